"""The app's datamodules: declared shapes, seeded splits, training-set standardisation,
generated problems that carry their structure, and file readers in the standard formats."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from lightning_imex.data import DATAMODULES, CIFAR10DataModule, Lorenz63DataModule, MNISTDataModule
from lightning_imex.data.generated import lorenz63_rk4

IN_CODE = sorted(n for n in DATAMODULES if n not in ("mnist", "cifar10"))


def make(name, tmp_path, **kwargs):
    root = {"root": str(tmp_path)} if name in ("mnist1d", "mnist", "cifar10") else {}
    dm = DATAMODULES[name](**root, **kwargs)
    dm.setup()
    return dm


@pytest.mark.parametrize("name", IN_CODE)
def test_declared_shapes_and_standardisation(name, tmp_path):
    cls = DATAMODULES[name]
    declared = (cls().input_shape, cls().num_outputs, cls().task)  # known before any data is read
    dm = make(name, tmp_path)
    assert (dm.input_shape, dm.num_outputs, dm.task) == declared
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == dm.input_shape and x.dtype == torch.float32
    if dm.task == "classification":
        assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < dm.num_outputs
    else:
        assert y.dtype == torch.float32 and y.shape[1:] == (dm.num_outputs,)
    train_x = dm.splits["train"].tensors[0]
    assert train_x.mean().abs() < 1e-4 and (train_x.std() - 1).abs() < 0.05  # training statistics
    assert not torch.allclose(dm.splits["test"].tensors[0].mean(), torch.tensor(0.0), atol=1e-6)


@pytest.mark.parametrize("name", IN_CODE)
def test_seeded_splits_are_reproducible_and_disjoint(name, tmp_path):
    a, b, c = make(name, tmp_path), make(name, tmp_path), make(name, tmp_path, seed=1)
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split].tensors[0], b.splits[split].tensors[0])
    assert not torch.equal(a.splits["val"].tensors[0], c.splits["val"].tensors[0])
    rows = {tuple(r.tolist()) for r in a.splits["train"].tensors[0].flatten(1)}
    assert not any(tuple(r.tolist()) in rows for r in a.splits["val"].tensors[0].flatten(1))
    first = [next(iter(a.train_dataloader()))[1] for _ in range(2)]
    assert torch.equal(*first)  # the shuffle order is seeded


def test_lorenz63_rk4_is_fourth_order_and_the_targets_are_its_flow_map():
    x0 = np.array([[1.0, 2.0, 20.0]])
    exact = lorenz63_rk4(x0, 0.1, 2000)
    errors = [np.abs(lorenz63_rk4(x0, 0.1, n) - exact).max() for n in (10, 20)]
    assert 14 < errors[0] / errors[1] < 18  # halving the step divides the error by 2^4
    dm = Lorenz63DataModule(n_trajectories=2, steps=5, burn_in=0, seed=3)
    x, y, _, _ = dm.arrays()
    np.testing.assert_allclose(y, lorenz63_rk4(x, dm.dt, 200), rtol=0, atol=1e-7)


def test_spirals_need_a_nonlinear_classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    dm = DATAMODULES["spirals"](seed=0)
    x, y, _, _ = dm.arrays()
    linear = LogisticRegression().fit(x[:1500], y[:1500]).score(x[1500:], y[1500:])
    neighbours = KNeighborsClassifier(5).fit(x[:1500], y[:1500]).score(x[1500:], y[1500:])
    assert linear < 0.75 < 0.95 < neighbours


def test_gaussians_targets_are_smooth_bumps():
    from sklearn.neighbors import KNeighborsRegressor
    dm = DATAMODULES["gaussians"](seed=0, noise=0.0)
    x, y, _, _ = dm.arrays()
    fit = KNeighborsRegressor(5).fit(x[:1500], y[:1500]).score(x[1500:], y[1500:])
    assert fit > 0.95 and y.std() > 0.1


def write_idx(path, array, gz=False):
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def write_mnist(folder, n=30, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix in ("train", "t10k"):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        arrays[prefix] = images, labels
    return arrays


@pytest.mark.parametrize("layout,gz", [(".", False), ("MNIST/raw", True)])
def test_mnist_reads_idx_files(tmp_path, layout, gz):
    arrays = write_mnist(tmp_path / layout, gz=gz)
    dm = MNISTDataModule(root=str(tmp_path), val_fraction=0.2)
    dm.check_files()
    x, y, x_test, y_test = dm.arrays()
    np.testing.assert_array_equal(x[:, 0] * 255, arrays["train"][0])
    np.testing.assert_array_equal(y_test, arrays["t10k"][1])
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [24, 6, 30]


def write_cifar(folder, n=8):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_reads_python_batches(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(root=str(tmp_path))
    x, y, x_test, y_test = dm.arrays()
    assert x.shape == (40, 3, 32, 32) and x_test.shape == (8, 3, 32, 32) and y.shape == (40,)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        second = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(x[8:16].reshape(8, -1) * 255, second[b"data"])


@pytest.mark.parametrize("cls,missing", [(MNISTDataModule, "train-images-idx3-ubyte"), (CIFAR10DataModule, "test_batch")])
def test_missing_files_name_the_files_and_folders(tmp_path, cls, missing):
    dm = cls(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"put .*{missing}.* in {tmp_path / 'nowhere'}"):
        dm.check_files()
    with pytest.raises(FileNotFoundError):
        dm.setup()


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "dataset.batch_size must be an integer >= 1"),
    (dict(val_fraction=1.0), r"dataset.val_fraction must be a number in \[0, 1\)"),
    (dict(num_workers=-1), "dataset.num_workers must be an integer >= 0"),
])
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DATAMODULES["digits"](**kwargs)

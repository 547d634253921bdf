"""The app's datamodules: declared shapes, seeded and disjoint splits, training-set
standardisation, generated problems that carry their structure, and file readers in the
standard formats (tiny synthetic files written here; nothing is downloaded)."""

import gzip
import pickle
import random

import numpy as np
import pytest
import torch

from lightning_imex.data import DATAMODULES, ArrayDataModule, CIFAR10DataModule, Lorenz63DataModule, MNISTDataModule
from lightning_imex.data.generated import lorenz63_rk4
from lightning_imex.data.text import PTBDataModule

FILES = ("mnist", "cifar10")
# the datamodules of arrays; the language-model ones (token windows) are tested in tests/test_language_model.py
ARRAYS = sorted(name for name, cls in DATAMODULES.items() if cls.task != "language_model")
IN_CODE = sorted(set(ARRAYS) - set(FILES))


# --- synthetic files in the standard formats ---------------------------------------------

def write_idx(path, array, gz=False):
    """IDX: 00 00 08 (unsigned bytes) ndim, the dimensions as big-endian int32, the data."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


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


def write_cifar(folder, n=8):
    """Pickled dicts as the official batches: b"data" uint8 (n, 3072), b"labels" a list."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                         b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    return batches


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A root per dataset that needs one: synthetic MNIST/CIFAR files, and one mnist1d
    cache shared by the tests (generating takes about a second)."""
    base = tmp_path_factory.mktemp("roots")
    write_mnist(base / "mnist", n=40)
    write_cifar(base / "cifar10", n=10)
    return {"mnist": base / "mnist", "cifar10": base / "cifar10", "mnist1d": base / "mnist1d"}


def make(name, roots, **kwargs):
    root = {"root": str(roots[name])} if name in roots else {}
    dm = DATAMODULES[name](**root, **kwargs)
    dm.setup()
    return dm


# --- every datamodule ------------------------------------------------------------------

@pytest.mark.parametrize("name", ARRAYS)
def test_batches_match_the_declared_shapes_and_task(name, roots):
    declared = DATAMODULES[name](root=str(roots[name] / "absent")) if name in roots else DATAMODULES[name]()
    assert not declared.splits  # the attributes come without reading any data
    dm = make(name, roots)
    assert (dm.input_shape, dm.num_outputs, dm.task) == (declared.input_shape, declared.num_outputs, declared.task)
    assert dm.task in ("classification", "regression")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.dtype == torch.float32 and x.shape == (len(x), *dm.input_shape) and len(x) <= dm.batch_size
        if dm.task == "classification":
            assert y.dtype == torch.int64 and y.shape == (len(x),)
            assert 0 <= y.min() and y.max() < dm.num_outputs
        else:
            assert y.dtype == torch.float32 and y.shape == (len(x), dm.num_outputs)


@pytest.mark.parametrize("name", ARRAYS)
def test_training_split_is_standardised_with_its_own_statistics(name, roots):
    dm = make(name, roots)
    x, y = dm.splits["train"][:]
    channels = (0, 2, 3) if x.ndim == 4 else (0,)  # images: per channel; vectors: per feature
    torch.testing.assert_close(x.double().mean(channels), torch.zeros(x.shape[1]).double(), rtol=0, atol=1e-5)
    std = x.double().std(channels, correction=0)
    assert torch.all(((std - 1).abs() < 1e-4) | (std == 0))  # constant features stay constant
    if dm.task == "regression":
        torch.testing.assert_close(y.double().mean(0), torch.zeros(dm.num_outputs).double(), rtol=0, atol=1e-5)
        torch.testing.assert_close(y.double().std(0, correction=0), torch.ones(dm.num_outputs).double(),
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ARRAYS)
def test_the_seed_fixes_data_splits_and_shuffle(name, roots):
    a, b, c = make(name, roots), make(name, roots), make(name, roots, seed=1)
    for split in ("train", "val", "test"):
        for ta, tb in zip(a.splits[split][:], b.splits[split][:]):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.splits["val"][:][0], c.splits["val"][:][0])
    first_batches = [next(iter(dm.train_dataloader()))[0] for dm in (a, a, c)]
    assert torch.equal(first_batches[0], first_batches[1]) and not torch.equal(first_batches[0], first_batches[2])
    loader = a.train_dataloader()
    epochs = [torch.cat([x for x, _ in loader]) for _ in range(2)]
    assert not torch.equal(*epochs)  # a plain loop over the loader again: the next epoch, a new order


class Indexed(ArrayDataModule):
    """Row ``i`` holds ``i`` and a random offset feature: each split says which rows it took."""

    input_shape, num_outputs, task = (2,), 1, "regression"
    n = 1000

    def arrays(self):
        rng = np.random.default_rng(123)
        x = np.stack([np.arange(self.n), 5 + 3 * rng.standard_normal(self.n)], 1)
        return x, x[:, 1:] ** 2, None, None


def test_splits_partition_the_pool_and_share_the_training_statistics():
    dm = Indexed(val_fraction=0.25, test_fraction=0.2)
    dm.setup()
    raw, _, _, _ = dm.arrays()
    mean, std = dm.splits["train"].mean, dm.splits["train"].std
    rows = {}
    for split in ("train", "val", "test"):
        x, _ = dm.splits[split][:]
        restored = (x.double() * std.double() + mean.double()).numpy()  # the same transform for every split
        rows[split] = np.rint(restored[:, 0]).astype(int)
        np.testing.assert_allclose(restored[:, 1], raw[rows[split], 1], rtol=0, atol=1e-4)
    assert {k: len(v) for k, v in rows.items()} == {"test": 200, "val": 200, "train": 600}
    assert sorted(np.concatenate(list(rows.values()))) == list(range(dm.n))  # disjoint and complete
    train_raw = raw[rows["train"]]
    np.testing.assert_allclose(mean.numpy(), train_raw.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), train_raw.std(0), rtol=1e-5)


@pytest.mark.parametrize("name", IN_CODE)
def test_pools_without_a_test_set_are_split_three_ways(name, roots):
    dm = make(name, roots)
    sizes = [len(dm.splits[s]) for s in ("train", "val", "test")]
    pool = len(dm.arrays()[0])
    if dm.has_test_set:
        assert sizes[0] + sizes[1] == pool
    else:
        assert sum(sizes) == pool and sizes[2] == int(np.ceil(dm.test_fraction * pool))


def test_loaders_work_in_worker_processes(roots):
    dm = make("spirals", roots, num_workers=1, batch_size=500)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (500, 2) and y.shape == (500,)


@pytest.mark.parametrize("name,kwargs,match", [
    ("digits", dict(batch_size=0), r"dataset.batch_size must be an integer >= 1, got 0"),
    ("digits", dict(val_fraction=1.0), r"dataset.val_fraction must be a number in \[0, 1\)"),
    ("digits", dict(num_workers=-1), "dataset.num_workers must be an integer >= 0"),
    ("digits", dict(seed=1.5), "dataset.seed must be an integer"),
    ("mnist", dict(test_fraction=0.1), "dataset.test_fraction: MNISTDataModule has its own test set"),
    ("spirals", dict(noise=-0.1), "dataset.noise must be a finite number >= 0"),
    ("lorenz63", dict(dt=0.0), "dataset.dt must be a finite number > 0"),
    ("gaussians", dict(input_dim=0), "dataset.input_dim must be an integer >= 1"),
])
def test_bad_arguments_name_the_field(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DATAMODULES[name](**kwargs)


# --- generated problems ----------------------------------------------------------------

def test_rk4_is_fourth_order():
    x0 = np.array([[1.0, 2.0, 20.0], [-5.0, -3.0, 30.0]])
    reference = lorenz63_rk4(x0, 0.1, 4000)
    errors = [np.abs(lorenz63_rk4(x0, 0.1, n) - reference).max() for n in (10, 20, 40)]
    ratios = errors[0] / errors[1], errors[1] / errors[2]
    assert all(13 < r < 19 for r in ratios), ratios  # halving the step divides the error by 2^4 = 16


def test_lorenz63_targets_are_the_flow_map_of_the_inputs():
    dm = Lorenz63DataModule(n_trajectories=3, steps=50, burn_in=100, seed=3)
    x, y, _, _ = dm.arrays()
    assert x.shape == y.shape == (150, 3)
    # independently: 20x finer RK4 steps. The data's steps (h = 1e-3) carry an error of
    # order h^4 |f''''| dt, about 1e-9 here; 1e-7 leaves room, yet a first-order scheme
    # (about 1e-3) or a wrong dt would fail it by orders of magnitude.
    np.testing.assert_allclose(y, lorenz63_rk4(x, dm.dt, 20 * dm.substeps), rtol=0, atol=1e-7)
    assert np.abs(y - x).max() > 0.1  # the map moves the states
    # trajectories are chained: each target is the next pair's input
    np.testing.assert_array_equal(y.reshape(3, 50, 3)[:, :-1], x.reshape(3, 50, 3)[:, 1:])
    assert 5 < x[:, 2].mean() < 45 and np.abs(x).max() < 60  # on the attractor (z around 24)


def test_spirals_need_a_nonlinear_classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    for n_classes in (2, 3):
        x, y, _, _ = DATAMODULES["spirals"](n_classes=n_classes, seed=0).arrays()
        assert np.bincount(y, minlength=n_classes).min() > 0.8 * len(y) / n_classes  # balanced classes
        linear = LogisticRegression().fit(x[:1500], y[:1500]).score(x[1500:], y[1500:])
        neighbours = KNeighborsClassifier(5).fit(x[:1500], y[:1500]).score(x[1500:], y[1500:])
        assert linear < 0.75 and neighbours > 0.95, (n_classes, linear, neighbours)


@pytest.mark.parametrize("input_dim", [2, 5])
def test_gaussians_are_smooth_nonlinear_bumps(input_dim):
    from sklearn.linear_model import LinearRegression
    from sklearn.neighbors import KNeighborsRegressor
    x, y, _, _ = DATAMODULES["gaussians"](input_dim=input_dim, noise=0.0, n_samples=4000, seed=0).arrays()
    assert x.shape == (4000, input_dim) and y.shape == (4000, 1) and y.std() > 0.1
    linear = LinearRegression().fit(x[:3000], y[:3000]).score(x[3000:], y[3000:])
    neighbours = KNeighborsRegressor(5).fit(x[:3000], y[:3000]).score(x[3000:], y[3000:])
    assert linear < 0.5 and neighbours > (0.95 if input_dim == 2 else 0.7), (linear, neighbours)
    noisy = DATAMODULES["gaussians"](input_dim=input_dim, noise=0.1, n_samples=4000, seed=0).arrays()[1]
    assert 0.08 < (noisy - y).std() < 0.12


def test_mnist1d_is_cached_by_its_arguments_and_leaves_global_generators_alone(tmp_path, monkeypatch):
    import mnist1d.data
    random.seed(7)
    np.random.seed(7)
    expected = random.random(), np.random.random()
    random.seed(7)
    np.random.seed(7)
    dm = DATAMODULES["mnist1d"](root=str(tmp_path))
    x, y, x_test, y_test = dm.arrays()
    assert (random.random(), np.random.random()) == expected
    assert x.shape == (4000, 40) and x_test.shape == (1000, 40) and set(np.unique(y)) == set(range(10))
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"] and tmp_path.iterdir().__next__().name.startswith("mnist1d-")

    def regenerate(*args):
        raise AssertionError("the cache was not used")
    monkeypatch.setattr(mnist1d.data, "make_dataset", regenerate)
    cached = DATAMODULES["mnist1d"](root=str(tmp_path)).arrays()
    for a, b in zip(cached, (x, y, x_test, y_test)):
        np.testing.assert_array_equal(a, b)
    monkeypatch.undo()
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    uncached = DATAMODULES["mnist1d"](root=str(not_a_folder)).arrays()  # cannot cache: still works
    np.testing.assert_array_equal(uncached[0], x)


# --- file readers ----------------------------------------------------------------------

@pytest.mark.parametrize("layout,gz", [(".", False), ("MNIST/raw", True)])
def test_mnist_reads_idx_files(tmp_path, layout, gz):
    arrays = write_mnist(tmp_path / layout, gz=gz)
    dm = MNISTDataModule(root=str(tmp_path), val_fraction=0.2)
    dm.check_files()
    x, y, x_test, y_test = dm.arrays()
    assert x.dtype == np.uint8 and x.shape == (30, 1, 28, 28)
    np.testing.assert_array_equal(x[:, 0], arrays["train"][0])
    np.testing.assert_array_equal(y, arrays["train"][1])
    np.testing.assert_array_equal(x_test[:, 0], arrays["t10k"][0])
    np.testing.assert_array_equal(y_test, arrays["t10k"][1])
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [24, 6, 30]
    assert dm.splits["train"].inputs.dtype == torch.uint8  # a quarter of float32's memory


def test_idx_reader_rejects_other_files(tmp_path):
    from lightning_imex.data.files import read_idx
    (tmp_path / "bad").write_bytes(bytes([0, 0, 13, 1]) + np.asarray([2], ">i4").tobytes() + b"\0" * 8)
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + np.asarray([5], ">i4").tobytes() + b"\0" * 3)
    with pytest.raises(ValueError, match=r"header says shape \(5,\), the file holds 3 values"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("layout", ["cifar-10-batches-py", "."])
def test_cifar10_reads_python_batches(tmp_path, layout):
    batches = write_cifar(tmp_path / layout)
    dm = CIFAR10DataModule(root=str(tmp_path))
    x, y, x_test, y_test = dm.arrays()
    assert x.shape == (40, 3, 32, 32) and x_test.shape == (8, 3, 32, 32) and x.dtype == np.uint8
    second = batches["data_batch_2"]
    np.testing.assert_array_equal(x[8:16].reshape(8, -1), second[b"data"])
    np.testing.assert_array_equal(y[8:16], second[b"labels"])
    # channel-major rows: the first 1024 values are the red plane
    np.testing.assert_array_equal(x_test[:, 0].reshape(8, -1), batches["test_batch"][b"data"][:, :1024])
    np.testing.assert_array_equal(y_test, batches["test_batch"][b"labels"])


@pytest.mark.parametrize("cls,folder", [(MNISTDataModule, "MNIST/raw"), (CIFAR10DataModule, "cifar-10-batches-py"),
                                        (PTBDataModule, "simple-examples/data")])
def test_missing_files_name_the_files_and_the_folders(tmp_path, cls, folder):
    root = tmp_path / "nowhere"
    dm = cls(root=str(root))  # construction reads nothing
    for check in (dm.check_files, dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as error:
            check()
        message = str(error.value)
        assert "\n" not in message and all(name in message for name in cls.files)
        assert str(root) in message and str(root / folder) in message and "http" in message


def test_missing_files_are_named_one_by_one(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]; looked in") as error:
        MNISTDataModule(root=str(tmp_path)).check_files()
    assert "missing train-" not in str(error.value)

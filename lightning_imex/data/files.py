"""MNIST and CIFAR-10 from their standard files under ``root``; nothing is ever
downloaded. :meth:`FileDataModule.check_files` (cheap; the app calls it before training,
``prepare_data`` and ``setup`` call it too) raises a one-line ``FileNotFoundError`` that
names the missing files, the folders searched and where to get them."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from .base import ArrayDataModule, Arrays, check_path

__all__ = ["CIFAR10DataModule", "FileDataModule", "MNISTDataModule", "read_cifar_batch", "read_idx"]


class FileDataModule(ArrayDataModule):
    """Reads ``files`` (each under one of ``suffixes``) from the first of ``folders``
    (relative to ``root``) that holds them all. Construction touches no file."""

    has_test_set = True
    files: tuple[str, ...]
    folders: tuple[str, ...]
    suffixes: tuple[str, ...] = ("",)
    source: str  # where to get the files

    def __init__(self, root: str = "data", **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = check_path("root", root)

    def _located(self, folder: Path) -> dict[str, Path | None]:
        return {name: next((folder / (name + s) for s in self.suffixes if (folder / (name + s)).is_file()), None)
                for name in self.files}

    def paths(self) -> dict[str, Path]:
        """Each file's path; ``FileNotFoundError`` when no folder holds them all."""
        folders = [Path(self.root) / folder for folder in self.folders]
        located = [self._located(folder) for folder in folders]
        for found in located:
            if all(found.values()):
                return found
        # name what is missing from the most complete folder: usually one file forgotten
        closest = max(located, key=lambda found: sum(p is not None for p in found.values()))
        missing = [name + ("[.gz]" if ".gz" in self.suffixes else "") for name, p in closest.items() if p is None]
        raise FileNotFoundError(
            f"dataset {type(self).__name__}: missing {', '.join(missing)}; looked in "
            f"{' and '.join(str(f) for f in folders)} (dataset.root={self.root!r}); put all of "
            f"{', '.join(self.files)} in one of them, they are never downloaded: get them from {self.source}")

    def check_files(self) -> None:
        self.paths()

    def prepare_data(self) -> None:
        self.check_files()


class MNISTDataModule(FileDataModule):
    """MNIST's 60000/10000 28x28 digits from the four IDX files (each optionally
    gzipped) in ``root`` or ``root/MNIST/raw`` (torchvision's layout). Held in memory as
    uint8 (55 MB) and standardised per sample as it is read."""

    input_shape, num_outputs, task = (1, 28, 28), 10, "classification"
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    folders, suffixes = (".", "MNIST/raw"), ("", ".gz")
    source = "https://yann.lecun.com/exdb/mnist/ or a mirror such as https://ossci-datasets.s3.amazonaws.com/mnist/"

    def arrays(self) -> Arrays:
        x, y, x_test, y_test = (read_idx(path) for path in self.paths().values())
        return x[:, None], y, x_test[:, None], y_test


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format): magic ``00 00 08 D`` for ``D``
    dimensions, the dimensions as big-endian int32, then the data; gzipped if the name
    ends in ``.gz``."""
    with (gzip.open if Path(path).suffix == ".gz" else open)(path, "rb") as f:
        raw = bytearray(f.read())  # writable: torch shares the memory rather than copy it
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()}, expected 000008..)")
    dims = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", dims, 4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
    if data.size != np.prod(shape):
        raise ValueError(f"{path}: the header says shape {shape}, the file holds {data.size} values")
    return data.reshape(shape)


class CIFAR10DataModule(FileDataModule):
    """CIFAR-10's 50000/10000 32x32 colour images from the python batches
    (``data_batch_1`` ... ``data_batch_5``, ``test_batch``) in ``root/cifar-10-batches-py``
    or ``root``. Held in memory as uint8 (185 MB) and standardised per sample as it is
    read."""

    input_shape, num_outputs, task = (3, 32, 32), 10, "classification"
    files = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
    folders = ("cifar-10-batches-py", ".")
    source = "https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version, unpacked)"

    def arrays(self) -> Arrays:
        batches = [read_cifar_batch(path) for path in self.paths().values()]
        x, y = (np.concatenate(part) for part in zip(*batches[:5]))
        return x, y, *batches[5]


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: a pickled dict whose ``b"data"`` holds uint8 rows of
    3072 values (1024 red, then green, then blue, row-major) and ``b"labels"`` the
    classes."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the official format is a pickle: read files you trust
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (a dict with b'data' and b'labels')")
    return np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], np.int64)

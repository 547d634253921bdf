"""MNIST and CIFAR-10 from their standard files under ``root``; nothing is ever
downloaded. :meth:`check_files` says which files are missing and where to put them."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from .base import ArrayDataModule, Arrays

__all__ = ["CIFAR10DataModule", "MNISTDataModule", "read_idx"]


class FileDataModule(ArrayDataModule):
    """Reads ``files`` from the first of ``folders`` (relative to ``root``) that holds them."""

    files: tuple[str, ...]
    folders: tuple[str, ...]
    source: str
    suffixes: tuple[str, ...] = ("",)

    def __init__(self, root: str = "data", **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root

    def _find(self) -> dict[str, Path] | list[Path]:
        """Each file's path, or the folders searched when some are missing."""
        searched = [Path(self.root) / folder for folder in self.folders]
        for folder in searched:
            found = {name: next((folder / (name + s) for s in self.suffixes if (folder / (name + s)).is_file()), None)
                     for name in self.files}
            if all(found.values()):
                return found
        return searched

    def check_files(self) -> None:
        found = self._find()
        if isinstance(found, list):
            folders = " or ".join(str(f) for f in found)
            raise FileNotFoundError(
                f"dataset {self.source}: put {', '.join(self.files)} in {folders} (dataset.root={self.root!r}); "
                f"they are never downloaded, get them from {self.url}")

    def _paths(self) -> dict[str, Path]:
        self.check_files()
        return self._find()


class MNISTDataModule(FileDataModule):
    """MNIST's 60000/10000 28x28 digits from the four IDX files (optionally gzipped),
    in ``root`` or ``root/MNIST/raw``. Held in memory as float32 (about 220 MB)."""

    input_shape, num_outputs, task = (1, 28, 28), 10, "classification"
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    folders, suffixes, source = (".", "MNIST/raw"), ("", ".gz"), "mnist"
    url = "https://yann.lecun.com/exdb/mnist/ (or any mirror)"

    def arrays(self) -> Arrays:
        paths = self._paths()
        x, y, x_test, y_test = (read_idx(paths[name]) for name in self.files)
        return x[:, None].astype(np.float32) / 255, y, x_test[:, None].astype(np.float32) / 255, y_test


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic ``0x0000 08 D`` for unsigned bytes in ``D``
    dimensions, the dimensions as big-endian int32, then the data."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    dims = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", dims, 4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
    if data.size != np.prod(shape):
        raise ValueError(f"{path}: header says {shape}, the file holds {data.size} values")
    return data.reshape(shape)


class CIFAR10DataModule(FileDataModule):
    """CIFAR-10's 50000/10000 32x32 colour images from the python batches
    (``data_batch_1`` ... ``data_batch_5``, ``test_batch``) in ``root/cifar-10-batches-py``
    or ``root``. Held in memory as float32 (about 740 MB)."""

    input_shape, num_outputs, task = (3, 32, 32), 10, "classification"
    files = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
    folders, source = ("cifar-10-batches-py", "."), "cifar10"
    url = "https://www.cs.toronto.edu/~kriz/cifar.html (the python version)"

    def arrays(self) -> Arrays:
        paths = self._paths()
        batches = [_cifar_batch(paths[name]) for name in self.files]
        x = np.concatenate([b[0] for b in batches[:5]])
        y = np.concatenate([b[1] for b in batches[:5]])
        return x, y, *batches[5]


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        # the official batches are pickles: read only files you trust
        batch = pickle.load(f, encoding="bytes")
    x = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).astype(np.float32) / 255
    return x, np.asarray(batch[b"labels"], np.int64)

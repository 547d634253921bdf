"""What every datamodule of the app shares: arrays in memory, a seeded train/validation
(and, where the data has none, test) split, standardisation with training statistics,
and DataLoaders whose shuffling is seeded too."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["ArrayDataModule", "Arrays"]

# (x_train, y_train, x_test, y_test); x_test None: the test set is carved from the pool
Arrays = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]

TASKS = ("classification", "regression")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"dataset.{name} must be an integer >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"dataset.{name} must be a number in [0, 1), got {value!r}")


class ArrayDataModule(L.LightningDataModule):
    """A dataset held in memory. Subclasses set ``input_shape``, ``num_outputs`` and
    ``task`` (known before any data is read) and implement :meth:`arrays`.

    Args:
        batch_size: training and evaluation batch size.
        num_workers: DataLoader worker processes.
        seed: fixes generated data, the splits and the training shuffle order.
        val_fraction: share of the training pool held out for validation.
        test_fraction: share of the pool held out for testing, where the data has no
            test set of its own.
    """

    input_shape: tuple[int, ...]
    num_outputs: int
    task: str

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.splits: dict[str, TensorDataset] = {}

    def arrays(self) -> Arrays:
        """Inputs shaped ``(N, *input_shape)``; class indices, or targets shaped
        ``(N, num_outputs)``."""
        raise NotImplementedError

    def check_files(self) -> None:
        """Raises ``FileNotFoundError`` naming what is missing; in-code data needs none."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y, x_test, y_test = self.arrays()
        rng = np.random.default_rng(self.seed)
        if x_test is None:
            x, y, x_test, y_test = _split(rng, x, y, self.test_fraction)
        x_train, y_train, x_val, y_val = _split(rng, x, y, self.val_fraction)
        x_mean, x_std = _statistics(x_train, per_channel=len(self.input_shape) == 3)
        standard = [(x_train, y_train), (x_val, y_val), (x_test, y_test)]
        if self.task == "regression":
            y_mean, y_std = _statistics(y_train, per_channel=False)
            standard = [(xs, (ys - y_mean) / y_std) for xs, ys in standard]
        for name, (xs, ys) in zip(("train", "val", "test"), standard):
            inputs = torch.as_tensor(((xs - x_mean) / x_std).astype(np.float32))
            targets = torch.as_tensor(ys.astype(np.int64 if self.task == "classification" else np.float32))
            self.splits[name] = TensorDataset(inputs, targets)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


def _split(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, fraction: float) -> Arrays:
    order = rng.permutation(len(x))
    held = math.ceil(fraction * len(x)) if fraction else 0
    keep, out = order[held:], order[:held]
    return x[keep], y[keep], x[out], y[out]


def _statistics(a: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over samples (and pixels, per channel, for images);
    constant features keep scale 1."""
    axes = (0, 2, 3) if per_channel else 0
    mean = a.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = a.std(axis=axes, keepdims=True, dtype=np.float64)
    return mean[0], np.where(std > 0, std, 1.0)[0]

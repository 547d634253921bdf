"""What every datamodule of the app shares: arrays in memory, a seeded train/validation
(and, where the data has none, test) split, standardisation with training statistics,
and DataLoaders: the training one shuffled in a seeded order per epoch that a resumed fit
continues exactly (:mod:`.resumable`), the others in the data's order."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..validate import fraction, integer, is_integer
from .resumable import EpochSampler, ResumableDataLoader

__all__ = ["ArrayDataModule", "Arrays", "StandardizedDataset"]

# (x_train, y_train, x_test, y_test); x_test None: the test set is carved from the pool
Arrays = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]

DEFAULT_TEST_FRACTION = 0.2
STATISTICS_CHUNK = 4096  # samples per pass: a float64 copy of all CIFAR-10 pixels would take 1.1 GB


def check_path(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"dataset.{name} must be a folder path, got {value!r}")
    return str(value)


class StandardizedDataset(Dataset):
    """``(inputs[i] - mean) / std`` as float32, with its target. Inputs stay as stored
    (uint8 for image files: a quarter of float32's memory) and are standardised when read;
    ``dataset[:]`` gives the whole split."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.inputs, self.targets, self.mean, self.std = inputs, targets, mean, std

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.inputs[index].to(torch.float32) - self.mean) / self.std, self.targets[index]


class ArrayDataModule(L.LightningDataModule):
    """A dataset held in memory. Subclasses set ``input_shape``, ``num_outputs`` and
    ``task`` (known right after construction, before any data is read), set
    ``has_test_set`` when the data comes with its own test split, and implement
    :meth:`arrays`.

    Args:
        batch_size: training and evaluation batch size.
        num_workers: DataLoader worker processes.
        seed: fixes generated data, the splits and every epoch's training order.
        val_fraction: share of the training pool held out for validation.
        test_fraction: share of the pool held out for testing (default 0.2); only for
            data without a test set of its own.
    """

    input_shape: tuple[int, ...]
    num_outputs: int
    task: str  # "classification" (int64 class indices) or "regression" (float32 (N, num_outputs))
    has_test_set = False

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float | None = None) -> None:
        super().__init__()
        integer("dataset.batch_size", batch_size, 1)
        integer("dataset.num_workers", num_workers, 0)
        integer("dataset.seed", seed, 0)
        fraction("dataset.val_fraction", val_fraction)
        if test_fraction is not None and self.has_test_set:
            raise ValueError(f"dataset.test_fraction: {type(self).__name__} has its own test set; leave it unset")
        test_fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        fraction("dataset.test_fraction", test_fraction)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.splits: dict[str, StandardizedDataset] = {}

    def arrays(self) -> Arrays:
        """Inputs shaped ``(N, *input_shape)`` (any real dtype); class indices shaped
        ``(N,)``, or targets shaped ``(N, num_outputs)``. Test arrays are None unless
        ``has_test_set``."""
        raise NotImplementedError

    def check_files(self) -> None:
        """Raises ``FileNotFoundError`` naming what is missing; in-code data needs none."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y, x_test, y_test = self.arrays()
        rng = np.random.default_rng(self.seed)
        if not self.has_test_set:
            x, y, x_test, y_test = _split(rng, x, y, self.test_fraction)
        x_train, y_train, x_val, y_val = _split(rng, x, y, self.val_fraction)
        # images: one mean and scale per channel; vectors: per feature
        mean, std = _statistics(x_train, axes=(0, 2, 3) if len(self.input_shape) == 3 else (0,))
        parts = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
        if self.task == "regression":  # targets are small: standardise them once, in float64
            y_mean, y_std = _statistics(y_train, axes=(0,))
            parts = {name: (xs, (ys - y_mean) / y_std) for name, (xs, ys) in parts.items()}
        target_dtype = np.int64 if self.task == "classification" else np.float32
        mean, std = (torch.from_numpy(stat.astype(np.float32)) for stat in (mean, std))
        for name, (xs, ys) in parts.items():
            stored = xs if xs.dtype == np.uint8 else xs.astype(np.float32)
            self.splits[name] = StandardizedDataset(torch.from_numpy(np.ascontiguousarray(stored)),
                                                    torch.from_numpy(ys.astype(target_dtype)), mean, std)

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(self.splits[split], batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=_own_generator(self.seed))

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled: epoch ``e``'s order is :func:`~lightning_imex.data.resumable.epoch_order`
        ``(len, seed, e)``, this process's share of it under DDP, and the loader's state in a
        checkpoint resumes an interrupted epoch at its next batch
        (:class:`~lightning_imex.data.resumable.ResumableDataLoader`)."""
        self.setup()
        dataset = self.splits["train"]
        loader = ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=EpochSampler(dataset, seed=self.seed),
                                     num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                     generator=_own_generator(self.seed))
        loader.batches_per_epoch = _limited(len(loader), getattr(self.trainer, "limit_train_batches", None))
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


def _limited(length: int, limit: Any) -> int | None:
    """The batches of ``length`` that Lightning's ``limit_train_batches`` lets an epoch
    use (as Lightning 2.6's ``_parse_num_batches`` counts them), None without a limit."""
    if is_integer(limit):
        return min(length, limit)
    if isinstance(limit, float) and limit != 1.0:
        return int(length * limit)
    return None


def _own_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: making an iterator (its workers' base seed) then
    draws no number from the global one, whose state a checkpoint restores for the
    training step's own draws (dropout)."""
    return torch.Generator().manual_seed(seed)


def _split(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, share: float) -> Arrays:
    """The pool minus a random ``share`` of it, and that share (copies, in a
    seeded random order)."""
    order = rng.permutation(len(x))
    held = math.ceil(share * len(x))
    keep, out = order[held:], order[:held]
    return x[keep], y[keep], x[out], y[out]


def _statistics(a: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over ``axes`` (samples first), shaped to
    broadcast against one sample, in two float64 passes over chunks of samples; constant
    features keep scale 1."""
    mean = a.mean(axis=axes, dtype=np.float64, keepdims=True)
    chunks = range(0, len(a), STATISTICS_CHUNK)
    squares = sum(((a[i:i + STATISTICS_CHUNK] - mean) ** 2).sum(axis=axes, keepdims=True) for i in chunks)
    std = np.sqrt(squares / (a.size / mean.size))
    return mean[0], np.where(std > 0, std, 1.0)[0]

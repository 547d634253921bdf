"""The app's datasets as LightningDataModules, by name. None is ever downloaded: bundled
with scikit-learn or Python, generated in code (offline), or read from the user's files."""

from collections.abc import Mapping

from .base import ArrayDataModule
from .files import CIFAR10DataModule, MNISTDataModule
from .generated import (DiabetesDataModule, DigitsDataModule, GaussiansDataModule, Lorenz63DataModule,
                        MNIST1DDataModule, SpiralsDataModule)
from .resumable import EpochSampler, ResumableDataLoader, epoch_order
from .text import PTBDataModule, PydocTopicsDataModule, TextDataModule

DATAMODULES: Mapping[str, type[ArrayDataModule]] = {
    "digits": DigitsDataModule,
    "diabetes": DiabetesDataModule,
    "mnist1d": MNIST1DDataModule,
    "spirals": SpiralsDataModule,
    "gaussians": GaussiansDataModule,
    "lorenz63": Lorenz63DataModule,
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "pydoc_topics": PydocTopicsDataModule,
    "ptb": PTBDataModule,
}

__all__ = ["DATAMODULES", "ArrayDataModule", "EpochSampler", "ResumableDataLoader", "TextDataModule", "epoch_order",
           *(cls.__name__ for cls in DATAMODULES.values())]

"""Small Lightning fixtures shared by the Lightning tests: one classifier on IMEXModule, on
a plain LightningModule and on the factory; in-memory data, a quiet Trainer, and the rows
a CSVLogger wrote."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from conftest import make_data
from torch import nn
from torch.nn import functional as F

from lightning_imex import IMEXModule, configure_optimizers, gradient_evaluation
from lightning_imex.optim import IMEXAdam


class ClassifierBody:
    """The network and steps the Lightning tests train, whatever the module's base."""

    def build(self, hidden: int, batch_norm: bool, dropout: float = 0.0) -> None:
        torch.manual_seed(0)
        norm = [nn.BatchNorm1d(hidden)] if batch_norm else []
        drop = [nn.Dropout(dropout)] if dropout else []
        self.net = nn.Sequential(nn.Linear(6, hidden), *norm, nn.Tanh(), *drop, nn.Linear(hidden, 3))
        self.calls = 0
        self.poison: tuple[int, int] | None = None  # (global step, gradient evaluation) whose loss is poisoned
        self.poison_value = float("nan")  # what the loss is multiplied by there

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.poison == (self.trainer.global_step, gradient_evaluation(self)):
            loss = loss * self.poison_value
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


class Classifier(ClassifierBody, IMEXModule):
    def __init__(self, hidden: int = 16, batch_norm: bool = False, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.build(hidden, batch_norm, dropout)


class PlainClassifier(ClassifierBody, L.LightningModule):
    """A plain LightningModule whose configure_optimizers returns our optimizer itself."""

    def __init__(self, optimizer: dict, hidden: int = 16, batch_norm: bool = False):
        super().__init__()
        self.optimizer_spec = dict(optimizer)
        self.build(hidden, batch_norm)

    def configure_optimizers(self):
        return IMEXAdam(self.parameters(), **{k: v for k, v in self.optimizer_spec.items() if k != "name"})


class FactoryClassifier(PlainClassifier):
    """A plain LightningModule using the one-line factory."""

    def configure_optimizers(self):
        return configure_optimizers(self, self.optimizer_spec)


MODULE_KINDS = [Classifier, PlainClassifier, FactoryClassifier]


def loader(n: int = 64, batch_size: int = 16, seed: int = 1) -> torch.utils.data.DataLoader:
    x, _ = make_data(seed=seed, n=n)
    y = x[:, :3].argmax(1)  # learnable labels
    # its own generator: making an iterator draws no number from the global one
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size,
                                       generator=torch.Generator())


def trainer(tmp_path: Path | None = None, **kwargs) -> L.Trainer:
    """A CPU Trainer; with ``tmp_path``, a CSVLogger there logging every step."""
    options = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                   logger=False, enable_checkpointing=False, log_every_n_steps=1)
    if tmp_path is not None:
        options.update(logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""), default_root_dir=tmp_path)
    options.update(kwargs)
    return L.Trainer(**options)


def logged_rows(trainer: L.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]

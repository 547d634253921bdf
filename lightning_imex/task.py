"""The module the app trains: a network from ``lightning_imex.models`` on a datamodule's
classification or regression task, with torchmetrics metrics, on ``IMEXModule``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Accuracy, MeanMetric, MeanSquaredError, Metric

from .factory import to_plain
from .models import build_model
from .module import IMEXModule

__all__ = ["TASKS", "SupervisedTask"]

TASKS = ("classification", "regression")
STAGES = ("train", "val", "test")


class SupervisedTask(IMEXModule):
    """Logs ``{stage}/loss`` and ``{stage}/acc`` (classification) or ``{stage}/mse``
    (regression) for the train, val and test stages; the remaining arguments are
    :class:`~lightning_imex.IMEXModule`'s.

    Every logged value is a torchmetrics metric: an epoch value is the mean over all
    processes (the metric syncs once, when it computes), while the training loss's step
    value (``train/loss_step``) stays the process's own, with no collective per step."""

    def __init__(self, model: Mapping[str, Any], input_shape: Sequence[int], num_outputs: int,
                 task: str = "classification", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.save_hyperparameters()
        self.net = build_model(to_plain(model, "model"), input_shape, num_outputs)
        self.example_input_array = torch.zeros(1, *input_shape)  # the model summary's sizes and FLOPs
        self.task, self.metric_name = task, "acc" if task == "classification" else "mse"
        self.metrics = nn.ModuleDict({f"{stage}_{self.metric_name}": self._metric(num_outputs) for stage in STAGES})
        # the mean loss per sample, as Lightning's own mean of logged tensors (weighted by batch size)
        self.metrics.update({f"{stage}_loss": MeanMetric() for stage in STAGES})

    def logged_metrics(self) -> set[str]:
        """The names a fit logs (what a callback's or the schedule's ``monitor`` can
        watch): the training and validation loss and metric, and what
        :class:`~lightning_imex.IMEXModule` logs under its clipping settings."""
        names = {"train/loss", "train/loss_step", "train/loss_epoch", f"train/{self.metric_name}", "val/loss",
                 f"val/{self.metric_name}"}
        if self.clipping.log:
            names |= {"grad_norm", "grad_clipped"} if self.clipping.algorithm != "off" else {"grad_norm"}
            names |= {"skipped_steps"} if self.clipping.nonfinite == "skip" else set()
        return names

    def _metric(self, num_outputs: int) -> Metric:
        if self.task == "classification":
            return Accuracy(task="multiclass", num_classes=num_outputs)
        return MeanSquaredError()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: Sequence[Tensor], stage: str) -> Tensor:
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out, y) if self.task == "classification" else F.mse_loss(out, y)
        metric, mean_loss = self.metrics[f"{stage}_{self.metric_name}"], self.metrics[f"{stage}_loss"]
        metric(out, y)
        mean_loss(loss.detach(), weight=y.shape[0])
        self.log(f"{stage}/loss", mean_loss, on_step=stage == "train", on_epoch=True, prog_bar=True)
        self.log(f"{stage}/{self.metric_name}", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

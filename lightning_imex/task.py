"""The module the app trains: a network from ``lightning_imex.models`` on a datamodule's
classification, regression or language-modelling task, with torchmetrics metrics, on
``IMEXModule``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Accuracy, MeanMetric, MeanSquaredError, Metric

from .models import LSTMLanguageModel, ResNet, ResidualBlock, build_model
from .module import IMEXModule
from .plain import to_plain
from .sharding import mixed_precision_policy, shard_blocks

__all__ = ["TASKS", "Perplexity", "SupervisedTask"]

TASKS = ("classification", "regression", "language_model")
STAGES = ("train", "val", "test")
METRIC_NAMES = {"classification": "acc", "regression": "mse", "language_model": "ppl"}


class Perplexity(MeanMetric):
    """``exp`` of the mean of the losses it is given (weighted: by the number of tokens
    each loss averages), i.e. the perplexity of the tokens seen so far. Its state is
    :class:`~torchmetrics.MeanMetric`'s, summed across processes once, when it computes."""

    def compute(self) -> Tensor:
        return super().compute().exp()


class SupervisedTask(IMEXModule):
    """Logs ``{stage}/loss`` and ``{stage}/acc`` (classification), ``{stage}/mse``
    (regression) or ``{stage}/ppl`` (language model: the loss is the cross-entropy of
    every token, the perplexity ``exp`` of its mean over the epoch's tokens) for the train,
    val and test stages; the remaining arguments are :class:`~lightning_imex.IMEXModule`'s.

    Every logged value is a torchmetrics metric: an epoch value is the mean over all
    processes (the metric syncs once, when it computes), while the training loss's step
    value (``train/loss_step``) stays the process's own, with no collective per step."""

    def __init__(self, model: Mapping[str, Any], input_shape: Sequence[int], num_outputs: int,
                 task: str = "classification", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.save_hyperparameters()
        self.net = build_model(to_plain(model, "model"), input_shape, num_outputs, task)
        self.input_shape = tuple(input_shape)
        self.task, self.metric_name = task, METRIC_NAMES[task]
        self.metrics = nn.ModuleDict({f"{stage}_{self.metric_name}": self._metric(num_outputs) for stage in STAGES})
        # the mean loss per sample (per token for a language model), as Lightning's own mean of logged tensors
        # (weighted by batch size)
        self.metrics.update({f"{stage}_loss": MeanMetric() for stage in STAGES})


    @property
    def example_input_array(self) -> torch.Tensor:
        """The model summary's input (sizes and FLOPs): token ids for a language model, else
        zeros in the weights' dtype (``bf16-true`` converts them)."""
        dtype = torch.int64 if self.task == "language_model" else next(self.net.parameters()).dtype
        return torch.zeros(1, *self.input_shape, dtype=dtype)

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
        return Perplexity() if self.task == "language_model" else MeanSquaredError()

    def configure_model(self) -> None:
        """Under a sharding strategy (``strategy=fsdp``/``fsdp_cpu``, which gives the
        module a device mesh) the network is sharded with FSDP2 (:func:`shard_blocks`):
        one unit per residual block of a ResNet, per LSTM, embedding and linear layer of
        the language model (the LSTM alone when the decoder ties its weights to the
        embedding: the root holds both), per linear and convolution layer of the other
        networks; BatchNorm layers and the rest belong to the root unit, the network.
        Weights are gathered in ``bf16`` under ``trainer.precision=bf16-mixed``
        (gradients reduced in fp32, the shards and optimizer state in fp32). On GPUs
        BatchNorm becomes ``SyncBatchNorm`` (statistics over the whole batch, as
        ``strategy=ddp``'s ``sync_batchnorm``); on CPU processes they stay per process."""
        mesh = self.device_mesh
        if mesh is None:  # a strategy that does not shard
            return
        if self.trainer.strategy.root_device.type != "cpu":
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        shard_blocks(self.net, mesh["data_parallel"], block_types=self._shard_block_types(),
                     mp_policy=mixed_precision_policy(self.trainer.precision))

    def _shard_block_types(self) -> tuple[type[nn.Module], ...]:
        if isinstance(self.net, ResNet):
            return ResidualBlock, nn.Linear
        if isinstance(self.net, LSTMLanguageModel):
            tied = self.net.decoder.weight is self.net.embedding.weight
            return (nn.LSTM,) if tied else (nn.LSTM, nn.Embedding, nn.Linear)
        return nn.Linear, nn.Conv2d

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: Sequence[Tensor], stage: str) -> Tensor:
        x, y = batch
        out = self(x)
        # a language model's (batch, bptt, vocabulary) logits: one classification per token
        loss = F.mse_loss(out, y) if self.task == "regression" else F.cross_entropy(out.flatten(0, -2), y.flatten())
        metric, mean_loss = self.metrics[f"{stage}_{self.metric_name}"], self.metrics[f"{stage}_loss"]
        targets = y.numel() if self.task == "language_model" else y.shape[0]  # the batch's weight in the means
        if self.task == "language_model":
            metric(loss.detach(), weight=targets)
        else:
            metric(out, y)
        mean_loss(loss.detach(), weight=targets)
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

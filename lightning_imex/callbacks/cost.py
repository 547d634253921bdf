"""``TrainingCost``: what a fit spent, logged beside its losses, so that optimizers are
compared by gradient evaluations and wall-clock rather than by steps (a two-gradient
method's step costs two forward and backward passes)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import lightning as L
import torch

from .. import _lightning

__all__ = ["DIGESTED_BATCHES", "TrainingCost"]

DIGESTED_BATCHES = 16  # the first training batches whose contents are fingerprinted


class TrainingCost(L.Callback):
    """Counts gradient evaluations (backward passes: one per closure call, whatever the
    optimizer) and the seconds spent in training steps, and logs both with every
    training step the loggers record (``log_every_n_steps``) as
    ``cost/gradient_evaluations`` and ``cost/train_seconds``.

    The seconds are the wall-clock of the training batches (forward, backward, optimizer
    step); data loading between batches and validation are left out. On CUDA the batches
    the loggers record, and the fit's end, wait for the device, so that the time logged is
    the kernels' and not the launches' (the batches in between do not: a synchronisation
    per step would slow the training it measures).
    Both counters (and the digests below) are checkpointed: a resumed fit goes on counting.

    For checking a comparison's fairness, :attr:`initial_weights` is a digest of the
    weights when a fresh fit starts and :attr:`batch_digests` those of its first
    ``DIGESTED_BATCHES`` training batches (same seed, same digests: same initial model and
    data order).

    Every fit counts from zero (a resumed one from the checkpoint's counters): a callback
    reused for a second fit does not add it to the first's."""

    def __init__(self) -> None:
        self._new_fit()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before a resumed fit loads its counters
            self._new_fit()

    def _new_fit(self) -> None:
        self.gradient_evaluations = 0
        self.train_seconds = 0.0
        self.initial_weights: str | None = None
        self.batch_digests: list[str] = []
        self._batch_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and self.gradient_evaluations == 0:
            self.initial_weights = _digest(pl_module.state_dict().values())

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.initial_weights is not None and len(self.batch_digests) < DIGESTED_BATCHES:
            self.batch_digests.append(_digest(batch if isinstance(batch, (list, tuple)) else [batch]))
        self._batch_start = time.perf_counter()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.gradient_evaluations += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        logged = _lightning.logs_this_step(trainer)
        if logged and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        if self._batch_start is not None:
            self.train_seconds += time.perf_counter() - self._batch_start
            self._batch_start = None
        if logged:  # self.log costs as much as a small model's step: only where the loggers write
            pl_module.log("cost/gradient_evaluations", float(self.gradient_evaluations), on_step=True, on_epoch=False)
            pl_module.log("cost/train_seconds", self.train_seconds, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":  # the last batches' kernels, still queued
            start = time.perf_counter()
            torch.cuda.synchronize(pl_module.device)
            self.train_seconds += time.perf_counter() - start

    def state_dict(self) -> dict[str, Any]:
        return {"gradient_evaluations": self.gradient_evaluations, "train_seconds": self.train_seconds,
                "initial_weights": self.initial_weights, "batch_digests": list(self.batch_digests)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.gradient_evaluations = int(state_dict["gradient_evaluations"])
        self.train_seconds = float(state_dict["train_seconds"])
        self.initial_weights = state_dict.get("initial_weights")
        self.batch_digests = list(state_dict.get("batch_digests", []))


def _digest(tensors: Any) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            if hasattr(tensor, "full_tensor"):  # a shard (DTensor, FSDP2): the digest is the whole tensor's
                tensor = tensor.full_tensor()
            sha.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]

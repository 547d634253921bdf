"""``PostHocEMA``: tracks power-function EMAs of the weights and writes snapshots of them
into the run folder, from which ``lightning-imex-posthoc-ema`` rebuilds the EMA of any
width after training (Karras et al. 2024, EDM2; docs/algorithms.md, section 7)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..ema_posthoc import SNAPSHOT_DTYPES, PowerEMA, find_snapshots, save_snapshot
from ..validate import boolean, choice, integer
from .ema import SHARDED

__all__ = ["PostHocEMA"]

FOLDER = "posthoc_ema"


class PostHocEMA(L.Callback):
    r"""Power-function EMAs ``e_t = beta_t e_{t-1} + (1 - beta_t) theta_t``,
    ``beta_t = (1 - 1/t)^(gamma + 1)`` (``t``: the trainer's optimizer step), one per width
    in ``sigma_rels``, saved every ``snapshot_every`` steps and at the end of fit.

    Args:
        sigma_rels: the tracked widths (relative to the training length), each in
            (0, 1/sqrt(12)); two (EDM2's 0.05 and 0.10) let any width in between, and
            some beyond, be rebuilt.
        snapshot_every: optimizer steps between snapshots. More snapshots fit the target
            profiles better (``lightning-imex-posthoc-ema`` prints each fit's residual).
        update_every: update every N optimizer steps, the skipped steps' weight given to
            the weights at the update (``beta = (s/t)^(gamma + 1)`` from step ``s``).
        snapshot_dtype: ``float32`` or ``bfloat16`` (half the disk; each weight then
            carries bf16's relative rounding, up to 2^-8: a rebuilt average is within about
            2e-3 relative L2 of the tracked one, not float32's 1e-6).
        dirpath: the snapshot folder; default ``<trainer.default_root_dir>/posthoc_ema``
            (the app's run folder).
        include_buffers: average floating-point buffers too (BatchNorm statistics); the
            other entries of the ``state_dict`` are saved as they are at each snapshot.
        device: where the averages live (e.g. ``"cpu"``); ``None``: beside each weight.

    Cost: ``len(sigma_rels)`` copies of the averaged tensors in memory (fp32, or the
    weights' dtype); on disk ``len(sigma_rels)`` copies per snapshot in ``snapshot_dtype``,
    written by rank zero at the step they are taken (temporary file, then renamed).
    Checkpoints hold the averages (callback state), so a resumed fit continues exactly; a
    fit that resumes from step ``s`` removes the folder's snapshots after ``s``, which
    the interrupted run wrote (an app run resumed into a new run folder writes the later
    snapshots there: rebuild from one folder holding both runs' files). A fit that starts
    from step 0 needs a folder without snapshots. A step skipped for non-finite gradients
    is a step of the time axis whose weights did not change.
    """

    def __init__(self, sigma_rels: tuple[float, ...] | list[float] = (0.05, 0.10), snapshot_every: int = 1000, *,
                 update_every: int = 1, snapshot_dtype: str = "float32", dirpath: str | os.PathLike | None = None,
                 include_buffers: bool = True, device: str | torch.device | None = None) -> None:
        if isinstance(sigma_rels, (int, float)) or not hasattr(sigma_rels, "__iter__"):
            raise ValueError(f"sigma_rels must be a list of widths in (0, 0.2887), got {sigma_rels!r}")
        integer("snapshot_every", snapshot_every, 1)
        integer("update_every", update_every, 1)
        if snapshot_every % update_every:
            raise ValueError(f"snapshot_every must be a multiple of update_every ({update_every}), "
                             f"got {snapshot_every}")
        choice("snapshot_dtype", snapshot_dtype, SNAPSHOT_DTYPES)
        boolean("include_buffers", include_buffers)
        self.ema = PowerEMA(list(sigma_rels), device)  # checks the widths and the device
        self.snapshot_every, self.update_every, self.snapshot_dtype = snapshot_every, update_every, snapshot_dtype
        self.dirpath, self.include_buffers = dirpath, include_buffers
        self.last_snapshot = 0  # the step of the last snapshot written
        self._tracked: list[Tensor] | None = None

    @property
    def state_key(self) -> str:
        # several PostHocEMA callbacks in one Trainer each keep their own checkpointed state
        return self._generate_state_key(sigma_rels=self.ema.sigma_rels, dirpath=str(self.dirpath))

    # ---------------------------------------------------------------- tensors
    def tracked(self, pl_module: nn.Module) -> list[Tensor]:
        """The averaged tensors: weights and (``include_buffers``) floating buffers, in
        registration order. Cached per process (reset in ``setup``)."""
        if self._tracked is None:
            self._tracked = list(pl_module.parameters())
            if self.include_buffers:
                self._tracked += [b for b in pl_module.buffers() if b.is_floating_point()]
        return self._tracked

    def _names(self, pl_module: nn.Module) -> tuple[list[str], dict[str, str], dict[str, Tensor]]:
        """(a ``state_dict`` key per tracked tensor, {alias: key} for tied tensors, the
        untracked entries)."""
        index = {id(t): i for i, t in enumerate(self.tracked(pl_module))}
        names: list[str | None] = [None] * len(index)
        aliases, other = {}, {}
        for key, value in pl_module.state_dict(keep_vars=True).items():
            i = index.get(id(value))
            if i is None:
                other[key] = value.detach()
            elif names[i] is None:
                names[i] = key
            else:
                aliases[key] = names[i]
        return names, aliases, other

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / FOLDER)

    # ---------------------------------------------------------------- fit
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy)
        if any(c.__name__ in SHARDED for c in strategy.__mro__):
            raise RuntimeError(f"PostHocEMA does not average sharded weights ({strategy.__name__}): use a strategy "
                               "in which each rank holds the whole model (e.g. 'ddp')")
        self._tracked = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, folder = trainer.global_step, self.folder(trainer)
        if step == 0:  # a new run: nothing carries over from an earlier fit
            self.ema.averages, self.ema.step, self.last_snapshot = None, 0, 0
            if find_snapshots(folder):
                raise ValueError(f"PostHocEMA: dirpath={folder} holds snapshots of another run; a fit from step 0 "
                                 "needs a folder without any (step=*.pt)")
        elif step != self.ema.step:
            raise ValueError(f"PostHocEMA: the fit starts at step {step} but the tracked averages are at step "
                             f"{self.ema.step}: resume from a checkpoint this callback saved")
        elif self.ema.averages is not None:  # resumed: the averages beside the weights (or on `device`)
            self.ema.averages = [[a.to(self.ema.device or t.device) for a, t in zip(average, self.tracked(pl_module))]
                                 for average in self.ema.averages]
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"PostHocEMA: dirpath={folder} is not writable")
            stale = [p for s, p in find_snapshots(folder) if s > step]
            for path in stale:  # written after `step` by the run this fit resumes
                path.unlink()
            if stale:
                rank_zero_info(f"PostHocEMA: removed {len(stale)} snapshots after step {step} from {folder}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps: one update per step, however many batches or gradients
        if step >= self.ema.step + self.update_every:
            self.ema.update(self.tracked(pl_module), step)
            if step % self.snapshot_every == 0:
                self._snapshot(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema.averages is not None and self.last_snapshot != self.ema.step:
            self._snapshot(trainer, pl_module)

    def _snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            names, aliases, other = self._names(pl_module)
            save_snapshot(self.folder(trainer), self.ema, names, other, self.snapshot_dtype, aliases)
        self.last_snapshot = self.ema.step

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**self.ema.state_dict(), "last_snapshot": self.last_snapshot}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict)
        self.last_snapshot = state_dict["last_snapshot"]

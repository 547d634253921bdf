"""``configure_optimizers`` in one line, the Lightning glue over
:mod:`lightning_imex.optimizers` (an optimizer from a name, a Hydra partial or a config,
over parameter groups) and :mod:`lightning_imex.schedules` (a schedule with Lightning's
``interval`` / ``frequency`` / ``monitor``): the fit's length, the learning rate
``Tuner.lr_find`` writes, the checks of the Trainer a multi-gradient step needs.

Configs are resolved once into specs (:class:`~lightning_imex.optimizers.OptimizerSpec`,
:class:`~lightning_imex.schedules.SchedulerSpec`), taken as they are here; their plain
forms are what a checkpoint stores (it loads with ``weights_only=True``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr
from torch import nn

from ._lightning import attached_trainer, loaded_checkpoint
from .multigradient import check_trainer
from .optimizers import build_optimizer, optimizer_spec
from .schedules import SchedulerSpec, WarmupCosine, build_scheduler, scheduler_spec
from .validate import is_real

__all__ = ["configure_optimizers", "fit_length", "module_lr", "with_schedule"]


# where Lightning's Tuner.lr_find looks for the learning rate, and writes its suggestion:
# the first of these names that the module or its hparams (or the datamodule) has
LR_NAMES = ("lr", "learning_rate")


def module_lr(module: nn.Module) -> tuple[str, float] | None:
    """``(name, value)`` of the learning rate a LightningModule carries where
    ``Tuner.lr_find`` finds it (:data:`LR_NAMES`), if it is a number; else None."""
    if not isinstance(module, L.LightningModule):
        return None
    name = next((n for n in LR_NAMES if lightning_hasattr(module, n)), None)
    value = lightning_getattr(module, name) if name else None
    return (name, float(value)) if is_real(value) else None


def configure_optimizers(
    module: nn.Module,
    optimizer: Any = "imex_adam",
    scheduler: Any = None,
    decay_norm_and_bias: bool = False,
    no_weight_decay: Sequence[str] = (),
    lr_multipliers: Mapping[str, float] | None = None,
) -> Any:
    """What a ``LightningModule.configure_optimizers`` returns, in one line::

        def configure_optimizers(self):
            return configure_optimizers(self, {"name": "imex_adam", "lr": 3e-3},
                                        scheduler={"name": "warmup_cosine", "warmup_steps": 100})

    ``warmup_cosine`` without ``total_steps`` spans the whole fit (the trainer's
    estimated optimizer steps, or ``max_epochs`` when ``interval="epoch"``).

    ``Tuner.lr_find`` writes its suggestion to the module's ``lr`` or ``learning_rate``
    (attribute or hyper-parameter, :func:`module_lr`) and the fit then calls
    ``configure_optimizers``: an optimizer config without ``lr`` takes the module's; one
    whose ``lr`` differs from it is an error (the suggestion would be lost), so pass
    ``"lr": self.lr`` or leave ``lr`` out.

    ``optimizer`` and ``scheduler`` are specs (taken as they are) or what
    :func:`~lightning_imex.optimizers.optimizer_spec` and
    :func:`~lightning_imex.schedules.scheduler_spec` read."""
    spec = optimizer_spec(optimizer)
    found = module_lr(module)
    if found is not None and found[1] != spec.lr:
        if "lr" in spec.kwargs:
            raise ValueError(f"optimizer.lr={spec.lr!r} but the module's {found[0]}={found[1]!r} (where Tuner.lr_find "
                             f"writes its suggestion): pass the module's, e.g. {{..., 'lr': self.{found[0]}}}, or "
                             f"leave optimizer.lr out to use it")
        spec = spec.with_lr(found[1])
    opt = build_optimizer(module, spec, decay_norm_and_bias, no_weight_decay, lr_multipliers)
    return with_schedule(module, opt, scheduler)


def with_schedule(module: nn.Module, opt: torch.optim.Optimizer, scheduler: Any = None) -> Any:
    """:func:`configure_optimizers`' answer for an optimizer built already: ``opt``, or
    ``{"optimizer": opt, "lr_scheduler": ...}`` with the schedule of ``scheduler``,
    checked against the attached trainer's fit (and the checkpoint it resumes from)."""
    trainer = attached_trainer(module)
    if trainer is not None:  # fit is starting: settings a multi-gradient step cannot work under fail now
        check_trainer(trainer, opt)
    spec = scheduler_spec(scheduler)
    if spec is None:
        return opt
    schedule = build_scheduler(opt, spec, fit_length(module, spec))
    saved = loaded_checkpoint(trainer) if trainer is not None else None
    if isinstance(schedule["scheduler"], WarmupCosine) and saved and saved.get("lr_schedulers"):
        # the plan's checks, before the fit prints its summary (Lightning loads the state later)
        schedule["scheduler"].resumed_state(saved["lr_schedulers"][0], warn=False)
    return {"optimizer": opt, "lr_scheduler": schedule}


def fit_length(module: nn.Module, spec: SchedulerSpec) -> int | None:
    """Scheduler steps in the attached trainer's fit, if known. Under ``fast_dev_run`` (a
    smoke test of a few steps) at least the warm-up and one step more: the steps taken
    follow the real run's warm-up rather than one squeezed into the debug fit (and warned
    about, where the user has nothing to fix)."""
    trainer = attached_trainer(module)
    if trainer is None:
        return None
    if spec.interval == "epoch":
        total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
    else:
        total = trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else None
    if total is None:
        return None
    total = max(1, total // spec.frequency)
    if trainer.fast_dev_run:
        total = max(total, int(spec.kwargs.get("warmup_steps") or 0) + 1)
    return total

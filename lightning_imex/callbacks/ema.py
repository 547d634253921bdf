"""``ModelEMA``: an exponential moving average of the model's weights (docs/algorithms.md,
sections 1, 4 and 5), updated once per optimizer step in one foreach pass, swapped in for
validation, test and predict, and checkpointed so that a resumed fit continues exactly."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..optim.clipped_adam import EMA_SCHEDULES

__all__ = ["EVALUATE", "SCHEDULES", "ModelEMA"]

SCHEDULES = EMA_SCHEDULES
EVALUATE = ("ema", "raw", "both")
SHARDED = ("FSDPStrategy", "ModelParallelStrategy")
RAW_SUFFIX = "_raw"


class ModelEMA(L.Callback):
    r"""Model EMA ``e_k = d_k e_{k-1} + (1 - d_k) theta_k``, one update per optimizer step.

    Args:
        decay: ``d`` in (0, 1), or ``"optimizer"``: the first parameter group's
            ``betas[0]`` (the Ahn-Cutkosky coupling; the schedule then defaults to the
            group's ``ema_schedule`` if it sets one, else ``zero_start``).
        schedule: ``fixed`` (``e_0 = theta_0``, ``d_k = d``); ``warmup`` (the default for
            a float decay: ``d_k = min(d, (1 + k) / (10 + k))``); ``power``
            (``d_k = clamp(1 - (1 + k / gamma)^-power, min_decay, d)``); ``zero_start``
            (``e_0 = 0``, reports ``e_k / (1 - d^k)``: the Adam paper's bias-corrected
            temporal average). ``k`` = 1, 2, ... counts the optimizer steps since the EMA
            started.
        gamma, power, min_decay: the ``power`` schedule's constants.
        update_every: update every N optimizer steps with ``d_k^N``, the skipped steps' decay.
        start_step: the EMA starts at the weights after this many optimizer steps; before
            its first update nothing is swapped.
        evaluate: what validation runs on: ``ema``, ``raw``, or ``both``: the EMA under the
            names the module logs (``val_loss``), then the raw weights with ``_raw``
            appended (``val_loss_raw``); each torchmetrics ``Metric`` of the module gets a
            twin for the raw pass.
        swap_test, swap_predict: test and predict on the EMA weights.
        include_buffers: average floating-point buffers (BatchNorm statistics) and copy
            integer ones; otherwise the EMA model uses the module's buffers.
        device: where the EMA lives (e.g. ``"cpu"`` to keep it off the accelerator);
            ``None``: beside each weight.
        end_with: ``ema`` or ``raw``: the weights the module holds after fit.
        export_path: at the end of fit, write the EMA weights there as a plain
            ``state_dict`` (loads with ``torch.load(..., weights_only=True)``).

    Checkpoints have the layout of Lightning's ``EMAWeightAveraging``: ``state_dict`` holds
    the EMA weights (so ``load_from_checkpoint`` gives the EMA model), ``current_model_state``
    the raw weights, ``averaging_state`` the update count; the callback's own state holds
    the counters that make a resumed fit bit-identical.
    """

    def __init__(
        self,
        decay: float | str = 0.999,
        schedule: str | None = None,
        *,
        gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        update_every: int = 1,
        start_step: int = 0,
        evaluate: str = "ema",
        swap_test: bool = True,
        swap_predict: bool = True,
        include_buffers: bool = True,
        device: str | torch.device | None = None,
        end_with: str = "ema",
        export_path: str | os.PathLike | None = None,
    ) -> None:
        if decay != "optimizer" and not (_is_number(decay) and 0 < decay < 1):
            raise ValueError(f"decay must be a number in (0, 1) or 'optimizer', got {decay!r}")
        for name, value, allowed in (("schedule", schedule, (*SCHEDULES, None)), ("evaluate", evaluate, EVALUATE),
                                     ("end_with", end_with, ("ema", "raw"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, value, low in (("update_every", update_every, 1), ("start_step", start_step, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value, ok, allowed in (("gamma", gamma, lambda v: v > 0, "> 0"),
                                         ("power", power, lambda v: v > 0, "> 0"),
                                         ("min_decay", min_decay, lambda v: 0 <= v < 1, "in [0, 1)")):
            if not (_is_number(value) and ok(value)):
                raise ValueError(f"{name} must be a number {allowed}, got {value!r}")
        for name, value in (("swap_test", swap_test), ("swap_predict", swap_predict),
                            ("include_buffers", include_buffers)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device or None, got {device!r}") from None
        self.decay_option, self.schedule_option = decay, schedule
        self.gamma, self.power, self.min_decay = gamma, power, min_decay
        self.update_every, self.start_step = update_every, start_step
        self.evaluate, self.swap_test, self.swap_predict = evaluate, swap_test, swap_predict
        self.include_buffers, self.end_with, self.export_path = include_buffers, end_with, export_path
        self.decay: float | None = None  # resolved at fit start
        self.schedule: str | None = None
        self.updates = 0
        self.last_step = -1  # trainer.global_step at the EMA's start or last update
        self.decay_product = 1.0  # prod d: zero_start's bias correction
        self.ema: list[Tensor] | None = None  # the copy of the tracked tensors the module does not hold
        self.holding = "raw"  # which copy the module holds
        self._tracked: tuple[list[Tensor], list[Tensor]] | None = None
        self._swapped_for_stage = False

    # ---------------------------------------------------------------- tensors
    def tracked(self, pl_module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """(averaged, copied): the module's weights and floating buffers, and its integer
        buffers, in registration order: matched by order and identity, not by names, which
        torch.compile prefixes with ``_orig_mod.``. Cached per process (reset in ``setup``)."""
        if self._tracked is None:
            averaged, copied = list(pl_module.parameters()), []
            if self.include_buffers:
                for b in pl_module.buffers():
                    (averaged if b.is_floating_point() else copied).append(b)
            self._tracked = averaged, copied
        return self._tracked

    def _all(self, pl_module: nn.Module) -> list[Tensor]:
        averaged, copied = self.tracked(pl_module)
        return averaged + copied

    def _copy(self, pl_module: nn.Module) -> list[Tensor]:
        return [t.detach().to(self.device, copy=True) for t in self._all(pl_module)]

    # ---------------------------------------------------------------- the average
    def decay_at(self, k: int) -> float:
        """``d_k``, for the update ``k`` optimizer steps after the EMA started (k >= 1)."""
        if self.schedule == "warmup":
            return min(self.decay, (1 + k) / (10 + k))
        if self.schedule == "power":
            return min(self.decay, max(self.min_decay, 1 - (1 + k / self.gamma) ** -self.power))
        return self.decay

    @torch.no_grad()
    def update(self, pl_module: nn.Module) -> None:
        """One update in one foreach pass: ``e = lerp(e, theta, w)``, ``w = 1 - d_k^N``.
        ``zero_start`` keeps ``e`` bias-corrected as it goes: ``w = (1 - d^N) / (1 - prod d)``
        turns ``a_k = d a_{k-1} + (1 - d) theta_k`` into ``a_k / (1 - prod d)`` exactly, so
        swaps and checkpoints need no correction pass, and the first update (``w = 1``)
        makes the zero start implicit."""
        decay = self.decay_at((self.updates + 1) * self.update_every) ** self.update_every
        self.decay_product *= decay
        weight = (1 - decay) / (1 - self.decay_product) if self.schedule == "zero_start" else 1 - decay
        averaged, copied = self.tracked(pl_module)
        sources = averaged if self.device is None else [t.detach().to(self.device) for t in averaged]
        torch._foreach_lerp_(self.ema[: len(averaged)], sources, weight)
        if copied:
            torch._foreach_copy_(self.ema[len(averaged):], copied)
        self.updates += 1

    @torch.no_grad()
    def swap(self, pl_module: nn.Module) -> None:
        """Exchanges the module's tensors and the EMA. On one device the storages trade places
        (``.data``: nothing allocated, the Parameters and the optimizer's references stay);
        across devices (``device=``), through one tensor-sized temporary at a time."""
        for i, t in enumerate(self._all(pl_module)):
            other = self.ema[i]
            if other.device == t.device:
                t.data, self.ema[i] = other, t.data
            else:
                held = t.detach().to(other.device, copy=True)
                t.detach().copy_(other)
                other.copy_(held)
        self.holding = "ema" if self.holding == "raw" else "raw"

    def ema_state_dict(self, pl_module: nn.Module) -> dict[str, Tensor]:
        """The module's ``state_dict`` with the EMA weights."""
        return self._other_state_dict(pl_module) if self.holding == "raw" else pl_module.state_dict()

    def _other_state_dict(self, pl_module: nn.Module) -> dict[str, Tensor]:
        """The module's ``state_dict`` with the copy it does not hold in place of the tracked tensors."""
        index = {id(t): i for i, t in enumerate(self._all(pl_module))}
        return {name: self.ema[index[id(t)]] if id(t) in index else t.detach()
                for name, t in pl_module.state_dict(keep_vars=True).items()}

    # ---------------------------------------------------------------- fit
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy)
        if any(c.__name__ in SHARDED for c in strategy.__mro__):
            raise RuntimeError(f"ModelEMA does not average sharded weights ({strategy.__name__}): use a strategy in "
                               "which each rank holds the whole model (e.g. 'ddp')")
        self._tracked = None  # this process's module (ddp_spawn unpickles a copy)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.holding == "ema":  # an earlier fit ended with the EMA in the module
            self.swap(pl_module)
        if self.decay_option == "optimizer":
            group = trainer.optimizers[0].param_groups[0]
            if "betas" not in group:
                raise ValueError(f"decay='optimizer' reads the first parameter group's betas[0]; "
                                 f"{type(trainer.optimizers[0]).__name__} has no betas")
            self.decay = float(group["betas"][0])
            self.schedule = self.schedule_option or group.get("ema_schedule") or "zero_start"
        else:
            self.decay, self.schedule = float(self.decay_option), self.schedule_option or "warmup"

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.ema is None and trainer.global_step >= self.start_step:
            self.ema, self.last_step = self._copy(pl_module), trainer.global_step  # e_0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimizer steps: with gradient accumulation, or an optimizer that
        # evaluates its closure several times (IMEX), still one update per step
        if self.ema is not None and getattr(pl_module, "last_step_skipped", False):
            self.last_step += 1  # a step skipped for non-finite gradients (IMEXModule) is not a step
            return
        if self.ema is not None and trainer.global_step >= self.last_step + self.update_every:
            self.last_step = trainer.global_step
            self.update(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.updates == 0:
            return
        if self.export_path is not None and trainer.is_global_zero:
            Path(self.export_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in self.ema_state_dict(pl_module).items()}, self.export_path)
            rank_zero_info(f"ModelEMA: EMA weights written to {self.export_path}")
        if self.end_with == "ema":
            self.swap(pl_module)

    # ---------------------------------------------------------------- evaluation
    def _swap_in(self, wanted: bool, pl_module: nn.Module) -> None:
        if wanted and self.updates > 0 and self.holding == "raw":  # no EMA before the first update
            self.swap(pl_module)
            self._swapped_for_stage = True

    def _swap_out(self, pl_module: nn.Module) -> None:
        if self._swapped_for_stage:
            self.swap(pl_module)
            self._swapped_for_stage = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(self.evaluate != "raw", pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluate == "both" and self.updates > 0 and self.holding == "ema":
            twins = {name: m.clone() for name, m in _top_metrics(pl_module)}
            pl_module.__dict__["validation_step"] = functools.partial(
                self._ema_then_raw, pl_module, pl_module.validation_step, twins)

    def _ema_then_raw(self, pl_module: L.LightningModule, step: Callable, twins: dict[str, nn.Module], *args: Any,
                      **kwargs: Any) -> Any:
        """evaluate="both": the module's validation step on the EMA, then on the raw weights
        with every logged name suffixed and the metrics' twins in place of the metrics."""
        output = step(*args, **kwargs)
        originals = {name: _set_submodule(pl_module, name, twin) for name, twin in twins.items()}
        twin_names = {id(twin): name for name, twin in twins.items()}
        pl_module.__dict__["log"] = functools.partial(_raw_log, pl_module.log, twin_names)
        self.swap(pl_module)
        try:
            step(*args, **kwargs)
        finally:
            self.swap(pl_module)
            del pl_module.__dict__["log"]
            for name, original in originals.items():
                _set_submodule(pl_module, name, original)
        return output

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.__dict__.pop("validation_step", None)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(self.swap_test, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(self.swap_predict, pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "last_step": self.last_step, "decay_product": self.decay_product}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates, self.last_step = state_dict["updates"], state_dict["last_step"]
        self.decay_product = state_dict["decay_product"]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.ema is None:
            return
        held, other = checkpoint["state_dict"], self._other_state_dict(pl_module)
        checkpoint["state_dict"], checkpoint["current_model_state"] = (other, held) if self.holding == "raw" else (
            held, other)
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self.updates)}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if "current_model_state" not in checkpoint:
            return
        # Lightning has loaded state_dict, the EMA, into the module: that becomes the EMA,
        # and the raw weights go back in
        self.ema, self.holding = self._copy(pl_module), "raw"
        pl_module.load_state_dict(checkpoint["current_model_state"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _raw_log(log: Callable, twin_names: dict[int, str], name: str, value: Any, *args: Any, **kwargs: Any) -> None:
    """``LightningModule.log`` for the raw pass: the name suffixed; a metric twin named by its
    place, which Lightning's cache of the module's metric attributes does not know."""
    if id(value) in twin_names:
        kwargs.setdefault("metric_attribute", twin_names[id(value)])
    log(name + RAW_SUFFIX, value, *args, **kwargs)


def _top_metrics(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The module's torchmetrics ``Metric``s, less those inside another metric (a wrapper's)."""
    from torchmetrics import Metric

    found: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if isinstance(m, Metric) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, m))
    return found


def _set_submodule(module: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Puts ``new`` at ``name`` (bypassing any ``__setattr__`` logic) and returns what was there."""
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name)
    old, parent._modules[attr] = parent._modules[attr], new
    return old

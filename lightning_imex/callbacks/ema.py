"""``ModelEMA``: an exponential moving average of the model's weights (ALGORITHMS.md
sections 4 and 5), updated once per optimizer step in one foreach pass, swapped in for
validation, test and predict, and checkpointed so that a resumed fit continues exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

__all__ = ["EVALUATE", "SCHEDULES", "ModelEMA"]

SCHEDULES = ("fixed", "warmup", "power", "zero_start")
EVALUATE = ("ema", "raw", "both")
SHARDED = ("FSDPStrategy", "ModelParallelStrategy")


class ModelEMA(L.Callback):
    r"""Model EMA ``e_k = d_k e_{k-1} + (1 - d_k) theta_k`` over optimizer steps.

    Args:
        decay: ``d`` in (0, 1), or ``"optimizer"``: the first parameter group's
            ``betas[0]`` (the Ahn-Cutkosky coupling; the schedule then defaults to
            ``zero_start``, or to the group's ``ema_schedule`` when it sets one).
        schedule: ``fixed`` (``e_0 = theta_0``, constant ``d``); ``warmup`` (default for a
            float decay: ``d_k = min(d, (1 + k) / (10 + k))``); ``power``
            (``d_k = clamp(1 - (1 + k / gamma)^-power, min_decay, d)``); ``zero_start``
            (``e_0 = 0``, and the EMA reported is ``e_k / (1 - prod d)``: the bias-corrected
            average of the Adam paper's section 7.2). ``k`` counts the optimizer steps
            from ``start_step`` before the update.
        gamma, power, min_decay: the ``power`` schedule's constants.
        update_every: update every N optimizer steps with ``d^N`` (the skipped steps'
            decay).
        start_step: the first optimizer step (``trainer.global_step`` after it) that
            updates; before it there is no EMA and nothing is swapped.
        evaluate: ``ema`` (validation sees the EMA weights), ``raw``, or ``both``
            (validation runs on both; the EMA's values are logged with ``_ema`` appended
            to each name, e.g. ``val/acc`` and ``val/acc_ema``).
        swap_validation, swap_test, swap_predict: which stages use the EMA weights.
        include_buffers: average floating-point buffers (BatchNorm statistics) too, and
            copy integer ones; otherwise the model's own buffers are used.
        device: where the EMA lives (e.g. ``"cpu"`` to keep it off the accelerator);
            ``None``: beside each weight.
        end_with: ``ema`` or ``raw``: the weights left in the module after fit.
        export_path: at the end of fit, write the EMA weights there as a plain
            ``state_dict`` (loads with ``torch.load(..., weights_only=True)``).

    Checkpoints use the layout of Lightning's ``EMAWeightAveraging``: ``state_dict``
    holds the EMA weights (so ``load_from_checkpoint`` gives the EMA model), the raw
    weights are under ``current_model_state``, the counters in the callback's state.
    """

    def __init__(
        self,
        decay: float | str = 0.999,
        schedule: str | None = None,
        gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        update_every: int = 1,
        start_step: int = 0,
        evaluate: str = "ema",
        swap_validation: bool = True,
        swap_test: bool = True,
        swap_predict: bool = True,
        include_buffers: bool = True,
        device: str | None = None,
        end_with: str = "ema",
        export_path: str | None = None,
    ) -> None:
        if decay != "optimizer" and not (isinstance(decay, (int, float)) and not isinstance(decay, bool)
                                         and 0 < decay < 1):
            raise ValueError(f"decay must be a number in (0, 1) or 'optimizer', got {decay!r}")
        if schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if evaluate not in EVALUATE:
            raise ValueError(f"evaluate must be one of {EVALUATE}, got {evaluate!r}")
        if end_with not in ("ema", "raw"):
            raise ValueError(f"end_with must be 'ema' or 'raw', got {end_with!r}")
        for name, value, low in (("update_every", update_every, 1), ("start_step", start_step, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (gamma > 0 and power > 0 and 0 <= min_decay < 1):
            raise ValueError(f"power schedule needs gamma > 0, power > 0, 0 <= min_decay < 1; got gamma={gamma!r}, "
                             f"power={power!r}, min_decay={min_decay!r}")
        self.decay_option, self.schedule_option = decay, schedule
        self.gamma, self.power, self.min_decay = gamma, power, min_decay
        self.update_every, self.start_step, self.evaluate = update_every, start_step, evaluate
        self.swap_stages = {"validation": swap_validation and evaluate == "ema",
                            "test": swap_test and evaluate != "raw", "predict": swap_predict and evaluate != "raw"}
        self.include_buffers, self.device = include_buffers, device
        self.end_with, self.export_path = end_with, export_path
        self.decay: float | None = None  # resolved at fit start
        self.schedule: str | None = None
        self.updates = 0  # EMA updates so far
        self.last_step = -1  # the optimizer step of the last update
        self.decay_product = 1.0  # prod of the decays applied: zero_start's bias correction
        self.ema: list[Tensor] | None = None  # tracked tensors' other copy, in _all() order
        self.holding = "raw"  # which copy the module's tensors hold
        self._stage_swapped = False

    # ------------------------------------------------------------------ tensors
    def _tensors(self, pl_module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """(averaged, copied): the module's weights and floating buffers, and its integer
        buffers, in registration order (identity, not names: torch.compile prefixes them)."""
        averaged, copied = list(pl_module.parameters()), []
        if self.include_buffers:
            for b in pl_module.buffers():
                (averaged if b.is_floating_point() else copied).append(b)
        return averaged, copied

    def _all(self, pl_module: nn.Module) -> list[Tensor]:
        averaged, copied = self._tensors(pl_module)
        return averaged + copied

    def _new_ema(self, pl_module: nn.Module) -> list[Tensor]:
        zero = self.schedule == "zero_start"
        return [torch.zeros_like(t, device=self.device) if zero and t.is_floating_point()
                else t.detach().to(self.device, copy=True) for t in self._all(pl_module)]

    # ------------------------------------------------------------------ schedule
    def decay_at(self, k: int) -> float:
        """``d_k`` for the update after ``k`` optimizer steps from ``start_step``."""
        d = self.decay
        if self.schedule == "warmup":
            return min(d, (1 + k) / (10 + k))
        if self.schedule == "power":
            return min(d, max(self.min_decay, 1 - (1 + k / self.gamma) ** -self.power))
        return d

    @torch.no_grad()
    def update(self, pl_module: nn.Module) -> None:
        """One EMA update in one foreach pass: ``lerp(e, theta, w)`` with ``w = 1 - d^N``
        (``zero_start``: ``w = (1 - d^N) / (1 - prod d)``, which keeps ``e`` bias-corrected)."""
        decay = self.decay_at(self.updates * self.update_every) ** self.update_every
        self.decay_product *= decay
        weight = (1 - decay) / (1 - self.decay_product) if self.schedule == "zero_start" else 1 - decay
        averaged, copied = self._tensors(pl_module)
        n = len(averaged)
        sources = averaged if self.device is None else [t.detach().to(self.device) for t in averaged]
        torch._foreach_lerp_(self.ema[:n], sources, weight)
        if copied:
            torch._foreach_copy_(self.ema[n:], copied)
        self.updates += 1

    # ------------------------------------------------------------------ swap
    @torch.no_grad()
    def swap(self, pl_module: nn.Module) -> None:
        """Exchanges the module's tensors and the EMA: storage pointers on the same device
        and dtype (nothing allocated), else one tensor at a time through a temporary."""
        for i, t in enumerate(self._all(pl_module)):
            other = self.ema[i]
            if other.device == t.device and other.dtype == t.dtype:
                t.data, self.ema[i] = other, t.data
            else:
                raw = t.detach().to(other.device, copy=True)
                t.detach().copy_(other)
                other.copy_(raw)
        self.holding = "ema" if self.holding == "raw" else "raw"

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        names = [c.__name__ for c in type(trainer.strategy).__mro__]
        if any(name in SHARDED for name in names):
            raise RuntimeError(f"ModelEMA does not average sharded weights ({type(trainer.strategy).__name__}): use "
                               "strategy='ddp' (each rank holds the whole model), or EMA outside the sharded fit")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.holding == "ema":  # a previous fit ended with the EMA in the module
            self.swap(pl_module)
        if self.decay_option == "optimizer":
            group = trainer.optimizers[0].param_groups[0]
            if "betas" not in group:
                raise ValueError(f"decay='optimizer' reads betas[0] of the first parameter group; "
                                 f"{type(trainer.optimizers[0]).__name__} has no betas")
            self.decay = float(group["betas"][0])
            self.schedule = self.schedule_option or group.get("ema_schedule") or "zero_start"
        else:
            self.decay = float(self.decay_option)
            self.schedule = self.schedule_option or "warmup"
        if self.ema is None and self.start_step == 0:
            self.ema = self._new_ema(pl_module)  # e_0: the initial weights (zero_start: zeros)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps taken: an accumulating batch does not add one
        if step == self.last_step or step < max(self.start_step, 1) or (step - self.start_step) % self.update_every:
            return
        self.last_step = step
        if self.ema is None:  # start_step > 0: e_0 is the weights at start_step
            self.ema = self._new_ema(pl_module)
        self.update(pl_module)

    def _swap_in(self, stage: str, pl_module: L.LightningModule) -> None:
        if self.swap_stages[stage] and self.updates > 0 and self.holding == "raw":
            self.swap(pl_module)
            self._stage_swapped = True

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._stage_swapped:
            self.swap(pl_module)
            self._stage_swapped = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in("validation", pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in("test", pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in("predict", pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluate == "both" and self.updates > 0 and not trainer.sanity_checking:
            _BothPasses(self, pl_module).install()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _BothPasses.uninstall(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.updates == 0:
            return
        if self.export_path is not None and trainer.is_global_zero:
            Path(self.export_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in self.ema_state_dict(pl_module).items()}, self.export_path)
            rank_zero_info(f"ModelEMA: EMA weights written to {self.export_path}")
        if self.end_with == "ema" and self.holding == "raw":
            self.swap(pl_module)

    # ------------------------------------------------------------------ checkpoints
    def _other_state_dict(self, pl_module: nn.Module) -> dict[str, Tensor]:
        """The module's state_dict with the copy it does not hold (the EMA, or the raw
        weights while the EMA is swapped in) in place of the tracked tensors."""
        index = {id(t): i for i, t in enumerate(self._all(pl_module))}
        return {name: self.ema[index[id(t)]] if id(t) in index else t
                for name, t in pl_module.state_dict(keep_vars=True).items()}

    def ema_state_dict(self, pl_module: nn.Module) -> dict[str, Tensor]:
        """The module's state_dict holding the EMA weights."""
        return self._other_state_dict(pl_module) if self.holding == "raw" else pl_module.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay_product": self.decay_product, "decay": self.decay,
                "schedule": self.schedule, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates, self.decay_product = state_dict["updates"], state_dict["decay_product"]
        self.decay, self.schedule, self.last_step = state_dict["decay"], state_dict["schedule"], state_dict["last_step"]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.updates == 0:
            return
        other = {k: v.detach() for k, v in self._other_state_dict(pl_module).items()}
        held = checkpoint["state_dict"]
        prefix = _state_prefix(held, other)
        other = {prefix + k: v for k, v in other.items()}
        ema, raw = (other, held) if self.holding == "raw" else (held, other)
        checkpoint["state_dict"] = {k: ema.get(k, v) for k, v in held.items()}
        checkpoint["current_model_state"] = {k: raw.get(k, v) for k, v in held.items()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if "current_model_state" not in checkpoint:
            return
        # Lightning has loaded state_dict (the EMA) into the module: keep it as the EMA,
        # then put the raw weights back
        self.ema = [t.detach().to(self.device, copy=True) for t in self._all(pl_module)]
        pl_module.load_state_dict(checkpoint["current_model_state"])
        self.holding = "raw"


def _state_prefix(held: dict[str, Tensor], ours: dict[str, Tensor]) -> str:
    """'' unless the strategy's state_dict keys carry a prefix the module's do not."""
    key = next(iter(ours), "")
    return next((k[: -len(key)] for k in held if key and k.endswith(key)), "")


class _BothPasses:
    """evaluate="both": each validation batch runs the module's ``validation_step`` on the
    raw weights, then on the EMA with its own copies of the torchmetrics metrics and
    every logged name suffixed ``_ema``."""

    SUFFIX = "_ema"

    def __init__(self, callback: ModelEMA, pl_module: L.LightningModule) -> None:
        self.callback, self.module = callback, pl_module
        self.step = pl_module.validation_step
        self.log = pl_module.log
        from torchmetrics import Metric
        self.twins = {name: m.clone() for name, m in pl_module.named_modules() if isinstance(m, Metric)}
        self.twin_names = {id(twin): name for name, twin in self.twins.items()}

    def install(self) -> None:
        self.module.__dict__["validation_step"] = self.validation_step
        self.module.__dict__["_ema_both"] = self

    @staticmethod
    def uninstall(pl_module: nn.Module) -> None:
        for key in ("validation_step", "_ema_both", "log"):
            pl_module.__dict__.pop(key, None)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        output = self.step(*args, **kwargs)
        originals = {name: self._set_module(name, twin) for name, twin in self.twins.items()}
        self.module.__dict__["log"] = self.suffixed_log
        self.callback.swap(self.module)
        try:
            self.step(*args, **kwargs)
        finally:
            self.callback.swap(self.module)
            self.module.__dict__.pop("log", None)
            for name, original in originals.items():
                self._set_module(name, original)
        return output

    def suffixed_log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if id(value) in self.twin_names:  # Lightning finds logged metrics by attribute: name the twin's
            kwargs.setdefault("metric_attribute", self.twin_names[id(value)])
        self.log(name + self.SUFFIX, value, *args, **kwargs)

    def _set_module(self, name: str, module: nn.Module) -> nn.Module:
        parent_name, _, attr = name.rpartition(".")
        parent = self.module.get_submodule(parent_name) if parent_name else self.module
        original = getattr(parent, attr)
        parent._modules[attr] = module
        return original


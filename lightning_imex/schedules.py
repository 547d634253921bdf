"""A ``torch.optim.lr_scheduler`` schedule from a config: a name (:data:`SCHEDULERS`,
or a class of ``torch.optim.lr_scheduler``) or a mapping, resolved once into a
:class:`SchedulerSpec` (:func:`scheduler_spec`) with Lightning's ``interval`` /
``frequency`` / ``monitor``; :class:`WarmupCosine`, a warm-up and half cosine that a
resumed fit keeps or re-plans."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import lr_scheduler

from .plain import HYDRA_KEYS, ReadOnlyDict, keyword_names, to_plain
from .validate import allowed_keywords, choice, integer, is_integer, is_real, real

__all__ = ["SCHEDULERS", "SchedulerSpec", "WarmupCosine", "build_scheduler", "scheduler_builder", "scheduler_spec"]


INTERVALS = ("step", "epoch")


def _constant(optimizer, warmup_steps: int = 0, warmup_start_factor: float = 0.01):
    if warmup_steps == 0:
        return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return lr_scheduler.LinearLR(optimizer, warmup_start_factor, 1.0, total_iters=warmup_steps)


ON_RESUME = ("keep", "replan")


class WarmupCosine(lr_scheduler.LRScheduler):
    """A linear warm-up from ``warmup_start_factor * lr`` to ``lr`` over ``warmup_steps``,
    then a half cosine down to ``eta_min`` at ``total_steps``, held there after (torch's
    ``CosineAnnealingLR`` is periodic: it would climb back). The LR is a closed form of
    the step count, so a resumed fit has exactly the uninterrupted one's.

    A checkpoint carries its plan. Resumed by a fit that ends later (``max_epochs`` raised),
    the plan would hold ``eta_min`` for the steps it never planned, so loading it is an
    error unless ``on_resume`` says what to do:

    - ``"keep"``: the checkpoint's plan, ``eta_min`` past its end;
    - ``"replan"``: the rest of the cosine stretched to end at this fit's ``total_steps``:
      from the resume step ``s`` (past the warm-up) the cosine's progress ``p`` runs from
      ``p(s)`` to 1, so the LR at ``s`` is the checkpoint's and ``eta_min`` is reached at
      the new end (before the warm-up's end, the warm-up is kept and the cosine after it
      spans the new length). A plan that has ended has nothing to re-plan: an error.

    A fit that ends earlier than the plan keeps it (with a warning unless ``on_resume``
    is set; ``"replan"`` compresses the rest instead)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 warmup_start_factor: float = 0.01, eta_min: float = 0.0, on_resume: str | None = None,
                 last_epoch: int = -1) -> None:
        integer("scheduler.total_steps", total_steps, 1)
        if not (is_integer(warmup_steps) and 0 <= warmup_steps < total_steps):
            raise ValueError(f"scheduler.warmup_steps must be an integer in [0, total_steps={total_steps}), "
                             f"got {warmup_steps!r}")
        if not (is_real(warmup_start_factor) and 0 < warmup_start_factor <= 1):
            raise ValueError(f"scheduler.warmup_start_factor must be a number in (0, 1], got {warmup_start_factor!r}")
        real("scheduler.eta_min", eta_min, 0)
        if on_resume is not None and on_resume not in ON_RESUME:
            raise ValueError(f"scheduler.on_resume must be one of {', '.join(ON_RESUME)} or null (a longer resumed "
                             f"fit is then an error), got {on_resume!r}")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.warmup_start_factor, self.eta_min = float(warmup_start_factor), float(eta_min)
        self.on_resume = on_resume
        # the cosine's progress is cosine_start_progress at step cosine_start and 1 at
        # total_steps: 0 at the warm-up's end, until a re-plan moves the start to its step
        self.cosine_start, self.cosine_start_progress = warmup_steps, 0.0
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, base) for base in self.base_lrs]

    def lr_at(self, step: int, base: float) -> float:
        return _warmup_cosine_lr(vars(self), step, base)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("on_resume", None)  # the resumed fit's choice, not the plan's state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(self.resumed_state(state_dict))

    def resumed_state(self, state_dict: dict[str, Any], warn: bool = True) -> dict[str, Any]:
        """A checkpoint's state as this fit resumes it (:attr:`on_resume`): its plan, or
        the plan re-planned to this fit's ``total_steps``; a ``ValueError`` (one line,
        the choices) where neither is chosen and the fit is longer."""
        state = {k: v for k, v in state_dict.items() if k != "on_resume"}
        state.setdefault("cosine_start", state.get("warmup_steps", self.warmup_steps))  # saved before re-plans
        state.setdefault("cosine_start_progress", 0.0)
        planned, total, step = state.get("total_steps", self.total_steps), self.total_steps, state["last_epoch"]
        if planned == total or self.on_resume == "keep" or step >= total:  # the same plan, or no step left
            return state
        where = (f"scheduler: the checkpoint's warmup_cosine plan ends at scheduler step {planned}, this fit's at "
                 f"{total} (resuming at {step}, LR {_warmup_cosine_lr(state, step, state['base_lrs'][0]):.4g})")
        if self.on_resume is None:
            choices = (f"set scheduler.on_resume=keep to keep the checkpoint's plan, or scheduler.on_resume=replan "
                       f"to stretch the rest of its cosine to end at step {total}")
            if total > planned:
                raise ValueError(f"{where}: the LR would hold eta_min={state['eta_min']:g} for the last "
                                 f"{total - max(planned, step)} steps; {choices}")
            if warn:
                warnings.warn(f"{where}: keeping the checkpoint's plan (this fit ends before the LR reaches "
                              f"eta_min); {choices}", stacklevel=3)
            return state
        if step >= planned:
            raise ValueError(f"{where}: the plan has ended, its LR is eta_min={state['eta_min']:g}, and a re-plan "
                             "from there stays at eta_min; to train on at a higher LR start a new fit from the "
                             "checkpoint's weights, or set scheduler.on_resume=keep to train on at eta_min")
        if total <= state["warmup_steps"]:
            raise ValueError(f"{where}: its warm-up ends at step {state['warmup_steps']}, after this fit's end: "
                             "cannot re-plan; set scheduler.on_resume=keep, or run the fit longer")
        if step > state["cosine_start"]:
            state["cosine_start"], state["cosine_start_progress"] = step, _cosine_progress(state, step)
        state["total_steps"] = total
        return state


def _warmup_cosine_lr(plan: Mapping[str, Any], step: int, base: float) -> float:
    """:class:`WarmupCosine`'s LR at ``step`` under ``plan`` (its attributes or state)."""
    if step < plan["warmup_steps"]:
        factor = plan["warmup_start_factor"]
        return base * (factor + (1 - factor) * step / plan["warmup_steps"])
    if step >= plan["total_steps"]:
        return plan["eta_min"]
    return plan["eta_min"] + (base - plan["eta_min"]) * (1 + math.cos(math.pi * _cosine_progress(plan, step))) / 2


def _cosine_progress(plan: Mapping[str, Any], step: int) -> float:
    """How far through the cosine ``step`` is: ``cosine_start_progress`` at ``cosine_start``, 1 at ``total_steps``."""
    start, p0 = plan["cosine_start"], plan["cosine_start_progress"]
    return p0 + (1 - p0) * (step - start) / (plan["total_steps"] - start)


def _step(optimizer, step_size: int, gamma: float = 0.1):
    integer("scheduler.step_size", step_size, 1)
    real("scheduler.gamma", gamma, 0, above=True)
    return lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


def _plateau(optimizer, mode: str = "min", factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
             min_lr: float = 0.0):
    return lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience,
                                          threshold=threshold, min_lr=min_lr)


# name -> (builder, default interval); any other torch.optim.lr_scheduler class also works by name
SCHEDULERS = {
    "constant": (_constant, "step"),
    "warmup_cosine": (WarmupCosine, "step"),
    "step": (_step, "epoch"),
    "plateau": (_plateau, "epoch"),
}


LIGHTNING_KEYS = ("name", "interval", "frequency", "monitor")  # a config's keys that are not the schedule's arguments


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """A schedule config resolved and checked: the schedule ``name`` (:data:`SCHEDULERS`
    or a class of ``torch.optim.lr_scheduler``), its keyword arguments (plain values,
    read-only), and Lightning's ``interval`` (None: the schedule's own), ``frequency`` and
    ``monitor``. Checked when made: the name, the keyword names, the required ones (a
    ``warmup_cosine``'s ``total_steps`` defaults to the fit's length) and a monitor for
    ``plateau``. :meth:`plain` is the form a checkpoint stores."""

    name: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    interval: str | None = None
    frequency: int = 1
    monitor: str | None = None

    def __post_init__(self) -> None:
        builder, interval = scheduler_builder(self.name)
        kwargs = to_plain(self.kwargs, "scheduler")
        if not isinstance(kwargs, dict):
            raise TypeError(f"scheduler: its keyword arguments must be a mapping, got {self.kwargs!r}")
        object.__setattr__(self, "interval", interval if self.interval is None else self.interval)
        choice("scheduler.interval", self.interval, INTERVALS)
        integer("scheduler.frequency", self.frequency, 1)
        if builder in (_plateau, lr_scheduler.ReduceLROnPlateau) and not self.monitor:
            raise ValueError(f"scheduler.monitor is required by {self.name!r}: the logged metric to watch, "
                             "e.g. 'val_loss'")
        allowed = keyword_names(builder, skip=("optimizer",))
        if allowed is not None:
            allowed_keywords("scheduler", kwargs, allowed, f"scheduler {self.name!r}")
        filled = ("optimizer", "total_steps") if builder is WarmupCosine else ("optimizer",)  # total: the fit's
        for key, parameter in inspect.signature(builder).parameters.items():
            if parameter.default is parameter.empty and key not in filled and key != "self" and key not in kwargs \
                    and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise ValueError(f"scheduler.{key} is required by {self.name!r}")
        object.__setattr__(self, "kwargs", ReadOnlyDict(kwargs))

    @property
    def builder(self) -> Any:
        """What builds the schedule from the optimizer and :attr:`kwargs`."""
        return scheduler_builder(self.name)[0]

    def plain(self) -> dict[str, Any]:
        """``{"name", "interval", "frequency", "monitor", **kwargs}``, a copy."""
        return {"name": self.name, "interval": self.interval, "frequency": self.frequency, "monitor": self.monitor,
                **copy.deepcopy(dict(self.kwargs))}


def scheduler_spec(scheduler: Any) -> SchedulerSpec | None:
    """A :class:`SchedulerSpec` (or ``None``: no schedule) from a name, a mapping
    (``{"name": ..., "interval": ..., "frequency": ..., "monitor": ..., **kwargs}``, dict
    or OmegaConf), ``None``/``"none"`` or a spec, which is returned as it is: a config is
    resolved once."""
    if scheduler is None or isinstance(scheduler, SchedulerSpec) or scheduler == "none":
        return None if scheduler == "none" else scheduler
    config = to_plain({"name": scheduler} if isinstance(scheduler, str) else scheduler, "scheduler")
    if not isinstance(config, dict):
        raise TypeError(f"scheduler must be a name or a mapping, got {scheduler!r}")
    if config.get("name") is None:
        return None
    lightning = {k: config[k] for k in LIGHTNING_KEYS[1:] if config.get(k) is not None}
    return SchedulerSpec(config["name"], {k: v for k, v in config.items() if k not in (*HYDRA_KEYS, *LIGHTNING_KEYS)},
                         **lightning)


def scheduler_builder(name: str) -> tuple[Any, str]:
    if name in SCHEDULERS:
        return SCHEDULERS[name]
    cls = getattr(lr_scheduler, str(name), None)
    if isinstance(cls, type) and issubclass(cls, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)):
        return cls, "epoch" if cls is lr_scheduler.ReduceLROnPlateau else "step"
    raise ValueError(f"scheduler.name must be one of {sorted(SCHEDULERS)} or a torch.optim.lr_scheduler "
                     f"class name, got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, scheduler: Any, total_steps: int | None = None) -> dict | None:
    """Lightning's ``lr_scheduler`` dict for ``scheduler`` (a spec, or what
    :func:`scheduler_spec` reads). ``total_steps`` (scheduler steps over the fit) fills
    ``warmup_cosine``'s when unset."""
    spec = scheduler_spec(scheduler)
    if spec is None:
        return None
    kwargs = dict(spec.kwargs)
    if spec.builder is WarmupCosine and kwargs.get("total_steps") is None:
        if total_steps is None:
            raise ValueError("scheduler.total_steps is required outside a Trainer (inside one it defaults "
                             "to the fit's length)")
        kwargs["total_steps"] = total_steps
        warmup = kwargs.get("warmup_steps", 0)
        if warmup >= total_steps:  # a short fit (fast_dev_run keeps the warm-up whole: fit_length)
            from lightning.pytorch.utilities.rank_zero import rank_zero_only
            if getattr(rank_zero_only, "rank", 0) == 0:  # once under DDP, not once per process
                warnings.warn(f"scheduler.warmup_steps={warmup} is not shorter than this fit ({total_steps} "
                              f"scheduler steps): warming up over {total_steps - 1}", stacklevel=2)
            kwargs["warmup_steps"] = total_steps - 1
    return {"scheduler": spec.builder(optimizer, **kwargs), "interval": spec.interval,
            "frequency": spec.frequency, "monitor": spec.monitor, "name": None}

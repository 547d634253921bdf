"""``configure_optimizers`` in one line: an optimizer from a name, a Hydra partial or a
config; parameter groups (no weight decay for biases, normalisation layers and 1-D
parameters; learning-rate multipliers by name pattern); a ``torch.optim.lr_scheduler``
schedule with Lightning's ``interval`` / ``frequency`` / ``monitor``.

Configs are normalised to plain dicts (:func:`optimizer_config`, :func:`scheduler_config`)
so that hyper-parameters saved in a checkpoint load with ``weights_only=True``."""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import functools
import importlib
import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from ._lightning import attached_trainer
from .multigradient import check_trainer
from .optim import OPTIMIZERS

__all__ = ["SCHEDULERS", "WarmupCosine", "build_optimizer", "build_scheduler", "configure_optimizers", "optimizer_config",
           "parameter_groups", "scheduler_config", "to_plain"]

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
HYDRA_KEYS = ("_partial_", "_convert_", "_recursive_")


def to_plain(value: Any, name: str = "value") -> Any:
    """``value`` as containers of numbers, strings and tensors (what ``torch.load(...,
    weights_only=True)`` reads): OmegaConf containers resolved, partials and classes as
    ``{"_target_": "module.Name", ...}``, dataclasses as dicts, enums as their values."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        return to_plain(OmegaConf.to_container(value, resolve=True), name)
    if isinstance(value, functools.partial):
        if value.args:
            raise TypeError(f"{name}: a partial with positional arguments cannot be stored; use keywords")
        return {"_target_": dotted_path(value.func), **to_plain(value.keywords, name)}
    if isinstance(value, type):
        return {"_target_": dotted_path(value)}
    if dataclasses.is_dataclass(value):
        return to_plain(dataclasses.asdict(value), name)
    if isinstance(value, enum.Enum):
        return to_plain(value.value, name)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v, f"{name}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{name}: a {type(value).__name__} cannot be stored in a checkpoint that loads with "
                    "weights_only=True; pass numbers, strings, lists or dicts (or leave it out of the "
                    "saved hyper-parameters with save_hyperparameters(ignore=[...]))")


def dotted_path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def import_path(path: str, name: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{name}: cannot import {path!r} ({error})") from None


# ---------------------------------------------------------------------------------------
# optimizer


def optimizer_config(spec: Any) -> dict[str, Any]:
    """A plain ``{"name": registry name | "_target_": "module.Class", **kwargs}`` from a
    registry name, an optimizer class, a ``functools.partial`` (Hydra ``_partial_: true``)
    or a config mapping (dict or OmegaConf, Hydra keys allowed)."""
    if isinstance(spec, str):
        spec = {"_target_": spec} if "." in spec else {"name": spec}
    config = to_plain(spec, "optimizer")
    if not isinstance(config, dict):
        raise TypeError(f"optimizer must be a name, an optimizer class, a partial or a mapping, got {spec!r}")
    config = {k: v for k, v in config.items() if k not in HYDRA_KEYS}
    if "_target_" in config:
        cls = import_path(config.pop("_target_"), "optimizer._target_")
        name = next((n for n, c in OPTIMIZERS.items() if c is cls), None)
        config = {"name": name, **config} if name else {"_target_": dotted_path(cls), **config}
    elif config.get("name") not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {sorted(OPTIMIZERS)} (or give '_target_': "
                         f"'module.Class'), got {config.get('name')!r}")
    optimizer_class(config)  # checks the class and the keyword names before any work
    return config


def optimizer_class(config: Mapping[str, Any]) -> type[torch.optim.Optimizer]:
    cls = OPTIMIZERS[config["name"]] if "name" in config else import_path(config["_target_"], "optimizer._target_")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer._target_ must name a torch.optim.Optimizer subclass, got {cls!r}")
    check_keywords(cls, optimizer_kwargs(config), "optimizer", skip=("params",))
    return cls


def optimizer_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("name", "_target_")}


def check_keywords(fn: Any, kwargs: Mapping[str, Any], name: str, skip: Sequence[str] = ()) -> None:
    parameters = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    allowed = [k for k in parameters if k not in skip and k != "self"]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"{name}.{key}: unknown field for {getattr(fn, '__name__', fn)}; allowed: "
                             f"{', '.join(allowed)}")


def parameter_groups(
    module: nn.Module,
    lr: float,
    weight_decay: float | None,
    decay_norm_and_bias: bool = False,
    no_weight_decay: Sequence[str] = (),
    lr_multipliers: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The trainable parameters of ``module`` split into optimizer groups.

    With a non-zero ``weight_decay`` (``None``: the optimizer takes none), biases, the parameters of
    normalisation layers and every 1-D parameter get ``weight_decay=0`` unless
    ``decay_norm_and_bias``; so do names matching a ``no_weight_decay`` pattern.
    ``lr_multipliers`` maps name patterns (``fnmatch``, e.g. ``"head.*"``) to a factor on
    ``lr``; the first matching pattern wins. A pattern matching no parameter is an error."""
    check_group_options(decay_norm_and_bias, no_weight_decay, lr_multipliers)
    lr_multipliers = dict(lr_multipliers or {})
    for pattern, factor in lr_multipliers.items():
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor < math.inf:
            raise ValueError(f"lr_multipliers[{pattern!r}] must be a finite number >= 0, got {factor!r}")
    norm_params = {id(p) for m in module.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(False)}
    named = [(name.replace("_orig_mod.", ""), p) for name, p in module.named_parameters() if p.requires_grad]
    for field, patterns in (("no_weight_decay", list(no_weight_decay)), ("lr_multipliers", list(lr_multipliers))):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in named):
                raise ValueError(f"{field}: pattern {pattern!r} matches no trainable parameter (names look "
                                 f"like {', '.join(repr(n) for n, _ in named[:3])})")
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in named:
        exempt = bool(weight_decay) and (  # no decay anyway: one group, one kernel batch
            any(fnmatch.fnmatchcase(name, pattern) for pattern in no_weight_decay)
            or (not decay_norm_and_bias and (p.ndim <= 1 or id(p) in norm_params or name.endswith("bias"))))
        factor = next((f for pattern, f in lr_multipliers.items() if fnmatch.fnmatchcase(name, pattern)), 1.0)
        group = groups.setdefault((exempt, float(factor)), {"params": [], "param_names": [], "lr": lr * factor})
        if weight_decay is not None:
            group["weight_decay"] = 0.0 if exempt else weight_decay
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def check_group_options(decay_norm_and_bias: Any, no_weight_decay: Any, lr_multipliers: Any) -> None:
    """The types of :func:`parameter_groups`' options (plain containers: OmegaConf's
    converted by :func:`to_plain` first)."""
    if not isinstance(decay_norm_and_bias, bool):
        raise TypeError(f"decay_norm_and_bias must be a bool, got {decay_norm_and_bias!r}")
    if not isinstance(no_weight_decay, (list, tuple)) or not all(isinstance(p, str) for p in no_weight_decay):
        raise TypeError(f"no_weight_decay must be a list of parameter-name patterns, got {no_weight_decay!r}")
    if lr_multipliers is not None and not isinstance(lr_multipliers, Mapping):
        raise TypeError(f"lr_multipliers must be a mapping of name pattern -> factor, got {lr_multipliers!r}")


def build_optimizer(
    module: nn.Module,
    optimizer: Any,
    decay_norm_and_bias: bool = False,
    no_weight_decay: Sequence[str] = (),
    lr_multipliers: Mapping[str, float] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer named by ``optimizer`` (see :func:`optimizer_config`) over the
    :func:`parameter_groups` of ``module``."""
    config = optimizer_config(optimizer)
    cls, kwargs = optimizer_class(config), optimizer_kwargs(config)
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    lr = kwargs.get("lr", defaults.get("lr"))
    if lr is None:
        raise ValueError(f"optimizer.lr is required by {cls.__name__}")
    weight_decay = kwargs.get("weight_decay", defaults.get("weight_decay"))
    groups = parameter_groups(module, lr, weight_decay, decay_norm_and_bias, no_weight_decay, lr_multipliers)
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to optimize")
    return cls(groups, **kwargs)


# ---------------------------------------------------------------------------------------
# learning-rate schedule

INTERVALS = ("step", "epoch")


def _constant(optimizer, warmup_steps: int = 0, warmup_start_factor: float = 0.01):
    if warmup_steps == 0:
        return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return lr_scheduler.LinearLR(optimizer, warmup_start_factor, 1.0, total_iters=warmup_steps)


class WarmupCosine(lr_scheduler.LRScheduler):
    """A linear warm-up from ``warmup_start_factor * lr`` to ``lr`` over ``warmup_steps``,
    then a half cosine down to ``eta_min`` at ``total_steps``, held there after (torch's
    ``CosineAnnealingLR`` is periodic: it would climb back). The LR is a closed form of
    the step count, so a resumed fit has exactly the uninterrupted one's.

    A checkpoint keeps its plan: resuming with a longer fit keeps the saved
    ``total_steps`` (and says so) and holds ``eta_min`` past it; set
    ``scheduler.total_steps`` to plan a longer run from the start."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 warmup_start_factor: float = 0.01, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"scheduler.total_steps must be an integer >= 1, got {total_steps!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"scheduler.warmup_steps must be an integer in [0, total_steps={total_steps}), "
                             f"got {warmup_steps!r}")
        if not (_is_real(warmup_start_factor) and 0 < warmup_start_factor <= 1):
            raise ValueError(f"scheduler.warmup_start_factor must be a number in (0, 1], got {warmup_start_factor!r}")
        if not (_is_real(eta_min) and 0 <= eta_min < math.inf):
            raise ValueError(f"scheduler.eta_min must be a finite number >= 0, got {eta_min!r}")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.warmup_start_factor, self.eta_min = float(warmup_start_factor), float(eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, base) for base in self.base_lrs]

    def lr_at(self, step: int, base: float) -> float:
        if step < self.warmup_steps:
            return base * (self.warmup_start_factor + (1 - self.warmup_start_factor) * step / self.warmup_steps)
        if step >= self.total_steps:
            return self.eta_min
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * progress)) / 2

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("total_steps", self.total_steps)
        if saved != self.total_steps:
            warnings.warn(f"scheduler: the checkpoint's warmup_cosine plan ends at step {saved}, this fit's would "
                          f"at step {self.total_steps}: keeping the checkpoint's (the LR holds eta_min="
                          f"{self.eta_min:g} after step {saved}); set scheduler.total_steps to plan a longer run",
                          stacklevel=2)
        super().load_state_dict(state_dict)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _step(optimizer, step_size: int, gamma: float = 0.1):
    if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
        raise ValueError(f"scheduler.step_size must be an integer >= 1, got {step_size!r}")
    if not (_is_real(gamma) and gamma > 0):
        raise ValueError(f"scheduler.gamma must be a finite number > 0, got {gamma!r}")
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


def scheduler_config(spec: Any) -> dict[str, Any] | None:
    """A plain ``{"name": ..., "interval": ..., "frequency": ..., "monitor": ..., **kwargs}``
    (or ``None``) from a name, a mapping or ``None``/``"none"``; names are
    :data:`SCHEDULERS` or a class of ``torch.optim.lr_scheduler``."""
    if spec is None or spec == "none":
        return None
    config = to_plain({"name": spec} if isinstance(spec, str) else spec, "scheduler")
    if not isinstance(config, dict):
        raise TypeError(f"scheduler must be a name or a mapping, got {spec!r}")
    config = {k: v for k, v in config.items() if k not in HYDRA_KEYS}
    if config.get("name") is None:
        return None
    builder, interval = scheduler_builder(config["name"])
    config.setdefault("interval", interval)
    config.setdefault("frequency", 1)
    config.setdefault("monitor", None)
    if config["interval"] not in INTERVALS:
        raise ValueError(f"scheduler.interval must be one of {INTERVALS}, got {config['interval']!r}")
    frequency = config["frequency"]
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
        raise ValueError(f"scheduler.frequency must be an integer >= 1, got {frequency!r}")
    is_plateau = builder in (_plateau, lr_scheduler.ReduceLROnPlateau)
    if is_plateau and not config["monitor"]:
        raise ValueError(f"scheduler.monitor is required by {config['name']!r}: the logged metric to watch, "
                         "e.g. 'val_loss'")
    check_keywords(builder, scheduler_kwargs(config), "scheduler", skip=("optimizer",))
    filled = ("optimizer", "total_steps") if builder is WarmupCosine else ("optimizer",)  # total: the fit's
    for key, parameter in inspect.signature(builder).parameters.items():
        if parameter.default is parameter.empty and key not in filled and key != "self" and key not in config \
                and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ValueError(f"scheduler.{key} is required by {config['name']!r}")
    return config


def scheduler_builder(name: str) -> tuple[Any, str]:
    if name in SCHEDULERS:
        return SCHEDULERS[name]
    cls = getattr(lr_scheduler, str(name), None)
    if isinstance(cls, type) and issubclass(cls, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)):
        return cls, "epoch" if cls is lr_scheduler.ReduceLROnPlateau else "step"
    raise ValueError(f"scheduler.name must be one of {sorted(SCHEDULERS)} or a torch.optim.lr_scheduler "
                     f"class name, got {name!r}")


def scheduler_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("name", "interval", "frequency", "monitor")}


def build_scheduler(optimizer: torch.optim.Optimizer, scheduler: Any, total_steps: int | None = None) -> dict | None:
    """Lightning's ``lr_scheduler`` dict for ``scheduler`` (see :func:`scheduler_config`).
    ``total_steps`` (scheduler steps over the fit) fills ``warmup_cosine``'s when unset."""
    config = scheduler_config(scheduler)
    if config is None:
        return None
    builder, _ = scheduler_builder(config["name"])
    kwargs = scheduler_kwargs(config)
    if builder is WarmupCosine and kwargs.get("total_steps") is None:
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
    return {"scheduler": builder(optimizer, **kwargs), "interval": config["interval"],
            "frequency": config["frequency"], "monitor": config["monitor"], "name": None}


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
    estimated optimizer steps, or ``max_epochs`` when ``interval="epoch"``)."""
    opt = build_optimizer(module, optimizer, decay_norm_and_bias, no_weight_decay, lr_multipliers)
    trainer = attached_trainer(module)
    if trainer is not None:  # fit is starting: settings a multi-gradient step cannot work under fail now
        check_trainer(trainer, opt)
    config = scheduler_config(scheduler)
    if config is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": build_scheduler(opt, config, fit_length(module, config))}


def fit_length(module: nn.Module, config: Mapping[str, Any]) -> int | None:
    """Scheduler steps in the attached trainer's fit, if known. Under ``fast_dev_run`` (a
    smoke test of a few steps) at least the warm-up and one step more: the steps taken
    follow the real run's warm-up rather than one squeezed into the debug fit (and warned
    about, where the user has nothing to fix)."""
    trainer = attached_trainer(module)
    if trainer is None:
        return None
    if config["interval"] == "epoch":
        total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
    else:
        total = trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else None
    if total is None:
        return None
    total = max(1, total // config["frequency"])
    if trainer.fast_dev_run:
        total = max(total, int(config.get("warmup_steps") or 0) + 1)
    return total

"""An optimizer from a config: a registry name, an optimizer class, a Hydra partial or a
mapping, normalised to a plain ``{"name" | "_target_": ..., **kwargs}``
(:func:`optimizer_config`), built over parameter groups (no weight decay for biases,
normalisation layers and 1-D parameters; learning-rate multipliers by name pattern)."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .optim import OPTIMIZERS
from .optim.base import ElementwiseOptimizer, check_state_storage
from .plain import HYDRA_KEYS, dotted_path, import_path, keyword_names, to_plain
from .validate import allowed_keywords, boolean, real

__all__ = ["build_optimizer", "check_group_options", "optimizer_class", "optimizer_config", "optimizer_kwargs",
           "optimizer_lr", "parameter_groups"]

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


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
    cls = optimizer_class(config)  # checks the class and the keyword names before any work
    if issubclass(cls, ElementwiseOptimizer):  # and how state and parameters are stored ("bfloat16" is a dtype)
        check_state_storage({k: config[k] for k in ("state_dtype", "param_rounding", "seed") if k in config})
    return config


def optimizer_class(config: Mapping[str, Any]) -> type[torch.optim.Optimizer]:
    cls = OPTIMIZERS[config["name"]] if "name" in config else import_path(config["_target_"], "optimizer._target_")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer._target_ must name a torch.optim.Optimizer subclass, got {cls!r}")
    allowed = keyword_names(cls, skip=("params",))
    if allowed is not None:
        allowed_keywords("optimizer", optimizer_kwargs(config), allowed, cls.__name__)
    return cls


def optimizer_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("name", "_target_")}


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
        real(f"lr_multipliers[{pattern!r}]", factor, 0)
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
    converted by :func:`~lightning_imex.plain.to_plain` first)."""
    boolean("decay_norm_and_bias", decay_norm_and_bias)
    if not isinstance(no_weight_decay, (list, tuple)) or not all(isinstance(p, str) for p in no_weight_decay):
        raise TypeError(f"no_weight_decay must be a list of parameter-name patterns, got {no_weight_decay!r}")
    if lr_multipliers is not None and not isinstance(lr_multipliers, Mapping):
        raise TypeError(f"lr_multipliers must be a mapping of name pattern -> factor, got {lr_multipliers!r}")


def _defaults(cls: type) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def optimizer_lr(config: Mapping[str, Any]) -> Any:
    """The learning rate an :func:`optimizer_config` gives: its ``lr``, else the class's default."""
    return config["lr"] if "lr" in config else _defaults(optimizer_class(config)).get("lr")


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
    lr = optimizer_lr(config)
    if lr is None:
        raise ValueError(f"optimizer.lr is required by {cls.__name__}")
    weight_decay = kwargs.get("weight_decay", _defaults(cls).get("weight_decay"))
    groups = parameter_groups(module, lr, weight_decay, decay_norm_and_bias, no_weight_decay, lr_multipliers)
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to optimize")
    return cls(groups, **kwargs)

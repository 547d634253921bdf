"""An optimizer from a config: a registry name, an optimizer class, a Hydra partial or a
mapping, resolved once into an :class:`OptimizerSpec` (:func:`optimizer_spec`: the class and
its checked keyword arguments) that everything downstream takes as it is, built over
parameter groups (no weight decay for biases, normalisation layers and 1-D parameters;
learning-rate multipliers by name pattern)."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .optim import OPTIMIZERS
from .optim.base import ElementwiseOptimizer, check_state_storage
from .plain import HYDRA_KEYS, ReadOnlyDict, dotted_path, import_path, keyword_names, to_plain
from .validate import allowed_keywords, boolean, real

__all__ = ["OptimizerSpec", "build_optimizer", "check_group_options", "optimizer_spec", "parameter_groups"]

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer config resolved and checked: ``cls(param_groups, **kwargs)`` builds it.

    Checked when made, before any work: ``cls`` is a ``torch.optim.Optimizer``, ``kwargs``
    are keyword arguments it takes (held as plain values, read-only), and this package's
    optimizers' state storage (``state_dtype``, ``param_rounding``, ``seed``) is valid.
    :meth:`plain` is the form a checkpoint stores (it loads with ``weights_only=True``) and
    :func:`optimizer_spec` reads back."""

    cls: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.cls, type) and issubclass(self.cls, torch.optim.Optimizer)):
            raise TypeError(f"optimizer._target_ must name a torch.optim.Optimizer subclass, got {self.cls!r}")
        kwargs = to_plain(self.kwargs, "optimizer")
        if not isinstance(kwargs, dict):
            raise TypeError(f"optimizer: its keyword arguments must be a mapping, got {self.kwargs!r}")
        allowed = keyword_names(self.cls, skip=("params",))
        if allowed is not None:
            allowed_keywords("optimizer", kwargs, allowed, self.cls.__name__)
        if issubclass(self.cls, ElementwiseOptimizer):  # how state and parameters are stored ("bfloat16" is a dtype)
            check_state_storage({k: kwargs[k] for k in ("state_dtype", "param_rounding", "seed") if k in kwargs})
        object.__setattr__(self, "kwargs", ReadOnlyDict(kwargs))

    @property
    def name(self) -> str | None:
        """:attr:`cls`'s name in the registry (``lightning_imex.optim.OPTIMIZERS``), or None."""
        return next((n for n, c in OPTIMIZERS.items() if c is self.cls), None)

    @property
    def lr(self) -> Any:
        """The learning rate it gives: its ``lr``, else the class's default (None if none)."""
        return self.kwargs["lr"] if "lr" in self.kwargs else _defaults(self.cls).get("lr")

    def with_lr(self, lr: Any) -> OptimizerSpec:
        """This spec with learning rate ``lr`` (``Tuner.lr_find``'s suggestion)."""
        return OptimizerSpec(self.cls, {**self.kwargs, "lr": lr})

    def plain(self) -> dict[str, Any]:
        """``{"name": registry name | "_target_": "module.Class", **kwargs}``, a copy."""
        head = {"name": self.name} if self.name else {"_target_": dotted_path(self.cls)}
        return {**head, **copy.deepcopy(dict(self.kwargs))}


def optimizer_spec(optimizer: Any) -> OptimizerSpec:
    """An :class:`OptimizerSpec` from a registry name, ``"module.Class"``, an optimizer
    class, a ``functools.partial`` (Hydra ``_partial_: true``), a config mapping (dict or
    OmegaConf: ``{"name": ..., **kwargs}`` or ``{"_target_": ..., **kwargs}``, Hydra's keys
    allowed) or a spec, which is returned as it is: a config is resolved once."""
    if isinstance(optimizer, OptimizerSpec):
        return optimizer
    if isinstance(optimizer, str):
        optimizer = {"_target_": optimizer} if "." in optimizer else {"name": optimizer}
    config = to_plain(optimizer, "optimizer")
    if not isinstance(config, dict):
        raise TypeError(f"optimizer must be a name, an optimizer class, a partial or a mapping, got {optimizer!r}")
    kwargs = {k: v for k, v in config.items() if k not in (*HYDRA_KEYS, "name", "_target_")}
    if "_target_" in config:
        return OptimizerSpec(import_path(config["_target_"], "optimizer._target_"), kwargs)
    if config.get("name") not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {sorted(OPTIMIZERS)} (or give '_target_': "
                         f"'module.Class'), got {config.get('name')!r}")
    return OptimizerSpec(OPTIMIZERS[config["name"]], kwargs)


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


def build_optimizer(
    module: nn.Module,
    optimizer: Any,
    decay_norm_and_bias: bool = False,
    no_weight_decay: Sequence[str] = (),
    lr_multipliers: Mapping[str, float] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer of ``optimizer`` (a spec, or what :func:`optimizer_spec` reads) over
    the :func:`parameter_groups` of ``module``."""
    spec = optimizer_spec(optimizer)
    if spec.lr is None:
        raise ValueError(f"optimizer.lr is required by {spec.cls.__name__}")
    weight_decay = spec.kwargs.get("weight_decay", _defaults(spec.cls).get("weight_decay"))
    groups = parameter_groups(module, spec.lr, weight_decay, decay_norm_and_bias, no_weight_decay, lr_multipliers)
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to optimize")
    return spec.cls(groups, **spec.kwargs)

"""What the package's optimizers share: hyper-parameter checks, two state buffers per
parameter, the named per-step scalars their programs read, and steps made of
element-wise programs (:mod:`.program`) that :class:`~.kernel.Batch` runs on the path
:func:`~.kernel.select_backend` picks."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Callable, Hashable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from .kernel import Batch, reduction_key, select_backend
from .program import Event, Expr, scalar

__all__ = ["ElementwiseOptimizer", "OnePassOptimizer", "check_adam_hyperparameters", "LR", "B1", "B2", "EPS",
           "WD", "K", "gradient", "decayed"]

# The per-step scalars of the Adam family, by name (values from :meth:`OnePassOptimizer._scalars`).
LR, B1, B2, EPS, WD = scalar("lr"), scalar("b1"), scalar("b2"), scalar("eps"), scalar("wd")
K = scalar("k")  # the step number, from 1


def gradient(g: Expr, p: Expr, maximize: bool, l2: bool) -> Expr:
    """The gradient a program uses: negated when maximizing, then plus L2 weight decay
    (torch's order)."""
    g = -g if maximize else g
    return g + WD * p if l2 else g


def decayed(p: Expr, decoupled: bool) -> Expr:
    """The parameter after decoupled weight decay (AdamW), before the update."""
    return p * (1 - LR * WD) if decoupled else p


def number(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_adam_hyperparameters(group: dict[str, Any]) -> None:
    """Validates the Adam-family fields of a parameter group; errors name the field."""
    for name in ("lr", "eps", "weight_decay"):
        value = number(name, group[name])
        if not value >= 0.0 or math.isinf(value):
            raise ValueError(f"{name} must be a finite number >= 0, got {group[name]!r}")
    betas = group["betas"]
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= number(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
    group["betas"] = tuple(float(b) for b in betas)
    for name in ("decoupled_weight_decay", "maximize", "bias_correction"):
        if name in group and not isinstance(group[name], bool):
            raise TypeError(f"{name} must be a bool, got {group[name]!r}")
    if group.get("fused") is not None and not isinstance(group["fused"], bool):
        raise TypeError(f"fused must be a bool or None, got {group['fused']!r}")


def gradient_flags(group: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(maximize, L2 weight decay, decoupled weight decay): what a group's program does
    with the gradient and the parameters besides its own update."""
    decay = group["weight_decay"] != 0
    decoupled = group.get("decoupled_weight_decay", False)
    return group["maximize"], decay and not decoupled, decay and decoupled


_BATCH_CACHE_SIZE = 64


class ElementwiseOptimizer(Optimizer):
    """An optimizer with two state buffers per parameter (named by ``state_buffers``; its
    programs call them ``m`` and ``v``) whose step runs element-wise programs on the path
    ``fused`` asks for (see :func:`~.kernel.select_backend`). Complex parameters are
    updated as their real views, as torch's Adam does."""

    state_buffers: tuple[str, str] = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any],
                 fused: bool | None) -> None:
        defaults = {**defaults, "fused": fused}
        self._check_group(dict(defaults))  # bad settings fail before params are read
        self._init_caches()
        super().__init__(params, defaults)

    def _init_caches(self) -> None:
        # Per-parameter working buffers of multi-stage programs (contents never outlive a
        # step) and the batches of recent steps: kept between steps, never state.
        self._scratch: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._batch_cache: dict[tuple[int, ...], Batch] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling, deepcopy and load_state_dict land here: fill flags that an older
        # state lacks with their documented defaults, as torch's optimizers do.
        super().__setstate__(state)
        documented = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()
                      if p.default is not inspect.Parameter.empty}
        for group in self.param_groups:
            for key in documented.keys() & self.defaults.keys():
                group.setdefault(key, documented[key])
        self._init_caches()

    @property
    def fused(self) -> bool | None:
        return self.defaults["fused"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:
        check_adam_hyperparameters(group)

    def _init_state(self, state: dict[str, Any], p: Tensor) -> None:
        state["step"] = 0
        for name in self.state_buffers:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _state_key(self, state: dict[str, Any]) -> tuple:
        """What, besides device and dtype, a parameter's scalars depend on."""
        return (state["step"],)

    def _batches(self, group: dict[str, Any], scratch: Sequence[str], scalars: Callable[[tuple], dict[Hashable, float]],
                 without_grad: bool = False) -> list[Batch]:
        """The group's parameters that take part in this step (those with a gradient, or
        all that require one), split by device, dtype, sharding (:func:`~.kernel.reduction_key`)
        and :meth:`_state_key`."""
        split: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None and not (without_grad and p.requires_grad):
                continue
            if p.grad is not None and p.grad.is_sparse:  # refused before any state exists
                raise sparse_error(type(self).__name__, p)
            state = self.state[p]
            if not state:
                self._init_state(state, p)
            split[(p.device, p.dtype, reduction_key(p), *self._state_key(state))].append(p)
        batches = []
        for key, params in split.items():
            states = [self.state[p] for p in params]
            buffers = {"p": params, "m": [s[self.state_buffers[0]] for s in states],
                       "v": [s[self.state_buffers[1]] for s in states]}
            buffers.update({name: [self._scratch_buffer(p, name) for p in params] for name in scratch})
            batch = self._batch(params, buffers, select_backend(group["fused"], params))
            batch.values = scalars(key[3:])
            batches.append(batch)
        return batches

    def _batch(self, params: list[Tensor], buffers: dict[str, list[Tensor]], backend) -> Batch:
        """The batch of an earlier step if it still matches: its tables are built already."""
        key = tuple(map(id, params))
        batch = self._batch_cache.get(key)
        if batch is None or not batch.matches(buffers, backend):
            if len(self._batch_cache) >= _BATCH_CACHE_SIZE:  # parameter sets that come and go
                self._batch_cache.clear()
            batch = self._batch_cache[key] = Batch(params, buffers, backend)
        return batch

    def _scratch_buffer(self, p: Tensor, name: str) -> Tensor:
        buffers = self._scratch.setdefault(p, {})
        if name not in buffers:
            buffers[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return buffers[name]

    def _gradients(self, params: list[Tensor], required: bool = True) -> list[Tensor | None]:
        """The current gradients; a parameter this evaluation did not reach gets zeros."""
        grads = []
        for p in params:
            g = p.grad
            if g is None and required:
                g = torch.zeros_like(p)
            elif g is not None and g.is_sparse:
                raise sparse_error(type(self).__name__, p)
            grads.append(g)
        return grads

    def _count_step(self, batches: Iterable[Batch]) -> None:
        for batch in batches:
            for p in batch.params:
                self.state[p]["step"] += 1


class OnePassOptimizer(ElementwiseOptimizer):
    """An optimizer whose step is one program over (p, g, state) after the closure (or a
    few, for a norm over the group: :meth:`_apply`)."""

    def _events(self, group: dict[str, Any]) -> tuple[Event, ...]:
        raise NotImplementedError

    def _scalars(self, group: dict[str, Any], step: int) -> dict[Hashable, float]:
        """The named scalars of a step after ``step`` completed ones: those of
        :data:`LR`, :data:`B1`, ... and any a subclass adds."""
        (b1, b2), lr = group["betas"], number("lr", group["lr"])
        return {"lr": lr, "b1": b1, "b2": b2, "eps": group["eps"], "wd": group["weight_decay"], "k": step + 1.0}

    def _apply(self, group: dict[str, Any], events: tuple[Event, ...], batches: list[Batch]) -> None:
        (event,) = events
        for batch in batches:
            batch.run(event, self._gradients(batch.params))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            batches = self._batches(group, (), lambda key, group=group: self._scalars(group, key[0]))
            if batches:
                self._apply(group, self._events(group), batches)
                self._count_step(batches)
        return loss


def sparse_error(name: str, p: Tensor) -> RuntimeError:
    return RuntimeError(f"{name} does not support sparse gradients (a parameter of shape {tuple(p.shape)} "
                        "has one); use dense gradients, e.g. nn.Embedding(sparse=False)")

"""What the package's optimizers share: hyper-parameter checks, two state buffers per
parameter, and steps made of element-wise programs that :class:`~.kernel.Batch` runs
eagerly or fused."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Callable, Hashable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from .kernel import Batch, Event, Statement, select_fused

__all__ = ["ElementwiseOptimizer", "OnePassOptimizer", "Program", "check_adam_hyperparameters"]


def number(name: str, value: Any) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
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


def gradient_flags(group: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(maximize, L2 weight decay, decoupled weight decay): what a group's program does
    with the gradient and the parameters besides its own update."""
    decay = group["weight_decay"] != 0
    decoupled = group.get("decoupled_weight_decay", False)
    return group["maximize"], decay and not decoupled, decay and decoupled


class Program:
    """Builds one :class:`Event`: statements plus the keys of the scalars they read."""

    def __init__(self) -> None:
        self.keys: dict[Hashable, int] = {}
        self.statements: list[Statement] = []

    def c(self, key: Hashable) -> int:
        """The coefficient slot of ``key``."""
        return self.keys.setdefault(key, len(self.keys))

    def add(self, *statement) -> None:
        self.statements.append(statement)

    def gradient(self, maximize: bool, l2: bool) -> None:
        """``g = -g`` when maximizing, then ``g += wd * p`` for L2 weight decay (torch's order)."""
        terms = ((self.c(("sign",)), "g"),) if maximize else ((None, "g"),)
        if l2:
            terms += ((self.c(("wd",)), "p"),)
        if maximize or l2:
            self.add("lin", "g", terms)

    def event(self, writes: Iterable[tuple[str, str]], gradient: int = 1, reduce: str | None = None) -> Event:
        """The statements added so far as an event; the next event starts empty and
        shares the coefficient slots."""
        statements, self.statements = tuple(self.statements), []
        return Event(gradient=gradient, statements=statements, writes=tuple(writes), reduce=reduce)


class ElementwiseOptimizer(Optimizer):
    """An optimizer with two state buffers per parameter (named by ``buffers``) whose step
    runs element-wise programs, eager or fused (``fused``: see :func:`~.kernel.select_fused`)."""

    buffers: tuple[str, str] = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any],
                 fused: bool | None) -> None:
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool or None, got {fused!r}")
        self.fused = fused
        # Per-parameter working buffers of multi-stage programs, kept between steps (not
        # state: their contents never outlive a step).
        self._scratch: WeakIdKeyDictionary = WeakIdKeyDictionary()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:
        check_adam_hyperparameters(group)

    def _init_state(self, state: dict[str, Any], p: Tensor) -> None:
        state["step"] = 0
        for name in self.buffers:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _state_key(self, state: dict[str, Any]) -> tuple:
        """What, besides device and dtype, a parameter's coefficients depend on."""
        return (state["step"],)

    def _batches(
        self, group: dict[str, Any], scratch: Sequence[str], coefficients: Callable[[tuple], list[float]],
        without_grad: bool = False,
    ) -> list[Batch]:
        """The group's parameters that take part in this step (those with a gradient, or
        all that require one), split by device, dtype and :meth:`_state_key`."""
        split: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None and not (without_grad and p.requires_grad):
                continue
            if p.grad is not None and p.grad.is_sparse:  # refused before any state exists
                raise sparse_error(type(self).__name__, p)
            state = self.state[p]
            if not state:
                self._init_state(state, p)
            split[(p.device, p.dtype, *self._state_key(state))].append(p)
        batches = []
        for key, params in split.items():
            states = [self.state[p] for p in params]
            buffers = [[s[name] for s in states] for name in self.buffers]
            work = {name: [self._scratch_buffer(p, name) for p in params] for name in scratch}
            batches.append(Batch(params, *buffers, work, coefficients(key[2:]), select_fused(self.fused, params)))
        return batches

    def _scratch_buffer(self, p: Tensor, name: str) -> Tensor:
        buffers = self._scratch.setdefault(p, {})
        if name not in buffers:
            buffers[name] = torch.empty_like(p, memory_format=torch.preserve_format)
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
    """An optimizer whose step is one program over (p, g, state), after the closure."""

    def _event(self, group: dict[str, Any]) -> tuple[Event, tuple[Hashable, ...]]:
        raise NotImplementedError

    def _coefficients(self, group: dict[str, Any], step: int) -> dict[Hashable, float]:
        """Scalars for a step after ``step`` completed ones, by key."""
        raise NotImplementedError

    @staticmethod
    def _moment_coefficients(group: dict[str, Any]) -> dict[Hashable, float]:
        """The scalars every Adam-like program reads: betas, eps, sign and weight decay."""
        (b1, b2), wd = group["betas"], group["weight_decay"]
        return {"b1": b1, "1-b1": 1 - b1, "b2": b2, "1-b2": 1 - b2, "eps": group["eps"], ("sign",): -1.0,
                ("wd",): wd, "decay": 1 - number("lr", group["lr"]) * wd}

    def _apply(self, group: dict[str, Any], event: Event, batches: list[Batch]) -> None:
        for batch in batches:
            batch.run(event, self._gradients(batch.params))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            event, keys = self._event(group)

            def coefficients(key: tuple, group=group) -> list[float]:
                values = self._coefficients(group, key[0])
                return [values[k] for k in keys]

            batches = self._batches(group, (), coefficients)
            if batches:
                self._apply(group, event, batches)
                self._count_step(batches)
        return loss


def sparse_error(name: str, p: Tensor) -> RuntimeError:
    return RuntimeError(f"{name} does not support sparse gradients (a parameter of shape {tuple(p.shape)} "
                        "has one); use dense gradients, e.g. nn.Embedding(sparse=False)")

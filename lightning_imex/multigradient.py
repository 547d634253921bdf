"""Optimizers that call Lightning's training closure more than once per step (IMEX
trapezoidal, ssp3_433, ars222/ars343; also ``torch.optim.LBFGS``).

Lightning's automatic optimization hands the optimizer a closure that runs
``training_step`` and ``backward``; such an optimizer calls it once per gradient stage.
This module checks, when fit starts, the settings under which that silently goes wrong,
and runs a step so that its later evaluations see the same stochastic loss (random
generators rewound: the same dropout masks) and leave no trace besides their gradients:
``self.log`` records once per step (the start point's values), metric objects and
buffers (BatchNorm running statistics) update once, and the step's output is the first
evaluation's."""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch.loops.optimization.automatic import Closure
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torchmetrics import Metric

from .clipping import SkipStep

__all__ = ["IncompatibleSetupError", "StepEvaluations", "check_fit", "requires_closure"]


class IncompatibleSetupError(RuntimeError):
    """A Trainer setting under which a multi-gradient optimizer step would be silently
    wrong; raised before the first optimizer step, and the message names the fix."""


def requires_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` calls its closure more than once or away from the
    current parameters (so gradients cannot be computed before the step)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap a LightningOptimizer
    return isinstance(optimizer, torch.optim.LBFGS) or bool(getattr(optimizer, "requires_closure", False))


def describe(optimizer: Any) -> str:
    tableau = getattr(optimizer, "tableau", None)
    return type(optimizer).__name__ + (f"(tableau={tableau.name!r})" if tableau is not None else "")


def check_fit(trainer: Any) -> None:
    """Raises, before the first step, for settings under which an optimizer that calls
    the closure several times per step would be silently wrong."""
    for optimizer in trainer.optimizers:
        if not requires_closure(optimizer):
            continue
        name = describe(optimizer)
        plugin = trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            raise IncompatibleSetupError(
                f"{name} evaluates the gradient several times per step, but precision={trainer.precision!r} "
                "steps through a GradScaler, which calls the optimizer without the closure: use "
                "precision='bf16-mixed' or '32-true' (or tableau='euler' / reuse_gradient=True)")
        if any(cls.__name__ == "DeepSpeedStrategy" for cls in type(trainer.strategy).__mro__):
            raise IncompatibleSetupError(
                f"{name} evaluates the gradient several times per step, but DeepSpeed steps its engine "
                "without the closure: use strategy='ddp' or 'fsdp' (or tableau='euler' / reuse_gradient=True)")
        if trainer.accumulate_grad_batches > 1:
            raise IncompatibleSetupError(
                f"{name} evaluates the gradient several times per step on one batch, so "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} would add its later evaluations "
                "onto the accumulated gradients: use accumulate_grad_batches=1 with a larger batch (or "
                "tableau='euler' / reuse_gradient=True)")


class StepEvaluations:
    """Runs optimizer steps for ``module``, numbering the closure evaluations of each
    (:attr:`index`, 0 for the first) and undoing the side effects of the later ones."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.index = 0

    def step(self, optimizer: Any, closure: Callable[[], Any] | None, undoable: bool = False) -> bool:
        """``optimizer.step(closure)``; with ``undoable``, a :class:`SkipStep` raised
        during it restores parameters and optimizer state. Returns whether it stepped."""
        saved = OptimizerSnapshot(optimizer) if undoable and requires_closure(optimizer) else None
        count, first, side_effects, random = 0, None, None, None
        # Lightning names logged values by the running hook and does not restore the name
        # when a hook raises; a skipped step's later logs belong to optimizer_step
        hook = getattr(self.module, "_current_fx_name", None)

        def evaluation() -> Any:
            nonlocal count, first, side_effects, random
            self.index, count = count, count + 1
            if self.index == 0:
                random = RandomState()
            else:  # the same dropout masks and augmentations: the same stochastic loss
                random.restore()
            if self.index == 1:  # from here on, buffers and metrics go back to this point
                side_effects = SideEffects(self.module)
            try:
                return closure()
            finally:
                if self.index == 0:
                    first = getattr(closure, "_result", None)
                else:
                    side_effects.restore()

        try:
            optimizer.step(closure=evaluation if closure is not None else None)
        except SkipStep:
            if saved is not None:
                saved.restore()
            self.module._current_fx_name = hook
            return False
        finally:
            self.index = 0
            if isinstance(closure, Closure) and count > 1:
                closure._result = first  # the step's output is its start point's
        return True


class RandomState:
    """The CPU and (initialised) CUDA generators' states."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class SideEffects:
    """The module's buffers and torchmetrics states, to put back after a later evaluation."""

    def __init__(self, module: nn.Module) -> None:
        self.buffers = [(b, b.detach().clone()) for b in module.buffers()]
        self.metrics = [(m, {name: _copy(getattr(m, name)) for name in m._defaults}, m._update_count, m._computed)
                        for m in module.modules() if isinstance(m, Metric)]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, value in self.buffers:
            buffer.copy_(value)
        for metric, states, update_count, computed in self.metrics:
            for name, value in states.items():
                setattr(metric, name, _copy(value))  # a fresh copy: updates may work in place
            metric._update_count, metric._computed = update_count, computed


def _copy(state: Tensor | list) -> Tensor | list:
    return state.detach().clone() if isinstance(state, Tensor) else list(state)


class OptimizerSnapshot:
    """Parameters and optimizer state, copied so that a step can be undone exactly."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        state = self.optimizer.state
        self.saved = [(p, p.detach().clone(), _clone_state(state[p]) if p in state else None)
                      for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def restore(self) -> None:
        state = self.optimizer.state
        for p, value, saved in self.saved:
            p.copy_(value)
            if saved is None:
                state.pop(p, None)
            else:
                state[p] = _clone_state(saved)


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}

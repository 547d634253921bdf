"""Optimizer steps that evaluate the gradient more than once (IMEX trapezoidal,
ssp3_433, ars222/ars343), right in any LightningModule.

Lightning's automatic optimization hands ``optimizer.step`` a closure that runs
``training_step`` and ``backward``; such an optimizer calls it once per gradient stage.
``IMEXAdam`` calls it through :func:`lightning_imex.optim.closure.closure_calls`, which
passes Lightning's closures to :func:`lightning_closure_calls` (the package root
registers it), so whatever module the user wrote, with or without
:class:`~lightning_imex.IMEXModule`:

- the settings under which the step would be silently wrong raise
  :class:`IncompatibleSetupError` before the first step changes anything;
- the later evaluations see the same random numbers (the same dropout masks) and leave
  no trace besides their gradients: ``self.log`` records once per step (the start
  point's values), metric objects and buffers (BatchNorm running statistics) keep only
  the first evaluation's updates, and the step's output is the first evaluation's."""

from __future__ import annotations

import contextlib
import random
import sys
import weakref
from typing import Any, Callable, Iterator

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torchmetrics import Metric

from . import _lightning

__all__ = ["IncompatibleSetupError", "StepCalls", "check_trainer", "gradient_evaluation", "gradient_evaluations_per_step",
           "lightning_closure_calls", "requires_closure"]


class IncompatibleSetupError(RuntimeError):
    """A Trainer setting under which a multi-gradient optimizer step would be silently
    wrong; raised before the first optimizer step, and the message names the fix."""


def requires_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` calls its closure more than once or away from the
    current parameters (so gradients cannot be computed before the step)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap a LightningOptimizer
    return isinstance(optimizer, torch.optim.LBFGS) or bool(getattr(optimizer, "requires_closure", False))


def gradient_evaluations_per_step(optimizer: Any) -> int | None:
    """Gradient evaluations (closure calls) one ``optimizer.step`` makes: an IMEX tableau's
    stage count, 1 for a one-gradient optimizer, None where it varies (LBFGS)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if isinstance(optimizer, torch.optim.LBFGS):
        return None
    return int(getattr(optimizer, "gradient_evaluations_per_step", 1))


def _describe(optimizer: Any) -> str:
    optimizer = getattr(optimizer, "optimizer", optimizer)
    tableau = getattr(optimizer, "tableau", None)
    return type(optimizer).__name__ + (f"(tableau={tableau.name!r})" if tableau is not None else "")


def check_trainer(trainer: Trainer, optimizer: Any) -> None:
    """Raises :class:`IncompatibleSetupError` for a Trainer setting under which
    ``optimizer``, if it calls the closure several times per step, would be wrong."""
    if not requires_closure(optimizer):
        return
    name, fix = _describe(optimizer), "(or tableau='euler' / reuse_gradient=True: one gradient per step)"
    plugin = trainer.precision_plugin
    if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
        raise IncompatibleSetupError(
            f"{name} evaluates the gradient several times per step, but precision={trainer.precision!r} steps "
            f"through a GradScaler, which calls the optimizer without the closure: use precision='bf16-mixed' "
            f"or '32-true' {fix}")
    if any(cls.__name__ == "DeepSpeedStrategy" for cls in type(trainer.strategy).__mro__):
        raise IncompatibleSetupError(
            f"{name} evaluates the gradient several times per step, but DeepSpeed steps its engine without the "
            f"closure: use strategy='ddp' or 'fsdp' {fix}")
    if trainer.accumulate_grad_batches > 1:
        raise IncompatibleSetupError(
            f"{name} evaluates the gradient several times per step on one batch, so accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches} would add its later evaluations onto the accumulated gradients: "
            f"use accumulate_grad_batches=1 with a larger batch {fix}")


# the step running for each module, for gradient_evaluation()
_RUNNING: weakref.WeakKeyDictionary[nn.Module, StepCalls] = weakref.WeakKeyDictionary()


def gradient_evaluation(module: nn.Module) -> int:
    """Which closure evaluation of ``module``'s current optimizer step is running: 0 for
    the first (at the step's start point), 1 for the second, ..."""
    calls = _RUNNING.get(module)
    return calls.index if calls is not None else 0


@contextlib.contextmanager
def lightning_closure_calls(optimizer: Any, closure: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
    """The closure adapter for Lightning (:func:`~lightning_imex.optim.closure.closure_calls`):
    checks the Trainer, then yields a :class:`StepCalls` for the step."""
    found = _lightning.training_closure(closure)
    if found is None:  # a closure Lightning did not build (e.g. Fabric's user code)
        yield closure
        return
    module, inner = found
    trainer = _lightning.attached_trainer(module)
    if trainer is not None:
        check_trainer(trainer, optimizer)
    with step_calls(module, closure, inner) as calls:
        yield calls


@contextlib.contextmanager
def step_calls(module: LightningModule, closure: Callable[[], Any],
               inner: Callable[[], Any] | None = None) -> Iterator[StepCalls]:
    """:class:`StepCalls` of ``closure`` for one step of ``module``; ``inner`` is the
    Lightning closure within it whose recorded output is the step's (default ``closure``)."""
    calls = _RUNNING[module] = StepCalls(module, closure, closure if inner is None else inner)
    try:
        yield calls
    finally:
        del _RUNNING[module]
        calls.finish()


class StepCalls:
    """Calls ``closure`` once per gradient evaluation of one optimizer step of ``module``
    (:attr:`index` numbers them), undoing the side effects of all but the first."""

    def __init__(self, module: LightningModule, closure: Callable[[], Any], inner: Callable[[], Any]) -> None:
        self.module, self.closure, self.inner = module, closure, inner
        self.index, self.calls = 0, 0
        self.random: RandomState | None = None
        self.side_effects: SideEffects | None = None
        self.first_output: Any = None

    def __call__(self) -> Any:
        self.index, self.calls = self.calls, self.calls + 1
        if self.index == 0:
            self.random = RandomState()
            try:
                return self.closure()
            finally:
                self.first_output = _lightning.step_output(self.inner)
        self.random.restore()  # the same dropout masks and augmentations: the same stochastic loss
        if self.index == 1:  # from here on, buffers and metrics go back to this point
            self.side_effects = SideEffects(self.module)
        self.module.__dict__["log"] = _no_log  # shadows LightningModule.log (and log_dict) for this call
        try:
            return self.closure()
        finally:
            del self.module.__dict__["log"]
            self.side_effects.restore()

    def finish(self) -> None:
        """After the step: its output is the first evaluation's."""
        if self.calls > 1:
            _lightning.set_step_output(self.inner, self.first_output)
        self.index = 0


def _no_log(*args: Any, **kwargs: Any) -> None:
    """``self.log`` during a step's later gradient evaluations: the step logs its start point's values once."""


class RandomState:
    """The generators a training step may draw from: torch's CPU and (initialised) CUDA
    generators, Python's ``random`` and NumPy's global one. :meth:`state_dict` holds
    only tensors, numbers and strings (a checkpoint that loads with ``weights_only=True``)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.python = random.getstate()
        numpy = sys.modules.get("numpy")
        self.numpy = numpy.random.get_state() if numpy is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None and len(self.cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.python
        state = {"torch": self.cpu, "cuda": list(self.cuda or []),
                 "python": {"version": version, "internal": torch.tensor(internal), "gauss": gauss}}
        if self.numpy is not None:
            kind, keys, pos, has_gauss, cached = self.numpy
            state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": pos,
                              "has_gauss": has_gauss, "cached_gaussian": cached}
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RandomState:
        self = cls.__new__(cls)
        self.cpu, self.cuda = state["torch"], state["cuda"] or None
        python = state["python"]
        self.python = (python["version"], tuple(python["internal"].tolist()), python["gauss"])
        numpy, saved = sys.modules.get("numpy"), state.get("numpy")
        self.numpy = None
        if numpy is not None and saved is not None:
            self.numpy = (saved["kind"], saved["keys"].numpy().astype(numpy.uint32), saved["pos"],
                          saved["has_gauss"], saved["cached_gaussian"])
        return self


class SideEffects:
    """The module's buffers and torchmetrics states, to put back after a later evaluation."""

    def __init__(self, module: nn.Module) -> None:
        self.buffers = [(b, b.detach().clone()) for b in module.buffers()]
        self.metrics = [(m, _lightning.metric_state(m)) for m in module.modules() if isinstance(m, Metric)]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, value in self.buffers:
            buffer.copy_(value)
        for metric, saved in self.metrics:
            _lightning.restore_metric_state(metric, saved)


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

"""Every private Lightning and torchmetrics API the package relies on, in one place.

Checked against lightning 2.6.0 - 2.6.6 and torchmetrics 1.4 - 1.8 (``pyproject.toml``
pins ``lightning>=2.6,<2.7``). When a new release changes one of these, this module is
the one to update; ``tests/test_lightning_private.py`` fails first."""

from __future__ import annotations

import functools
from typing import Any, Callable

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loops.optimization.automatic import Closure
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torchmetrics import Metric

__all__ = ["attached_trainer", "current_hook", "logs_this_step", "metric_state", "restore_metric_state",
           "set_current_hook", "set_step_output", "step_output", "training_closure"]


def training_closure(closure: Callable[[], Any]) -> tuple[LightningModule, Callable[[], Any]] | None:
    """``(module, inner closure)`` when ``closure`` is what Lightning's precision plugin
    passes to ``optimizer.step``: ``partial(Precision._wrap_closure, module, optimizer,
    inner)``, the inner one running ``training_step`` and ``backward``."""
    if not isinstance(closure, functools.partial) or len(closure.args) != 3:
        return None
    plugin = getattr(closure.func, "__self__", None)
    if not isinstance(plugin, Precision) or getattr(closure.func, "__name__", "") != "_wrap_closure":
        return None
    module, _, inner = closure.args
    return (module, inner) if isinstance(module, LightningModule) else None


def step_output(closure: Callable[[], Any]) -> Any:
    """What automatic optimization's closure recorded for its last call (``None`` for
    another closure)."""
    return closure._result if isinstance(closure, Closure) else None


def set_step_output(closure: Callable[[], Any], output: Any) -> None:
    """Makes ``output`` the step's ``training_step`` output (what ``on_train_batch_end``
    and the epoch's outputs see)."""
    if isinstance(closure, Closure):
        closure._result = output


def attached_trainer(module: Any) -> Trainer | None:
    """The Trainer ``module`` is attached to (``None`` for none, or a plain ``nn.Module``);
    the public ``trainer`` property raises when none is."""
    return getattr(module, "_trainer", None)


def current_hook(module: LightningModule) -> str | None:
    """The hook Lightning names ``self.log`` records after."""
    return module._current_fx_name


def set_current_hook(module: LightningModule, name: str | None) -> None:
    module._current_fx_name = name


def logs_this_step(trainer: Trainer | None) -> bool:
    """Whether the Trainer's loggers record this step (``log_every_n_steps``)."""
    if trainer is None or not trainer.loggers:
        return False
    return trainer._logger_connector.should_update_logs


def metric_state(metric: Metric) -> tuple[dict[str, Tensor | list], int, Any]:
    """A copy of ``metric``'s accumulated state, to put back with :func:`restore_metric_state`."""
    return {name: _copy(getattr(metric, name)) for name in metric._defaults}, metric._update_count, metric._computed


def restore_metric_state(metric: Metric, saved: tuple[dict[str, Tensor | list], int, Any]) -> None:
    states, update_count, computed = saved
    for name, value in states.items():
        setattr(metric, name, _copy(value))  # a fresh copy: updates may work in place
    metric._update_count, metric._computed = update_count, computed


def _copy(state: Tensor | list) -> Tensor | list:
    return state.detach().clone() if isinstance(state, Tensor) else list(state)

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

__all__ = ["attached_trainer", "current_hook", "loaded_checkpoint", "logs_this_step", "metric_state",
           "restore_metric_state", "resume_fit_loop", "saves_distributed_checkpoint", "set_current_hook",
           "set_model_parallel_sizes", "set_step_output", "step_output", "training_closure"]


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


def loaded_checkpoint(trainer: Trainer) -> dict[str, Any] | None:
    """The checkpoint a fit resumes from, while its setup runs (``configure_optimizers``
    included, unless the strategy restores after setting up); None otherwise."""
    return trainer._checkpoint_connector._loaded_checkpoint or None


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


def resume_fit_loop(trainer: Trainer) -> None:
    """Puts right what Lightning 2.6's fit loop gets wrong when it resumes from a
    checkpoint, so that the resumed fit goes on as the uninterrupted one did: the same
    batches, hooks and counters. Called at ``on_train_start``: after the loop's ``reset()``
    has read the checkpoint's progress, before the first epoch starts.

    * The training loader's state is loaded only by ``setup_data()``, which does nothing
      when the loader is set up already: ``configure_optimizers`` sets it up, before the
      checkpoint's loop state is restored, when it asks for
      ``trainer.estimated_stepping_batches`` in a fit bounded by ``max_epochs`` (as a
      schedule spanning the fit does). The state would be dropped, and the interrupted
      epoch trained again from its first batch.
    * A checkpoint saved after an epoch's last batch (``on_train_batch_end``): ``reset()``
      counts that epoch finished but keeps the "restarted mid-epoch" stage, so the next
      epoch would start without ``on_train_epoch_start`` and without counting itself
      started. A checkpoint saved during that epoch would then read as saved before it:
      a fit bounded by ``max_epochs`` resumed from it would train the epoch again from its
      first batch.
    * A checkpoint saved at an epoch's end (``on_train_epoch_end``, where ModelCheckpoint
      saves by default) of a fit bounded by ``max_steps``: the loop would finish that
      epoch a second time, in an empty pass that calls its ``on_train_epoch_end`` hooks
      again and counts one more epoch processed and one more batch stepped (the loggers'
      step) with every such resume. Instead the epoch is counted completed and the next
      one starts afresh, as Lightning does in a fit bounded by ``max_epochs``."""
    fit_loop = trainer.fit_loop
    fit_loop._load_combined_loader_states()  # nothing to load if setup_data() did (or no resume)
    epochs = fit_loop.epoch_progress.current
    if fit_loop.restarted_mid_epoch and epochs.processed == epochs.started:
        fit_loop.reset_restart_stage()
    elif fit_loop.restarted_on_epoch_end:
        fit_loop.epoch_progress.increment_completed()
        fit_loop.reset_restart_stage()
        fit_loop.epoch_loop.restarting = False  # the next epoch from its first batch, not the saved one's end


def saves_distributed_checkpoint(strategy: Any) -> bool:
    """Whether a ``ModelParallelStrategy`` saves folders of shards (its constructor's
    ``save_distributed_checkpoint``)."""
    return bool(getattr(strategy, "_save_distributed_checkpoint", False))


def set_model_parallel_sizes(strategy: Any, data_parallel: int, tensor_parallel: int) -> None:
    """The device mesh's sizes of a ``ModelParallelStrategy`` (its constructor's
    ``data_parallel_size`` and ``tensor_parallel_size``), set before its
    ``setup_environment`` builds the mesh: once the Trainer has counted the devices."""
    strategy._data_parallel_size, strategy._tensor_parallel_size = data_parallel, tensor_parallel

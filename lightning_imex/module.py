"""``IMEXModule``: a LightningModule base class that builds its optimizer and schedule
from configs, clips gradients, and runs multi-gradient optimizer steps correctly; a
subclass writes only the model and the step logic."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict

from . import _lightning
from .clipping import GradientClipping, SkipStep, clip_gradients
from .factory import configure_optimizers, with_schedule
from .multigradient import (OptimizerSnapshot, RandomState, check_trainer, gradient_evaluation, requires_closure,
                            step_calls)
from .optimizers import OptimizerSpec, build_optimizer, check_group_options, optimizer_spec
from .plain import to_plain
from .schedules import scheduler_spec

__all__ = ["IMEXModule"]


class IMEXModule(L.LightningModule):
    """Subclass it, build the network in ``__init__`` and write ``training_step`` (and
    the validation/test steps)::

        class Classifier(IMEXModule):
            def __init__(self, hidden: int = 64, **kwargs):
                super().__init__(**kwargs)
                self.save_hyperparameters()
                self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

            def training_step(self, batch, batch_idx):
                x, y = batch
                loss = F.cross_entropy(self.net(x), y)
                self.log("train_loss", loss)
                return loss

        Classifier(optimizer={"name": "imex_adam", "lr": 3e-3, "tableau": "trapezoidal"},
                   scheduler={"name": "warmup_cosine", "warmup_steps": 50},
                   clipping={"algorithm": "norm", "threshold": 1.0})

    Args:
        optimizer: an :class:`~lightning_imex.optimizers.OptimizerSpec`, a registry name,
            an optimizer class, a Hydra partial or a config mapping
            (:func:`~lightning_imex.optimizers.optimizer_spec`).
        scheduler: ``None``, a :class:`~lightning_imex.schedules.SchedulerSpec` or a
            schedule config (:func:`~lightning_imex.schedules.scheduler_spec`).
        clipping: a :class:`~lightning_imex.clipping.GradientClipping` or a mapping of
            its fields; ``None`` clips nothing (unless the Trainer's
            ``gradient_clip_val`` is set) and raises on non-finite gradients.

    Each config is resolved once, here, into its spec (:attr:`optimizer_spec`,
    :attr:`scheduler_spec`, :attr:`clipping`; a spec is kept as it is), which the fit
    uses as it is.
        decay_norm_and_bias, no_weight_decay, lr_multipliers: parameter groups
            (:func:`~lightning_imex.optimizers.parameter_groups`).

    With an optimizer that evaluates several gradients per step, ``training_step`` runs
    once per evaluation; :attr:`gradient_evaluation` says which (0 = the step's start
    point). As in any LightningModule (:mod:`lightning_imex.multigradient`), ``self.log``
    records only the first, and buffers (BatchNorm statistics) and torchmetrics states
    keep only the first's updates; this class adds ``torch.optim.LBFGS`` to that and the
    ``clipping.nonfinite="skip"`` policy (a skipped step moves neither the parameters,
    the optimizer state, the LR schedule nor ``ModelEMA``). ``save_hyperparameters``
    stores the specs' plain forms and every other value as plain containers, so
    checkpoints load with ``weights_only=True``;
    they also carry the random generators' states, restored when a resumed fit's
    training starts (dropout draws what the uninterrupted fit drew, as long as the
    DataLoaders have their own ``generator``). A resumed fit also gets its training
    loader's state and the fit loop's counters and hooks where Lightning 2.6 would lose
    them (:func:`lightning_imex._lightning.resume_fit_loop`).
    """

    can_skip_steps = True  # clipping.nonfinite="skip" needs an optimizer_step that can undo a step

    def __init__(
        self,
        optimizer: Any = "imex_adam",
        scheduler: Any = None,
        clipping: Any = None,
        decay_norm_and_bias: bool = False,
        no_weight_decay: Sequence[str] = (),
        lr_multipliers: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_spec = optimizer_spec(optimizer)
        self.scheduler_spec = scheduler_spec(scheduler)
        self.clipping = GradientClipping.from_config(clipping)
        no_weight_decay, lr_multipliers = (to_plain(no_weight_decay, "no_weight_decay"),
                                           to_plain(lr_multipliers, "lr_multipliers"))
        check_group_options(decay_norm_and_bias, no_weight_decay, lr_multipliers)
        self.param_group_config = dict(decay_norm_and_bias=decay_norm_and_bias, no_weight_decay=tuple(no_weight_decay),
                                       lr_multipliers=dict(lr_multipliers or {}))
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients (clipping.nonfinite="skip")
        # whether the latest optimizer step was skipped: then the LR schedule and ModelEMA
        # do not advance either (Lightning's global_step does)
        self.last_step_skipped = False
        self._resumed_random_state: RandomState | None = None
        # (spec, optimizer) built by checked_optimizer(), for the fit's configure_optimizers
        self._checked: tuple[OptimizerSpec, torch.optim.Optimizer] | None = None

    @property
    def lr(self) -> float:
        """The optimizer's learning rate (``optimizer.lr``, else its class's default).
        ``Tuner.lr_find`` finds it here (Lightning looks for ``lr`` on the module) and
        writes its suggestion here: the fit's ``configure_optimizers`` builds the
        optimizer with it, and the saved ``optimizer`` hyper-parameter keeps it."""
        return self.optimizer_spec.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer_spec = self.optimizer_spec.with_lr(value)
        if "optimizer" in self.hparams:  # what load_from_checkpoint rebuilds the module with
            self.hparams["optimizer"] = self.optimizer_spec.plain()

    @property
    def gradient_evaluation(self) -> int:
        """Which closure evaluation of the current optimizer step is running (0 first)."""
        return gradient_evaluation(self)

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None, frame: Any = None,
                             logger: bool = True) -> None:
        """Lightning's, with the optimizer, scheduler and clipping as their specs' plain
        forms (what ``__init__`` resolved, not the values given) and every other value
        made plain (:func:`~lightning_imex.plain.to_plain`): an unstorable one is an error
        now rather than at the first checkpoint."""
        frame = frame if frame is not None else inspect.currentframe().f_back
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        specs = {"optimizer": self.optimizer_spec.plain(), "clipping": to_plain(self.clipping),
                 "scheduler": self.scheduler_spec.plain() if self.scheduler_spec is not None else None}
        hparams = {key: specs[key] if key in specs else value for key, value in self._hparams.items()}
        self._hparams = AttributeDict(to_plain(hparams, "hyper-parameter"))
        self._hparams_initial = copy.deepcopy(self._hparams)

    def checked_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of the next fit, built now so that its hyper-parameters (and a
        checkpoint's state, loaded into it) can be checked before the fit starts. That
        fit's :meth:`configure_optimizers` takes it rather than building another, unless
        the optimizer config (``lr``, which ``Tuner.lr_find`` sets) or the parameters (a
        sharding strategy replaces them) have changed since; either way only once. Asked
        again before the fit, it answers the one it built."""
        if self._checked is not None and self._checked[0] is self.optimizer_spec and _optimizes(self._checked[1], self):
            return self._checked[1]
        optimizer = build_optimizer(self, self.optimizer_spec, **self.param_group_config)
        self._checked = (self.optimizer_spec, optimizer)
        return optimizer

    def configure_optimizers(self) -> Any:
        trainer = _lightning.attached_trainer(self)
        if trainer is not None:  # both clipping settings given is an error before any work
            self.clipping.with_trainer(trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        checked, self._checked = self._checked, None
        if checked is not None and checked[0] is self.optimizer_spec and _optimizes(checked[1], self):
            return with_schedule(self, checked[1], self.scheduler_spec)
        return configure_optimizers(self, self.optimizer_spec, self.scheduler_spec, **self.param_group_config)

    def __getstate__(self) -> dict[str, Any]:
        # a copy (ddp_spawn's workers, deepcopy) builds its own optimizer
        return {**super().__getstate__(), "_checked": None}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip_gradients(self, optimizer, self.clipping, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        undoable = self.clipping.nonfinite == "skip"
        saved = OptimizerSnapshot(optimizer) if undoable and requires_closure(optimizer) else None
        hook = _lightning.current_hook(self)
        self.last_step_skipped = False
        try:
            if isinstance(getattr(optimizer, "optimizer", optimizer), torch.optim.LBFGS) and optimizer_closure:
                check_trainer(self.trainer, optimizer)  # torch's LBFGS calls the closure itself, unadapted
                with step_calls(self, optimizer_closure) as calls:
                    optimizer.step(closure=calls)
            else:
                optimizer.step(closure=optimizer_closure)
        except SkipStep:
            if saved is not None:
                saved.restore()
            # Lightning names logged values by the running hook and does not restore the
            # name when a hook raises; the skipped_steps record belongs to optimizer_step
            _lightning.set_current_hook(self, hook)
            self.skipped_steps += 1
            self.last_step_skipped = True
        if undoable and self.clipping.log and _lightning.logs_this_step(_lightning.attached_trainer(self)):
            self.log("skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if not self.last_step_skipped:  # a skipped step is not a step
            super().lr_scheduler_step(scheduler, metric)

    def on_train_start(self) -> None:
        trainer = _lightning.attached_trainer(self)
        if trainer is not None:
            _lightning.resume_fit_loop(trainer)
        # after the sanity check and the loaders' setup: the first step draws what the
        # uninterrupted fit's next step drew
        if self._resumed_random_state is not None:
            self._resumed_random_state.restore()
            self._resumed_random_state = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "random_state" in checkpoint:
            self._resumed_random_state = RandomState.from_state_dict(checkpoint["random_state"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["random_state"] = RandomState().state_dict()
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = to_plain(dict(checkpoint["hyper_parameters"]), "hyper-parameter")
            checkpoint.pop("hparams_type", None)


def _optimizes(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> bool:
    """Whether ``optimizer`` holds exactly the module's trainable parameters (the same
    tensors: not the ones a sharding strategy has replaced)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return held == {id(p) for p in module.parameters() if p.requires_grad}

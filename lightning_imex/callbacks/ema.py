"""``ModelEMA``: the Lightning callback over :class:`lightning_imex.ema.EMA` (docs/algorithms.md,
sections 1, 4 and 5): one update per optimizer step, the EMA swapped in for validation,
test and predict, and checkpointed so that a resumed fit continues exactly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .. import _lightning
from ..atomic import torch_save
from ..clipping import step_skipped
from ..ema import EMA, FSDP1_MODULE, SCHEDULES, check_options, decay_from_optimizer, reshard, tracked_tensors
from ..ema_offload import build_ema
from ..sharding import COPY_MARK, is_sharded_checkpoint, load_weight_copies
from ..validate import boolean, choice, integer

__all__ = ["EVALUATE", "RAW_IN_STATE_DICT", "RAW_SUFFIX", "SCHEDULES", "ModelEMA"]

EVALUATE = ("ema", "raw", "both")
SHARDED = ("FSDPStrategy", "ModelParallelStrategy")
RAW_SUFFIX = "_raw"
# where the raw weights go under a strategy that shards state_dict alone (Lightning's
# ModelParallelStrategy): inside state_dict, under names no module weight has
RAW_IN_STATE_DICT = f"{COPY_MARK}current_model_state/"
# other callbacks that put averaged weights into the module: with ModelEMA, the result
# would depend on the order of the callbacks
AVERAGING = (StochasticWeightAveraging, WeightAveraging)


class ModelEMA(L.Callback):
    r"""Model EMA ``e_k = d_k e_{k-1} + (1 - d_k) theta_k``, one update per optimizer step.

    Args:
        decay: ``d`` in (0, 1), or ``"optimizer"``: the first parameter group's
            ``betas[0]`` (the Ahn-Cutkosky coupling; the schedule then defaults to the
            group's ``ema_schedule`` if it sets one, else ``zero_start``).
        schedule, gamma, power, min_decay, update_every, include_buffers, device: as
            :class:`~lightning_imex.ema.EMA` (``fixed``, ``warmup``: the default for a float
            decay, ``power``, ``zero_start``). ``k`` = 1, 2, ... counts the optimizer steps
            since the EMA started; a step the module skipped
            (:class:`~lightning_imex.clipping.SkipsSteps`) is not counted.
        start_step: the EMA starts at the weights after this many optimizer steps; before
            its first update nothing is swapped.
        evaluate: what validation runs on: ``ema``, ``raw``, or ``both``: the EMA under the
            names the module logs (``val_loss``), then the raw weights with ``_raw``
            appended (``val_loss_raw``); each torchmetrics ``Metric`` of the module gets a
            twin for the raw pass.
        swap_test, swap_predict: test and predict on the EMA weights.
        end_with: ``ema`` or ``raw``: the weights the module holds after fit.
        export_path: at the end of fit, write the EMA weights there as a plain
            ``state_dict`` (loads with ``torch.load(..., weights_only=True)``).

    Every fit starts a new average from the module's weights (those of the checkpoint when
    it resumes from one): nothing carries over from an earlier fit of this callback.

    Checkpoints have the layout of Lightning's ``EMAWeightAveraging``: ``state_dict`` holds
    the EMA weights (so ``load_from_checkpoint`` gives the EMA model), ``current_model_state``
    the raw weights, ``averaging_state`` the update count; the callback's own state holds
    the counters that make a resumed fit bit-identical. A fit resumes from an
    ``EMAWeightAveraging`` checkpoint too. Validate / test / predict given a checkpoint
    evaluate its weights: the EMA, or the raw ones where the stage evaluates raw weights
    or where the checkpoint is the best of a ``ModelCheckpoint`` that monitors a ``_raw``
    metric (the weights it ranked).

    Under FSDP2 (:class:`~lightning_imex.sharding.FSDP2Strategy`, the app's ``strategy=fsdp``,
    or Lightning's ``ModelParallelStrategy`` with a module that calls ``fully_shard`` in
    ``configure_model``) each rank averages and swaps its own shards of the weights
    (nothing gathered, the EMA per rank the size of its shard); checkpoints (folders of
    shards: ``save_distributed_checkpoint=True``) hold the EMA and the raw weights as
    DTensors in the sharded part, so that each rank restores its own: the raw ones as
    ``current_model_state`` under ``FSDP2Strategy``, and under ``ModelParallelStrategy``
    (which shards ``state_dict`` alone) inside ``state_dict`` under names starting with
    ``RAW_IN_STATE_DICT``, which loading the module and ``consolidate`` leave out.
    ``export_path`` is gathered once, at the end.

    Under FSDP1 (Lightning's ``FSDPStrategy``, ``use_orig_params`` True or False) the EMA
    averages the FSDP wrapper's weights: each rank its pieces of the FlatParameters'
    shards, nothing gathered in an update. Checkpoints hold the EMA in ``state_dict`` in the
    strategy's layout (``state_dict_type="sharded"``: FSDP's per-parameter shards, every
    rank's saved, and the raw ones beside them under ``RAW_IN_STATE_DICT``; ``"full"``: whole
    tensors gathered to rank 0, the raw ones in ``current_model_state``), which FSDP
    gathers each unit to build, as for the module's own.

    Override :meth:`make_ema` to average with a subclass of :class:`~lightning_imex.ema.EMA`.
    """

    def __init__(
        self,
        decay: float | str = 0.999,
        schedule: str | None = None,
        *,
        gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        update_every: int = 1,
        start_step: int = 0,
        evaluate: str = "ema",
        swap_test: bool = True,
        swap_predict: bool = True,
        include_buffers: bool = True,
        device: str | torch.device | None = None,
        end_with: str = "ema",
        export_path: str | os.PathLike | None = None,
    ) -> None:
        check_options(decay=decay, schedule=schedule, gamma=gamma, power=power, min_decay=min_decay,
                      update_every=update_every, include_buffers=include_buffers)
        if isinstance(decay, torch.optim.Optimizer):
            raise ValueError("decay must be a number in (0, 1) or 'optimizer', got an optimizer instance")
        choice("evaluate", evaluate, EVALUATE)
        choice("end_with", end_with, ("ema", "raw"))
        integer("start_step", start_step, 0)
        boolean("swap_test", swap_test)
        boolean("swap_predict", swap_predict)
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device or None, got {device!r}") from None
        self.decay_option, self.schedule_option = decay, schedule
        self.gamma, self.power, self.min_decay = gamma, power, min_decay
        self.update_every, self.start_step = update_every, start_step
        self.evaluate, self.swap_test, self.swap_predict = evaluate, swap_test, swap_predict
        self.include_buffers, self.end_with, self.export_path = include_buffers, end_with, export_path
        self._new_fit()

    def _new_fit(self) -> None:
        """Forgets everything a fit keeps: the next fit starts a new average."""
        self.decay: float | None = None  # resolved at fit start
        self.schedule: str | None = None
        self.ema: EMA | None = None  # the average, from start_step on
        self.last_step = -1  # trainer.global_step at the EMA's start or latest step
        self._resumed: tuple[list[Tensor], dict[str, Any]] | None = None  # a checkpoint's, until built
        self._swapped_for_stage = False
        self._twins: dict[str, nn.Module] | None = None

    def make_ema(self, pl_module: nn.Module) -> EMA:
        """The average of ``pl_module`` from its current weights (decay and schedule resolved);
        with ``device="cpu"`` and a CUDA module, updated off the critical path (``OffloadedEMA``).
        Under FSDP1 ``pl_module`` is the FSDP wrapper around the LightningModule (the root
        unit's weights are its own)."""
        return build_ema(pl_module, self.decay, self.schedule, gamma=self.gamma, power=self.power,
                         min_decay=self.min_decay, update_every=self.update_every,
                         include_buffers=self.include_buffers, device=self.device)

    @property
    def updates(self) -> int:
        return 0 if self.ema is None else self.ema.updates

    # ---------------------------------------------------------------- fit
    @staticmethod
    def check_strategy(strategy: Any) -> None:
        """One line where ``strategy`` shards the weights in a way the EMA cannot follow: a
        ``ModelParallelStrategy`` that gathers its checkpoints into one file from rank 0
        (which would not hold the other ranks' EMA shards)."""
        names = [c.__name__ for c in type(strategy).__mro__]
        if "ModelParallelStrategy" in names and not _lightning.saves_distributed_checkpoint(strategy):
            raise RuntimeError(f"ModelEMA under {type(strategy).__name__} needs save_distributed_checkpoint=True "
                               "(strategy=fsdp in the app): a folder of shards holds every rank's shards of the "
                               "EMA, which a checkpoint gathered into one file by rank 0 would not")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_strategy(trainer.strategy)
        if stage != "fit":
            return
        others = [type(c).__name__ for c in trainer.callbacks if isinstance(c, AVERAGING)]
        if others:
            raise ValueError(f"ModelEMA cannot run with {', '.join(others)}: both put averaged weights into the "
                             "module for validation and at the end of fit, so the result would depend on the "
                             "callbacks' order; use one of them")
        self._new_fit()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.decay_option == "optimizer":
            self.decay, self.schedule = decay_from_optimizer(trainer.optimizers[0], self.schedule_option)
        else:
            self.decay, self.schedule = float(self.decay_option), self.schedule_option or "warmup"
        self._build_resumed(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._build_resumed(pl_module)  # a strategy that restores checkpoints after on_fit_start

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.ema is None and trainer.global_step >= self.start_step:
            self.ema, self.last_step = self.make_ema(_averaged(pl_module)), trainer.global_step  # e_0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimizer steps: with gradient accumulation, or an optimizer that
        # evaluates its closure several times (IMEX), still one update per step
        if self.ema is None or trainer.global_step == self.last_step:
            return
        self.last_step = trainer.global_step
        if not step_skipped(pl_module):  # a step skipped for non-finite gradients is not a step
            self.ema.update()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.updates == 0:
            return
        if self.export_path is not None:
            whole = self.ema.full_state_dict()  # gathered, once, with every rank taking part
            if trainer.is_global_zero:
                torch_save({name: t.detach().cpu() for name, t in whole.items()}, Path(self.export_path))
            rank_zero_info(f"ModelEMA: EMA weights written to {self.export_path}")
        if self.end_with == "ema" and self.ema.holding == "raw":
            self.ema.swap()

    # ---------------------------------------------------------------- evaluation
    def _swap_in(self, wanted: bool, pl_module: nn.Module) -> None:
        ema = self.ema
        if wanted and ema is not None and ema.updates > 0 and ema.holding == "raw":  # no EMA before the first update
            if ema.model is not _averaged(pl_module):
                rank_zero_warn("ModelEMA: this module is not the one the EMA averaged; it is evaluated as it is")
                return
            ema.swap()
            self._swapped_for_stage = True

    def _swap_out(self) -> None:
        if self._swapped_for_stage:
            self.ema.swap()
            self._swapped_for_stage = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._build_resumed(pl_module)
        self._swap_in(self.evaluate != "raw", pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = self.ema
        if self.evaluate == "both" and ema is not None and ema.holding == "ema" and ema.model is _averaged(pl_module):
            self._twins = {name: m.clone() for name, m in _top_metrics(pl_module)}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int | None = None) -> None:
        """evaluate="both": the module's validation step ran on the EMA; it runs again on the
        raw weights, through a view of the module that logs every name with ``_raw``
        appended and holds each metric's twin in its place (the module is not touched)."""
        if self._twins is None:
            return
        extra = {} if dataloader_idx is None else {"dataloader_idx": dataloader_idx}  # as Lightning passed it
        self.ema.swap()
        try:
            step = _raw_view(pl_module, self._twins).validation_step
            if self.ema.model is pl_module:
                step(batch, batch_idx, **extra)
            else:  # FSDP1 gathers the root unit's weights in its wrapper's forward: the step runs as that
                _as_forward(self.ema.model, pl_module, step, batch, batch_idx, **extra)
        finally:
            self.ema.swap()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._twins = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(self.swap_test, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(self.swap_predict, pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "ema": None if self.ema is None else self.ema.counters()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ema" not in state_dict:
            raise ValueError("ModelEMA: the checkpoint's ModelEMA state has no 'ema' counters (written before "
                             "lightning_imex.ema.EMA); resume it with the version that wrote it, or start a new fit")
        self.last_step = state_dict["last_step"]
        if self._resumed is not None and state_dict["ema"] is not None:
            self._resumed = self._resumed[0], state_dict["ema"]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.ema is None:
            return
        if self.ema.flat_sharded and all(type(t) is Tensor for t in checkpoint["state_dict"].values()):
            # FSDPStrategy(state_dict_type="full") gave rank 0 the whole weights (the other ranks
            # nothing): so are the EMA's, and the raw ones go with them into rank 0's file
            checkpoint["state_dict"] = self.ema.full_state_dict("ema")
            checkpoint["current_model_state"] = self.ema.full_state_dict("raw")
            checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self.ema.updates)}
            return
        checkpoint["state_dict"] = self.ema.averaged_state_dict()
        raw = self.ema.raw_state_dict()
        if self.ema.sharded and not getattr(trainer.strategy, "saves_weight_copies", False):
            # Lightning's ModelParallelStrategy and FSDPStrategy shard state_dict and the optimizers'
            # states and pickle the rest from rank 0: the raw shards ride inside state_dict
            checkpoint["state_dict"].update((RAW_IN_STATE_DICT + name, t) for name, t in raw.items())
        else:
            checkpoint["current_model_state"] = raw
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self.ema.updates)}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning has loaded state_dict (the EMA, if the checkpoint has one) into the module
        if trainer.state.fn != TrainerFn.FITTING:  # evaluate the checkpoint's weights, not an earlier fit's EMA
            self.ema = None
            evaluates_raw = self._evaluates_raw(trainer, checkpoint)
            raw = self._raw_weights(trainer, pl_module, checkpoint) if evaluates_raw else None
            if raw is not None:
                _load_weights(pl_module, raw)
            elif trainer.state.fn == TrainerFn.VALIDATING and self.evaluate == "both":
                rank_zero_warn("ModelEMA: validate given a checkpoint runs on its EMA weights only; "
                               "evaluate='both' logs the raw pass during fit")
            return
        raw = self._raw_weights(trainer, pl_module, checkpoint)
        if raw is None:
            return
        # a fit: the module's weights become the EMA, and the raw weights go back in. The
        # counters come with the callback's state; a checkpoint of Lightning's
        # EMAWeightAveraging has none: it updated on every step since its first average
        averaged = _averaged(pl_module)
        reshard(averaged)  # FSDP1's flat shards, as the EMA will hold them
        average = [t.detach().clone() for t in tracked_tensors(averaged, self.include_buffers)[0]]
        n = int(checkpoint.get("averaging_state", {}).get("n_averaged", 0))
        self._resumed = average, {"steps": n, "updates": n, "lightning": True}
        self.last_step = checkpoint["global_step"]
        _load_weights(pl_module, raw)

    @staticmethod
    def _raw_weights(trainer: L.Trainer, pl_module: nn.Module, checkpoint: dict) -> dict[str, Tensor] | None:
        """The checkpoint's raw weights, or None: its ``current_model_state``, or the shards
        kept inside ``state_dict`` of a folder that ``ModelParallelStrategy`` or
        ``FSDPStrategy`` saved (read here, by every rank: Lightning loaded only the module's
        names)."""
        if "current_model_state" in checkpoint:
            return checkpoint["current_model_state"]
        path = trainer.ckpt_path
        if path is None or not is_sharded_checkpoint(path):
            return None
        # the folder's entry for state_dict: ModelParallelStrategy's "state_dict", FSDPStrategy's "model"
        prefixes = [f"{entry}.{RAW_IN_STATE_DICT}" for entry in ("state_dict", "model")]
        return next(iter(load_weight_copies(path, _averaged(pl_module), prefixes).values()), None)

    def _build_resumed(self, pl_module: nn.Module) -> None:
        """The resumed EMA, once the checkpoint's tensors and counters and the fit's decay are known."""
        if self._resumed is None or self.decay is None:
            return
        average, counters = self._resumed
        self.ema = self.make_ema(_averaged(pl_module))
        if counters.get("lightning"):  # constant decay, no bias correction to carry
            counters = {**self.ema.counters(), "steps": counters["steps"], "updates": counters["updates"],
                        "decay_product": self.ema.decay ** counters["updates"]}
        self.ema.load_state_dict({"average": average, **counters})
        self._resumed = None

    def _evaluates_raw(self, trainer: L.Trainer, checkpoint: dict) -> bool:
        """Whether a validate / test / predict given ``checkpoint`` evaluates its raw weights:
        where the stage evaluates raw weights, or where a ``ModelCheckpoint`` that monitors a
        ``_raw`` metric saved it as its best (its state in the checkpoint says so: the
        checkpoint ranked by the raw weights)."""
        loaded = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
        ranked_raw = loaded is not None and any(
            isinstance(state, dict) and str(state.get("monitor") or "").endswith(RAW_SUFFIX)
            and state.get("best_model_path") and Path(state["best_model_path"]).resolve() == loaded
            for state in checkpoint.get("callbacks", {}).values())
        wanted = {TrainerFn.VALIDATING: self.evaluate != "raw", TrainerFn.TESTING: self.swap_test,
                  TrainerFn.PREDICTING: self.swap_predict}
        return ranked_raw or not wanted.get(trainer.state.fn, True)


def _averaged(pl_module: nn.Module) -> nn.Module:
    """What the EMA of ``pl_module`` averages: the module, or under FSDP1 the FSDP wrapper
    around it (Lightning's FSDPStrategy: the root unit's FlatParameter is the wrapper's)."""
    trainer = _lightning.attached_trainer(pl_module)
    wrapper = None if trainer is None else trainer.strategy.model
    if FSDP1_MODULE is not None and isinstance(wrapper, FSDP1_MODULE) and wrapper.module is pl_module:
        return wrapper
    return pl_module


def _as_forward(wrapper: nn.Module, pl_module: nn.Module, step: Any, *args: Any, **kwargs: Any) -> Any:
    """``step(*args, **kwargs)`` run as the forward of ``pl_module`` inside ``wrapper``'s
    (as Lightning's strategies run the module's steps)."""
    pl_module.forward = step
    try:
        return wrapper(*args, **kwargs)
    finally:
        del pl_module.forward


def _load_weights(pl_module: nn.Module, state: dict[str, Tensor]) -> None:
    """``state`` (raw weights: DTensors, FSDP1's sharded tensors, or whole ones) into the module."""
    averaged = _averaged(pl_module)
    if averaged is pl_module:
        pl_module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    whole = all(type(t) is Tensor for t in state.values())  # FSDPStrategy(state_dict_type="full")'s
    set_model_state_dict(averaged, state, options=StateDictOptions(full_state_dict=whole))


class _RawLog:
    """The raw pass's ``log``: every name suffixed; a metric twin named by its place, which
    Lightning's cache of the module's metric attributes does not know."""

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        twin_names = self.__dict__["_ema_twin_names"]
        if id(value) in twin_names:
            kwargs.setdefault("metric_attribute", twin_names[id(value)])
        super().log(name + RAW_SUFFIX, value, *args, **kwargs)


_RAW_CLASSES: dict[type, type] = {}


def _raw_view(module: nn.Module, twins: dict[str, nn.Module]) -> nn.Module:
    """A view of ``module`` for the raw pass: a shallow copy (same tensors, submodules and
    trainer) of a subclass whose ``log`` is :class:`_RawLog`'s, with the metrics' twins in
    their places. Attributes the step sets land on the view; the module stays as it is."""
    cls = type(module)
    if cls not in _RAW_CLASSES:
        _RAW_CLASSES[cls] = type(cls.__name__, (_RawLog, cls), {"__module__": cls.__module__})
    view = _shallow(module, _RAW_CLASSES[cls])
    view.__dict__["_ema_twin_names"] = {id(twin): name for name, twin in twins.items()}
    copied = {"": view}
    for name, twin in twins.items():
        parent_name, _, attr = name.rpartition(".")
        parent, path = view, ""
        for part in parent_name.split(".") if parent_name else ():
            path = f"{path}.{part}" if path else part
            if path not in copied:
                copied[path] = parent._modules[part] = _shallow(parent._modules[part])
            parent = copied[path]
        parent._modules[attr] = twin
    return view


def _shallow(module: nn.Module, cls: type | None = None) -> nn.Module:
    """A new ``cls`` (``type(module)``) object sharing ``module``'s attributes, with its own
    dict of submodules."""
    copy = object.__new__(cls or type(module))
    copy.__dict__.update(module.__dict__)
    copy.__dict__["_modules"] = dict(module._modules)
    return copy


def _top_metrics(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The module's torchmetrics ``Metric``s, less those inside another metric (a wrapper's)."""
    from torchmetrics import Metric

    found: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if isinstance(m, Metric) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, m))
    return found

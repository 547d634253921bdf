"""The app's checks of what Lightning leaves to the start of the fit (or never checks):
the seed, the Trainer's arguments, folders the
run writes in, monitored metrics, the schedule, the validation interval and the
checkpoint to resume from. Each raises one line naming the key (:class:`ConfigError`,
or ``ValueError`` from :mod:`lightning_imex.validate`)."""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from ..callbacks import ModelEMA
from ..checkpoint import check_checkpoint
from ..schedules import build_scheduler
from ..sharding import is_sharded
from ..task import SupervisedTask
from ..validate import allowed_keywords, integer, is_integer, real
from .errors import ConfigError
from .run_dir import CKPT_KEYWORDS

__all__ = ["check_folder", "check_monitors", "check_resume", "check_scheduler", "check_seed", "check_trainer_options",
           "check_val_check_interval", "fields"]

SEED_MAX = 2**32 - 1  # numpy's


def check_seed(seed: Any) -> None:
    if not (is_integer(seed) and 0 <= seed <= SEED_MAX):
        raise ConfigError(f"seed must be an integer in [0, {SEED_MAX}], got {seed!r}")


def fields(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` takes, following ``**kwargs`` up its bases."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names += [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                  and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def check_trainer_options(options: dict[str, Any]) -> None:
    """The Trainer's arguments that Lightning takes unchecked (a negative number of steps,
    a zero that divides later) or checks with a message that does not name the key."""
    allowed_keywords("trainer", options, [k for k in inspect.signature(L.Trainer).parameters
                                          if k not in ("callbacks", "logger")], "lightning.Trainer", "an argument")
    for key, minimum, optional, note in (
            ("accumulate_grad_batches", 1, False, ""),
            ("log_every_n_steps", 0, True, " (0: no logging within an epoch)"),
            ("check_val_every_n_epoch", 1, True, " (null: validate every val_check_interval batches)"),
            ("num_sanity_val_steps", -1, True, " (-1: every validation batch)"),
            ("min_epochs", 0, True, ""),
            ("min_steps", 0, True, "")):
        if key in options:
            integer(f"trainer.{key}", options[key], minimum, optional=optional, note=note)
    if options.get("gradient_clip_val") is not None:
        real("trainer.gradient_clip_val", options["gradient_clip_val"], 0, note=" (0 or null: no clipping)")
    value = options.get("val_check_interval")
    if is_integer(value) and value < 1:
        raise ConfigError(f"trainer.val_check_interval must be an integer >= 1 (batches), a fraction of the epoch "
                          f"in (0, 1] or a time, got {value!r}")
    value = options.get("devices")
    if is_integer(value) and not (value >= 1 or value == -1):
        raise ConfigError(f"trainer.devices must be a number of devices >= 1, -1 (all of them), 'auto' or a list "
                          f"of device indices, got {value!r}")


def check_folder(key: str, path: Any) -> None:
    """A folder the run will write in can be created (without creating it)."""
    if path is None:
        return
    folder = os.path.abspath(os.fspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}={path}: cannot create this folder: {existing} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lightning-imex-", dir=existing))
    except OSError as error:
        raise ConfigError(f"{key}={path}: cannot create this folder in {existing} "
                          f"({error.strerror or error})") from None


def check_monitors(module: SupervisedTask, callbacks: dict[str, Callback]) -> None:
    """Every ``monitor`` names a metric the fit logs (Lightning finds out an epoch into
    the fit, or only warns)."""
    logged = module.logged_metrics()
    if any(isinstance(c, ModelEMA) and c.evaluate == "both" for c in callbacks.values()):
        logged |= {f"{name}_raw" for name in logged if name.startswith("val/")}
    watched = [(f"callbacks.{key}.monitor", getattr(c, "monitor", None)) for key, c in callbacks.items()]
    watched.append(("scheduler.monitor", module.scheduler_spec.monitor if module.scheduler_spec else None))
    for key, monitor in watched:
        if monitor is not None and monitor not in logged:
            raise ConfigError(f"{key}={monitor!r} is not a metric this fit logs; it logs: {', '.join(sorted(logged))}")


def check_scheduler(module: SupervisedTask, optimizer: Any) -> None:
    """Builds the schedule on the checked optimizer, then puts back the learning rates it
    set (the fit's schedule starts from them); a ``warmup_cosine`` that spans the fit gets
    a stand-in length (the fit's is known at its start)."""
    spec = module.scheduler_spec
    if spec is None:
        return
    total = None
    if spec.name == "warmup_cosine" and spec.kwargs.get("total_steps") is None:
        total = integer("scheduler.warmup_steps", spec.kwargs.get("warmup_steps", 0), 0) + 1
    groups = [dict(group) for group in optimizer.param_groups]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a stand-in length may be short; the fit warns, if it needs to
            build_scheduler(optimizer, spec, total)
    finally:
        for group, before in zip(optimizer.param_groups, groups):
            group.pop("initial_lr", None)
            group.update(before)


def check_val_check_interval(trainer: L.Trainer, datamodule: L.LightningDataModule) -> None:
    """An integer ``val_check_interval`` within an epoch's training batches, as the fit
    checks once its loader is set up (the count here is every process's: DDP's share is
    checked by Lightning)."""
    interval = trainer.val_check_interval
    if (not is_integer(interval) or trainer.check_val_every_n_epoch is None or not trainer.limit_val_batches
            or trainer.fast_dev_run or trainer.overfit_batches):
        return
    batches = len(datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if is_integer(limit) else int(batches * limit)
    if batches and interval > batches:  # no batch at all: Lightning says why
        limited = "" if limit == 1.0 else f" (with trainer.limit_train_batches={limit})"
        raise ConfigError(f"trainer.val_check_interval={interval} is more than the {batches} training batches of an "
                          f"epoch{limited}: use at most {batches}, a fraction of the epoch in (0, 1], or "
                          "trainer.check_val_every_n_epoch=null to count batches across epochs")


def check_resume(ckpt_path: Any, module: SupervisedTask, optimizer: Any, trainer: L.Trainer) -> None:
    """The checkpoint to resume from: a file (a folder only for a sharded fit), readable,
    made by the same model and optimizer (its state loads into ``optimizer``)."""
    if ckpt_path is None or ckpt_path in CKPT_KEYWORDS:
        return
    if os.path.isdir(ckpt_path) and not is_sharded(trainer.strategy):
        raise ConfigError(f"ckpt_path={ckpt_path}: a folder, not a checkpoint file (only a sharded fit, "
                          "strategy=fsdp or fsdp_cpu, resumes from a folder: the one it saves, e.g. "
                          "checkpoints/last.ckpt)")
    check_checkpoint(ckpt_path, module, optimizer)

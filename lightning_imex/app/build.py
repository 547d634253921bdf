"""Building a fit from a composed config: datamodule, module, logger, callbacks and
Trainer, each checked before any training starts (data files present, model and
optimizer hyper-parameters valid, the optimizer compatible with the Trainer's settings,
the checkpoint to resume from readable and made by the same model and optimizer)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import CSVLogger
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..callbacks import ModelEMA
from ..clipping import GradientClipping, check_sharded
from ..data import DATAMODULES
from ..multigradient import IncompatibleSetupError, check_trainer
from ..optimizers import optimizer_spec
from ..schedules import scheduler_spec
from ..sharding import is_sharded
from ..task import SupervisedTask
from ..validate import allowed_keywords, choice
from . import checks
from .errors import ConfigError, hint, one_line, optimizer_error, trainer_error
from .quiet import INFO, FitStart, Quiet
from .threads import TorchThreads

__all__ = ["build", "build_fit", "sharded_callbacks"]


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, SupervisedTask, L.Trainer]:
    """Datamodule, module and Trainer from a composed config (:func:`build_fit`), with
    Lightning's device lines held until the Trainer is built and checked, then printed
    (dropped with an error)."""
    INFO.hold()
    try:
        built = build_fit(cfg)
    except BaseException:
        INFO.drop()
        raise
    INFO.release()
    return built


def build_fit(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()
              ) -> tuple[L.LightningDataModule, SupervisedTask, L.Trainer]:
    """Datamodule, module and Trainer from a composed config; a bad value raises
    :class:`ConfigError`. ``extra_callbacks`` join the config's.

    The progress bar follows the callbacks: without a progress-bar callback there is
    none (unless ``trainer.enable_progress_bar=true`` asks for Lightning's), and
    ``trainer.enable_progress_bar=false`` drops the callback."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation and ??? value
        checks.check_seed(cfg.seed)
        threads = TorchThreads(cfg.get("threads"))
        # the optimizer, schedule and clipping resolved once, here: the module and the fit take the specs as they are
        specs = dict(optimizer=optimizer_spec(cfg.optimizer), scheduler=scheduler_spec(cfg.scheduler),
                     clipping=GradientClipping.from_config(cfg.clipping))
        datamodule = _datamodule(cfg.dataset)
        module = SupervisedTask(model=cfg.model, input_shape=datamodule.input_shape,
                                num_outputs=datamodule.num_outputs, task=datamodule.task, **specs, **cfg.param_groups)
        module.to(_true_precision_dtype(cfg.trainer.get("precision")))  # as the Trainer will: the optimizer sees it
        try:
            optimizer = module.checked_optimizer()  # the fit's, its hyper-parameters checked
        except (ValueError, TypeError) as error:
            raise ConfigError(optimizer_error(module.optimizer_spec, error)) from error
        checks.check_scheduler(module, optimizer)
        logger = _logger(cfg)
        callbacks = {key: instantiate(c) for key, c in (cfg.callbacks or {}).items() if c}
        if not logger:  # an LR monitor has nowhere to write (and Lightning refuses it)
            callbacks = {k: c for k, c in callbacks.items() if not isinstance(c, LearningRateMonitor)}
        options = instantiate(cfg.trainer, _convert_="all")
        callbacks = sharded_callbacks(options.get("strategy"), callbacks)
        if options.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
            callbacks = {k: c for k, c in callbacks.items() if not isinstance(c, ProgressBar)}
        elif options.get("enable_progress_bar") is None:  # else Lightning adds its TQDM bar
            options["enable_progress_bar"] = any(isinstance(c, ProgressBar) for c in callbacks.values())
        checks.check_trainer_options(options)
        checks.check_monitors(module, callbacks)
        checks.check_folder("trainer.default_root_dir", options.get("default_root_dir"))
        for key, callback in callbacks.items():
            checks.check_folder(f"callbacks.{key}.dirpath", getattr(callback, "dirpath", None))
        checks.check_folder("logger.save_dir", getattr(logger, "save_dir", None) if logger else None)
        try:
            trainer = L.Trainer(**options, logger=logger, callbacks=[*callbacks.values(), *extra_callbacks, threads,
                                                                     Quiet(), FitStart()])
        except (ValueError, TypeError, ImportError, MisconfigurationException) as error:
            raise ConfigError(trainer_error(cfg, error)) from error
        if is_sharded(trainer.strategy):
            check_sharded(module.clipping.with_trainer(trainer.gradient_clip_val, trainer.gradient_clip_algorithm))
        check_trainer(trainer, optimizer)  # what fit would raise at its start, before any output
        checks.check_val_check_interval(trainer, datamodule)
        checks.check_resume(cfg.ckpt_path, module, optimizer, trainer)  # loads its state (the fit loads it again)
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError, ImportError, InstantiationException,
            MisconfigurationException, IncompatibleSetupError, OmegaConfBaseException) as error:
        raise ConfigError(hint(cfg, error)) from error
    return datamodule, module, trainer


def _datamodule(config: Any) -> L.LightningDataModule:
    """The config's dataset, its files checked."""
    dataset = OmegaConf.to_container(config, resolve=True)
    if not isinstance(dataset, dict):
        raise ValueError(f"dataset must be a mapping with a name and its fields, got {dataset!r}")
    name = choice("dataset.name", dataset.pop("name", None), sorted(DATAMODULES))
    allowed_keywords("dataset", dataset, checks.fields(DATAMODULES[name]), f"dataset {name!r}")
    datamodule = DATAMODULES[name](**dataset)
    datamodule.check_files()
    return datamodule


def _logger(cfg: DictConfig) -> Any:
    """The config's logger. A resumed run's CSV logs go beside the earlier run's
    ``metrics.csv`` (in ``resumed_N/``) where Lightning's ``CSVLogger`` would delete it."""
    if not cfg.logger:
        return False
    try:
        logger = instantiate(cfg.logger)
        if cfg.ckpt_path is not None and isinstance(logger, CSVLogger) and os.path.isfile(
                os.path.join(logger.log_dir, "metrics.csv")):
            version = next(f"resumed_{n}" for n in range(1, sys.maxsize)  # (a failed resume logged nothing)
                           if not os.path.exists(os.path.join(logger.log_dir, f"resumed_{n}", "metrics.csv")))
            logger = instantiate(cfg.logger, version=os.path.join(str(logger.version), version))
        return logger
    except InstantiationException as error:
        if isinstance(error.__cause__, ModuleNotFoundError) and "tensorboard" in str(error.__cause__):
            raise ConfigError("logger=tensorboard needs the tensorboard package, which is not installed: "
                              "pip install 'lightning-imex[tensorboard]' (or pip install tensorboard), "
                              "or use logger=csv") from error
        raise


def _true_precision_dtype(precision: Any) -> torch.dtype:
    """The dtype a ``*-true`` (or double) precision gives the weights before the optimizer
    is built (``param_rounding`` checks it); float32 for any other precision."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64, "64": torch.float64,
            "double": torch.float64}.get(str(precision), torch.float32)


def sharded_callbacks(strategy: Any, callbacks: dict[str, Callback]) -> dict[str, Callback]:
    """``callbacks``, each ``ModelEMA`` checked against ``strategy`` (it averages the
    rank's shards under FSDP2 and FSDP1; a strategy it cannot average under is refused):
    one line before anything runs."""
    for key, callback in callbacks.items():
        if isinstance(callback, ModelEMA):
            try:
                callback.check_strategy(strategy)
            except RuntimeError as error:
                raise ConfigError(f"callbacks.{key}: {one_line(error)}") from error
    return callbacks

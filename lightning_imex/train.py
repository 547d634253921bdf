"""``lightning-imex-train`` (also ``python -m lightning_imex.train``): the Hydra app.

Composes ``conf/train.yaml`` with command-line overrides, checks every part by building
it (a bad value stops here with one line naming it), then fits, tests, and prints where
the checkpoint and logs are. Configs are found in the installed package
(``lightning_imex.conf``, the repository's ``conf/``).

A run prints Lightning's device lines, the model summary, the progress bar and the
summary; third-party tips and deprecation warnings its user cannot act on are filtered
(:func:`quiet`, by exact message, in the app's processes only). Every error is one line,
``lightning-imex-train: error: ...``, with a non-zero exit status."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import warnings
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .config import register
from .data import DATAMODULES
from .factory import build_optimizer
from .multigradient import IncompatibleSetupError, check_trainer
from .task import SupervisedTask

__all__ = ["ConfigError", "build", "main", "quiet", "train"]

PROG = "lightning-imex-train"
CONFIG_PATH = "pkg://lightning_imex.conf"


class ConfigError(ValueError):
    """A config value that cannot work; the message names it."""


# ---------------------------------------------------------------------------------------
# quiet output

# (message regex, category) of warnings a run of the app would print that its user
# cannot act on
QUIET_WARNINGS = (
    # torch >= 2.10 deprecates LeafSpec, which Lightning 2.6's utilities/_pytree.py builds
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
# the start of Lightning's info messages the app drops: advertisements, and the note that
# the schedule's length (Trainer.estimated_stepping_batches) loads the train dataloader
QUIET_INFO = (
    "💡 Tip: For seamless cloud ",
    "Loading `train_dataloader` to estimate number of stepping batches",
)
# where Lightning's rank_zero_info messages are logged (lightning_utilities' module
# logger, replaced by Lightning's)
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _LightningInfo(logging.Filter):
    """Drops :data:`QUIET_INFO`; while :attr:`held` is a list, keeps the other records
    there instead of printing them (so that a config that fails to build prints its
    error line alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).lstrip().startswith(QUIET_INFO):
            return False
        if self.held is not None:
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            logging.getLogger(record.name).handle(record)

    def drop(self) -> None:
        self.held = None


_INFO = _LightningInfo()


def quiet() -> None:
    """Installs the app's filters in this process (idempotent): :data:`QUIET_WARNINGS`
    and :data:`QUIET_INFO`. ``main()`` calls it, and so does every process a fit spawns
    (:class:`_Quiet`)."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if _INFO not in logger.filters:
            logger.addFilter(_INFO)


class _Quiet(Callback):
    """:func:`quiet` in a process that did not start at ``main()``: a ``ddp_spawn``
    worker, which unpickles the Trainer (and this callback) first."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_quiet": True}  # not empty: pickle calls __setstate__ then

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        quiet()


# ---------------------------------------------------------------------------------------
# errors


def one_line(error: BaseException) -> str:
    """``error``'s message in one line: a Hydra ``InstantiationException`` gives way to
    its cause (prefixed by the config key, e.g. ``logger: ...``), and a first line that
    ends with ``:`` keeps the lines it introduces."""
    where = None
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        found = re.search(r"^full_key: (\S+)", str(error), re.MULTILINE)
        where = where or (found.group(1) if found else None)
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    message = lines.pop(0)
    while message.endswith(":") and lines:
        message += " " + lines.pop(0)
    return f"{where}: {message}" if where else message


def fail(message: str) -> None:
    """Exits with ``lightning-imex-train: error: message`` on stderr, printed by one
    process only (under DDP every process fails alike)."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ImportError:  # its parent package is missing
        return True


def check_launcher(args: list[str]) -> None:
    """The SLURM launcher's plugin, before Hydra fails to load it with a longer message."""
    for arg in args:
        found = re.fullmatch(r"\+*hydra/launcher=(\S+)", arg)
        if found and found.group(1) in ("slurm", "submitit_slurm", "submitit_local") and _module_missing(
                "hydra_plugins.hydra_submitit_launcher"):
            fail(f"hydra/launcher={found.group(1)} needs the hydra-submitit-launcher plugin, which is not "
                 "installed: pip install 'lightning-imex[slurm]' (or pip install hydra-submitit-launcher)")


def _logger(cfg: DictConfig) -> Any:
    if not cfg.logger:
        return False
    try:
        return instantiate(cfg.logger)
    except InstantiationException as error:
        if isinstance(error.__cause__, ModuleNotFoundError) and "tensorboard" in str(error.__cause__):
            raise ConfigError("logger=tensorboard needs the tensorboard package, which is not installed: "
                              "pip install 'lightning-imex[tensorboard]' (or pip install tensorboard), "
                              "or use logger=csv") from error
        raise


# ---------------------------------------------------------------------------------------
# the app


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, SupervisedTask, L.Trainer]:
    """Datamodule, module and Trainer from a composed config, each checked before any
    training starts (data files present, optimizer hyper-parameters valid, the optimizer
    compatible with the Trainer's settings).

    The progress bar follows the callbacks: without a progress-bar callback there is
    none (unless ``trainer.enable_progress_bar=true`` asks for Lightning's), and
    ``trainer.enable_progress_bar=false`` drops the callback. Lightning's device lines
    are held until the Trainer is built and checked, then printed."""
    _INFO.held, built = [], False
    try:
        dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
        name = dataset.pop("name", None)
        if name not in DATAMODULES:
            raise ValueError(f"dataset.name must be one of {sorted(DATAMODULES)}, got {name!r}")
        datamodule = DATAMODULES[name](**dataset)
        datamodule.check_files()
        module = SupervisedTask(model=cfg.model, input_shape=datamodule.input_shape,
                                num_outputs=datamodule.num_outputs, task=datamodule.task, optimizer=cfg.optimizer,
                                scheduler=cfg.scheduler, clipping=cfg.clipping, **cfg.param_groups)
        optimizer = build_optimizer(module, module.optimizer_config, **module.param_group_config)  # its own checks
        logger = _logger(cfg)
        callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c]
        if not logger:  # an LR monitor has nowhere to write (and Lightning refuses it)
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        options = instantiate(cfg.trainer, _convert_="all")
        if options.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        elif options.get("enable_progress_bar") is None:  # else Lightning adds its TQDM bar
            options["enable_progress_bar"] = any(isinstance(c, ProgressBar) for c in callbacks)
        trainer = L.Trainer(**options, callbacks=[*callbacks, _Quiet()], logger=logger)
        check_trainer(trainer, optimizer)  # what fit would raise at its start, before any output
        built = True
    except (ValueError, TypeError, FileNotFoundError, ImportError, InstantiationException,
            MisconfigurationException, IncompatibleSetupError) as error:
        raise ConfigError(_hint(cfg, error)) from error
    finally:
        _INFO.release() if built else _INFO.drop()
    return datamodule, module, trainer


def _hint(cfg: DictConfig, error: BaseException) -> str:
    message = one_line(error)
    if message == "No supported gpu backend found!":
        return (f"trainer.accelerator={cfg.trainer.accelerator} but this machine has no GPU (Lightning: "
                f"{message}): use strategy=ddp_cpu for 2 CPU processes, or strategy=auto")
    return message


def train(cfg: DictConfig) -> dict[str, float]:
    """Seeds, builds, fits and tests; returns the final metrics."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module, trainer = build(cfg)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path,
                    weights_only=True if cfg.ckpt_path else None)
        if cfg.test and not trainer.fast_dev_run:
            trainer.test(module, datamodule=datamodule, verbose=False)
    except (IncompatibleSetupError, MisconfigurationException) as error:
        raise ConfigError(one_line(error)) from error
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    log_dir = trainer.log_dir  # a collective call under DDP: every rank makes it
    if trainer.is_global_zero:
        print(summary(trainer, metrics, log_dir))
    return metrics


def summary(trainer: L.Trainer, metrics: dict[str, float], log_dir: str | None) -> str:
    # the last epoch's index, as the progress bar and a checkpoint's name (epoch=19-step=420)
    # give it; trainer.current_epoch counts the epochs completed
    lines = [f"finished at step {trainer.global_step} (epoch {max(trainer.current_epoch - 1, 0)})"]
    lines += [f"  {name:<14} {value:.4f}" for name, value in sorted(metrics.items())
              if name.startswith(("test/", "val/"))]
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        lines.append(f"  checkpoint     {checkpoint.best_model_path}")
    if log_dir:
        lines.append(f"  logs           {log_dir}")
    return "\n".join(lines)


register()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> Any:
    try:
        return train(cfg)
    except ConfigError as error:
        fail(str(error))


def main() -> None:
    quiet()
    check_launcher(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()

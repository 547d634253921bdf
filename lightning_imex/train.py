"""``lightning-imex-train`` (also ``python -m lightning_imex.train``): the Hydra app.

Composes ``conf/train.yaml`` with command-line overrides, checks every part by building
it (a bad value stops here with one line naming it), then fits, tests, and prints where
the checkpoint and logs are. Configs are found in the installed package
(``lightning_imex.conf``, the repository's ``conf/``).

A run prints Lightning's device lines, the model summary, the progress bar and the
summary; third-party tips and deprecation warnings its user cannot act on are filtered
(:func:`quiet`, by exact message, in the app's processes only).

Every error of the configuration (the command line, Hydra's composition, building the
parts, a checkpoint to resume from, Lightning's checks at the start of the fit) is one
line, ``lightning-imex-train: error: ...``, with a non-zero exit status; nothing is
trained and no summary is printed. An error once training has started keeps its
traceback (``HYDRA_FULL_ERROR=1`` shows one for every error)."""

from __future__ import annotations

import importlib.resources
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import hydra
import lightning as L
from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .callbacks import ModelEMA
from .checkpoint import check_checkpoint
from .config import register
from .data import DATAMODULES
from .factory import build_optimizer, build_scheduler, optimizer_class
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


class _FitStart(Callback):
    """Where a fit stands: :attr:`configuring` until the sanity check starts, again
    between its end and the start of training (where Lightning checks the training
    loader), never after. The first start prints Lightning's held information."""

    def __init__(self) -> None:
        self.configuring = True

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.configuring = False
        _INFO.release()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.configuring = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.configuring = False
        _INFO.release()


# ---------------------------------------------------------------------------------------
# errors


def one_line(error: BaseException) -> str:
    """``error``'s message in one line: a Hydra ``InstantiationException`` gives way to
    its cause (prefixed by the config key, e.g. ``logger: ...``), Hydra's composition
    errors say which override or key and what it allows (:func:`compose_error`), and a
    first line that ends with ``:`` keeps the lines it introduces."""
    where = None
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        found = re.search(r"^full_key: (\S+)", str(error), re.MULTILINE)
        where = where or (found.group(1) if found else None)
        error = error.__cause__
    if isinstance(error, (HydraException, OmegaConfBaseException)) and not isinstance(error, InstantiationException):
        message = compose_error(error)
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if not lines:
            return type(error).__name__
        message = lines.pop(0)
        while message.endswith(":") and lines:
            message += " " + lines.pop(0)
    return f"{where}: {message}" if where else message


# what OmegaConf appends to its messages, and Hydra's pointers elsewhere
_DETAIL = re.compile(r"^(full_key|object_type|reference_type|See https|Set the environment variable)")


def compose_error(error: BaseException) -> str:
    """A Hydra or OmegaConf error at composition in one line: ``optimizer=nope: no such
    optimizer config; available: adam, ...``, ``model.width: no such key in model; model
    has: name, hidden, ...``, ``trainer.max_epochs=abc: Value 'abc' of type 'str' could not
    be converted to Integer``."""
    text = str(error)
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and "/" in error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        options = list(error.options or _group_options(group))
        listed = f"; available: {', '.join(options)}" if options else ""
        return f"{group}={option}: no such {group} config{listed}"
    if isinstance(error, OverrideParseException):
        detail = " ".join(line.strip() for line in text.splitlines()
                          if line.strip() and not _DETAIL.match(line.strip()) and not line.startswith("Error parsing"))
        return (f"cannot parse the override {error.override!r}: {detail} (the syntax: "
                "https://hydra.cc/docs/advanced/override_grammar/basic/)")
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key, full_key = str(cause.key), str(cause.full_key)
        first = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        if "is not in struct" in first or re.match(r"Key '.*' not in '", first):
            parent = full_key[:-len(key) - 1] if full_key.endswith("." + key) else ""
            keys = _keys(cause.parent_node)
            has = f"; {parent or 'the config'} has: {', '.join(keys)}" if keys else ""
            add = re.search(r"use (\+\S+)", text)
            return (f"{full_key}: no such key{f' in {parent}' if parent else ''}{has}"
                    + (f" (to add one: {add.group(1)})" if add else ""))
        override = re.search(r"override '?([^'\s]+)", text.splitlines()[0]) if text else None
        return f"{override.group(1) if override else full_key}: {first}"
    lines = []
    for line in text.splitlines():
        if line.startswith("Config search path"):
            break
        if line.strip() and not _DETAIL.match(line.strip()):
            lines.append(line.strip())
    return " ".join(lines) or type(error).__name__


def _keys(node: Any) -> list[str]:
    try:
        return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    except (OmegaConfBaseException, AttributeError, TypeError):  # a node that is None
        return []


def _group_options(group: str) -> list[str]:
    """The options of a config group among the app's configs."""
    try:
        folder = importlib.resources.files("lightning_imex.conf").joinpath(group)
        return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))
    except (OSError, ModuleNotFoundError, ValueError):
        return []


def fail(message: str) -> None:
    """Exits with ``lightning-imex-train: error: message`` (in one line) on stderr,
    printed by one process only (under DDP every process fails alike)."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
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


def check_arguments(args: list[str]) -> None:
    """The command line parsed as Hydra parses it, an unknown flag failing in one line
    (argparse prints its usage too)."""
    from hydra._internal.utils import get_args_parser
    parser = get_args_parser()
    parser.prog = PROG
    parser.error = lambda message: fail(f"{message} (see {PROG} --help)")  # type: ignore[method-assign]
    parser.parse_args(args)


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
# checks of what Lightning leaves to the start of the fit (or never checks)

SEED_MAX = 2**32 - 1  # numpy's
CKPT_KEYWORDS = ("last", "best", "hpc")  # ckpt_path values Lightning resolves itself


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(seed: Any) -> None:
    if not (_is_int(seed) and 0 <= seed <= SEED_MAX):
        raise ConfigError(f"seed must be an integer in [0, {SEED_MAX}], got {seed!r}")


def _fields(cls: type) -> list[str]:
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
    allowed = [k for k in inspect.signature(L.Trainer).parameters if k not in ("callbacks", "logger")]
    for key in options:
        if key not in allowed:
            raise ConfigError(f"trainer.{key}: not an argument of lightning.Trainer; allowed: {', '.join(allowed)}")

    def check(key: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"trainer.{key} must be {allowed}, got {options[key]!r}")

    def integer(key: str, minimum: int, optional: bool = True, note: str = "") -> None:
        if key in options and not (options[key] is None and optional):
            check(key, _is_int(options[key]) and options[key] >= minimum,
                  f"an integer >= {minimum}{note}" + (" or null" if optional else ""))

    integer("accumulate_grad_batches", 1, optional=False)
    integer("log_every_n_steps", 0, note=" (0: no logging within an epoch)")
    integer("check_val_every_n_epoch", 1, note=" (null: validate every val_check_interval batches)")
    integer("num_sanity_val_steps", -1, note=" (-1: every validation batch)")
    integer("min_epochs", 0)
    integer("min_steps", 0)
    if options.get("gradient_clip_val") is not None:
        value = options["gradient_clip_val"]
        check("gradient_clip_val", isinstance(value, (int, float)) and not isinstance(value, bool)
              and 0 <= value < math.inf, "a finite number >= 0 (0 or null: no clipping)")
    value = options.get("val_check_interval")
    if _is_int(value):
        check("val_check_interval", value >= 1, "an integer >= 1 (batches), a fraction of the epoch in (0, 1] or "
                                                "a time")
    value = options.get("devices")
    if _is_int(value):
        check("devices", value >= 1 or value == -1, "a number of devices >= 1, -1 (all of them), 'auto' or a list "
                                                    "of device indices")


def _trainer_error(cfg: DictConfig, error: BaseException) -> str:
    message = _hint(cfg, error)
    return message if message.startswith("trainer") else f"trainer: {message}"


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
    watched.append(("scheduler.monitor", (module.scheduler_config or {}).get("monitor")))
    for key, monitor in watched:
        if monitor is not None and monitor not in logged:
            raise ConfigError(f"{key}={monitor!r} is not a metric this fit logs; it logs: {', '.join(sorted(logged))}")


def check_scheduler(module: SupervisedTask, optimizer: Any) -> None:
    """Builds the schedule on the checked optimizer; a ``warmup_cosine`` that spans the
    fit gets a stand-in length (the fit's is known at its start)."""
    config = module.scheduler_config
    if config is None:
        return
    total = None
    if config["name"] == "warmup_cosine" and config.get("total_steps") is None:
        warmup = config.get("warmup_steps", 0)
        if not (_is_int(warmup) and warmup >= 0):
            raise ConfigError(f"scheduler.warmup_steps must be an integer >= 0, got {warmup!r}")
        total = warmup + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stand-in length may be short; the fit warns, if it needs to
        build_scheduler(optimizer, config, total)


def check_val_check_interval(trainer: L.Trainer, datamodule: L.LightningDataModule) -> None:
    """An integer ``val_check_interval`` within an epoch's training batches, as the fit
    checks once its loader is set up (the count here is every process's: DDP's share is
    checked by Lightning)."""
    interval = trainer.val_check_interval
    if (not _is_int(interval) or trainer.check_val_every_n_epoch is None or not trainer.limit_val_batches
            or trainer.fast_dev_run or trainer.overfit_batches):
        return
    batches = len(datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if _is_int(limit) else int(batches * limit)
    if batches and interval > batches:  # no batch at all: Lightning says why
        limited = "" if limit == 1.0 else f" (with trainer.limit_train_batches={limit})"
        raise ConfigError(f"trainer.val_check_interval={interval} is more than the {batches} training batches of an "
                          f"epoch{limited}: use at most {batches}, a fraction of the epoch in (0, 1], or "
                          "trainer.check_val_every_n_epoch=null to count batches across epochs")


def _sharded(strategy: Any) -> bool:
    """A strategy whose checkpoint can be a folder."""
    return any(cls.__name__ in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")
               for cls in type(strategy).__mro__)


# ---------------------------------------------------------------------------------------
# the app


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, SupervisedTask, L.Trainer]:
    """Datamodule, module and Trainer from a composed config, each checked before any
    training starts (data files present, model and optimizer hyper-parameters valid, the
    optimizer compatible with the Trainer's settings, the checkpoint to resume from
    readable and made by the same model and optimizer).

    The progress bar follows the callbacks: without a progress-bar callback there is
    none (unless ``trainer.enable_progress_bar=true`` asks for Lightning's), and
    ``trainer.enable_progress_bar=false`` drops the callback. Lightning's device lines
    are held until the Trainer is built and checked, then printed."""
    _INFO.held = []
    try:
        built = _build(cfg)
    except BaseException:
        _INFO.drop()
        raise
    _INFO.release()
    return built


def _build(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()
           ) -> tuple[L.LightningDataModule, SupervisedTask, L.Trainer]:
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation and ??? value
        check_seed(cfg.seed)
        dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
        if not isinstance(dataset, dict):
            raise ValueError(f"dataset must be a mapping with a name and its fields, got {dataset!r}")
        name = dataset.pop("name", None)
        if name not in DATAMODULES:
            raise ValueError(f"dataset.name must be one of {sorted(DATAMODULES)}, got {name!r}")
        allowed = _fields(DATAMODULES[name])
        for key in dataset:
            if key not in allowed:
                raise ValueError(f"dataset.{key}: not a field of dataset {name!r}; allowed: {', '.join(allowed)}")
        datamodule = DATAMODULES[name](**dataset)
        datamodule.check_files()
        module = SupervisedTask(model=cfg.model, input_shape=datamodule.input_shape,
                                num_outputs=datamodule.num_outputs, task=datamodule.task, optimizer=cfg.optimizer,
                                scheduler=cfg.scheduler, clipping=cfg.clipping, **cfg.param_groups)
        try:
            optimizer = build_optimizer(module, module.optimizer_config, **module.param_group_config)  # its checks
        except (ValueError, TypeError) as error:
            raise ConfigError(_optimizer_error(module, error)) from error
        check_scheduler(module, optimizer)
        logger = _logger(cfg)
        callbacks = {key: instantiate(c) for key, c in (cfg.callbacks or {}).items() if c}
        if not logger:  # an LR monitor has nowhere to write (and Lightning refuses it)
            callbacks = {k: c for k, c in callbacks.items() if not isinstance(c, LearningRateMonitor)}
        options = instantiate(cfg.trainer, _convert_="all")
        if options.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
            callbacks = {k: c for k, c in callbacks.items() if not isinstance(c, ProgressBar)}
        elif options.get("enable_progress_bar") is None:  # else Lightning adds its TQDM bar
            options["enable_progress_bar"] = any(isinstance(c, ProgressBar) for c in callbacks.values())
        check_trainer_options(options)
        check_monitors(module, callbacks)
        check_folder("trainer.default_root_dir", options.get("default_root_dir"))
        for key, callback in callbacks.items():
            check_folder(f"callbacks.{key}.dirpath", getattr(callback, "dirpath", None))
        check_folder("logger.save_dir", getattr(logger, "save_dir", None) if logger else None)
        try:
            trainer = L.Trainer(**options, callbacks=[*callbacks.values(), *extra_callbacks, _Quiet(), _FitStart()],
                                logger=logger)
        except (ValueError, TypeError, ImportError, MisconfigurationException) as error:
            raise ConfigError(_trainer_error(cfg, error)) from error
        module.clipping.with_trainer(trainer.gradient_clip_val, trainer.gradient_clip_algorithm)  # set twice?
        check_trainer(trainer, optimizer)  # what fit would raise at its start, before any output
        check_val_check_interval(trainer, datamodule)
        if cfg.ckpt_path is not None and cfg.ckpt_path not in CKPT_KEYWORDS and not (
                os.path.isdir(cfg.ckpt_path) and _sharded(trainer.strategy)):
            check_checkpoint(cfg.ckpt_path, module, optimizer)  # loads its state into this (unused) optimizer
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError, ImportError, InstantiationException,
            MisconfigurationException, IncompatibleSetupError, OmegaConfBaseException) as error:
        raise ConfigError(_hint(cfg, error)) from error
    return datamodule, module, trainer


PARAM_GROUP_FIELDS = ("decay_norm_and_bias", "no_weight_decay", "lr_multipliers")


def _optimizer_error(module: SupervisedTask, error: BaseException) -> str:
    """An optimizer's or the parameter groups' error with the config key it is about:
    ``lr must be ...`` is ``optimizer.lr must be ...``."""
    message = one_line(error)
    if message.startswith(("optimizer", "param_groups")):
        return message
    word = re.match(r"\w+", message)
    word = word.group(0) if word else ""
    if word in PARAM_GROUP_FIELDS:
        return f"param_groups.{message}"
    try:
        fields = list(inspect.signature(optimizer_class(module.optimizer_config)).parameters)
    except (ValueError, TypeError):
        fields = []
    return f"optimizer.{message}" if word in fields else f"optimizer: {message}"


def _hint(cfg: DictConfig, error: BaseException) -> str:
    message = one_line(error)
    if message == "No supported gpu backend found!":
        return (f"trainer.accelerator={cfg.trainer.accelerator} but this machine has no GPU (Lightning: "
                f"{message}): use strategy=ddp_cpu for 2 CPU processes, or strategy=auto")
    return message


def train(cfg: DictConfig, *, extra_callbacks: Sequence[Callback] = (), print_summary: bool = True
          ) -> dict[str, float]:
    """Seeds, builds, fits and tests; returns the final metrics. A bad value raises
    :class:`ConfigError` before the fit starts training; Lightning's information lines
    are held until then (and dropped with the error). ``extra_callbacks`` join the
    config's (``lightning-imex-compare`` adds its progress bar)."""
    try:
        check_seed(cfg.seed)
    except OmegaConfBaseException as error:
        raise ConfigError(one_line(error)) from error
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _INFO.held = []
    try:
        datamodule, module, trainer = _build(cfg, extra_callbacks)
        start = next(c for c in trainer.callbacks if isinstance(c, _FitStart))
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path,
                        weights_only=True if cfg.ckpt_path else None)
            _INFO.release()  # a fit that ended before training (max_steps=0)
            if cfg.test and not trainer.fast_dev_run:
                trainer.test(module, datamodule=datamodule, verbose=False)
        except (IncompatibleSetupError, MisconfigurationException) as error:
            raise ConfigError(one_line(error)) from error
        except (ValueError, OSError) as error:  # Lightning's checks at the start of the fit
            if not start.configuring:
                raise  # a bug: keep the traceback
            raise ConfigError(_hint(cfg, error)) from error
    except BaseException:
        _INFO.drop()
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    log_dir = trainer.log_dir  # a collective call under DDP: every rank makes it
    if trainer.is_global_zero and print_summary:
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

FULL_ERROR = "HYDRA_FULL_ERROR"
_UNSET = object()
# the user's HYDRA_FULL_ERROR while main() runs Hydra with it set (None: unset), and the
# errors that escaped the task (a run that failed): they keep their traceback
_users_full_error: Any = _UNSET
_RUN_ERRORS: list[BaseException] = []


def _setenv(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> Any:
    hydras = os.environ.get(FULL_ERROR)
    if _users_full_error is not _UNSET:  # the run (and the processes it starts) sees the user's environment
        _setenv(FULL_ERROR, _users_full_error)
    try:
        return train(cfg)
    except ConfigError as error:
        if os.environ.get(FULL_ERROR) == "1":
            raise
        fail(str(error))
    except Exception as error:
        _RUN_ERRORS.append(error)
        raise
    finally:
        _setenv(FULL_ERROR, hydras)


def main() -> None:
    """The console script: Hydra's app, its errors (arguments, composition, the run
    folder) and the app's own (:class:`ConfigError`) in one line; an error raised once
    the run has started keeps its traceback, as does every error with
    ``HYDRA_FULL_ERROR=1``."""
    global _users_full_error
    quiet()
    args = sys.argv[1:]
    check_launcher(args)
    check_arguments(args)
    _users_full_error = os.environ.get(FULL_ERROR)
    os.environ[FULL_ERROR] = "1"  # Hydra raises its errors here instead of printing them
    try:
        _hydra_main()
    except Exception as error:
        if _users_full_error == "1" or any(error is e for e in _RUN_ERRORS):
            raise
        if isinstance(error, OSError) and not isinstance(error, HydraException):
            # Hydra writes the run's folder before the task starts
            fail(f"cannot write the run's folder ({one_line(error)}): hydra.run.dir (hydra.sweep.dir with -m) "
                 "must be a folder that can be created")
        fail(one_line(error))
    finally:
        _setenv(FULL_ERROR, _users_full_error)
        _users_full_error = _UNSET


if __name__ == "__main__":
    main()

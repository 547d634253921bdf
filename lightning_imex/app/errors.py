"""The app's error text: every error of a configuration (the command line, Hydra's
composition, building the parts, a checkpoint to resume from, Lightning's checks at the
start of the fit) becomes one line, ``lightning-imex-train: error: ...``, naming the key
and what it allows. Importing it loads neither torch nor Lightning (the command line's
errors answer without them)."""

from __future__ import annotations

import importlib.resources
import inspect
import re
import sys
from typing import TYPE_CHECKING, Any

from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:  # importing it loads torch
    from ..optimizers import OptimizerSpec

__all__ = ["PROG", "ConfigError", "compose_error", "fail", "hint", "one_line", "optimizer_error", "trainer_error"]

PROG = "lightning-imex-train"


class ConfigError(ValueError):
    """A config value that cannot work; the message names it."""


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
    printed by one process only (under DDP every process fails alike). Without Lightning
    loaded (the command line's errors) this is the only process."""
    rank_zero = sys.modules.get("lightning.pytorch.utilities.rank_zero")
    if getattr(getattr(rank_zero, "rank_zero_only", None), "rank", 0) == 0:
        message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def hint(cfg: DictConfig, error: BaseException) -> str:
    """``error`` in one line, with what to do where Lightning's message does not say."""
    message = one_line(error)
    if message == "No supported gpu backend found!":
        cpu = "fsdp_cpu" if "FSDP2Strategy" in str(cfg.trainer.get("strategy", "")) else "ddp_cpu"
        return (f"trainer.accelerator={cfg.trainer.accelerator} but this machine has no GPU (Lightning: "
                f"{message}): use strategy={cpu} for 2 CPU processes, or strategy=auto")
    return message


def trainer_error(cfg: DictConfig, error: BaseException) -> str:
    message = hint(cfg, error)
    return message if message.startswith("trainer") else f"trainer: {message}"


PARAM_GROUP_FIELDS = ("decay_norm_and_bias", "no_weight_decay", "lr_multipliers")


def optimizer_error(spec: OptimizerSpec, error: BaseException) -> str:
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
        fields = list(inspect.signature(spec.cls).parameters)
    except (ValueError, TypeError):
        fields = []
    return f"optimizer.{message}" if word in fields else f"optimizer: {message}"

"""The command line of ``lightning-imex-train`` (:func:`main`, the console script): Hydra's
app, its errors (arguments, composition, the run folder) and the app's own
(:class:`~lightning_imex.app.errors.ConfigError`) in one line.

Lightning takes seconds to import, so what needs no run answers without it: ``--help``
and ``--hydra-help`` (Hydra's, with the schema registered without Lightning's types,
:func:`lightning_imex.config.register`), and a command line that does not compose (a bad
group option, key, value or override syntax) fails in a composition with that schema
first (:func:`compose_without_lightning`, which ``lightning-imex-compare`` runs on each
optimizer's overrides too). The overrides of the keys typed from Lightning
(:data:`~lightning_imex.config.FROM_LIGHTNING`) are checked by the run's composition,
with the whole schema."""

from __future__ import annotations

import os
import re
import sys
from argparse import Namespace
from collections.abc import Sequence
from typing import Any

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig

from ..config import FROM_LIGHTNING, register
from . import run_dir  # noqa: F401  (registers the run folder's resolvers)
from .errors import PROG, ConfigError, fail, one_line

__all__ = ["check_arguments", "check_launcher", "compose_without_lightning", "main"]

FULL_ERROR = "HYDRA_FULL_ERROR"
_UNSET = object()
# the user's HYDRA_FULL_ERROR while main() runs Hydra with it set (None: unset), and the
# errors that escaped the task (a run that failed): they keep their traceback
_users_full_error: Any = _UNSET
_RUN_ERRORS: list[BaseException] = []


def _module_missing(name: str) -> bool:
    import importlib.util

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


def check_arguments(args: list[str]) -> Namespace:
    """The command line parsed as Hydra parses it, an unknown flag failing in one line
    (argparse prints its usage too)."""
    from hydra._internal.utils import get_args_parser
    parser = get_args_parser()
    parser.prog = PROG
    parser.error = lambda message: fail(f"{message} (see {PROG} --help)")  # type: ignore[method-assign]
    return parser.parse_args(args)


def compose_without_lightning(overrides: Sequence[str]) -> None:
    """Composes the app's config for ``overrides`` with the schema registered without
    Lightning's types, raising Hydra's (or OmegaConf's) error of a bad group option, key,
    value or override syntax before Lightning loads. Left to a composition with the whole
    schema: the overrides of :data:`FROM_LIGHTNING`'s keys and a sweep; with Lightning
    loaded already (a test, a forked run) or Hydra initialised, nothing is saved and
    nothing is composed here."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if GlobalHydra().is_initialized() or "lightning" in sys.modules:
        return
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if any(o.is_sweep_override() for o in parsed):
        return
    register(lightning=False)  # kept if the whole schema is registered
    kept = [o.input_line for o in parsed if o.key_or_group.split(".")[0] not in FROM_LIGHTNING
            or "." not in o.key_or_group]
    with initialize_config_module(config_module="lightning_imex.conf", version_base="1.3"):
        compose("train", overrides=kept)


def _compose_without_lightning(parsed: Namespace) -> None:
    """The command line's overrides composed without Lightning (:func:`compose_without_lightning`):
    an error fails here, in one line. A command line that names other configs or asks for
    something other than a run is left to Hydra."""
    if (parsed.multirun or parsed.cfg or parsed.info or parsed.shell_completion or parsed.experimental_rerun
            or parsed.config_path or parsed.config_name or parsed.config_dir):
        return
    try:
        compose_without_lightning(parsed.overrides)
    except Exception as error:
        if os.environ.get(FULL_ERROR) == "1":
            raise
        fail(one_line(error))


def _setenv(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


@hydra.main(version_base="1.3", config_path="pkg://lightning_imex.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> Any:
    from ..train import train

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
    args = sys.argv[1:]
    check_launcher(args)
    parsed = check_arguments(args)
    register(lightning=False)  # kept if the whole schema is registered
    if not (parsed.help or parsed.hydra_help):
        _compose_without_lightning(parsed)
        from .. import train  # Lightning, and the whole schema
        train.quiet()
    _users_full_error = os.environ.get(FULL_ERROR)
    os.environ[FULL_ERROR] = "1"  # Hydra raises its errors here instead of printing them
    try:
        _hydra_main()
    except Exception as error:
        if _users_full_error == "1" or any(error is e for e in _RUN_ERRORS):
            raise
        if isinstance(error, BrokenPipeError):  # --help's reader stopped reading (| head): nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit, when stdout is flushed
            sys.exit(1)
        if isinstance(error, OSError) and not isinstance(error, HydraException):
            # Hydra writes the run's folder before the task starts
            fail(f"cannot write the run's folder ({one_line(error)}): hydra.run.dir (hydra.sweep.dir with -m) "
                 "must be a folder that can be created")
        fail(one_line(error))
    finally:
        _setenv(FULL_ERROR, _users_full_error)
        _users_full_error = _UNSET

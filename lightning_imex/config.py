"""The app's config schema, registered in Hydra's ConfigStore as ``train_schema``: the
Trainer's arguments (read off ``lightning.Trainer``), clipping (off
:class:`~lightning_imex.clipping.GradientClipping`), parameter groups and the top-level
keys are typed, so an unknown key or a wrong type fails at composition with Hydra's
message. Group options are checked by Hydra (it lists the available ones); values of
the optimizer, dataset and model are checked by building them before training.

Reading the Trainer's and clipping's signatures imports Lightning (seconds), so
``register(lightning=False)`` registers the schema with :data:`FROM_LIGHTNING` untyped:
``lightning-imex-train --help`` and a bad group or key elsewhere answer with it
(:mod:`lightning_imex.app.cli`) before a run registers the whole schema."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

__all__ = ["FROM_LIGHTNING", "TrainConfig", "register"]

SIMPLE = (int, float, bool, str)


def _omegaconf_type(annotation: Any) -> Any:
    """``annotation`` where OmegaConf can check it (a simple type, optional or not, or a
    tuple of strings), else ``Any``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation in SIMPLE:
        return annotation
    if len(args) == 1 and args[0] in SIMPLE and type(None) in typing.get_args(annotation):
        return Optional[args[0]]
    if typing.get_origin(annotation) is tuple and args and args[0] is str:
        return List[str]
    return Any


def _schema(name: str, target: Any, skip: tuple[str, ...] = ()) -> type:
    """A dataclass with ``target``'s keyword arguments (or fields), their checkable types
    and their defaults."""
    hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    fields = []
    for key, parameter in inspect.signature(target).parameters.items():
        if key in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default if parameter.default is not parameter.empty else None
        kind = _omegaconf_type(hints.get(key, Any))
        if isinstance(default, (list, tuple)):
            fields.append((key, kind, field(default_factory=lambda d=default: list(d))))
        else:
            fields.append((key, kind if default is None or kind is Any or isinstance(default, SIMPLE) else Any,
                           field(default=default)))
    return dataclasses.make_dataclass(name, fields)


@dataclasses.dataclass
class ParamGroupsConfig:
    decay_norm_and_bias: bool = False
    no_weight_decay: List[str] = field(default_factory=list)
    lr_multipliers: Dict[str, float] = field(default_factory=dict)


@dataclasses.dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "data"
    output_dir: str = "."
    log_dir: str = "."


@dataclasses.dataclass
class TrainConfig:
    dataset: Any = None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    trainer: Any = None  # typed by the whole schema (_with_lightning)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    logger: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    clipping: Any = None  # typed by the whole schema
    param_groups: ParamGroupsConfig = field(default_factory=ParamGroupsConfig)
    task_name: str = "train"
    seed: int = 0
    ckpt_path: Optional[str] = None
    test: bool = True
    threads: Optional[int] = None


# the keys whose schema is read off Lightning's classes (untyped without it)
FROM_LIGHTNING = ("trainer", "clipping")


@functools.cache
def _with_lightning() -> type:
    """:class:`TrainConfig` with the Trainer's arguments and clipping's fields typed."""
    import lightning as L

    from .clipping import GradientClipping

    trainer = _schema("TrainerConfig", L.Trainer, skip=("callbacks", "logger"))
    clipping = _schema("ClippingConfig", GradientClipping)
    return dataclasses.make_dataclass("TrainConfig", [("trainer", trainer, field(default_factory=trainer)),
                                                      ("clipping", clipping, field(default_factory=clipping))],
                                      bases=(TrainConfig,))


_whole_registered = False


def register(lightning: bool = True) -> None:
    """Registers ``train_schema``: the whole schema, or with ``lightning=False`` the one
    without :data:`FROM_LIGHTNING`'s types (no Lightning import) unless the whole one is
    registered already (it checks more, and Lightning is loaded then)."""
    global _whole_registered
    _whole_registered = _whole_registered or lightning
    ConfigStore.instance().store(name="train_schema", node=_with_lightning() if _whole_registered else TrainConfig)

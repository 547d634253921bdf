"""Configs as plain values: containers of numbers, strings and tensors, what a checkpoint
that loads with ``torch.load(..., weights_only=True)`` can hold. OmegaConf containers are
resolved, partials and classes become ``{"_target_": "module.Name", ...}``."""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["HYDRA_KEYS", "ReadOnlyDict", "dotted_path", "import_path", "keyword_names", "to_plain"]

HYDRA_KEYS = ("_partial_", "_convert_", "_recursive_")


def to_plain(value: Any, name: str = "value") -> Any:
    """``value`` as containers of numbers, strings and tensors (what ``torch.load(...,
    weights_only=True)`` reads): OmegaConf containers resolved, partials and classes as
    ``{"_target_": "module.Name", ...}``, dataclasses as dicts, enums as their values."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        return to_plain(OmegaConf.to_container(value, resolve=True), name)
    if isinstance(value, functools.partial):
        if value.args:
            raise TypeError(f"{name}: a partial with positional arguments cannot be stored; use keywords")
        return {"_target_": dotted_path(value.func), **to_plain(value.keywords, name)}
    if isinstance(value, type):
        return {"_target_": dotted_path(value)}
    if dataclasses.is_dataclass(value):
        return to_plain(dataclasses.asdict(value), name)
    if isinstance(value, enum.Enum):
        return to_plain(value.value, name)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v, f"{name}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{name}: a {type(value).__name__} cannot be stored in a checkpoint that loads with "
                    "weights_only=True; pass numbers, strings, lists or dicts (or leave it out of the "
                    "saved hyper-parameters with save_hyperparameters(ignore=[...]))")


class ReadOnlyDict(dict):
    """A dict that refuses changes: a spec's arguments, checked when it was made, stay
    what was checked (a changed copy is a new spec, checked again). It copies, pickles
    and deep-copies as a dict would."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a spec's arguments are read-only: make a new spec with the changed ones")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (dict(self),)


def dotted_path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def import_path(path: str, name: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{name}: cannot import {path!r} ({error})") from None


def keyword_names(fn: Any, skip: tuple[str, ...] = ()) -> list[str] | None:
    """The keyword arguments ``fn`` takes (less ``skip``); None where it takes ``**kwargs``."""
    parameters = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return None
    return [k for k in parameters if k not in skip and k != "self"]

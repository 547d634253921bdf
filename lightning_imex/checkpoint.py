"""A checkpoint checked against the module (and optimizer) before a fit resumes from it:
``check_checkpoint(path, module, optimizer)`` raises a one-line :class:`CheckpointError`
saying what is wrong (no such file, a folder, an empty, truncated or foreign file, weights
only, another model, another optimizer or schedule) before ``trainer.fit(ckpt_path=...)``
would fail halfway through its setup with a long traceback, or resume silently wrong.

The file is read as Lightning reads it (``torch.load(..., weights_only=True)``), memory-mapped
where its format allows: the check costs little besides opening the file::

    check_checkpoint(path, module, module.checked_optimizer())
    trainer.fit(module, datamodule=datamodule, ckpt_path=path, weights_only=True)
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "check_checkpoint", "load_checkpoint"]

SHOWN = 2  # differences a message names; it counts the rest
# how a file torch.save wrote starts: a zip archive (the format since torch 1.6), or the
# legacy format's pickle (a protocol header, then the magic number as a LONG1 opcode,
# after an 8-byte frame length from protocol 4 on)
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
HEAD = 32  # bytes read to tell them apart
# IMEXModule's hyper-parameters that set the training recipe, not the network
RECIPE_KEYS = ("optimizer", "scheduler", "clipping", "decay_norm_and_bias", "no_weight_decay", "lr_multipliers")


class CheckpointError(ValueError):
    """A checkpoint that a fit cannot resume from; the message is one line and says why."""


def load_checkpoint(path: Any, name: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at ``path`` (on the CPU, memory-mapped where the format allows), read
    with ``weights_only=True``; a dict with a ``state_dict``, or a :class:`CheckpointError`
    (``name=path: ...``). A sharded checkpoint (the folder a sharded fit saves) gives its
    ``meta.pt``, a ``state_dict`` of tensors on the ``meta`` device (the names, shapes
    and dtypes of the shards' index; no values read) and ``optimizer_states`` of one
    ``None`` per optimizer it holds."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise CheckpointError(f"{name} must be the path of a checkpoint file, got {path!r}")
    where = f"{name}={path}"
    if not os.path.exists(path):
        raise CheckpointError(f"{where}: no such file")
    if os.path.isdir(path):
        return _load_sharded(path, where)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEAD)
    except OSError as error:
        raise CheckpointError(f"{where}: cannot be read ({error.strerror or error})") from None
    if size == 0:
        raise CheckpointError(f"{where}: an empty file (0 bytes), not a checkpoint")
    zipped = head.startswith(ZIP_MAGIC)
    # anything else torch.load would unpickle: random bytes can pass for pickle opcodes and
    # fail as "refused objects"; a file in neither of torch.save's formats is foreign
    if not zipped and not (head.startswith(b"\x80") and LEGACY_MAGIC in head):
        raise CheckpointError(f"{where}: not a PyTorch checkpoint ({size} bytes in neither of torch.save's "
                              "formats: no zip archive, no legacy magic number)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True,
                                mmap=zipped and zipfile.is_zipfile(path))
    except Exception as error:  # torch.load raises anything the bytes provoke
        raise CheckpointError(f"{where}: {_unreadable(error, zipped, size)}") from None
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        holds = (f"a dict with keys {', '.join(map(str, list(checkpoint)[:5]))}" if isinstance(checkpoint, Mapping)
                 else f"a {type(checkpoint).__name__}")
        raise CheckpointError(f"{where}: not a Lightning checkpoint (no state_dict / loops): it holds {holds}")
    return dict(checkpoint)


def _load_sharded(path: Any, where: str) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata

    from .sharding import CHECKPOINT_METADATA, is_sharded_checkpoint, shards_index_problem
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{where}: a folder that is not a sharded checkpoint (no {CHECKPOINT_METADATA} and "
                              ".metadata beside shard files); a checkpoint is a file, e.g. checkpoints/last.ckpt, "
                              "or the folder a sharded fit (strategy=fsdp) saves under that name")
    problem = shards_index_problem(path)
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    try:
        checkpoint = torch.load(os.path.join(path, CHECKPOINT_METADATA), map_location="cpu", weights_only=True)
        index = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as error:  # torch.load and the index's unpickling raise anything the bytes provoke
        raise CheckpointError(f"{where}: a sharded checkpoint whose {CHECKPOINT_METADATA} or shard index cannot "
                              f"be read ({type(error).__name__}: {_first_line(str(error)) or '-'})") from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{where}: not a Lightning checkpoint ({CHECKPOINT_METADATA} holds a "
                              f"{type(checkpoint).__name__})")
    prefix = "state_dict."
    state_dict = {key[len(prefix):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device="meta")
                  for key, meta in index.items() if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not state_dict:
        raise CheckpointError(f"{where}: a sharded checkpoint without the module's weights (no state_dict.* shards)")
    optimizers = {key.split(".", 1)[0] for key in index if re.match(r"optimizer_\d+\.", key)}
    return {**checkpoint, "state_dict": state_dict, "optimizer_states": [None] * len(optimizers)}


def _unreadable(error: Exception, zipped: bool, size: int) -> str:
    message = str(error)
    if "Weights only load failed" in message:
        found = re.search(r"(Unsupported global: [^\n]*?)(?: was not an allowed global| \(|\n|$)", message)
        detail = found.group(1) if found else _first_line(message.split("WeightsUnpickler error:")[-1])
        return (f"holds objects that torch.load(weights_only=True) refuses ({detail}): checkpoints are loaded "
                "with weights_only=True; save plain tensors, numbers, strings, lists and dicts")
    if zipped:
        return (f"a truncated or corrupt checkpoint ({size} bytes): its zip archive cannot be read "
                f"({_first_line(message).split('. This is an internal')[0]})")
    return (f"not a PyTorch checkpoint ({size} bytes that torch.load cannot read: "
            f"{type(error).__name__}: {_first_line(message) or '-'})")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def check_checkpoint(path: Any, module: nn.Module,
                     optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None, *,
                     resume: bool = True, name: str = "ckpt_path") -> dict[str, Any]:
    """Raises :class:`CheckpointError` (one line, starting ``name=path``) unless ``module``
    can load the checkpoint at ``path``: its ``state_dict`` has the module's keys and
    shapes (the first differences are named, the rest counted, with the hyper-parameters
    that differ), and with ``resume`` it holds what a fit resumes (optimizer and loop
    states) for the same optimizer and schedule as ``module``'s
    (:class:`~lightning_imex.IMEXModule`'s configs, where the checkpoint has them).

    ``optimizers`` (fresh ones, built as ``configure_optimizers`` builds them) are checked
    by loading the checkpoint's states into them: they end up holding those states.
    Returns the checkpoint (memory-mapped tensors, on the CPU)."""
    checkpoint = load_checkpoint(path, name)
    where = f"{name}={path}"
    if resume:
        if "pytorch-lightning_version" not in checkpoint:
            raise CheckpointError(f"{where}: not a Lightning checkpoint (no pytorch-lightning_version): a fit "
                                  "resumes from what Trainer.save_checkpoint or ModelCheckpoint saved")
        missing = [key for key in ("optimizer_states", "loops") if key not in checkpoint]
        if missing:
            raise CheckpointError(f"{where}: holds the weights only (no {' / '.join(missing)}, as "
                                  "ModelCheckpoint(save_weights_only=True) saves): a fit cannot resume from it; "
                                  "load its state_dict into the model and start a new fit instead")
    _check_state_dict(where, checkpoint, module)
    if resume:
        _check_recipe(where, checkpoint, module)
        _check_optimizer_states(where, checkpoint, optimizers)
    return checkpoint


def _shape(value: Any) -> list[int] | None:
    shape = getattr(value, "shape", None)
    return list(shape) if shape is not None else None


def _check_state_dict(where: str, checkpoint: Mapping[str, Any], module: nn.Module) -> None:
    here, there = module.state_dict(), checkpoint["state_dict"]
    strict = getattr(module, "strict_loading", True)  # as Lightning loads it
    shapes = [f"{key} has shape {_shape(there[key])} in the checkpoint, {_shape(value)} here"
              for key, value in here.items() if key in there and _shape(there[key]) != _shape(value)]
    missing = [f"{key} is not in the checkpoint" for key in here if key not in there] if strict else []
    unexpected = [f"{key} is not in this model" for key in there if key not in here] if strict else []
    differences = shapes + missing + unexpected
    if not differences:
        return
    hparams = _differences(checkpoint.get("hyper_parameters"), getattr(module, "hparams", None))
    saved = f" ({'; '.join(hparams[:SHOWN])})" if hparams else ""
    more = len(differences) - SHOWN
    raise CheckpointError(f"{where} was saved from a different model{saved}: {'; '.join(differences[:SHOWN])}"
                          + (f"; and {more} more key{'s' * (more > 1)} differ{'s' * (more == 1)}" if more > 0 else ""))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def _differences(saved: Any, current: Any) -> list[str]:
    """``key=value in the checkpoint, value here`` for the hyper-parameters (besides the
    training recipe's) that differ."""
    if not isinstance(saved, Mapping) or not isinstance(current, Mapping):
        return []
    saved, current = (_flat({k: v for k, v in d.items() if k not in RECIPE_KEYS}) for d in (saved, current))
    return [f"{key}={saved[key]!r} in the checkpoint, {current[key]!r} here"
            for key in current if key in saved and saved[key] != current[key]]


def _check_recipe(where: str, checkpoint: Mapping[str, Any], module: nn.Module) -> None:
    """The optimizer's class and the schedule's name against an IMEXModule's specs."""
    from .schedules import scheduler_spec
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, Mapping):
        return
    current = getattr(module, "optimizer_spec", None)
    if current is not None and isinstance(saved.get("optimizer"), Mapping):
        before = _saved_class(saved["optimizer"])
        if before is not None and before is not current.cls:
            raise CheckpointError(f"{where} was saved with the optimizer {_describe(saved['optimizer'], before)}, "
                                  f"this fit has {_describe(current.kwargs, current.cls)}: its state does not carry "
                                  "over; resume with the checkpoint's optimizer, or start a new fit from its weights")
    if hasattr(module, "scheduler_spec") and "scheduler" in saved:
        try:
            spec = scheduler_spec(saved["scheduler"])
        except (ValueError, TypeError):  # not a config this version reads: Lightning's restore decides
            return
        names = [None if s is None else s.name for s in (spec, module.scheduler_spec)]
        if names[0] != names[1]:
            raise CheckpointError(f"{where} was saved with the scheduler {names[0]!r}, this fit has {names[1]!r}: "
                                  "its state does not carry over; resume with the checkpoint's scheduler, or "
                                  "start a new fit from its weights")


def _saved_class(config: Mapping[str, Any]) -> type | None:
    """The optimizer class a saved config names, by registry name or ``_target_`` in a
    module already imported (a file's content imports nothing); None if unknown."""
    from .optim import OPTIMIZERS
    if "name" in config:
        return OPTIMIZERS.get(config["name"])
    module, _, attr = str(config.get("_target_", "")).rpartition(".")
    found = getattr(sys.modules.get(module), attr, None)
    return found if isinstance(found, type) else None


def _describe(config: Mapping[str, Any], cls: type) -> str:
    from .optim import OPTIMIZERS
    name = next((n for n, c in OPTIMIZERS.items() if c is cls), None) or cls.__name__
    tableau = config.get("tableau")
    return name + (f" (tableau={tableau!r})" if isinstance(tableau, str) else "")


def _check_optimizer_states(where: str, checkpoint: Mapping[str, Any],
                            optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None) -> None:
    if optimizers is None:
        return
    optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    states = checkpoint["optimizer_states"]
    if len(states) != len(optimizers):
        raise CheckpointError(f"{where} holds the states of {len(states)} optimizers, this fit has "
                              f"{len(optimizers)}")
    for optimizer, state in zip(optimizers, states):
        if state is None:  # a sharded checkpoint's: its shards load into the sharded optimizer only
            continue
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as error:
            raise CheckpointError(f"{where}: its optimizer state does not fit this fit's {type(optimizer).__name__}: "
                                  f"{_first_line(str(error)) or type(error).__name__}") from None

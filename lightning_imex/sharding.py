"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``) under Lightning's
``ModelParallelStrategy``: every process holds a 1/N slice (dim 0) of every parameter,
gradient and optimizer state, and gathers a block's full weights only while it runs.

* :class:`FSDP2Strategy`: ``ModelParallelStrategy`` with one data-parallel dimension over
  every process (``data_parallel_size = world size``, no tensor parallelism), so that each
  process trains on its own share of the batch (``conf/strategy/fsdp.yaml``, ``fsdp_cpu.yaml``).
* :func:`shard_blocks`: ``fully_shard`` applied to the chosen blocks of a module, then to
  the module itself (what ``configure_model`` does); any LightningModule can call it::

      def configure_model(self):
          if self.device_mesh is not None:  # None under a strategy that does not shard
              shard_blocks(self.net, self.device_mesh["data_parallel"], block_types=(TransformerBlock,),
                           mp_policy=mixed_precision_policy(self.trainer.precision))

* :func:`consolidate`: a sharded checkpoint (the folder Lightning writes) into one plain
  ``state_dict`` file that loads into the unsharded module;
  ``python -m lightning_imex.sharding consolidate CKPT_DIR OUT.pt``.

The optimizers of :mod:`lightning_imex.optim` update the local shards in place and reduce
what needs the whole parameter (ClippedAdam's global norm) across processes."""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from . import _lightning
from .atomic import torch_save
from .multigradient import requires_closure
from .optim.cache import owner_problem

__all__ = ["CHECKPOINT_METADATA", "COPY_MARK", "FSDP2Strategy", "consolidate", "is_sharded",
           "is_sharded_checkpoint", "load_weight_copies", "mixed_precision_policy", "shard_blocks",
           "shards_index_problem"]

# what Lightning writes beside the shards of a sharded checkpoint (loops, callbacks,
# hyper-parameters), and torch.distributed.checkpoint's index of the shards
CHECKPOINT_METADATA, SHARDS_INDEX = "meta.pt", ".metadata"
# the first character of a state_dict key that is no module's: a copy of its weights kept
# with the shards under a strategy that shards state_dict alone (Lightning's
# ModelParallelStrategy: ModelEMA's raw weights), which loading and consolidate leave out
COPY_MARK = "@"
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process of the fit (``devices`` x ``num_nodes``): Lightning's
    ``ModelParallelStrategy`` with ``data_parallel_size`` the world size and
    ``tensor_parallel_size`` 1, sizes it can only be given once the Trainer has counted
    its devices. The module's ``configure_model`` shards over
    ``self.device_mesh["data_parallel"]`` (:func:`shard_blocks`); each process's data
    sampler takes its share of every batch, as under DDP.

    Checkpoints are folders of shards (``save_distributed_checkpoint=True``, the default)
    that a fit resumes from (``ckpt_path=.../last.ckpt``) and :func:`consolidate` turns
    into one file; ``False`` gathers everything on rank 0 into one file instead.

    Beside the module's ``state_dict`` and the optimizers' states, a sharded checkpoint
    holds with the shards every other top-level entry that is a copy of the module's
    weights as DTensors (``ModelEMA``'s ``current_model_state``: the raw weights while
    ``state_dict`` holds the EMA), so that each rank saves and restores its own shards;
    Lightning would pickle them into ``meta.pt`` from rank 0 alone. Loading gives them
    back as DTensors sharded as the module's."""

    saves_weight_copies: bool  # whether checkpoints keep such copies sharded (what ModelEMA needs)

    def __init__(self, process_group_backend: str | None = None, save_distributed_checkpoint: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(process_group_backend=process_group_backend,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.sharded_checkpoints = self.saves_weight_copies = save_distributed_checkpoint

    def setup_environment(self) -> None:
        _lightning.set_model_parallel_sizes(self, data_parallel=self.num_nodes * self.num_processes, tensor_parallel=1)
        super().setup_environment()

    def model_to_device(self) -> None:
        # a module sharded already (trainer.test after fit) is on its device: moving it would swap every
        # parameter for a copy, which fails while anything (an optimizer's caches) holds a weak reference to one
        if any(True for _ in self.model.parameters()) and all(
                t.device == self.root_device for t in (*self.model.parameters(), *self.model.buffers())):
            return
        super().model_to_device()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """A folder of shards written whole or not at all: into ``NAME.partial`` beside it,
        then swapped in by renames (the previous folder kept as ``NAME.previous`` until the
        new one is in place), so that a process killed while saving leaves the previous
        checkpoint as it was."""
        if not self.sharded_checkpoints:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(os.fspath(filepath)))
        staging, previous = path.with_name(path.name + ".partial"), path.with_name(path.name + ".previous")
        if self.global_rank == 0:
            for stale in (staging, previous):
                shutil.rmtree(stale, ignore_errors=True)
        self.barrier()
        self._save_shards(checkpoint, staging, storage_options)
        self.barrier()  # every rank's shards written
        if self.global_rank == 0:
            if path.exists():
                os.replace(path, previous)
            os.replace(staging, path)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier()

    def _save_shards(self, checkpoint: dict[str, Any], folder: Path, storage_options: Any) -> None:
        """Lightning's split of a sharded checkpoint (its ``save_checkpoint``), with the weight
        copies moved into the shards: ``state_dict``, ``optimizer_{i}`` and those copies
        through torch.distributed.checkpoint (every rank its shards), the rest into
        ``meta.pt`` by rank 0."""
        import torch.distributed.checkpoint as dcp

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options: sharded checkpoints "
                            "are written by torch.distributed.checkpoint, not a CheckpointIO")
        shards = {"state_dict": checkpoint.pop("state_dict")}
        shards.update((f"optimizer_{i}", state) for i, state in enumerate(checkpoint.pop("optimizer_states", [])))
        shards.update((key, checkpoint.pop(key)) for key in [key for key, value in checkpoint.items()
                                                             if _is_weight_copy(value)])
        folder.mkdir(parents=True, exist_ok=True)
        dcp.save(shards, checkpoint_id=folder)
        if self.global_rank == 0:
            torch.save(checkpoint, folder / CHECKPOINT_METADATA)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        for optimizer in self.optimizers:
            if requires_closure(optimizer) and not optimizer.state:
                _initialize_state(optimizer)
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        path = self.broadcast(os.fspath(checkpoint_path))
        if is_sharded_checkpoint(path):
            checkpoint.update(self._load_weight_copies(path))
        return checkpoint

    def _load_weight_copies(self, path: str) -> dict[str, dict[str, torch.Tensor]]:
        """The checkpoint's weight copies: its top-level shard entries other than
        ``state_dict`` and ``optimizer_{i}``."""
        entries = {key.partition(".")[0] for key in _dcp_keys(path)}
        prefixes = [f"{entry}." for entry in sorted(entries)
                    if entry != "state_dict" and not (entry.startswith("optimizer_") and entry[10:].isdigit())]
        return {prefix[:-1]: copy for prefix, copy in load_weight_copies(path, self.model, prefixes).items()}


def _dcp_keys(path: str | os.PathLike) -> list[str]:
    """The flattened names of the tensors in the sharded checkpoint folder ``path``
    (``state_dict.net.0.weight``, ``optimizer_0.state...``)."""
    import torch.distributed.checkpoint as dcp

    return list(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def load_weight_copies(path: str | os.PathLike, module: nn.Module,
                       prefixes: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Per prefix of the flattened names of the checkpoint folder ``path`` (``"entry."``,
    or ``"state_dict." + COPY_MARK + ...``: a copy kept inside ``state_dict``), the
    tensors named that prefix plus a weight's name of ``module``, by that name, each rank
    reading its shards into DTensors sharded as the module's; prefixes that name nothing
    are left out. Every rank calls it (the reads are collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    found: dict[str, list[str]] = {}
    for key in _dcp_keys(path):
        for prefix in prefixes:
            if key.startswith(prefix):
                found.setdefault(prefix, []).append(key[len(prefix):])
    if not found:
        return {}
    module_state = get_model_state_dict(module)  # the layout of every shard: the template DCP fills
    for prefix, names in found.items():
        unknown = sorted(set(names) - module_state.keys())
        if unknown:
            raise ValueError(f"{path}: the checkpoint's sharded entry {prefix + unknown[0]!r} is not one of the "
                             "module's weights: it was saved from another model")
    split = {prefix: prefix.partition(".")[::2] for prefix in found}  # DCP's flattening: entry.rest of the name
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for prefix, names in found.items():
        entry, inner = split[prefix]
        nested.setdefault(entry, {}).update((inner + name, module_state[name].detach().clone()) for name in names)
    dcp.load(nested, checkpoint_id=path)
    return {prefix: {name: nested[split[prefix][0]][split[prefix][1] + name] for name in names}
            for prefix, names in found.items()}


def _initialize_state(optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's state, created by one step on zero gradients with the learning rate
    0 (the parameters do not move): what torch.distributed.checkpoint does to a fresh
    optimizer before loading into it (the state is the template its loading fills), but
    with a closure, which an optimizer that evaluates several gradients per step needs."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0

    def zero_gradients() -> torch.Tensor:
        for p in params:
            p.grad = torch.zeros_like(p)
        return torch.zeros(())

    try:
        optimizer.step(zero_gradients)
    finally:
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        optimizer.zero_grad(set_to_none=True)


def _is_weight_copy(value: Any) -> bool:
    """Whether a checkpoint entry is a copy of sharded weights: a dict holding DTensors."""
    from torch.distributed.tensor import DTensor

    return isinstance(value, dict) and any(isinstance(v, DTensor) for v in value.values())


def is_sharded(strategy: Any) -> bool:
    """Whether ``strategy`` shards the weights (and saves a checkpoint as a folder of shards)."""
    return any(cls.__name__ in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")
               for cls in type(strategy).__mro__)


def mixed_precision_policy(precision: Any) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for the Trainer's ``precision``: ``bf16-mixed``
    computes with bf16 copies of the weights and reduces the gradients in fp32 (the
    sharded weights and optimizer state stay fp32); any other precision keeps the
    weights' own dtype (``None``: FSDP2's default)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if str(precision) == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_blocks(module: nn.Module, mesh: Any, block_types: Sequence[type[nn.Module]] = (),
                 name_pattern: str | None = None, mp_policy: Any = None) -> nn.Module:
    """``fully_shard`` on every submodule that is one of ``block_types`` or whose name
    (as ``named_modules`` gives it) matches the ``fnmatch`` pattern ``name_pattern``,
    innermost first, then on ``module`` (which owns the parameters no block holds).
    Each block is one all-gather in forward and one reduce-scatter in backward: a block
    per layer (or residual block) overlaps communication with compute and caps the
    memory of the gathered weights at about one block's.

    Under a policy that computes in low precision (``param_dtype``), every BatchNorm
    layer with weights is a unit of its own that keeps them in fp32 and takes its input
    as it comes: its running statistics are fp32 buffers, and batch norm computes a bf16
    input with fp32 weights and statistics (a bf16 output).

    A module sharded already is returned as it is (``configure_model`` runs again for
    ``trainer.test``). A parameter shared by two blocks, or by a block and a module
    outside it (tied weights), cannot be sharded apart: the ``ValueError`` names it;
    leave those modules out of the blocks (the root then holds them).

    Returns ``module`` (now also an ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(module, FSDPModule):
        return module
    block_types = tuple(block_types)
    if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in block_types):
        raise TypeError(f"shard_blocks: block_types must be nn.Module classes, got {block_types!r}")
    blocks = [(name, sub) for name, sub in module.named_modules() if name and (
        isinstance(sub, block_types) or (name_pattern is not None and fnmatch.fnmatchcase(name, name_pattern)))]
    norms: list[tuple[str, nn.Module]] = []
    if getattr(mp_policy, "param_dtype", None) is not None:
        norms = [(name, sub) for name, sub in module.named_modules() if name and isinstance(sub, BATCH_NORMS)
                 and any(True for _ in sub.parameters(recurse=False))]
        blocks = [(name, sub) for name, sub in blocks if not isinstance(sub, BATCH_NORMS)]
    _check_no_shared_parameters(module, blocks + norms)
    options = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for _, norm in norms:
        fully_shard(norm, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=mp_policy.reduce_dtype,
                                                                    cast_forward_inputs=False))
    for _, block in sorted(blocks, key=lambda item: -item[0].count(".")):  # innermost first
        fully_shard(block, **options)
    fully_shard(module, **options)
    return module


def _check_no_shared_parameters(module: nn.Module, blocks: list[tuple[str, nn.Module]]) -> None:
    """Every parameter of a block belongs to it alone: not to a sibling block, nor to a
    module outside it (nested blocks are fine: the inner one holds it)."""
    owner: dict[int, str] = {}  # parameter -> the innermost block holding it ("" for the root)
    for name, block in sorted(blocks, key=lambda item: item[0].count(".")):  # outermost first
        for p in block.parameters():
            owner[id(p)] = name
    for module_name, sub in module.named_modules(remove_duplicate=False):
        for param_name, p in sub.named_parameters(recurse=False):
            block = owner.get(id(p), "")
            inside = not block or module_name == block or module_name.startswith(block + ".")
            if not inside:
                where = f"{module_name}.{param_name}" if module_name else param_name
                raise ValueError(f"shard_blocks: parameter {where!r} is shared with block {block!r} (tied weights): "
                                 "a shared parameter cannot be sharded apart; leave the modules that share it out "
                                 "of block_types / name_pattern")


def is_sharded_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a folder of shards as a sharded fit saves it (Lightning's
    ``meta.pt`` beside torch.distributed.checkpoint's ``.metadata`` and shard files)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CHECKPOINT_METADATA)) and os.path.isfile(
        os.path.join(path, SHARDS_INDEX))


def shards_index_problem(path: str | os.PathLike) -> str | None:
    """Why the shard index of the checkpoint folder ``path`` must not be read, or None:
    torch.distributed.checkpoint stores it as a pickle (reading it runs what it holds), so
    it must be yours and writable by no one else."""
    problem = owner_problem(os.stat(os.path.join(path, SHARDS_INDEX)))
    return (f"its shard index {SHARDS_INDEX} {problem}; it is a pickle, which runs code when read: copy the "
            "checkpoint into a folder of your own (or fix its permissions)") if problem else None


def consolidate(checkpoint_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The module's full ``state_dict`` from a sharded checkpoint folder, read in this one
    process (no process group); the optimizer's shards are left unread. With ``out``
    it is also written there (atomically: a temporary file renamed), loadable with
    ``torch.load(out, weights_only=True)`` and ``module.load_state_dict`` into the
    unsharded module (the same LightningModule class, built without a strategy)."""
    import torch.distributed.checkpoint as dcp

    path = os.fspath(checkpoint_dir)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path}: not a sharded checkpoint folder (one holds {CHECKPOINT_METADATA} and "
                         f"{SHARDS_INDEX} beside the shard files)")
    problem = shards_index_problem(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    reader = dcp.FileSystemReader(path)
    prefix = "state_dict."
    state_dict = {key[len(prefix):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                  for key, meta in reader.read_metadata().state_dict_metadata.items()
                  if key.startswith(prefix) and not key.startswith(prefix + COPY_MARK)
                  and isinstance(meta, dcp.TensorStorageMetadata)}
    if not state_dict:
        raise ValueError(f"{path}: the checkpoint holds no module weights (no state_dict.* entries)")
    with warnings.catch_warnings():  # that it reads in one process, without a process group, is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load({"state_dict": state_dict}, storage_reader=reader)
    if out is not None:
        torch_save(state_dict, out)
    return state_dict


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lightning_imex.sharding consolidate CKPT_DIR OUT.pt``."""
    parser = argparse.ArgumentParser(prog="python -m lightning_imex.sharding",
                                     description="Tools for sharded (FSDP2) checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("consolidate", help="a sharded checkpoint folder into one plain state_dict file")
    merge.add_argument("checkpoint_dir", help="the folder a sharded fit saved (e.g. checkpoints/last.ckpt)")
    merge.add_argument("out", help="the state_dict file to write (torch.save format)")
    args = parser.parse_args(argv)
    try:
        state_dict = consolidate(args.checkpoint_dir, args.out)
    except (ValueError, OSError, RuntimeError) as error:
        parser.exit(1, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    count = sum(t.numel() for t in state_dict.values())
    print(f"wrote {args.out}: {len(state_dict)} tensors, {count} values")


if __name__ == "__main__":
    main(sys.argv[1:])

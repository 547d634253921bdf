"""Runs lowered programs (:mod:`.program`) over a batch of tensors, on one of three paths
chosen in :func:`select_backend` alone:

- ``eager``: torch operations tensor by tensor (the reference);
- ``cpu``: one generated C function per (event, dtype), one call per event over every
  tensor (:mod:`.cpu_backend`);
- ``triton``: one generated Triton kernel per (event, dtype), one launch per event over
  every tensor (:mod:`.triton_backend`).

The compiled paths address the tensors through pointer tables (:mod:`.toolkit`, below
this module and the backends): one row of data pointers per buffer and a table of
(tensor, offset) blocks, built once and refreshed only when a pointer changes (e.g.
gradients after ``zero_grad(set_to_none=True)``).
They run over each tensor's storage, so any dense layout (contiguous, channels_last,
transposed) works when the parameter, its gradient and its state share strides;
tensors that do not get the eager path, in the same step.
"""

from __future__ import annotations

import math
import operator
from typing import Mapping, Protocol, Sequence

import torch
from torch import Tensor

from . import cpu_backend, triton_backend  # each imports its toolchain (Triton, a C compiler) on first use
from .cache import cache_dir  # re-exported: where generated kernels live
from .program import Event, Kernel, Rounding, Storage, lower, quant_scales, rounding_salt, run_eager, tensor
from .toolkit import PointerTables, dense_layout, to_device

__all__ = ["Batch", "select_backend", "local_tensor", "reduction_key", "shard_offset", "all_reduce_sum",
           "cache_dir", "COMPILED_MIN_NUMEL"]


class CompiledBackend(Protocol):
    name: str
    block: int  # elements per entry of the block table its kernels take

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether kernels for ``dtype`` can run on ``device`` here."""

    def launch(self, kernel: Kernel, storage: Storage | torch.dtype, tables: PointerTables,
               buffers: Mapping[str, Sequence[Tensor]], coefficients: Sequence[float],
               runtimes: Mapping[str, Tensor]) -> Tensor | None:
        """Runs ``kernel`` over every tensor of ``tables`` (``buffers``: name -> one tensor
        per table entry) with its buffers held as ``storage`` says (a dtype: all in it);
        returns per-block partial sums of squares of ``kernel.reduce`` (None without one).
        With stochastic stores, ``tables.keys`` and ``tables.offsets`` hold the tensors'
        keys and first elements' offsets, and the last coefficient is the salt
        (:class:`~.program.Rounding`)."""


def _backends() -> dict[str, CompiledBackend]:
    return {"cpu": cpu_backend.BACKEND, "cuda": triton_backend.BACKEND}


_BACKENDS: dict[str, CompiledBackend] | None = None


def compiled_backend(device: torch.device) -> CompiledBackend | None:
    global _BACKENDS
    if _BACKENDS is None:
        _BACKENDS = _backends()
    return _BACKENDS.get(device.type)


# With fused=None, CPU batches from this many elements on take the compiled path (one call
# costs ~0.1 ms; the eager path is slower from ~2k elements on, measured on 2 cores); tiny
# models stay eager and never wait for a compiler.
COMPILED_MIN_NUMEL = 1 << 12


def select_backend(fused: bool | None, params: Sequence[Tensor]) -> CompiledBackend | None:
    """The one place that picks the path for a batch (one device and dtype): a compiled
    backend, or None for the eager path. ``fused=None``: compiled on CUDA, and on CPU for
    batches of at least :data:`COMPILED_MIN_NUMEL` elements, wherever the backend is
    available. ``fused=True`` on a device or dtype without one is an error."""
    if fused is False or not params:
        return None
    device, dtype = params[0].device, local_tensor(params[0]).dtype
    backend = compiled_backend(device)
    usable = backend is not None and backend.available(device, dtype)
    if fused is True:
        if not usable:
            raise RuntimeError(f"fused=True: no compiled backend for {dtype} parameters on {device.type} here "
                               "(CPU needs a C compiler, CUDA needs triton); use fused=None or fused=False")
        return backend
    if not usable:
        return None
    if device.type != "cpu":
        return backend
    total = 0
    for p in params:  # counted only as far as needed: this runs for every batch at every step
        total += p.numel()
        if total >= COMPILED_MIN_NUMEL:
            return backend
    return None


# Plain tensors: what a step meets per parameter, every step; the checks below are its
# hot path (a missing attribute costs an exception, a detach a new tensor object).
_PLAIN = (Tensor, torch.nn.Parameter)


def local_tensor(t: Tensor) -> Tensor:
    """The tensor a kernel updates: the local shard of a DTensor (FSDP2), as real numbers
    for a complex tensor, detached: a plain view of the same storage (a plain tensor that
    needs no detaching is returned as it is)."""
    if type(t) in _PLAIN and not t.requires_grad and not t.is_complex():
        return t  # a gradient or a state tensor: nothing to detach
    to_local = getattr(t, "to_local", None)
    t = (to_local() if to_local is not None else t).detach()
    return torch.view_as_real(t) if t.is_complex() else t


def reduction_key(t: Tensor) -> tuple | None:
    """What a sum over ``t``'s local elements must be summed over to cover the whole
    tensor: None for an ordinary tensor, (mesh, the mesh dimensions it is sharded on) for
    a DTensor (FSDP2)."""
    mesh = getattr(t, "device_mesh", None) if type(t) not in _PLAIN else None
    if mesh is None:
        return None
    return mesh, tuple(dim for dim, placement in enumerate(t.placements) if placement.is_shard())


def shard_offset(t: Tensor) -> int:
    """The offset in the whole tensor of the first element of ``t``'s local shard: for a
    DTensor sharded on dim 0 (FSDP2; torch.chunk's rows, per sharded mesh dimension in
    order), its first row times a row's elements; 0 for an ordinary tensor. With dim 0
    outermost in the shard's layout, that plus an element's offset in the shard's storage
    is its offset in the whole tensor's storage (in the same layout): the index stochastic
    rounding hashes (:mod:`.program`), so sharding does not change the bits. Other
    placements (a shard of columns, a strided shard) do not keep an element's index, and
    are refused."""
    mesh = getattr(t, "device_mesh", None)
    coordinate = mesh.get_coordinate() if mesh is not None else None
    if coordinate is None:  # not a DTensor, or this rank holds none of it
        return 0
    from torch.distributed.tensor import Shard  # only where DTensors are in use

    local = local_tensor(t)
    start, rows = 0, (t.shape[0] if t.dim() else 1)
    outermost = local.dim() == 0 or local.shape[0] <= 1 or local.stride(0) * local.shape[0] == local.numel()
    for dim, placement in enumerate(t.placements):
        if placement.is_replicate():
            continue
        if type(placement) is not Shard or placement.dim != 0 or not outermost:
            raise ValueError(f"stochastic rounding (bfloat16 state or scratch, param_rounding='stochastic') of a "
                             f"DTensor needs Shard(0) or Replicate placements and dim 0 outermost in the local "
                             f"shard's layout (FSDP2's default); got placements {tuple(t.placements)} with local "
                             f"shape {tuple(local.shape)} and strides {local.stride()}")
        chunk = -(-rows // mesh.size(dim))  # torch.chunk: the last chunks may be smaller, or empty
        first = min(chunk * coordinate[dim], rows)
        start, rows = start + first, min(chunk, rows - first)
    if t.dim() and rows != local.shape[0]:
        raise ValueError(f"stochastic rounding of a DTensor: its local shard has {local.shape[0]} rows where "
                         f"torch.chunk's sharding of {t.shape[0]} rows gives {rows} (placements {tuple(t.placements)})")
    return start * math.prod(local.shape[1:])


def all_reduce_sum(value: Tensor, key: tuple | None) -> Tensor:
    """``value``, a sum over local elements of tensors with :func:`reduction_key` ``key``,
    summed over the ranks that shard them."""
    if key is None or not key[1]:
        return value
    mesh, dims = key
    total = value.clone()
    for dim in dims:
        torch.distributed.all_reduce(total, group=mesh.get_group(dim))
    return total


# The sum of squares of every gradient and nothing else: a global gradient norm in one pass.
GRADIENT_SQUARES_KERNEL = lower(Event(gradient=1, writes={}, reduce=tensor("g")))


class Batch:
    """Parameters that share device, dtype and step, with their state and scratch buffers
    (``buffers``: name -> one tensor per parameter, ``"p"`` included) as the kernels see
    them, and the compiled path's pointer tables. Built once and reused by later steps
    while :meth:`matches` (the optimizer keeps it); ``values``, the step's named scalars,
    ``step``, the completed steps (salting stochastic rounding), and ``states``, the
    parameters' optimizer states, are set every step.
    ``stochastic``: the buffers whose stores round stochastically, with one key per
    parameter in ``keys`` (:func:`~.program.tensor_key`) and, in ``offsets``, the offset of
    each parameter's local shard in the whole tensor (:func:`shard_offset`). ``quantized``:
    the 8-bit buffers (buffer -> map), whose scales are in ``buffers`` too
    (:func:`~.program.quant_scales`)."""

    def __init__(self, params: list[Tensor], buffers: dict[str, list[Tensor]], backend: CompiledBackend | None,
                 stochastic: Sequence[str] = (), keys: Sequence[int] = (),
                 quantized: Mapping[str, str] | None = None) -> None:
        self.params, self.backend, self.values, self.step = params, backend, {}, 0
        self.states: list[dict] = []  # the parameters' optimizer states, set with ``step``
        self.rewrites: Mapping[Event, Event] = {}  # events the optimizer runs in another form on this batch
        self.stochastic, self.keys, self.quantized = tuple(stochastic), tuple(keys), dict(quantized or {})
        self.offsets = tuple(map(shard_offset, params)) if self.stochastic else ()
        self._storage: dict[Kernel, Storage] = {}
        self._given = buffers
        self._pointers = [p.data_ptr() for p in params]
        self.buffers = {name: [local_tensor(t) for t in ts] for name, ts in buffers.items()}
        scales = {quant_scales(name) for name in self.quantized}
        self.compiled = compiled_indices({k: v for k, v in self.buffers.items() if k not in scales}) \
            if backend is not None else []
        if self.compiled:
            local = self.buffers["p"]
            self.tables = PointerTables(local[0].device, [local[i].numel() for i in self.compiled])
            if self.stochastic:
                self.tables.keys = to_device(torch.tensor([self.keys[i] for i in self.compiled], dtype=torch.int64),
                                             local[0].device)
                self.tables.offsets = to_device(torch.tensor([self.offsets[i] for i in self.compiled],
                                                             dtype=torch.int64), local[0].device)

    def matches(self, buffers: dict[str, list[Tensor]], backend: CompiledBackend | None,
                stochastic: Sequence[str] = (), keys: Sequence[int] = (),
                quantized: Mapping[str, str] | None = None, scratch: Mapping[str, torch.dtype] | None = None
                ) -> bool:
        """Whether this batch still describes ``buffers``: the same tensors, and parameters
        whose storage was not replaced (``p.data = ...``, e.g. by ``module.to``). ``scratch``:
        the working buffers (name -> dtype) that the batch holds besides ``buffers``."""
        scratch = scratch or {}
        return (backend is self.backend and buffers.keys() | scratch.keys() == self._given.keys()
                and all(self._given[name][0].dtype == dtype for name, dtype in scratch.items())
                and self.stochastic == tuple(stochastic) and self.keys == tuple(keys)
                and self.quantized == dict(quantized or {})
                and all(all(map(operator.is_, ts, self._given[name])) for name, ts in buffers.items())
                and [p.data_ptr() for p in self.params] == self._pointers)

    def run(self, event: Event, grads: Sequence[Tensor | None], runtimes: Mapping[str, Tensor] | None = None
            ) -> list[Tensor]:
        """Runs ``event``; returns partial sums of squares of ``event.reduce`` whose total
        is the batch's (empty without one)."""
        kernel = lower(event)
        buffers = self.buffers
        if "g" in kernel.inputs:
            buffers = {**buffers, "g": [_laid_out_like(local_tensor(g), p) for g, p in zip(grads, buffers["p"])]}
        coefficients = kernel.coefficient_values(self.values)
        runtimes = runtimes or {}
        if len(self.compiled) == len(self.params):
            eager, compiled = {}, buffers
        else:
            chosen = set(self.compiled)
            eager = {k: [t for i, t in enumerate(v) if i not in chosen] for k, v in buffers.items()}
            compiled = {k: [v[i] for i in self.compiled] for k, v in buffers.items()}
        storage = self._storage.get(kernel)
        if storage is None:
            dtypes = {name: ts[0].dtype for name, ts in buffers.items()}
            storage = self._storage[kernel] = Storage.of(kernel, dtypes, self.stochastic, self.quantized)
        rounding = None
        if storage.stochastic:
            salt = rounding_salt(self.step, kernel.gradient)
            chosen = set(self.compiled)
            rounding = Rounding(tuple(k for i, k in enumerate(self.keys) if i not in chosen), salt,
                                tuple(o for i, o in enumerate(self.offsets) if i not in chosen))
            coefficients = [*coefficients, float(salt)]  # the compiled paths read the salt last
        sums = run_eager(kernel, eager, coefficients, runtimes, storage, rounding) if eager else []
        if self.compiled:
            partial = self.backend.launch(kernel, storage, self.tables, compiled, coefficients, runtimes)
            if partial is not None:
                sums.append(partial.sum(dtype=torch.float64))
        return sums

    def gradient_squares(self, grads: Sequence[Tensor]) -> tuple[list[int], Tensor]:
        """The sum of squares of each gradient (float64, on the device, over the local
        shard) and the indices of the parameters they belong to, in that order: one launch
        of a reduce-only kernel over the compiled path's tensors, one ``torch._foreach_norm``
        over the others."""
        grads = [_laid_out_like(local_tensor(g), p) for g, p in zip(grads, self.buffers["p"])]
        order, sums = [], []
        if self.compiled:
            partial = self.backend.launch(GRADIENT_SQUARES_KERNEL, self.buffers["p"][0].dtype, self.tables,
                                          {"g": [grads[i] for i in self.compiled]}, [], {})
            block_tensor, _ = self.tables.blocks(self.backend.block)
            per_tensor = torch.zeros(len(self.compiled), dtype=torch.float64, device=partial.device)
            order += self.compiled
            sums.append(per_tensor.index_add_(0, block_tensor, partial))
        if len(self.compiled) < len(grads):
            chosen = set(self.compiled)
            eager = [i for i in range(len(grads)) if i not in chosen]
            dtype = torch.promote_types(grads[eager[0]].dtype, torch.float32)  # low-precision norms in float32
            norms = torch._foreach_norm([grads[i] for i in eager], 2, dtype=dtype)
            order += eager
            sums.append(torch.stack(norms).double().square())
        return order, torch.cat(sums) if len(sums) > 1 else sums[0]


def _laid_out_like(g: Tensor, p: Tensor) -> Tensor:
    # a gradient set by hand may be laid out unlike its parameter: copy it, never misread it
    return g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


def compiled_indices(buffers: Mapping[str, Sequence[Tensor]]) -> list[int]:
    """The tensors a compiled backend can address: dense, with every state and scratch
    buffer laid out like the parameter (gradients are made so in :meth:`Batch.run`)."""
    params = buffers["p"]
    return [i for i, p in enumerate(params)
            if dense_layout(p) and all(b[i].stride() == p.stride() for b in buffers.values())]

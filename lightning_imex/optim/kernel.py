"""Runs lowered programs (:mod:`.program`) over a batch of tensors, on one of three paths
chosen in :func:`select_backend` alone:

- ``eager``: torch operations tensor by tensor (the reference);
- ``cpu``: one generated C function per (event, dtype), one call per event over every
  tensor (:mod:`.cpu_backend`);
- ``triton``: one generated Triton kernel per (event, dtype), one launch per event over
  every tensor (:mod:`.triton_backend`).

The compiled paths address the tensors through pointer tables: one row of data
pointers per buffer and a table of (tensor, offset) blocks, built once and refreshed
only when a pointer changes (e.g. gradients after ``zero_grad(set_to_none=True)``).
They run over each tensor's storage, so any dense layout (contiguous, channels_last,
transposed) works when the parameter, its gradient and its state share strides;
tensors that do not get the eager path, in the same step.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import torch
from torch import Tensor

from .program import Event, Kernel, lower, run_eager, tensor

__all__ = ["Batch", "PointerTables", "select_backend", "local_tensor", "reduction_key", "all_reduce_sum", "cache_dir", "kernel_buffers",
           "to_device", "COMPILED_MIN_NUMEL"]


class CompiledBackend(Protocol):
    name: str

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether kernels for ``dtype`` can run on ``device`` here."""

    def launch(self, kernel: Kernel, dtype: torch.dtype, tables: PointerTables,
               buffers: Mapping[str, Sequence[Tensor]], coefficients: Sequence[float],
               runtimes: Mapping[str, Tensor]) -> Tensor | None:
        """Runs ``kernel`` over every tensor of ``tables`` (``buffers``: name -> one tensor
        per table entry); returns per-block partial sums of squares of ``kernel.reduce``
        (None without one)."""


def _backends() -> dict[str, CompiledBackend]:
    from . import cpu_backend, triton_backend  # imported on first use: Triton is optional

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
    return backend if device.type != "cpu" or sum(p.numel() for p in params) >= COMPILED_MIN_NUMEL else None


def local_tensor(t: Tensor) -> Tensor:
    """The tensor a kernel updates: the local shard of a DTensor (FSDP2), as real numbers
    for a complex tensor, detached: a plain view of the same storage."""
    to_local = getattr(t, "to_local", None)
    t = (to_local() if to_local is not None else t).detach()
    return torch.view_as_real(t) if t.is_complex() else t


def reduction_key(t: Tensor) -> tuple | None:
    """What a sum over ``t``'s local elements must be summed over to cover the whole
    tensor: None for an ordinary tensor, (mesh, the mesh dimensions it is sharded on) for
    a DTensor (FSDP2)."""
    mesh = getattr(t, "device_mesh", None)
    if mesh is None:
        return None
    return mesh, tuple(dim for dim, placement in enumerate(t.placements) if placement.is_shard())


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


def dense_layout(t: Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive storage slots from its data
    pointer, in some dimension order (contiguous, channels_last, transposed, ...)."""
    if t.is_contiguous() or t.numel() <= 1:
        return True
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def kernel_buffers(kernel: Kernel) -> tuple[str, ...]:
    """Every buffer a kernel touches, read ones first: the order of its pointer rows."""
    return kernel.inputs + tuple(b for b in kernel.outputs if b not in kernel.inputs)


def cache_dir() -> Path:
    """Where generated kernels live: ``$LIGHTNING_IMEX_CACHE_DIR``, else the user's cache."""
    root = os.environ.get("LIGHTNING_IMEX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lightning_imex")
    return Path(root)


# What a backend runs once per dtype (and device) before it is used: a copy, to learn
# whether its toolchain works here.
PROBE_KERNEL = lower(Event(gradient=0, writes={"p": tensor("m")}))


class PointerTables:
    """One row of data pointers per buffer for a fixed list of tensors, their sizes, and
    block tables, on the tensors' device. Rows are rebuilt only when a pointer changed."""

    def __init__(self, device: torch.device, numels: Sequence[int]) -> None:
        self.device, self.count = device, len(numels)
        self.numels = torch.tensor(list(numels), dtype=torch.int64, device=device)
        self._numels = list(numels)
        self.total = sum(self._numels)
        self._rows: dict[str, tuple[list[int], Tensor]] = {}
        self._blocks: dict[int, tuple[Tensor, Tensor]] = {}

    def row(self, name: str, tensors: Sequence[Tensor]) -> Tensor:
        pointers = [t.data_ptr() for t in tensors]
        cached = self._rows.get(name)
        if cached is None or cached[0] != pointers:
            cached = pointers, to_device(torch.tensor(pointers, dtype=torch.int64), self.device)
            self._rows[name] = cached
        return cached[1]

    def blocks(self, size: int) -> tuple[Tensor, Tensor]:
        """(tensor index, first element) of every block of ``size`` elements."""
        if size not in self._blocks:
            index, start = [], []
            for t, n in enumerate(self._numels):
                offsets = range(0, n, size)
                index += [t] * len(offsets)
                start += offsets
            self._blocks[size] = (to_device(torch.tensor(index, dtype=torch.int32), self.device),
                                  to_device(torch.tensor(start, dtype=torch.int64), self.device))
        return self._blocks[size]


def to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)  # no sync with the device's queue


class Batch:
    """Parameters that share device, dtype and step, with their state and scratch buffers
    (``buffers``: name -> one tensor per parameter, ``"p"`` included) as the kernels see
    them, and the compiled path's pointer tables. Built once and reused by later steps
    while :meth:`matches` (the optimizer keeps it); ``values``, the step's named scalars,
    is set every step."""

    def __init__(self, params: list[Tensor], buffers: dict[str, list[Tensor]], backend: CompiledBackend | None) -> None:
        self.params, self.backend, self.values = params, backend, {}
        self._given = buffers
        self._pointers = [p.data_ptr() for p in params]
        self.buffers = {name: [local_tensor(t) for t in ts] for name, ts in buffers.items()}
        self.compiled = compiled_indices(self.buffers) if backend is not None else []
        if self.compiled:
            local = self.buffers["p"]
            self.tables = PointerTables(local[0].device, [local[i].numel() for i in self.compiled])

    def matches(self, buffers: dict[str, list[Tensor]], backend: CompiledBackend | None) -> bool:
        """Whether this batch still describes ``buffers``: the same tensors, and parameters
        whose storage was not replaced (``p.data = ...``, e.g. by ``module.to``)."""
        return (backend is self.backend and buffers.keys() == self._given.keys()
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
        sums = run_eager(kernel, eager, coefficients, runtimes) if eager else []
        if self.compiled:
            partial = self.backend.launch(kernel, self.buffers["p"][0].dtype, self.tables, compiled, coefficients, runtimes)
            if partial is not None:
                sums.append(partial.sum(dtype=torch.float64))
        return sums


def _laid_out_like(g: Tensor, p: Tensor) -> Tensor:
    # a gradient set by hand may be laid out unlike its parameter: copy it, never misread it
    return g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


def compiled_indices(buffers: Mapping[str, Sequence[Tensor]]) -> list[int]:
    """The tensors a compiled backend can address: dense, with every state and scratch
    buffer laid out like the parameter (gradients are made so in :meth:`Batch.run`)."""
    params = buffers["p"]
    return [i for i, p in enumerate(params)
            if dense_layout(p) and all(b[i].stride() == p.stride() for b in buffers.values())]

"""What every compiled backend shares, below the dispatcher (:mod:`.kernel`) that picks
one: pointer tables (one row of data pointers per buffer, a table of (tensor, offset)
blocks), the buffer order of a kernel, the kernel a backend probes its toolchain with.
The backends import this module, never :mod:`.kernel`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .program import Event, Kernel, lower, tensor

__all__ = ["PointerTables", "PROBE_KERNEL", "dense_layout", "kernel_buffers", "to_device"]


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
        # per tensor, for stochastic rounding: its key (int64 holding uint32), and the offset
        # in the whole tensor of its first element (a local shard's; 0 for a tensor held whole)
        self.keys: Tensor | None = None
        self.offsets: Tensor | None = None

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

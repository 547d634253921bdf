"""The CUDA backend: each lowered event (:class:`~.program.Kernel`) becomes one Triton
kernel, generated per (event, dtype), that updates every tensor of a batch in a single
launch through pointer tables (:class:`~.kernel.PointerTables`), as Triton's grouped-GEMM
tutorial does: program ``i`` takes block ``i`` of the block table (a tensor index and a
first element), loads that tensor's data pointer from each buffer's row, computes every
value in float32 (float64 for float64 tensors) and stores the written buffers last.

The kernel's Python source is generated from the same nodes that :func:`~.program.run_eager`
interprets, written to the cache directory (named by its hash) and imported from there,
because Triton reads a kernel's source with :func:`inspect.getsource`; Triton caches the
compiled binaries itself. Coefficients reach the kernel as a float64 device tensor and
runtime scalars by pointer, so a new learning rate never recompiles and nothing waits
for the device.

Full blocks of 16-byte-aligned tensors take a branch that loads and stores 16 bytes at a
time; tails and unaligned tensors take a masked element-wise branch. With
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors in Triton's interpreter (how
the tests check them). Triton is imported on first use: the package never needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import tempfile
import warnings
from types import ModuleType
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .kernel import PROBE_KERNEL, PointerTables, cache_dir, kernel_buffers, to_device
from .program import Kernel

__all__ = ["BACKEND", "TritonBackend", "triton_source"]

# Elements per program and warps per program: 8 elements per thread, two 16-byte
# accesses per buffer for float32; a block-table entry per 1024 elements is negligible.
BLOCK = 1024
NUM_WARPS = 4
# Bytes per vector access: the alignment a tensor's data pointer needs for the fast branch.
ALIGNMENT = 16

_ELEMENT_TYPES = {torch.float32: "tl.float32", torch.float64: "tl.float64",
                  torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}

_HEADER = """import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
"""


def triton_source(kernel: Kernel, dtype: torch.dtype) -> str:
    """The Python source of ``imex_kernel``, the Triton kernel for ``kernel`` on ``dtype``
    tensors. Its arguments: one row of data pointers per buffer (:func:`kernel_buffers`
    order), the tensors' sizes, the block table, the coefficients and the runtime
    scalars when the kernel reads any, and ``partial`` (one sum of squares of
    ``kernel.reduce`` per block, in float64 as on the eager path) when it has one."""
    element = _ELEMENT_TYPES[dtype]
    compute = "tl.float64" if dtype == torch.float64 else "tl.float32"
    buffers = kernel_buffers(kernel)
    arguments = [f"row{k}" for k in range(len(buffers))] + ["numels", "block_tensor", "block_start"]
    arguments += ["coefficients"] if kernel.coefficients else []
    arguments += [f"runtime{k}" for k in range(len(kernel.runtimes))]
    arguments += ["partial"] if kernel.reduce is not None else []
    lines = [f"def imex_kernel({', '.join(arguments)}, BLOCK: tl.constexpr):",
             "    block = tl.program_id(0)",
             "    t = tl.load(block_tensor + block)",
             "    start = tl.multiple_of(tl.load(block_start + block), BLOCK)",
             "    n = tl.load(numels + t)",
             "    offsets = start + tl.arange(0, BLOCK)"]
    lines += [f"    address{k} = tl.load(row{k} + t)  # {name!r}" for k, name in enumerate(buffers)]
    per_element = _per_element(kernel)
    lines += [f"    x{n} = {_expression(kernel, node, compute)}"
              for n, node in enumerate(kernel.nodes) if not per_element[n]]
    addresses = " | ".join(f"address{k}" for k in range(len(buffers)))
    lines.append(f"    if (start + BLOCK <= n) & (({addresses}) % {ALIGNMENT} == 0):")
    lines += _body(kernel, per_element, buffers, element, compute, masked=False)
    lines.append("    else:")
    lines += _body(kernel, per_element, buffers, element, compute, masked=True)
    return _HEADER + "\n".join(lines) + "\n"


def _per_element(kernel: Kernel) -> list[bool]:
    """Whether each node depends on a tensor (the others are the same for every element)."""
    flags: list[bool] = []
    for op, *args in kernel.nodes:
        flags.append(op == "tensor" or (op not in ("coef", "runtime") and any(flags[a] for a in args)))
    return flags


def _body(kernel: Kernel, per_element: list[bool], buffers: tuple[str, ...], element: str, compute: str,
          masked: bool) -> list[str]:
    """One branch: pointers, per-element values, the reduction, then every store."""
    indent = "        "
    mask = ", mask=mask" if masked else ""
    pointer = [f"address{k}.to(tl.pointer_type({element}))" for k in range(len(buffers))]
    if not masked:  # the branch's condition guarantees the alignment; the hint lets loads vectorize
        pointer = [f"tl.multiple_of({p}, {ALIGNMENT})" for p in pointer]
    lines = [f"{indent}mask = offsets < n"] if masked else []
    lines += [f"{indent}buffer{k} = {p}" for k, p in enumerate(pointer)]
    index = {name: k for k, name in enumerate(buffers)}
    for n, node in enumerate(kernel.nodes):
        if node[0] == "tensor":
            lines.append(f"{indent}x{n} = tl.load(buffer{index[node[1]]} + offsets{mask}).to({compute})")
        elif per_element[n]:
            lines.append(f"{indent}x{n} = {_expression(kernel, node, compute)}")
    if kernel.reduce is not None:
        if not per_element[kernel.reduce]:
            raise ValueError("a reduced value must depend on a tensor")
        lines.append(f"{indent}r = x{kernel.reduce}.to(tl.float64)")
        if masked:
            lines.append(f"{indent}r = tl.where(mask, r, 0.0)")
        lines.append(f"{indent}tl.store(partial + block, tl.sum(r * r, axis=0))")
    lines += [f"{indent}tl.store(buffer{index[name]} + offsets, x{n}.to({element}){mask})"
              for name, n in kernel.writes]
    return lines


def _expression(kernel: Kernel, node: tuple, compute: str) -> str:
    op, args = node[0], [f"x{a}" for a in node[1:]]
    float32 = compute == "tl.float32"  # its '/' and tl.sqrt are approximate on CUDA: ask for IEEE rounding
    if op == "coef":
        return f"tl.load(coefficients + {node[1]}).to({compute})"
    if op == "runtime":
        return f"tl.load(runtime{kernel.runtimes.index(node[1])}).to({compute})"
    if op in ("add", "sub", "mul"):
        return f"{args[0]} {'+-*'[('add', 'sub', 'mul').index(op)]} {args[1]}"
    if op == "div":
        return f"tl.div_rn({args[0]}, {args[1]})" if float32 else f"{args[0]} / {args[1]}"
    if op == "sqrt":
        return f"tl.sqrt_rn({args[0]})" if float32 else f"tl.sqrt({args[0]})"
    if op in ("max", "min"):  # NaN in either operand gives NaN, as torch.maximum
        return f"tl.{op}imum({args[0]}, {args[1]}, propagate_nan=tl.PropagateNan.ALL)"
    if op == "neg":
        return f"-{args[0]}"
    if op == "abs":
        return f"tl.abs({args[0]})"
    if op == "pow":  # libdevice: compiled kernels only, Triton's interpreter lacks it
        return f"libdevice.pow({args[0]}, {args[1]})"
    raise AssertionError(op)


def _import_kernel(source: str) -> Callable:
    """``imex_kernel`` from ``source``, through a file: Triton needs the source on disk."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    path = cache_dir() / "triton" / f"imex_{digest}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
            file.write(source)
        os.replace(file.name, path)  # atomic: a concurrent process sees the whole file or none
    spec = importlib.util.spec_from_file_location(f"lightning_imex_triton_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.imex_kernel


class TritonBackend:
    """Generates, compiles and launches Triton kernels (see the module docstring)."""

    name = "triton"

    def __init__(self) -> None:
        self._kernels: dict[tuple[Kernel, torch.dtype], Callable] = {}
        self._triton: ModuleType | None | bool = False  # False: not imported yet
        self._probed: dict[tuple[torch.device, torch.dtype], bool] = {}

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        """CUDA tensors of a supported dtype with Triton installed, on a device that ran
        this dtype's probe kernel; CPU tensors too under ``TRITON_INTERPRET=1`` (Triton's
        interpreter)."""
        if dtype not in _ELEMENT_TYPES:
            return False
        interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        if not (device.type == "cuda" or interpreted) or self._import_triton() is None:
            return False
        if (device, dtype) not in self._probed:
            self._probed[(device, dtype)] = self._probe(device, dtype)
        return self._probed[(device, dtype)]

    def _probe(self, device: torch.device, dtype: torch.dtype) -> bool:
        # a GPU Triton cannot compile for must fall back to the eager path, not fail a step
        try:
            source, target = torch.ones(1, dtype=dtype, device=device), torch.zeros(1, dtype=dtype, device=device)
            tables = PointerTables(device, [1])
            self.launch(PROBE_KERNEL, dtype, tables, {"m": [source], "p": [target]}, [], {})
            return bool(target.item() == 1)
        except Exception as error:  # any compiler or driver failure means: not here
            warnings.warn(f"Triton kernels do not run on {device} for {dtype} ({type(error).__name__}: {error}); "
                          "using the eager path", stacklevel=4)
            return False

    def _import_triton(self) -> ModuleType | None:
        if self._triton is False:
            try:
                import triton
            except ImportError:
                triton = None
            self._triton = triton
        return self._triton  # type: ignore[return-value]

    def launch(self, kernel: Kernel, dtype: torch.dtype, tables: PointerTables,
               buffers: Mapping[str, Sequence[Tensor]], coefficients: Sequence[float],
               runtimes: Mapping[str, Tensor]) -> Tensor | None:
        rows = [tables.row(name, buffers[name]) for name in kernel_buffers(kernel)]
        block_tensor, block_start = tables.blocks(BLOCK)
        arguments = [*rows, tables.numels, block_tensor, block_start]
        if kernel.coefficients:
            arguments.append(to_device(torch.tensor(list(coefficients), dtype=torch.float64), tables.device))
        arguments += [runtimes[name].to(tables.device, non_blocking=True) for name in kernel.runtimes]
        partial = None
        if kernel.reduce is not None:
            partial = torch.empty(len(block_tensor), dtype=torch.float64, device=tables.device)
            arguments.append(partial)
        # Triton launches on the current device, not the tensors'
        with torch.cuda.device(tables.device) if tables.device.type == "cuda" else contextlib.nullcontext():
            self._kernel(kernel, dtype)[(len(block_tensor),)](*arguments, BLOCK=BLOCK, num_warps=NUM_WARPS,
                                                              enable_fp_fusion=False)  # rounding as on the eager path
        return partial

    def _kernel(self, kernel: Kernel, dtype: torch.dtype) -> Callable:
        key = (kernel, dtype)
        if key not in self._kernels:
            self._kernels[key] = _import_kernel(triton_source(kernel, dtype))
        return self._kernels[key]


BACKEND = TritonBackend()

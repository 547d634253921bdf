"""The CPU backend: each lowered event (:class:`~.program.Kernel`) becomes one C function,
compiled once per (event, dtype) and cached on disk, that updates every tensor of a batch
in one call through pointer tables (:class:`~.kernel.PointerTables`), its blocks spread
over torch's intra-op threads with OpenMP.

Why generated C and not ``torch.compile``: one call per event whatever the number,
shapes, ranks or layouts of the tensors (no guards, no recompiles, no per-tensor
arguments), a first step that compiles in well under a second, and nothing that
dynamo must trace (FSDP2's DTensors included: kernels see the local shards).

It needs a C compiler (``cc``/``gcc``/``clang``, or ``$CC``), as ``torch.compile`` on CPU
does; without one, :meth:`CBackend.available` is false and the eager path runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .kernel import PROBE_KERNEL, cache_dir, kernel_buffers
from .program import Kernel

__all__ = ["BACKEND", "CBackend", "c_source"]

# Elements per block: large enough that a block's loop vectorizes and amortizes the table
# look-ups, small enough that a 100k-element tensor spreads over several threads.
BLOCK = 16384

_TYPES = {  # dtype -> (C storage type, C compute type, load expression, store expression)
    torch.float32: ("float", "float", "{p}[i]", "{v}"),
    torch.float64: ("double", "double", "{p}[i]", "{v}"),
    torch.bfloat16: ("uint16_t", "float", "bf16_load({p}[i])", "bf16_store({v})"),
    torch.float16: ("_Float16", "float", "(float){p}[i]", "(_Float16)({v})"),
}

_PRELUDE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
static inline float bf16_load(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t bf16_store(float f) {  /* round to nearest even, NaN stays NaN */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u); return (uint16_t)(u >> 16);
}
"""


def c_source(kernel: Kernel, dtype: torch.dtype) -> str:
    """The C function for ``kernel`` on ``dtype`` tensors:

    ``void imex_kernel(blocks_t, blocks_start, nblocks, numels, rows, count, coef, runtime, partial, threads)``

    ``rows[b * count + t]`` is the data pointer of buffer ``b`` (in ``kernel_buffers``
    order) of tensor ``t``; ``partial[block]`` receives the block's sum of squares of
    ``kernel.reduce`` when there is one."""
    storage, compute, load, store = _TYPES[dtype]
    fn = {"float": "f", "double": ""}[compute]
    buffers = kernel_buffers(kernel)
    lines = [_PRELUDE, "void imex_kernel(const int32_t* restrict blocks_t, const int64_t* restrict blocks_start, "
             "int64_t nblocks, const int64_t* restrict numels, const int64_t* restrict rows, int64_t count, "
             "const double* restrict coef, const double* restrict runtime, double* restrict partial, int threads) {",
             "  #pragma omp parallel for schedule(static) num_threads(threads)",
             "  for (int64_t b = 0; b < nblocks; ++b) {",
             "    const int64_t t = blocks_t[b], start = blocks_start[b];",
             f"    const int64_t end = start + {BLOCK} < numels[t] ? start + {BLOCK} : numels[t];"]
    for k, name in enumerate(buffers):
        const = "" if name in kernel.outputs else "const "
        lines.append(f"    {const}{storage}* restrict buf{k} = ({const}{storage}*)(intptr_t)rows[{k} * count + t];")
    body, hoisted = [], []
    index = {name: k for k, name in enumerate(buffers)}
    for n, node in enumerate(kernel.nodes):
        op, args = node[0], node[1:]
        if op == "coef":
            hoisted.append(f"    const {compute} x{n} = ({compute})coef[{args[0]}];")
        elif op == "runtime":
            hoisted.append(f"    const {compute} x{n} = ({compute})runtime[{kernel.runtimes.index(args[0])}];")
        elif op == "tensor":
            body.append(f"      const {compute} x{n} = {load.format(p=f'buf{index[args[0]]}')};")
        else:
            body.append(f"      const {compute} x{n} = {_c_expression(op, [f'x{a}' for a in args], fn)};")
    lines += hoisted
    # omp simd: the elements are independent and the buffers distinct, which the compiler
    # cannot prove past a few pointers (it would not vectorize); a vectorized sum without
    # relaxing the math elsewhere
    if kernel.reduce is not None:
        lines += ["    double sum = 0.0;", "    #pragma omp simd reduction(+:sum)"]
    else:
        lines.append("    #pragma omp simd")
    lines.append("    for (int64_t i = start; i < end; ++i) {")
    lines += body
    if kernel.reduce is not None:
        lines.append(f"      sum += (double)x{kernel.reduce} * (double)x{kernel.reduce};")
    for name, node in kernel.writes:
        lines.append(f"      buf{index[name]}[i] = {store.format(v=f'x{node}')};")
    lines.append("    }")
    if kernel.reduce is not None:
        lines.append("    partial[b] = sum;")
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def _c_expression(op: str, a: list[str], fn: str) -> str:
    if op in ("add", "sub", "mul", "div"):
        return f"{a[0]} {'+-*/'[('add', 'sub', 'mul', 'div').index(op)]} {a[1]}"
    if op == "max":  # NaN in either operand gives NaN, as torch.maximum
        return f"({a[0]} != {a[0]} || {a[0]} > {a[1]}) ? {a[0]} : {a[1]}"
    if op == "min":
        return f"({a[0]} != {a[0]} || {a[0]} < {a[1]}) ? {a[0]} : {a[1]}"
    if op == "neg":
        return f"-{a[0]}"
    if op == "abs":
        return f"fabs{fn}({a[0]})"
    if op == "sqrt":
        return f"sqrt{fn}({a[0]})"
    if op == "pow":
        return f"pow{fn}({a[0]}, {a[1]})"
    raise AssertionError(op)


def _openmp_flags() -> list[str]:
    # Link against the OpenMP runtime torch already loaded, so both share one thread pool.
    torch_lib = Path(torch.__file__).parent / "lib"
    bundled = sorted(torch_lib.glob("libgomp*.so*"))
    return ["-fopenmp"] + ([str(bundled[0]), f"-Wl,-rpath,{torch_lib}"] if bundled else [])


def _cpu_fingerprint() -> str:
    # -march=native binaries must not be reused by a different CPU sharing the cache
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


class CBackend:
    """Compiles and runs generated C kernels (see the module docstring)."""

    name = "cpu"

    def __init__(self) -> None:
        self._functions: dict[tuple[Kernel, torch.dtype], ctypes._CFuncPtr] = {}
        self._compiler: str | None | bool = False  # False: not looked for yet
        self._failed: set[torch.dtype] = set()
        self._probed: set[torch.dtype] = set()
        self._lock = threading.Lock()

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        """A CPU tensor of a supported dtype, and a compiler that built this dtype's probe."""
        if device.type != "cpu" or dtype not in _TYPES or self.compiler() is None:
            return False
        if dtype not in self._probed:
            try:
                self._function(PROBE_KERNEL, dtype)
            except RuntimeError as error:
                warnings.warn(f"no compiled CPU kernels for {dtype}, using the eager path: {error}", stacklevel=3)
                self._failed.add(dtype)
            self._probed.add(dtype)
        return dtype not in self._failed

    def compiler(self) -> str | None:
        if self._compiler is False:
            candidates = [os.environ.get("CC"), "cc", "gcc", "clang"]
            self._compiler = next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)
        return self._compiler  # type: ignore[return-value]

    def launch(self, kernel: Kernel, dtype: torch.dtype, tables, buffers: Mapping[str, Sequence[Tensor]],
               coefficients: Sequence[float], runtimes: Mapping[str, Tensor]) -> Tensor | None:
        function = self._function(kernel, dtype)
        names = kernel_buffers(kernel)
        rows = torch.stack([tables.row(name, buffers[name]) for name in names])
        block_t, block_start = tables.blocks(BLOCK)
        coef = torch.tensor(list(coefficients), dtype=torch.float64)
        runtime = torch.tensor([float(runtimes[r]) for r in kernel.runtimes], dtype=torch.float64)
        partial = torch.empty(len(block_t), dtype=torch.float64) if kernel.reduce is not None else None
        threads = 1 if tables.total < BLOCK * 4 else torch.get_num_threads()
        function(block_t.data_ptr(), block_start.data_ptr(), len(block_t), tables.numels.data_ptr(), rows.data_ptr(),
                 tables.count, coef.data_ptr(), runtime.data_ptr(), partial.data_ptr() if partial is not None else 0,
                 threads)
        return partial

    def _function(self, kernel: Kernel, dtype: torch.dtype):
        key = (kernel, dtype)
        function = self._functions.get(key)
        if function is None:
            with self._lock:
                function = self._functions.get(key) or self._load(kernel, dtype)
                self._functions[key] = function
        return function

    def _load(self, kernel: Kernel, dtype: torch.dtype):
        source = c_source(kernel, dtype)
        flags = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", *_openmp_flags()]
        digest = hashlib.sha256("\n".join([source, *flags, self.compiler() or "", _cpu_fingerprint()]).encode())
        path = cache_dir() / "cpu" / f"imex_{digest.hexdigest()[:24]}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._compile(source, flags, path)
        library = ctypes.CDLL(str(path))
        function = library.imex_kernel
        function.restype = None
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        return function

    def _compile(self, source: str, flags: list[str], path: Path) -> None:
        with tempfile.TemporaryDirectory(dir=path.parent) as work:
            src, out = Path(work) / "kernel.c", Path(work) / path.name
            src.write_text(source)
            command = [self.compiler(), *flags[:1], str(src), "-o", str(out), *flags[1:]]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0 and "-march=native" in command:  # compilers that lack it
                command.remove("-march=native")
                result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"compiling a CPU kernel failed ({' '.join(command)}):\n"
                                   f"{result.stderr.strip()[-2000:]}")
            os.replace(out, path)  # atomic: a concurrent process sees the whole file or none


BACKEND = CBackend()

"""The CPU backend: each lowered event (:class:`~.program.Kernel`) becomes one C function,
compiled once per (event, dtype) and cached on disk, that updates every tensor of a batch
in one call through pointer tables (:class:`~.toolkit.PointerTables`), its blocks spread
over torch's intra-op threads with OpenMP.

Why generated C and not ``torch.compile``: one call per event whatever the number,
shapes, ranks or layouts of the tensors (no guards, no recompiles, no per-tensor
arguments), a first step that compiles in well under a second, and nothing that
dynamo must trace (FSDP2's DTensors included: kernels see the local shards).

It needs a C compiler (``cc``/``gcc``/``clang``, or ``$CC``), as ``torch.compile`` on CPU
does; without one, :meth:`CBackend.available` is false and the eager path runs. Libraries
are built in this process's private directory and kept in the kernel cache under the
rules of :mod:`.cache` (owner, modes, a verified digest), and loaded from a private copy
of the verified bytes.
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

from . import cache
from .toolkit import PROBE_KERNEL, kernel_buffers
from .program import MIX32_MULTIPLIERS, QUANT_BLOCK, QUANT_MAPS, Kernel, Storage, quant_scales, stochastic_slots

__all__ = ["BACKEND", "CBackend", "c_source"]

# Elements per block: large enough that a block's loop vectorizes and amortizes the table
# look-ups, small enough that a 100k-element tensor spreads over several threads.
BLOCK = 16384

_TYPES = {  # dtype -> (C storage type, load expression, store expression)
    torch.float32: ("float", "{p}[i]", "{v}"),
    torch.float64: ("double", "{p}[i]", "{v}"),
    torch.bfloat16: ("uint16_t", "bf16_load({p}[i])", "bf16_store({v})"),
    torch.float16: ("_Float16", "(float){p}[i]", "(_Float16)({v})"),
}
# An 8-bit buffer (program.quantize): codes, read through dequant_{map} with the block's scale.
_QUANTIZED_TYPE = ("uint8_t", None, None)
# A stochastic store (float32 to bfloat16; program.py's comment on stochastic rounding
# says which bits): stream{q} is hoisted per block, hash{q} computed per element.
_STOCHASTIC_STORE = "bf16_store_stochastic({v}, hash{q} >> {shift})"

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
static inline uint32_t mix32(uint32_t x) {  /* program.mix32 */
    x ^= x >> 16; x *= %(m0)#xu; x ^= x >> 15; x *= %(m1)#xu; return x ^ (x >> 16);
}
static inline uint16_t bf16_store_stochastic(float f, uint32_t bits) {  /* program.round_stochastically */
    uint32_t u; memcpy(&u, &f, 4);
    const uint32_t magnitude = u & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    if (magnitude == 0x7f800000u) return (uint16_t)(u >> 16);
    return (uint16_t)((u + (bits & 0xffffu)) >> 16);
}
/* program.quantize and program.dequantize, element by element */
static inline float dequant_signed(uint8_t c, float scale) {
    const float k = (float)(c & 127), x = (k * k) / %(s2)sf; return ((c & 128) ? -x : x) * scale;
}
static inline float dequant_unsigned(uint8_t c, float scale) {
    const float k = (float)c, x = (k * k) / %(u2)sf; return (x * x) * scale;
}
static inline uint8_t quant_signed(float v, float divisor) {
    const float x = v / divisor, r = sqrtf(fabsf(x)) * %(s1)sf;
    const uint8_t k = r >= 0.0f ? (uint8_t)floorf(r + 0.5f) : 0;
    return x < 0.0f ? (uint8_t)(k | 128) : k;
}
static inline uint8_t quant_unsigned(float v, float divisor) {
    const float x = v / divisor, r = sqrtf(sqrtf(x > 0.0f ? x : 0.0f)) * %(u1)sf;
    return r >= 0.0f ? (uint8_t)floorf(r + 0.5f) : 0;
}
""" % dict(m0=MIX32_MULTIPLIERS[0], m1=MIX32_MULTIPLIERS[1], s1=QUANT_MAPS["signed"][0], s2=QUANT_MAPS["signed"][1],
           u1=QUANT_MAPS["unsigned"][0], u2=QUANT_MAPS["unsigned"][1])


def c_source(kernel: Kernel, storage: Storage | torch.dtype) -> str:
    """The C function for ``kernel`` with its buffers held as ``storage`` says (a dtype:
    all in it):

    ``void imex_kernel(blocks_t, blocks_start, nblocks, numels, rows, count, coef, runtime, partial, threads)``

    ``rows[b * count + t]`` is the data pointer of buffer ``b`` (in ``kernel_buffers``
    order) of tensor ``t``, and with stochastic stores row ``len(buffers)`` holds the
    tensors' keys and ``coef`` ends with the salt; the scales of 8-bit buffers follow, in
    ``storage.quantized`` order. ``partial[block]`` receives the block's sum of squares
    of ``kernel.reduce`` when there is one. An 8-bit buffer's new values wait in a
    block-sized array until the block's are all known: then each QUANT_BLOCK's scale is
    found and its codes stored."""
    if not isinstance(storage, Storage):
        storage = Storage.of(kernel, storage)
    compute = "double" if storage.compute == torch.float64 else "float"
    fn = {"float": "f", "double": ""}[compute]
    buffers = kernel_buffers(kernel)
    quantized = dict(storage.quantized)
    types = {name: _TYPES[storage.dtype(name)] if name not in quantized else _QUANTIZED_TYPE for name in buffers}
    index = {name: k for k, name in enumerate(buffers)}
    slots = stochastic_slots(kernel, storage)
    pairs = sorted({q for q, _ in slots.values()})
    lines = [_PRELUDE, "void imex_kernel(const int32_t* restrict blocks_t, const int64_t* restrict blocks_start, "
             "int64_t nblocks, const int64_t* restrict numels, const int64_t* restrict rows, int64_t count, "
             "const double* restrict coef, const double* restrict runtime, double* restrict partial, int threads) {",
             "  #pragma omp parallel for schedule(static) num_threads(threads)",
             "  for (int64_t b = 0; b < nblocks; ++b) {",
             "    const int64_t t = blocks_t[b], start = blocks_start[b];",
             f"    const int64_t end = start + {BLOCK} < numels[t] ? start + {BLOCK} : numels[t];"]
    for k, name in enumerate(buffers):
        const, ctype = "" if name in kernel.outputs else "const ", types[name][0]
        lines.append(f"    {const}{ctype}* restrict buf{k} = ({const}{ctype}*)(intptr_t)rows[{k} * count + t];")
    if storage.stochastic:
        lines.append(f"    const uint32_t base = mix32((uint32_t)rows[{len(buffers)} * count + t] ^ "
                     f"(uint32_t)coef[{len(kernel.coefficients)}]);")
        lines.append("    const uint32_t first = (uint32_t)start;  /* the element index of o = 0 */")
        lines += [f"    const uint32_t stream{q} = mix32(base + {q + 1}u);" for q in pairs]
    first_scale_row = len(buffers) + (1 if storage.stochastic else 0)
    for j, (name, _) in enumerate(storage.quantized):
        const = "" if name in kernel.outputs else "const "
        lines.append(f"    {const}float* restrict scale{index[name]} = ({const}float*)(intptr_t)"
                     f"rows[{first_scale_row + j} * count + t];")
        if name in kernel.outputs:
            lines.append(f"    float values{index[name]}[{BLOCK}];  /* the block's new values, to quantize */")
    body, hoisted = [], []
    for n, node in enumerate(kernel.nodes):
        op, args = node[0], node[1:]
        if op == "coef":
            hoisted.append(f"    const {compute} x{n} = ({compute})coef[{args[0]}];")
        elif op == "runtime":
            hoisted.append(f"    const {compute} x{n} = ({compute})runtime[{kernel.runtimes.index(args[0])}];")
        elif op == "tensor" and args[0] in quantized:
            k = index[args[0]]
            body.append(f"      const {compute} x{n} = dequant_{quantized[args[0]]}(buf{k}[i], "
                        f"scale{k}[i / {QUANT_BLOCK}]);")
        elif op == "tensor":
            body.append(f"      const {compute} x{n} = {types[args[0]][1].format(p=f'buf{index[args[0]]}')};")
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
    # a 32-bit counter: the element index the stochastic stores hash vectorizes in 32-bit lanes
    lines += ["    for (int32_t o = 0; o < (int32_t)(end - start); ++o) {", "      const int64_t i = start + o;"]
    lines += body
    if kernel.reduce is not None:
        lines.append(f"      sum += (double)x{kernel.reduce} * (double)x{kernel.reduce};")
    lines += [f"      const uint32_t hash{q} = mix32((first + (uint32_t)o) ^ stream{q});" for q in pairs]
    for name, node in kernel.writes:
        if name in quantized:
            lines.append(f"      values{index[name]}[o] = (float)x{node};")
            continue
        if name in slots:
            store = _STOCHASTIC_STORE.format(v=f"x{node}", q=slots[name][0], shift=16 * slots[name][1])
        else:
            store = types[name][2].format(v=f"x{node}")
        lines.append(f"      buf{index[name]}[i] = {store};")
    lines.append("    }")
    for name, kind in storage.quantized:
        if name in kernel.outputs:  # each QUANT_BLOCK's scale (NaN ignored), then its codes
            k = index[name]
            lines += [f"    for (int64_t s = start; s < end; s += {QUANT_BLOCK}) {{",
                      f"      const int64_t stop = s + {QUANT_BLOCK} < end ? s + {QUANT_BLOCK} : end;",
                      "      float absmax = 0.0f;",
                      "      #pragma omp simd reduction(max:absmax)",
                      f"      for (int64_t i = s; i < stop; ++i) {{ const float a = fabsf(values{k}[i - start]); "
                      "absmax = a > absmax ? a : absmax; }",
                      f"      scale{k}[s / {QUANT_BLOCK}] = absmax;",
                      "      const float divisor = absmax > 0.0f ? absmax : 1.0f;",
                      "      #pragma omp simd",
                      f"      for (int64_t i = s; i < stop; ++i) "
                      f"buf{k}[i] = quant_{kind}(values{k}[i - start], divisor);",
                      "    }"]
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
    if op == "bf16":  # through float32, as the eager path
        return f"bf16_load(bf16_store((float)({a[0]})))"
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
    block = BLOCK

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
            except (RuntimeError, OSError) as error:  # no working compiler, or nowhere to build or load
                warnings.warn(f"no compiled CPU kernels for {dtype}, using the eager path: {error}", stacklevel=3)
                self._failed.add(dtype)
            self._probed.add(dtype)
        return dtype not in self._failed

    def compiler(self) -> str | None:
        if self._compiler is False:
            candidates = [os.environ.get("CC"), "cc", "gcc", "clang"]
            self._compiler = next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)
        return self._compiler  # type: ignore[return-value]

    def launch(self, kernel: Kernel, storage: Storage | torch.dtype, tables, buffers: Mapping[str, Sequence[Tensor]],
               coefficients: Sequence[float], runtimes: Mapping[str, Tensor]) -> Tensor | None:
        function = self._function(kernel, storage)
        names = kernel_buffers(kernel)
        rows = [tables.row(name, buffers[name]) for name in names]
        if isinstance(storage, Storage):
            rows += [tables.keys] if storage.stochastic else []
            rows += [tables.row(quant_scales(name), buffers[quant_scales(name)]) for name, _ in storage.quantized]
        rows = torch.stack(rows)
        block_t, block_start = tables.blocks(BLOCK)
        coef = torch.tensor(list(coefficients), dtype=torch.float64)
        # read by the C function from host memory, without a read-back of the values here
        runtime = torch.stack([runtimes[r].reshape(()).to(torch.float64) for r in kernel.runtimes]) \
            if kernel.runtimes else torch.empty(0, dtype=torch.float64)
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
        binary = cache.cached("cpu", f"imex_{digest.hexdigest()[:24]}.so", lambda: self._compile(source, flags))
        library = ctypes.CDLL(str(cache.private_copy(binary, ".so")))
        function = library.imex_kernel
        function.restype = None
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        return function

    def _compile(self, source: str, flags: list[str]) -> bytes:
        """The shared library built from ``source``. Built under relative names in a fresh
        private directory, so that two processes building it make the same bytes."""
        with tempfile.TemporaryDirectory(dir=cache.private_dir()) as work:
            (Path(work) / "kernel.c").write_text(source)
            command = [self.compiler(), *flags[:1], "kernel.c", "-o", "kernel.so", *flags[1:]]
            result = subprocess.run(command, capture_output=True, text=True, cwd=work)
            if result.returncode != 0 and "-march=native" in command:  # compilers that lack it
                command.remove("-march=native")
                result = subprocess.run(command, capture_output=True, text=True, cwd=work)
            if result.returncode != 0:
                raise RuntimeError(f"compiling a CPU kernel failed ({' '.join(command)}):\n"
                                   f"{result.stderr.strip()[-2000:]}")
            return (Path(work) / "kernel.so").read_bytes()


BACKEND = CBackend()

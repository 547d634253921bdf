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
from .program import (MIX32_MULTIPLIERS, QUANT_BLOCK, QUANT_MAPS, Kernel, Storage, dequantize, quant_map_bias,
                      quant_scales, stochastic_slots)

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

def _dequant_tables() -> str:
    """Each map's 256 code values at scale 1, from program.dequantize itself (a look-up
    costs less than the division it holds, and gives the same bits)."""
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    lines = []
    for kind in QUANT_MAPS:
        values = dequantize(codes, torch.ones(1), torch.zeros(256, dtype=torch.int64), kind).tolist()
        lines.append(f"static const float dequant_{kind}_values[256] = {{{', '.join(f'{v.hex()}f' for v in values)}}};")
    return "\n".join(lines)


_PRELUDE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
%(tables)s
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
    /* as selects, not branches: fewer vector instructions (infinities and NaN add no bits) */
    uint32_t u; memcpy(&u, &f, 4);
    const uint32_t special = (u & 0x7f800000u) == 0x7f800000u, nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t r = (u + (special ? 0u : bits & 0xffffu)) >> 16;
    return (uint16_t)(nan ? r | 0x40u : r);
}
/* program.quantize and program.dequantize, element by element; a code's value (before
   its block's scale) is looked up in a table the generator fills from program.dequantize */
static inline float dequant_signed(uint8_t c, float scale) { return dequant_signed_values[c] * scale; }
static inline float dequant_unsigned(uint8_t c, float scale) { return dequant_unsigned_values[c] * scale; }
/* x = v times the reciprocal of the block's scale (program.quantize: both correctly
   rounded float32 operations, on every path); a code's magnitude comes from the bits of
   |x| (|x| <= 1 up to an ulp: no overflow; NaN gives 0). */
static inline uint32_t float_code(float a, int32_t bias) {
    int32_t u; memcpy(&u, &a, 4);
    const int32_t k = ((u + (1 << 19)) >> 20) - bias;
    return a == a && k > 0 ? (uint32_t)k : 0u;
}
static inline uint8_t quant_signed(float v, float reciprocal) {
    const float x = v * reciprocal;
    const uint32_t k = float_code(fabsf(x), %(signed_bias)d);
    return (uint8_t)(x < 0.0f ? k | 128u : k);
}
static inline uint8_t quant_unsigned(float v, float reciprocal) {
    const float x = v * reciprocal;
    return (uint8_t)float_code(x > 0.0f ? x : 0.0f, %(unsigned_bias)d);
}
""" % dict(m0=MIX32_MULTIPLIERS[0], m1=MIX32_MULTIPLIERS[1], signed_bias=quant_map_bias("signed"),
           unsigned_bias=quant_map_bias("unsigned"), tables=_dequant_tables())


def c_source(kernel: Kernel, storage: Storage | torch.dtype) -> str:
    """The C function for ``kernel`` with its buffers held as ``storage`` says (a dtype:
    all in it):

    ``void imex_kernel(blocks_t, blocks_start, nblocks, numels, rows, count, coef, runtime, partial, threads)``

    ``rows[b * count + t]`` is the data pointer of buffer ``b`` (in ``kernel_buffers``
    order) of tensor ``t``, and with stochastic stores rows ``len(buffers)`` and
    ``len(buffers) + 1`` hold the tensors' keys and their first elements' offsets in the
    whole tensors (``tables.keys``, ``tables.offsets``) and ``coef`` ends with the salt;
    the scales of 8-bit buffers follow, in ``storage.quantized`` order. ``partial[block]``
    receives the block's sum of squares of ``kernel.reduce`` when there is one. With 8-bit
    buffers a block is walked one QUANT_BLOCK at a time (blocks start at multiples of it):
    its scales are read once, its new values wait in a QUANT_BLOCK-sized array (in L1),
    their largest magnitude found as they are computed, then its scale and codes are stored."""
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
    step = QUANT_BLOCK if quantized else BLOCK  # elements per pass of the inner loop
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
        lines += [f"    const uint32_t stream{q} = mix32(base + {q + 1}u);" for q in pairs]
        lines.append(f"    const uint32_t shard_first = (uint32_t)rows[{len(buffers) + 1} * count + t];")
    first_scale_row = len(buffers) + (2 if storage.stochastic else 0)
    for j, (name, _) in enumerate(storage.quantized):
        const = "" if name in kernel.outputs else "const "
        lines.append(f"    {const}float* restrict scale{index[name]} = ({const}float*)(intptr_t)"
                     f"rows[{first_scale_row + j} * count + t];")
    body, hoisted = [], []
    for n, node in enumerate(kernel.nodes):
        op, args = node[0], node[1:]
        if op == "coef":
            hoisted.append(f"    const {compute} x{n} = ({compute})coef[{args[0]}];")
        elif op == "runtime":
            hoisted.append(f"    const {compute} x{n} = ({compute})runtime[{kernel.runtimes.index(args[0])}];")
        elif op == "tensor" and args[0] in quantized:
            k = index[args[0]]
            body.append(f"        const {compute} x{n} = dequant_{quantized[args[0]]}(buf{k}[i], block_scale{k});")
        elif op == "tensor":
            body.append(f"        const {compute} x{n} = {types[args[0]][1].format(p=f'buf{index[args[0]]}')};")
        else:
            body.append(f"        const {compute} x{n} = {_c_expression(op, [f'x{a}' for a in args], fn)};")
    lines += hoisted
    if kernel.reduce is not None:
        lines.append("    double sum = 0.0;")
    lines += [f"    for (int64_t s = start; s < end; s += {step}) {{",
              f"      const int32_t n = (int32_t)((s + {step} < end ? s + {step} : end) - s);"]
    for name, _ in storage.quantized:  # read before the pass stores this QUANT_BLOCK's new scale
        if name in kernel.inputs:
            lines.append(f"      const float block_scale{index[name]} = scale{index[name]}[s / {QUANT_BLOCK}];")
        if name in kernel.outputs:
            lines.append(f"      float values{index[name]}[{QUANT_BLOCK}];  /* the new values, to quantize */")
    if storage.stochastic:  # the hash counts elements in 32-bit lanes: it vectorizes as they do
        lines.append("      const uint32_t first = shard_first + (uint32_t)s;  /* the element index of o = 0 */")
    # omp simd: the elements are independent and the buffers distinct, which the compiler
    # cannot prove past a few pointers (it would not vectorize); a vectorized sum without
    # relaxing the math elsewhere. An 8-bit output's block scale (its largest magnitude,
    # NaN ignored) is found in the same pass: max is exact in any order.
    absmaxes = [f"absmax{index[name]}" for name, _ in storage.quantized if name in kernel.outputs]
    if absmaxes:
        lines.append(f"      float {', '.join(f'{a} = 0.0f' for a in absmaxes)};")
    first = "0"
    if kernel.reduce is not None and not kernel.writes and not storage.quantized:
        # A sum and nothing else (a gradient norm): one stream of reads per thread leaves
        # memory idle between misses, four (the block's quarters, side by side) keep it busy.
        square = f"(double)x{kernel.reduce} * (double)x{kernel.reduce}"
        lines += ["      const int32_t quarter = n / 4;", "      #pragma omp simd reduction(+:sum)",
                  "      for (int32_t o = 0; o < quarter; ++o) {", "        double part0, part1, part2, part3;"]
        for j in range(4):
            lines += [f"        {{ const int64_t i = s + {j} * quarter + o;", *body, f"        part{j} = {square}; }}"]
        lines += ["        sum += (part0 + part1) + (part2 + part3);", "      }"]
        first = "4 * quarter"  # the rest, one element at a time
    lines.append("      #pragma omp simd" + (" reduction(+:sum)" if kernel.reduce is not None else "")
                 + (f" reduction(max:{', '.join(absmaxes)})" if absmaxes else ""))
    lines += [f"      for (int32_t o = {first}; o < n; ++o) {{", "        const int64_t i = s + o;"]
    lines += body
    if kernel.reduce is not None:
        lines.append(f"        sum += (double)x{kernel.reduce} * (double)x{kernel.reduce};")
    lines += [f"        const uint32_t hash{q} = mix32((first + (uint32_t)o) ^ stream{q});" for q in pairs]
    for name, node in kernel.writes:
        if name in quantized:
            k = index[name]
            lines += [f"        values{k}[o] = (float)x{node};",
                      f"        {{ const float a = fabsf(values{k}[o]); absmax{k} = a > absmax{k} ? a : absmax{k}; }}"]
            continue
        if name in slots:
            store = _STOCHASTIC_STORE.format(v=f"x{node}", q=slots[name][0], shift=16 * slots[name][1])
        else:
            store = types[name][2].format(v=f"x{node}")
        lines.append(f"        buf{index[name]}[i] = {store};")
    lines.append("      }")
    for name, kind in storage.quantized:
        if name in kernel.outputs:  # the scale (NaN ignored), then the codes
            k = index[name]
            lines += ["      {",
                      f"        scale{k}[s / {QUANT_BLOCK}] = absmax{k};",
                      f"        const float reciprocal = 1.0f / (absmax{k} > 0.0f ? absmax{k} : 1.0f);",
                      "        #pragma omp simd",
                      f"        for (int32_t o = 0; o < n; ++o) buf{k}[s + o] = quant_{kind}(values{k}[o], reciprocal);",
                      "      }"]
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


# This CPU's instructions (the cache key holds its fingerprint); where it has AVX-512, full
# 512-bit vectors: the kernels with bfloat16 or 8-bit state do enough integer and
# conversion work per element to gain from them, and element-wise IEEE results do not
# depend on the width. Compilers that lack a flag build without these.
_TUNING = ["-march=native"] + (["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])


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
            rows += [tables.keys, tables.offsets] if storage.stochastic else []
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
        flags = ["-O3", *_TUNING, "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", *_openmp_flags()]
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
            if result.returncode != 0 and any(flag in command for flag in _TUNING):  # compilers that lack them
                command = [part for part in command if part not in _TUNING]
                result = subprocess.run(command, capture_output=True, text=True, cwd=work)
            if result.returncode != 0:
                raise RuntimeError(f"compiling a CPU kernel failed ({' '.join(command)}):\n"
                                   f"{result.stderr.strip()[-2000:]}")
            return (Path(work) / "kernel.so").read_bytes()


BACKEND = CBackend()

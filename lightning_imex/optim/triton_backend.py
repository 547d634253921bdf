"""The CUDA backend: each lowered event (:class:`~.program.Kernel`) becomes one Triton
kernel, generated per (event, dtype), that updates every tensor of a batch in a single
launch through pointer tables (:class:`~.toolkit.PointerTables`), as Triton's grouped-GEMM
tutorial does: program ``i`` takes block ``i`` of the block table (a tensor index and a
first element), loads that tensor's data pointer from each buffer's row, computes every
value in float32 (float64 for float64 tensors) and stores the written buffers last.

The kernel's Python source is generated from the same nodes that :func:`~.program.run_eager`
interprets, kept in the kernel cache (named by its hash, under the rules of :mod:`.cache`)
and imported from a file, a private copy of the verified source, because Triton reads a
kernel's source with :func:`inspect.getsource`; Triton caches the compiled binaries
itself. Coefficients reach the kernel as a float64 device tensor and
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
import warnings
from types import ModuleType
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from . import cache
from .toolkit import PROBE_KERNEL, PointerTables, kernel_buffers, to_device
from .program import MIX32_MULTIPLIERS, QUANT_BLOCK, Kernel, Storage, quant_map_bias, quant_scales, stochastic_slots

__all__ = ["BACKEND", "TritonBackend", "triton_source"]

# Elements per program and warps per program: 8 elements per thread, two 16-byte
# accesses per buffer for float32; a block-table entry per 1024 elements is negligible.
BLOCK = 1024
NUM_WARPS = 4
# Bytes per vector access: the alignment a tensor's data pointer needs for the fast branch.
ALIGNMENT = 16

_ELEMENT_TYPES = {torch.float32: "tl.float32", torch.float64: "tl.float64",
                  torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}

# Float32 to bfloat16, to nearest (ties to even), NaN kept quiet: in integer operations, as
# the C backend's bf16_store, because Triton's interpreter truncates in its own conversion.
# Then program.quantize and program.dequantize, element by element.
_HEADER = """import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def bf16_nearest(x):
    u = x.to(tl.uint32, bitcast=True)
    rounded = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def float_value(k, bias):
    return tl.where(k > 0, ((k + bias) << 20).to(tl.float32, bitcast=True), 0.0)


@triton.jit
def float_code(a, bias):
    k = ((a.to(tl.int32, bitcast=True) + (1 << 19)) >> 20) - bias
    return tl.where((a == a) & (k > 0), k, 0).to(tl.uint8)


@triton.jit
def dequant_signed(c, scale):
    x = float_value((c & 127).to(tl.int32), %(signed_bias)d)
    return tl.where(c >= 128, -x, x) * scale


@triton.jit
def dequant_unsigned(c, scale):
    return float_value(c.to(tl.int32), %(unsigned_bias)d) * scale


@triton.jit
def quant_signed(v, reciprocal):
    x = v * reciprocal
    k = float_code(tl.abs(x), %(signed_bias)d)
    return tl.where(x < 0, k | 128, k).to(tl.uint8)


@triton.jit
def quant_unsigned(v, reciprocal):
    x = v * reciprocal
    return float_code(tl.where(x > 0, x, 0.0), %(unsigned_bias)d)


@triton.jit
""" % dict(signed_bias=quant_map_bias("signed"), unsigned_bias=quant_map_bias("unsigned"))


def triton_source(kernel: Kernel, storage: Storage | torch.dtype) -> str:
    """The Python source of ``imex_kernel``, the Triton kernel for ``kernel`` with its
    buffers held as ``storage`` says (a dtype: all in it). Its arguments: one row of data
    pointers per buffer (:func:`kernel_buffers` order), the tensors' sizes, the block
    table, with stochastic stores the tensors' keys and their first elements' offsets in
    the whole tensors, the coefficients (then the salt, with stochastic stores) and the
    runtime scalars when the kernel reads any, and ``partial`` (one sum of squares of
    ``kernel.reduce`` per block, in float64 as on the eager path) when it has one; the
    scales of 8-bit buffers follow the rows, in ``storage.quantized`` order. A program
    holds whole QUANT_BLOCKs, so it finds their scales and codes itself."""
    if not isinstance(storage, Storage):
        storage = Storage.of(kernel, storage)
    compute = "tl.float64" if storage.compute == torch.float64 else "tl.float32"
    buffers = kernel_buffers(kernel)
    quantized = dict(storage.quantized)
    elements = [_ELEMENT_TYPES[storage.dtype(name)] if name not in quantized else "tl.uint8" for name in buffers]
    arguments = [f"row{k}" for k in range(len(buffers))]
    arguments += [f"scales{buffers.index(name)}" for name, _ in storage.quantized]
    arguments += ["numels", "block_tensor", "block_start"]
    arguments += ["keys", "shard_offsets"] if storage.stochastic else []
    arguments += ["coefficients"] if kernel.coefficients or storage.stochastic else []
    arguments += [f"runtime{k}" for k in range(len(kernel.runtimes))]
    arguments += ["partial"] if kernel.reduce is not None else []
    lines = [f"def imex_kernel({', '.join(arguments)}, BLOCK: tl.constexpr):",
             "    block = tl.program_id(0)",
             "    t = tl.load(block_tensor + block)",
             "    start = tl.multiple_of(tl.load(block_start + block), BLOCK)",
             "    n = tl.load(numels + t)",
             "    offsets = start + tl.arange(0, BLOCK)"]
    lines += [f"    address{k} = tl.load(row{k} + t)  # {name!r}" for k, name in enumerate(buffers)]
    lines += [f"    scale{k} = tl.load(scales{k} + t).to(tl.pointer_type(tl.float32))"
              for k in (buffers.index(name) for name, _ in storage.quantized)]
    per_element = _per_element(kernel)
    lines += [f"    x{n} = {_expression(kernel, node, compute)}"
              for n, node in enumerate(kernel.nodes) if not per_element[n]]
    if storage.stochastic:  # program.py's comment on stochastic rounding says which bits
        lines.append(f"    salt = tl.load(coefficients + {len(kernel.coefficients)}).to(tl.uint32)")
        lines += _mix32("base", "tl.load(keys + t).to(tl.uint32) ^ salt", "    ")
        for q in sorted({q for q, _ in stochastic_slots(kernel, storage).values()}):
            lines += _mix32(f"stream{q}", f"base + {q + 1}", "    ")
        lines.append("    indices = (offsets + tl.load(shard_offsets + t)).to(tl.uint32)  # in the whole tensor")
    addresses = " | ".join(f"address{k}" for k in range(len(buffers)))
    lines.append(f"    if (start + BLOCK <= n) & (({addresses}) % {ALIGNMENT} == 0):")
    lines += _body(kernel, storage, per_element, buffers, elements, compute, masked=False)
    lines.append("    else:")
    lines += _body(kernel, storage, per_element, buffers, elements, compute, masked=True)
    return _HEADER + "\n".join(lines) + "\n"


def _mix32(target: str, value: str, indent: str) -> list[str]:
    """``target = program.mix32(value)`` on uint32 values (products wrap)."""
    (first, second) = (f"{m:#x}" for m in MIX32_MULTIPLIERS)
    return [f"{indent}{target} = {value}", f"{indent}{target} = ({target} ^ ({target} >> 16)) * {first}",
            f"{indent}{target} = ({target} ^ ({target} >> 15)) * {second}",
            f"{indent}{target} = {target} ^ ({target} >> 16)"]


def _stochastic_store(value: str, bits: str, indent: str) -> list[str]:
    """``rounded``: float32 ``value`` as bfloat16, rounded stochastically with the low
    16 bits of ``bits`` for each element (program.round_stochastically)."""
    return [f"{indent}u = {value}.to(tl.uint32, bitcast=True)",
            f"{indent}magnitude = u & 0x7FFFFFFF",
            f"{indent}rounded = tl.where(magnitude > 0x7F800000, (u >> 16) | 0x40, tl.where(magnitude == 0x7F800000, "
            f"u >> 16, (u + ({bits} & 0xFFFF)) >> 16))",
            f"{indent}rounded = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)"]


def _quantized_store(value: str, k: int, kind: str, masked: bool, indent: str) -> list[str]:
    """Stores ``value`` into 8-bit buffer ``k``: each QUANT_BLOCK's largest magnitude (NaN
    and masked lanes ignored) as its scale, then the codes (program.quantize)."""
    groups = BLOCK // QUANT_BLOCK
    magnitude = "tl.where(mask & (magnitude == magnitude), magnitude, 0.0)" if masked else \
        "tl.where(magnitude == magnitude, magnitude, 0.0)"
    mask = ", mask=mask" if masked else ""
    return [f"{indent}v = {value}",
            f"{indent}magnitude = tl.abs(v)",
            f"{indent}magnitude = {magnitude}",
            f"{indent}absmax = tl.max(tl.reshape(magnitude, ({groups}, {QUANT_BLOCK})), axis=1)",
            f"{indent}first = start // {QUANT_BLOCK} + tl.arange(0, {groups})",
            f"{indent}tl.store(scale{k} + first, absmax" + (f", mask=first * {QUANT_BLOCK} < n)" if masked else ")"),
            f"{indent}reciprocal = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(absmax > 0, absmax, 1.0))",
            f"{indent}reciprocal = tl.reshape(tl.broadcast_to(reciprocal[:, None], ({groups}, {QUANT_BLOCK})), (BLOCK,))",
            f"{indent}tl.store(buffer{k} + offsets, quant_{kind}(v, reciprocal){mask})"]


def _per_element(kernel: Kernel) -> list[bool]:
    """Whether each node depends on a tensor (the others are the same for every element)."""
    flags: list[bool] = []
    for op, *args in kernel.nodes:
        flags.append(op == "tensor" or (op not in ("coef", "runtime") and any(flags[a] for a in args)))
    return flags


def _body(kernel: Kernel, storage: Storage, per_element: list[bool], buffers: tuple[str, ...], elements: list[str],
          compute: str, masked: bool) -> list[str]:
    """One branch: pointers, per-element values, the reduction, then every store."""
    indent = "        "
    mask = ", mask=mask" if masked else ""
    pointer = [f"address{k}.to(tl.pointer_type({element}))" for k, element in enumerate(elements)]
    if not masked:  # the branch's condition guarantees the alignment; the hint lets loads vectorize
        pointer = [f"tl.multiple_of({p}, {ALIGNMENT})" for p in pointer]
    lines = [f"{indent}mask = offsets < n"] if masked else []
    lines += [f"{indent}buffer{k} = {p}" for k, p in enumerate(pointer)]
    index = {name: k for k, name in enumerate(buffers)}
    quantized = dict(storage.quantized)
    for n, node in enumerate(kernel.nodes):
        if node[0] == "tensor" and node[1] in quantized:
            k = index[node[1]]
            lines.append(f"{indent}x{n} = dequant_{quantized[node[1]]}(tl.load(buffer{k} + offsets{mask}), "
                         f"tl.load(scale{k} + offsets // {QUANT_BLOCK}{mask})).to({compute})")
        elif node[0] == "tensor":
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
    slots = stochastic_slots(kernel, storage)
    for q in sorted({q for q, _ in slots.values()}):
        lines += _mix32(f"hash{q}", f"indices ^ stream{q}", indent)
    for name, n in kernel.writes:
        if name in quantized:
            lines += _quantized_store(f"x{n}.to(tl.float32)", index[name], quantized[name], masked, indent)
            continue
        value = f"x{n}.to({elements[index[name]]})"
        if elements[index[name]] == "tl.bfloat16":
            value = f"bf16_nearest(x{n}.to(tl.float32))"
        if name in slots:
            q, half = slots[name]
            lines += _stochastic_store(f"x{n}", f"(hash{q} >> {16 * half})", indent)
            value = "rounded"
        lines.append(f"{indent}tl.store(buffer{index[name]} + offsets, {value}{mask})")
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
    if op == "bf16":  # through float32, as the eager path
        return f"bf16_nearest({args[0]}.to(tl.float32)).to({compute})"
    if op == "abs":
        return f"tl.abs({args[0]})"
    if op == "pow":  # libdevice: compiled kernels only, Triton's interpreter lacks it
        return f"libdevice.pow({args[0]}, {args[1]})"
    raise AssertionError(op)


def _import_kernel(source: str) -> Callable:
    """``imex_kernel`` from ``source``, through a file: Triton needs the source on disk."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    verified = cache.cached("triton", f"imex_{digest}.py", source.encode)
    spec = importlib.util.spec_from_file_location(f"lightning_imex_triton_{digest}",
                                                  cache.private_copy(verified, ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.imex_kernel


class TritonBackend:
    """Generates, compiles and launches Triton kernels (see the module docstring)."""

    name = "triton"
    block = BLOCK

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

    def launch(self, kernel: Kernel, storage: Storage | torch.dtype, tables: PointerTables,
               buffers: Mapping[str, Sequence[Tensor]], coefficients: Sequence[float],
               runtimes: Mapping[str, Tensor]) -> Tensor | None:
        rows = [tables.row(name, buffers[name]) for name in kernel_buffers(kernel)]
        if isinstance(storage, Storage):
            rows += [tables.row(quant_scales(name), buffers[quant_scales(name)]) for name, _ in storage.quantized]
        block_tensor, block_start = tables.blocks(BLOCK)
        arguments = [*rows, tables.numels, block_tensor, block_start]
        stochastic = isinstance(storage, Storage) and bool(storage.stochastic)
        arguments += [tables.keys, tables.offsets] if stochastic else []
        if kernel.coefficients or stochastic:
            arguments.append(to_device(torch.tensor(list(coefficients), dtype=torch.float64), tables.device))
        arguments += [runtimes[name].to(tables.device, non_blocking=True) for name in kernel.runtimes]
        partial = None
        if kernel.reduce is not None:
            partial = torch.empty(len(block_tensor), dtype=torch.float64, device=tables.device)
            arguments.append(partial)
        # Triton launches on the current device, not the tensors'
        with torch.cuda.device(tables.device) if tables.device.type == "cuda" else contextlib.nullcontext():
            self._kernel(kernel, storage)[(len(block_tensor),)](*arguments, BLOCK=BLOCK, num_warps=NUM_WARPS,
                                                                enable_fp_fusion=False)  # rounding as on the eager path
        return partial

    def _kernel(self, kernel: Kernel, storage: Storage | torch.dtype) -> Callable:
        key = (kernel, storage)
        if key not in self._kernels:
            self._kernels[key] = _import_kernel(triton_source(kernel, storage))
        return self._kernels[key]


BACKEND = TritonBackend()

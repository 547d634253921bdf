"""The element-wise math of every optimizer, as data: one typed representation from which
the eager path and the compiled backends (C on CPU, Triton on GPU) are all produced.

An optimizer writes its update with ordinary operators on symbolic values::

    p, g, m, v = tensor("p"), tensor("g"), tensor("m"), tensor("v")
    b1, b2, lr, eps = scalar("b1"), scalar("b2"), scalar("lr"), scalar("eps")
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    event = Event(gradient=1, writes={"m": m, "v": v, "p": p - lr * m / (sqrt(v) + eps)})

``tensor`` values are per-element (a parameter, its gradient, a state or scratch buffer);
``scalar`` values are per-step numbers (lr, betas, bias-correction masses, ...), looked up
by name when a step runs; ``runtime`` values are 0-d tensors computed on the device
during the step (a global norm), read without a host sync. Every expression is
immutable and hashable, so programs are cache keys.

:func:`lower` turns an :class:`Event` into a :class:`Kernel`: straight-line code in
which every maximal sub-expression built from scalars alone is evaluated once per step
on the host in float64 (a *coefficient*), so ``(1 - b1)`` costs nothing per element and
hyper-parameters never reach the generated code. :func:`run_eager` executes a kernel
with torch operations (the reference path); the backends translate the same nodes. A
:class:`Storage` types a kernel's buffers (a dtype each, and which stores round
stochastically): the precision of state is a property of its buffers, not of an optimizer.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Callable, Hashable, Mapping, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Expr", "Event", "Kernel", "Node", "tensor", "scalar", "runtime", "sqrt", "maximum", "minimum", "clamp",
           "round_bf16", "lower", "run_eager", "with_gradient", "LR", "B1", "B2", "EPS", "WD", "K", "gradient",
           "decayed", "with_compensation", "with_offset", "COMPUTE_DTYPES", "Storage", "Rounding", "mix32",
           "tensor_key", "rounding_salt", "round_stochastically", "element_offsets", "stochastic_slots", "QUANT_BLOCK",
           "QUANT_MAPS", "quant_map_bias", "quant_scales", "quant_blocks", "quantize", "dequantize"]

# Operators by arity. Comparisons are deliberately absent: every node is a number.
UNARY = ("neg", "abs", "sqrt", "bf16")  # bf16: rounded to the nearest bfloat16, kept as a number
BINARY = ("add", "sub", "mul", "div", "pow", "max", "min")
LEAVES = ("tensor", "scalar", "runtime", "const")

Operand = Union["Expr", float, int]


@dataclass(frozen=True)
class Expr:
    """A symbolic value: a leaf (``tensor``/``scalar``/``runtime`` name, or ``const``)
    or an operator applied to sub-expressions."""

    op: str
    args: tuple
    # cached: expressions are nested deeply and hashed often while lowering
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.op, self.args)))

    def __hash__(self) -> int:
        return self._hash

    @cached_property
    def is_scalar(self) -> bool:
        """Whether the value is the same for every element and known on the host."""
        if self.op in ("tensor", "runtime"):
            return False
        return self.op in ("scalar", "const") or all(a.is_scalar for a in self.args)

    def __add__(self, other: Operand) -> Expr:
        return _apply("add", self, other)

    def __radd__(self, other: Operand) -> Expr:
        return _apply("add", other, self)

    def __sub__(self, other: Operand) -> Expr:
        return _apply("sub", self, other)

    def __rsub__(self, other: Operand) -> Expr:
        return _apply("sub", other, self)

    def __mul__(self, other: Operand) -> Expr:
        return _apply("mul", self, other)

    def __rmul__(self, other: Operand) -> Expr:
        return _apply("mul", other, self)

    def __truediv__(self, other: Operand) -> Expr:
        return _apply("div", self, other)

    def __rtruediv__(self, other: Operand) -> Expr:
        return _apply("div", other, self)

    def __pow__(self, other: Operand) -> Expr:
        return _apply("pow", self, other)

    def __rpow__(self, other: Operand) -> Expr:
        return _apply("pow", other, self)

    def __neg__(self) -> Expr:
        return Expr("neg", (self,))

    def __abs__(self) -> Expr:
        return Expr("abs", (self,))

    def __repr__(self) -> str:
        if self.op in LEAVES:
            return str(self.args[0])
        if self.op in UNARY:
            return f"{self.op}({self.args[0]!r})"
        symbol = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}.get(self.op)
        a, b = self.args
        return f"({a!r} {symbol} {b!r})" if symbol else f"{self.op}({a!r}, {b!r})"


def _const(x: Operand) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"an optimizer program combines expressions and numbers, got {type(x).__name__}")
    return Expr("const", (float(x),))


def _apply(op: str, a: Operand, b: Operand) -> Expr:
    return Expr(op, (_const(a), _const(b)))


def tensor(name: str) -> Expr:
    """A per-element buffer: ``"p"`` (parameter), ``"g"`` (gradient), a state buffer
    (``"m"``, ``"v"``) or a scratch buffer of a multi-stage step."""
    return Expr("tensor", (name,))


def scalar(key: Hashable) -> Expr:
    """A per-step number, looked up by ``key`` when the step runs."""
    return Expr("scalar", (key,))


def runtime(name: str) -> Expr:
    """A 0-d device tensor computed during the step (read without a host sync)."""
    return Expr("runtime", (name,))


def sqrt(x: Expr) -> Expr:
    return Expr("sqrt", (_const(x),))


def round_bf16(x: Expr) -> Expr:
    """``x`` rounded to the nearest bfloat16 (ties to even), as a float32 value: what a
    bfloat16 store of ``x`` keeps."""
    return Expr("bf16", (_const(x),))


def maximum(a: Operand, b: Operand) -> Expr:
    """Element-wise maximum; NaN if either operand is NaN (as ``torch.maximum``)."""
    return _apply("max", a, b)


def minimum(a: Operand, b: Operand) -> Expr:
    return _apply("min", a, b)


def clamp(x: Expr, low: Operand, high: Operand) -> Expr:
    """``x`` clamped to ``[low, high]`` (NaN stays NaN, as ``torch.clamp``)."""
    return minimum(maximum(x, low), high)


# The per-step scalars of the Adam family, by name (values from the optimizers' ``_scalars``).
LR, B1, B2, EPS, WD = scalar("lr"), scalar("b1"), scalar("b2"), scalar("eps"), scalar("wd")
K = scalar("k")  # the step number, from 1


def gradient(g: Expr, p: Expr, maximize: bool, l2: bool) -> Expr:
    """The gradient a program uses: negated when maximizing, then plus L2 weight decay
    (torch's order)."""
    g = -g if maximize else g
    return g + WD * p if l2 else g


def decayed(p: Expr, decoupled: bool) -> Expr:
    """The parameter after decoupled weight decay (AdamW), before the update."""
    return p * (1 - LR * WD) if decoupled else p


@dataclass(frozen=True)
class Event:
    """The element-wise work that follows gradient evaluation number ``gradient``
    (0: work before the first). Every buffer in ``writes`` is assigned its value after
    all values are computed, so each value reads the buffers as they were before the
    event. ``reduce``: a value whose per-tensor sum of squares the event returns."""

    gradient: int
    writes: tuple[tuple[str, Expr], ...]
    reduce: Expr | None = None

    def __init__(self, gradient: int, writes: Mapping[str, Expr] | Sequence[tuple[str, Expr]],
                 reduce: Expr | None = None) -> None:
        items = tuple(writes.items()) if isinstance(writes, Mapping) else tuple(writes)
        object.__setattr__(self, "gradient", gradient)
        object.__setattr__(self, "writes", items)
        object.__setattr__(self, "reduce", reduce)


@lru_cache(maxsize=None)
def with_gradient(event: Event, value: Expr) -> Event:
    """``event`` reading ``value`` wherever it reads the gradient ``tensor("g")``: how a
    transformation of the gradient (a clip factor, a runtime scalar) enters the pass that
    consumes it instead of a pass of its own."""
    visit = _substitution(tensor("g"), value)
    return Event(event.gradient, [(buffer, visit(v)) for buffer, v in event.writes],
                 visit(event.reduce) if event.reduce is not None else None)


def _substitution(leaf: Expr, value: Expr) -> Callable[[Expr], Expr]:
    """A function that rewrites an expression with ``value`` wherever it has ``leaf``."""
    done: dict[Expr, Expr] = {}

    def visit(e: Expr) -> Expr:
        if e == leaf:
            return value
        if e.op in LEAVES:
            return e
        if e not in done:
            done[e] = Expr(e.op, tuple(visit(a) for a in e.args))
        return done[e]

    return visit


@lru_cache(maxsize=None)
def with_compensation(event: Event, buffer: str, compensation: str) -> Event:
    """``event`` with ``buffer`` (bfloat16) and ``compensation`` (bfloat16) holding one
    value between them, Kahan-style: the event reads ``buffer + compensation`` wherever it
    read ``buffer``, and a write of ``x`` stores ``r = round_bf16(x)`` in ``buffer`` and the
    rounding error ``x - r`` (exact in float32) in ``compensation``, added back by the next
    read. An update smaller than half of ``buffer``'s bfloat16 spacing, which a rounded
    store would drop, accumulates in ``compensation`` until it moves ``buffer``."""
    visit = _substitution(tensor(buffer), tensor(buffer) + tensor(compensation))
    writes = []
    for name, x in event.writes:
        x = visit(x)
        if name == buffer:
            rounded = round_bf16(x)
            writes += [(name, rounded), (compensation, x - rounded)]
        else:
            writes.append((name, x))
    return Event(event.gradient, writes, visit(event.reduce) if event.reduce is not None else None)


@lru_cache(maxsize=None)
def with_offset(event: Event, buffer: str, base: str, kept: bool) -> Event:
    """``event`` with ``buffer`` holding its value minus ``base``'s: the event reads
    ``base + buffer`` wherever it read ``buffer``; a write of ``x`` to ``buffer`` stores
    ``x - b``, ``b`` the value ``base`` holds after the event (its write, else ``base``);
    an event that writes ``base`` but not ``buffer`` rewrites ``buffer`` against the new
    value when ``kept`` (a later event reads it). A buffer that holds ``base`` plus small
    updates (a parameter sum) then holds only the updates, so a narrow store of it loses a
    fraction of the updates, not of ``base``. ``base``'s stores must be exact (float32)."""
    visit = _substitution(tensor(buffer), tensor(base) + tensor(buffer))
    writes = {name: visit(x) for name, x in event.writes}
    after = writes.get(base, tensor(base))
    if buffer in writes:
        writes[buffer] = writes[buffer] - after
    elif base in writes and kept:
        writes[buffer] = tensor(base) + tensor(buffer) - after
    return Event(event.gradient, writes, visit(event.reduce) if event.reduce is not None else None)


# A lowered node: (op, operands). Operands are node indices, except for the leaves:
# ("tensor", name) loads an input buffer, ("coef", slot) reads a coefficient,
# ("runtime", name) a runtime scalar.
Node = tuple


@dataclass(frozen=True)
class Kernel:
    """An event as straight-line code over per-element values, ready for any backend."""

    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]  # tensor buffers read, in first-use order
    writes: tuple[tuple[str, int], ...]  # (buffer, node)
    reduce: int | None
    coefficients: tuple[Expr, ...]  # slot -> scalar-only expression, evaluated per step
    runtimes: tuple[str, ...]
    gradient: int

    @cached_property
    def scalar_keys(self) -> tuple[Hashable, ...]:
        """The ``scalar`` keys the coefficients read."""
        keys: dict[Hashable, None] = {}

        def visit(e: Expr) -> None:
            if e.op == "scalar":
                keys.setdefault(e.args[0])
            elif e.op not in LEAVES:
                for a in e.args:
                    visit(a)

        for c in self.coefficients:
            visit(c)
        return tuple(keys)

    def coefficient_values(self, values: Mapping[Hashable, float]) -> list[float]:
        """The coefficient of every slot for one step, in float64 on the host."""
        return [evaluate_scalar(c, values) for c in self.coefficients]

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(buffer for buffer, _ in self.writes)


def _divide(a: float, b: float) -> float:
    if b != 0.0:
        return a / b
    return math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)


# Host arithmetic in float64 with IEEE results where Python would raise.
_SCALAR_OPS = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": _divide, "pow": operator.pow,
    "max": max, "min": min, "neg": operator.neg, "abs": abs,
    "sqrt": lambda a: math.sqrt(a) if a >= 0 else math.nan,
    "bf16": lambda a: float(torch.tensor(a, dtype=torch.float32).bfloat16()),
}


def evaluate_scalar(e: Expr, values: Mapping[Hashable, float]) -> float:
    if e.op == "const":
        return e.args[0]
    if e.op == "scalar":
        return float(values[e.args[0]])
    return float(_SCALAR_OPS[e.op](*(evaluate_scalar(a, values) for a in e.args)))


@lru_cache(maxsize=None)
def lower(event: Event) -> Kernel:
    """Straight-line code for ``event``: common sub-expressions shared, scalar-only
    sub-expressions turned into coefficient slots."""
    nodes: list[Node] = []
    index: dict[Any, int] = {}
    slots: dict[Expr, int] = {}
    inputs: dict[str, None] = {}
    runtimes: dict[str, None] = {}

    def emit(node: Node) -> int:
        if node not in index:
            index[node] = len(nodes)
            nodes.append(node)
        return index[node]

    def visit(e: Expr) -> int:
        if e.is_scalar:
            return emit(("coef", slots.setdefault(e, len(slots))))
        if e.op == "tensor":
            inputs.setdefault(e.args[0])
            return emit(("tensor", e.args[0]))
        if e.op == "runtime":
            runtimes.setdefault(e.args[0])
            return emit(("runtime", e.args[0]))
        return emit((e.op, *(visit(a) for a in e.args)))

    writes = tuple((buffer, visit(value)) for buffer, value in event.writes)
    reduce = visit(event.reduce) if event.reduce is not None else None
    return Kernel(nodes=tuple(nodes), inputs=tuple(inputs), writes=writes, reduce=reduce,
                  coefficients=tuple(slots), runtimes=tuple(runtimes), gradient=event.gradient)


# Low-precision parameters are computed in float32 and rounded once when stored, on every
# path (as the compiled backends must do anyway).
COMPUTE_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _sqrt(x: Tensor) -> Tensor:
    # torch's vectorized float32 sqrt is not always correctly rounded (C's and Triton's
    # sqrt_rn are): float64's, rounded once to float32, is, so the paths agree bit for bit
    return torch.sqrt(x.double()).float() if x.dtype == torch.float32 else torch.sqrt(x)


_TORCH_OPS = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv, "pow": operator.pow,
    "max": torch.maximum, "min": torch.minimum, "neg": operator.neg, "abs": torch.abs, "sqrt": _sqrt,
    "bf16": lambda x: x.to(torch.float32).to(torch.bfloat16).to(x.dtype),  # through float32, as the backends
}


@dataclass(frozen=True)
class Storage:
    """How a kernel's buffers are held in memory: the dtype of each, the written buffers
    whose stores round stochastically (:func:`round_stochastically`), and the 8-bit ones
    (:func:`quantize`). A
    :class:`Kernel` with its Storage is a typed program: what one compiled function is
    generated for. Values are computed in float64 when a buffer is float64, else float32."""

    dtypes: tuple[tuple[str, torch.dtype], ...]
    stochastic: tuple[str, ...] = ()
    # 8-bit buffers: (buffer, map name in QUANT_MAPS); uint8 codes, with a float32 absmax
    # per QUANT_BLOCK elements in the buffer named quant_scales(buffer)
    quantized: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def of(kernel: Kernel, dtypes: torch.dtype | Mapping[str, torch.dtype], stochastic: Sequence[str] = (),
           quantized: Mapping[str, str] | None = None) -> Storage:
        """``kernel``'s buffers held in ``dtypes`` (one dtype for all, or one per buffer);
        ``stochastic``: the buffers whose stores round stochastically, where written;
        ``quantized``: the 8-bit buffers (buffer -> map), where touched."""
        names = kernel.inputs + tuple(b for b in kernel.outputs if b not in kernel.inputs)
        typed = {name: dtypes if isinstance(dtypes, torch.dtype) else dtypes[name] for name in names}
        return Storage(tuple(typed.items()), tuple(b for b in kernel.outputs if b in stochastic),
                       tuple((b, kind) for b, kind in (quantized or {}).items() if b in typed))

    def dtype(self, name: str) -> torch.dtype:
        return dict(self.dtypes)[name]

    @property
    def compute(self) -> torch.dtype:
        return torch.float64 if any(d == torch.float64 for _, d in self.dtypes) else torch.float32


# 8-bit blockwise state (docs/optimizer-core.md, "8-bit state"): a buffer is stored as one
# uint8 code per element and one float32 scale per block of QUANT_BLOCK elements (by
# offset in the tensor's storage, so a block never straddles two tensors): the block's
# largest magnitude (NaN ignored), 0 for an all-zero block. A code is a small float: of
# x, the value times the reciprocal of its block's scale (two correctly rounded float32
# operations: |x| <= 1 up to an ulp, which rounds to 1.0), it keeps the exponent and the
# 3 leading mantissa bits, rounded half up in x's float32 bits u:
#   k = ((u + 2^19) >> 20) - bias,  at least 0;  its value: the float32 with bits (k + bias) << 20
# with bias chosen so that 1.0 is the largest code: the map's steps are 1/16 to 1/8 of
# the value at every magnitude, down to the smallest code (below it, 0), where Adam's
# moments spread over decades (a vocabulary's rare rows beside its frequent ones):
#   "signed" (m):   7 bits (4 exponent bits, like FP8's E4M3) and bit 7 the sign; 1.0 is
#                   code 127, the smallest 1.25 * 2^-16 (1.9e-5) of the block's largest m
#   "unsigned" (v): 8 bits (5 exponent bits); x < 0 -> 0; 1.0 is code 255, the smallest
#                   1.25 * 2^-32 (2.9e-10) of the block's largest v (1.7e-5 in sqrt(v))
# A NaN value gets code 0. Every path computes these with the same float32 and integer
# operations. QUANT_BLOCK divides the compiled backends' blocks,
# so one program (C block, Triton program) computes a block's values, its scale, then
# its codes.
QUANT_BLOCK = 256
QUANT_MAPS = {"signed": 127, "unsigned": 255}  # the largest code's magnitude: the value 1.0


def quant_map_bias(kind: str) -> int:
    """What a code's magnitude is offset by from x's float32 bits over 2^20 (see above)."""
    return (127 << 3) - QUANT_MAPS[kind]


def quant_scales(buffer: str) -> str:
    """The name of the per-block scales of 8-bit ``buffer``."""
    return f"{buffer}_scales"


def quant_blocks(numel: int) -> int:
    return -(-numel // QUANT_BLOCK)


def quantize(value: Tensor, offsets: Tensor, blocks: int, kind: str) -> tuple[Tensor, Tensor]:
    """(uint8 codes of ``value`` (float32), float32 scale per block) under map ``kind``;
    ``offsets``: each element's offset in its tensor's storage (:func:`element_offsets`)."""
    block = (offsets // QUANT_BLOCK).reshape(-1)
    magnitude = value.abs()
    magnitude = torch.where(magnitude == magnitude, magnitude, 0.0).reshape(-1)
    scales = torch.zeros(blocks, dtype=torch.float32, device=value.device).scatter_reduce_(
        0, block, magnitude, "amax")
    x = value * (1.0 / torch.where(scales > 0, scales, 1.0))[block].view(value.shape)
    magnitude = x.abs() if kind == "signed" else torch.where(x > 0, x, 0.0)
    k = (((magnitude.view(torch.int32) + (1 << 19)) >> 20) - quant_map_bias(kind)).clamp(min=0)
    k = torch.where(magnitude == magnitude, k, 0).to(torch.uint8)
    return (k | torch.where(x < 0, 128, 0).to(torch.uint8) if kind == "signed" else k), scales


def dequantize(codes: Tensor, scales: Tensor, offsets: Tensor, kind: str) -> Tensor:
    """The float32 values of 8-bit ``codes`` with per-block ``scales`` (:func:`quantize`)."""
    k = (codes & 127 if kind == "signed" else codes).to(torch.int32)
    x = torch.where(k > 0, ((k + quant_map_bias(kind)) << 20).view(torch.float32), 0.0)
    x = torch.where(codes >= 128, -x, x) if kind == "signed" else x
    return x * scales[offsets // QUANT_BLOCK]


# Stochastic rounding (float32 to bfloat16): add 16 random bits to the value's low 16 bits,
# then truncate them; a value between two neighbours x < y rounds to y with probability
# (value - x) / (y - x), so the rounding is unbiased. The bits are a counter-based hash of
# (seed, step, tensor, element) that every path computes identically in 32-bit unsigned
# arithmetic, so eager, C and Triton agree bit for bit and a resumed run repeats them:
#   tensor key  = mix32(mix32(seed) ^ tensor index)          (host, once)
#   salt        = mix32(mix32(step) + gradient evaluation)   (host, per event)
#   stream_q    = mix32(mix32(key ^ salt) + q + 1)           (per tensor and pair q of stochastic writes)
#   hash_q      = mix32(element index ^ stream_q)            (per element, mod 2**32)
# where an element's index is its offset in the whole tensor: its offset in its storage plus,
# for a DTensor's local shard (FSDP2), the offset of the shard's first row in the whole tensor
# (kernel.shard_offset), so a sharded run rounds as one process does. The r-th stochastic
# write of an event (in the order of its writes) takes the bits hash_{r // 2} >> (16 * (r % 2)):
# one hash serves two stores, 16 bits each.
# mix32 is the "lowbias32" integer hash (C. Wellons): two multiplications, three xor-shifts.
MIX32_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
MASK32 = 0xFFFFFFFF


def mix32(x: int) -> int:
    x &= MASK32
    for shift, multiplier in zip((16, 15), MIX32_MULTIPLIERS):
        x = ((x ^ (x >> shift)) * multiplier) & MASK32
    return x ^ (x >> 16)


@lru_cache(maxsize=1 << 16)  # asked for every parameter at every step
def tensor_key(seed: int, index: int) -> int:
    return mix32(mix32(seed) ^ index)


def rounding_salt(step: int, gradient: int) -> int:
    return mix32(mix32(step) + gradient)


def _mix32_tensor(x: Tensor) -> Tensor:
    """:func:`mix32` of int64 tensors holding uint32 values (products split in 16-bit
    halves: no int64 overflow)."""
    for shift, multiplier in zip((16, 15), MIX32_MULTIPLIERS):
        x = x ^ (x >> shift)
        x = (x * (multiplier & 0xFFFF) + (((x * (multiplier >> 16)) & 0xFFFF) << 16)) & MASK32
    return x ^ (x >> 16)


def element_offsets(t: Tensor) -> Tensor:
    """Each element's offset from ``t``'s data pointer (int64, ``t``'s shape): the element
    index the compiled paths hash, whatever the dense layout."""
    offsets = torch.zeros((), dtype=torch.int64, device=t.device)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        shape = [1] * t.dim()
        shape[dim] = size
        offsets = offsets + (torch.arange(size, dtype=torch.int64, device=t.device) * stride).view(shape)
    return offsets.expand(t.shape)


def round_stochastically(value: Tensor, bits: Tensor) -> Tensor:
    """``value`` (float32) as bfloat16, rounded up in magnitude with probability given by
    ``bits``' low 16 bits (int64); NaN stays NaN (quiet) and infinities stay infinite."""
    u = value.view(torch.int32).to(torch.int64) & MASK32
    magnitude = u & 0x7FFFFFFF
    rounded = torch.where(magnitude > 0x7F800000, (u >> 16) | 0x40,
                          torch.where(magnitude == 0x7F800000, u >> 16, (u + (bits & 0xFFFF)) >> 16))
    return torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16).view(torch.bfloat16)


def stochastic_slots(kernel: Kernel, storage: Storage) -> dict[str, tuple[int, int]]:
    """(pair q, half) of each stochastically stored buffer: the r-th such write of
    ``kernel`` takes the bits ``hash_q >> (16 * half)`` with ``(q, half) = divmod(r, 2)``."""
    written = [buffer for buffer, _ in kernel.writes if buffer in storage.stochastic]
    return {buffer: divmod(r, 2) for r, buffer in enumerate(written)}


@dataclass(frozen=True)
class Rounding:
    """The inputs of the random bits of a launch's stochastic stores: one key per tensor
    (:func:`tensor_key`), the event's salt (:func:`rounding_salt`), and one offset per
    tensor that its element indices start from (a local shard's offset in the whole tensor,
    0 for a tensor held whole)."""

    keys: tuple[int, ...]
    salt: int
    offsets: tuple[int, ...]

    def stream(self, tensor: int, pair: int) -> int:
        """stream_q of pair ``pair`` for the ``tensor``-th key."""
        return mix32(mix32(self.keys[tensor] ^ self.salt) + pair + 1)


def run_eager(kernel: Kernel, buffers: Mapping[str, Sequence[Tensor]], coefficients: Sequence[float],
              runtimes: Mapping[str, Tensor] | None = None, storage: Storage | None = None,
              rounding: Rounding | None = None) -> list[Tensor]:
    """Executes ``kernel`` with torch operations, tensor by tensor. ``buffers`` maps each
    input and output name to one tensor per parameter. Returns the per-tensor sums of
    squares of ``kernel.reduce`` in float64 (empty without one). Stores to
    ``storage.stochastic`` buffers round stochastically with ``rounding``'s bits; 8-bit
    buffers (``storage.quantized``) are read and written with their scales."""
    count = len(buffers[(kernel.inputs or kernel.outputs)[0]])
    stochastic = storage.stochastic if storage is not None else ()
    quantized = dict(storage.quantized) if storage is not None else {}
    slots = stochastic_slots(kernel, storage) if stochastic else {}
    sums = []
    for i in range(count):
        values: list[Any] = []
        for node in kernel.nodes:
            op = node[0]
            if op == "tensor" and node[1] in quantized:
                t = buffers[node[1]][i]
                values.append(dequantize(t, buffers[quant_scales(node[1])][i], element_offsets(t), quantized[node[1]]))
            elif op == "tensor":
                t = buffers[node[1]][i]
                values.append(t.to(COMPUTE_DTYPES[t.dtype]) if t.dtype in COMPUTE_DTYPES else t)
            elif op == "coef":
                values.append(coefficients[node[1]])
            elif op == "runtime":
                values.append(runtimes[node[1]])
            else:
                operands = [values[j] for j in node[1:]]
                values.append(_torch_op(op, operands))
        if kernel.reduce is not None:
            sums.append(values[kernel.reduce].double().square().sum())
        results = [values[j] for _, j in kernel.writes]
        hashes: dict[int, Tensor] = {}
        for (buffer, _), value in zip(kernel.writes, results):
            target = buffers[buffer][i]
            if buffer in quantized:
                scales = buffers[quant_scales(buffer)][i]
                value, scale = quantize(value.to(torch.float32).expand(target.shape), element_offsets(target),
                                        scales.numel(), quantized[buffer])
                scales.copy_(scale)
            elif buffer in stochastic:
                pair, half = slots[buffer]
                if pair not in hashes:
                    indices = (element_offsets(target) + rounding.offsets[i]) & MASK32
                    hashes[pair] = _mix32_tensor(indices ^ rounding.stream(i, pair))
                value = round_stochastically(value.to(torch.float32).expand(target.shape), hashes[pair] >> (16 * half))
            target.copy_(value)
    return sums


def _torch_op(op: str, operands: list[Any]) -> Any:
    if all(not isinstance(x, Tensor) for x in operands):  # two coefficients: folded already
        raise AssertionError(f"unfolded scalar operation {op}")
    if op in ("max", "min") and not all(isinstance(x, Tensor) for x in operands):
        t = next(x for x in operands if isinstance(x, Tensor))
        operands = [x if isinstance(x, Tensor) else torch.tensor(x, dtype=t.dtype, device=t.device)
                    for x in operands]
    return _TORCH_OPS[op](*operands)

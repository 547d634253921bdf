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
with torch operations (the reference path); the backends translate the same nodes.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Hashable, Mapping, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Expr", "Event", "Kernel", "Node", "tensor", "scalar", "runtime", "sqrt", "maximum", "minimum", "clamp",
           "lower", "run_eager", "COMPUTE_DTYPES"]

# Operators by arity. Comparisons are deliberately absent: every node is a number.
UNARY = ("neg", "abs", "sqrt")
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


def maximum(a: Operand, b: Operand) -> Expr:
    """Element-wise maximum; NaN if either operand is NaN (as ``torch.maximum``)."""
    return _apply("max", a, b)


def minimum(a: Operand, b: Operand) -> Expr:
    return _apply("min", a, b)


def clamp(x: Expr, low: Operand, high: Operand) -> Expr:
    """``x`` clamped to ``[low, high]`` (NaN stays NaN, as ``torch.clamp``)."""
    return minimum(maximum(x, low), high)


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

_TORCH_OPS = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv, "pow": operator.pow,
    "max": torch.maximum, "min": torch.minimum, "neg": operator.neg, "abs": torch.abs, "sqrt": torch.sqrt,
}


def run_eager(kernel: Kernel, buffers: Mapping[str, Sequence[Tensor]], coefficients: Sequence[float],
              runtimes: Mapping[str, Tensor] | None = None) -> list[Tensor]:
    """Executes ``kernel`` with torch operations, tensor by tensor. ``buffers`` maps each
    input and output name to one tensor per parameter. Returns the per-tensor sums of
    squares of ``kernel.reduce`` in float64 (empty without one)."""
    count = len(buffers[(kernel.inputs or kernel.outputs)[0]])
    sums = []
    for i in range(count):
        values: list[Any] = []
        for node in kernel.nodes:
            op = node[0]
            if op == "tensor":
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
        for (buffer, _), value in zip(kernel.writes, results):
            buffers[buffer][i].copy_(value)
    return sums


def _torch_op(op: str, operands: list[Any]) -> Any:
    if all(not isinstance(x, Tensor) for x in operands):  # two coefficients: folded already
        raise AssertionError(f"unfolded scalar operation {op}")
    if op in ("max", "min") and not all(isinstance(x, Tensor) for x in operands):
        t = next(x for x in operands if isinstance(x, Tensor))
        operands = [x if isinstance(x, Tensor) else torch.tensor(x, dtype=t.dtype, device=t.device)
                    for x in operands]
    return _TORCH_OPS[op](*operands)

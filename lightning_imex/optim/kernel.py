"""Runs element-wise programs over tensors: eagerly (the reference path) or compiled into
one fused pass per program (the fast path). Both execute the same function, so they
cannot drift apart; the choice between them is made in :func:`select_fused` alone.

Every optimizer of the package is such a program (one :class:`Event` per gradient
evaluation): IMEX Adam's events come from its tableau (``plan.py``), the others are
written out in their modules.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Batch", "Event", "run_event", "compiled_event", "select_fused", "FUSED_BUCKETS"]

# Tensors per compiled call, largest first: a call pays ~50 us of guard and wrapper
# overhead, and a longer list compiles for longer (about 6 s for 8 tensors, 15 s for 32
# on 2 CPU cores). Only these lengths are ever compiled, so each event has at most
# three variants per dtype, whatever the model.
FUSED_BUCKETS = (32, 8, 1)

# Statements, over named per-tensor values ("p", "g", "m", "v", scratch names, and any
# name a statement defines) and the coefficient vector c:
#   ("lin", dest, ((k, src), ...))    dest = sum c[k] * src; k None: coefficient 1;
#                                      src None: the constant c[k]
#   ("mul" | "div" | "max", dest, a, b) dest = a * b, a / b, maximum(a, b)
#   ("abs", dest, src)                dest = |src|
#   ("clamp", dest, src, k)           dest = src clamped to [-c[k], c[k]]
#   ("u", dest, m, v, k_m, k_v, k_e)  dest = m c[k_m] / (sqrt(max(v, 0)) c[k_v] + c[k_e])
Statement = tuple


@dataclass(frozen=True)
class Event:
    """The element-wise work after gradient number ``gradient`` (0: before any)."""

    gradient: int
    statements: tuple[Statement, ...]
    # (buffer, value): "p", "m", "v" or a scratch name, written after all statements
    writes: tuple[tuple[str, str], ...]
    # a value whose per-tensor sum of squares the event returns (global norms)
    reduce: str | None = None


def run_event(
    event: Event,
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    scratch: dict[str, Sequence[Tensor]],
    coefficients: Sequence[float | Tensor] | Tensor,
) -> list[Tensor]:
    """Executes ``event`` on each tensor: statements over named values, then the writes.
    Returns the per-tensor sums of squares of ``event.reduce`` (empty without one)."""
    c = coefficients
    sums = []
    for i, p in enumerate(params):
        buffers = {"p": p, "m": exp_avgs[i], "v": exp_avg_sqs[i], **{k: v[i] for k, v in scratch.items()}}
        env: dict[str, Tensor] = {**buffers, "g": grads[i]}
        for statement in event.statements:
            kind, dest = statement[0], statement[1]
            if kind == "lin":
                value = None
                for k, src in statement[2]:
                    term = c[k] if src is None else env[src] if k is None else env[src] * c[k]
                    value = term if value is None else value + term
                env[dest] = value
            elif kind == "mul":
                env[dest] = env[statement[2]] * env[statement[3]]
            elif kind == "div":
                env[dest] = env[statement[2]] / env[statement[3]]
            elif kind == "max":
                env[dest] = torch.maximum(env[statement[2]], env[statement[3]])
            elif kind == "abs":
                env[dest] = env[statement[2]].abs()
            elif kind == "clamp":
                bound = c[statement[3]]
                env[dest] = env[statement[2]].clamp(-bound, bound)
            else:  # "u": the update direction m / (sqrt(v) + eps), bias-corrected by scales
                _, _, m, v, scale_m, scale_v, eps = statement
                env[dest] = env[m] * c[scale_m] / (env[v].clamp(min=0).sqrt() * c[scale_v] + c[eps])
        if event.reduce is not None:
            sums.append(env[event.reduce].float().square().sum())
        for buffer, value in event.writes:
            buffers[buffer].copy_(env[value])
    return sums


# Inductor options per device type. CPU: sizes are symbolic, so the code must not pick
# its threads from the sizes seen at compile time (a small first model would leave a
# serial kernel for good). CUDA: one launch for a bucket's kernels instead of one each.
_COMPILE_OPTIONS = {"cpu": {"cpp.dynamic_threads": True}, "cuda": {"combo_kernels": True}}


@lru_cache(maxsize=None)
def compiled_event(event: Event, device_type: str) -> Callable[..., None]:
    """``run_event`` for one event, compiled. Each event gets a code object of its own so
    that dynamo's per-code recompile limit counts only that event's few variants."""

    def imex_event(params, grads, exp_avgs, exp_avg_sqs, scratch, coefficients):
        return run_event(event, params, grads, exp_avgs, exp_avg_sqs, scratch, coefficients)

    code = imex_event.__code__.replace(co_name=f"imex_event_{abs(hash(event)):x}_{device_type}")
    fn = types.FunctionType(code, imex_event.__globals__, code.co_name, None, imex_event.__closure__)
    return torch.compile(fn, dynamic=True, fullgraph=True, options=_COMPILE_OPTIONS.get(device_type, {}))


class Batch:
    """Parameters that share one step's coefficients, device and dtype, with their state
    and this step's scratch buffers, prepared once per step for every event."""

    def __init__(self, params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 scratch: dict[str, list[Tensor]], coefficients: list[float], fused: bool) -> None:
        self.params, self.fused, self.scratch = params, fused, scratch
        self.coefficients: list[float] | Tensor = coefficients
        self.flat = [False] * len(params)
        if fused:
            # One symbolic size per tensor whatever its shape or size-1 dimensions, through
            # flat views (state and scratch are laid out like their parameter).
            self.flat = [p.is_contiguous() for p in params]
            params, exp_avgs, exp_avg_sqs = ([_flat_view(t, f) for t, f in zip(ts, self.flat)]
                                             for ts in (params, exp_avgs, exp_avg_sqs))
            self.scratch = {k: [_flat_view(t, f) for t, f in zip(v, self.flat)] for k, v in self.scratch.items()}
            dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
            self.coefficients = torch.tensor(coefficients, dtype=dtype, device=params[0].device)
        self.tensors = (params, exp_avgs, exp_avg_sqs)

    def run(self, event: Event, grads: list[Tensor | None], extra_coefficient: Tensor | None = None) -> list[Tensor]:
        """Runs ``event``; returns the per-tensor sums of squares of ``event.reduce``.
        ``extra_coefficient``: a 0-d tensor known only at run time (e.g. from a global
        norm), appended to the coefficients without a device-to-host sync."""
        params, exp_avgs, exp_avg_sqs = self.tensors
        coefficients = self.coefficients
        if extra_coefficient is not None:
            coefficients = (list(coefficients) + [extra_coefficient] if not self.fused else
                            torch.cat([coefficients, extra_coefficient.reshape(1).to(coefficients)]))
        if not self.fused:
            return run_event(event, params, grads, exp_avgs, exp_avg_sqs, self.scratch, coefficients)
        grads = [g.reshape(-1) if f and g is not None else g for g, f in zip(grads, self.flat)]
        fn = compiled_event(event, params[0].device.type)
        n, start, sums = len(params), 0, []
        # Sizes stay symbolic without "duck" sharing: otherwise two equal sizes in one bucket
        # would compile a variant that a bucket with different sizes cannot use.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            for size in FUSED_BUCKETS:
                while n - start >= size:
                    span = slice(start, start + size)
                    sums += fn(params[span], grads[span], exp_avgs[span], exp_avg_sqs[span],
                               {k: v[span] for k, v in self.scratch.items()}, coefficients)
                    start += size
        return sums


def _flat_view(t: Tensor, flat: bool) -> Tensor:
    # detached: a plain tensor on the same storage, kept across the step's closure calls
    # without autograd's view tracking
    t = t.detach()
    return t.view(-1) if flat else t


# With fused=None, CPU batches from this many elements on are compiled: the eager path
# allocates a temporary per operation and tensor, which costs far more than the one-time
# compile of a few seconds once a step moves tens of megabytes.
FUSED_CPU_MIN_NUMEL = 1 << 22


def select_fused(fused: bool | None, params: Sequence[Tensor]) -> bool:
    """The one place that picks the path. ``None``: fused on CUDA (compiled with Triton),
    and on CPU for batches of at least :data:`FUSED_CPU_MIN_NUMEL` elements."""
    if fused is not None:
        return fused
    if not params or any(p.device.type not in ("cpu", "cuda") for p in params):
        return False
    return params[0].device.type == "cuda" or sum(p.numel() for p in params) >= FUSED_CPU_MIN_NUMEL

"""Runs a plan's events over tensors: eagerly (the reference path) or compiled into one
fused pass per event (the fast path). Both execute the same function, so they cannot
drift apart; the choice between them is made in :func:`select_fused` alone."""

from __future__ import annotations

import types
from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import Tensor

from .plan import Event

__all__ = ["run_event", "compiled_event", "select_fused", "FUSED_BUCKETS"]

# Tensors per compiled call, largest first: a call pays ~50 us of guard and wrapper
# overhead, and a longer list compiles for longer (about 6 s for 8 tensors, 15 s for 32
# on 2 CPU cores). Only these lengths are ever compiled, so each event has at most
# three variants per dtype, whatever the model.
FUSED_BUCKETS = (32, 8, 1)


def run_event(
    event: Event,
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    scratch: dict[str, Sequence[Tensor]],
    coefficients: Sequence[float] | Tensor,
) -> None:
    """Executes ``event`` on each tensor: statements over named values, then the writes."""
    c = coefficients
    for i, p in enumerate(params):
        buffers = {"p": p, "m": exp_avgs[i], "v": exp_avg_sqs[i], **{k: v[i] for k, v in scratch.items()}}
        env: dict[str, Tensor] = {**buffers, "g": grads[i]}
        for statement in event.statements:
            kind, dest = statement[0], statement[1]
            if kind == "lin":
                value = None
                for k, src in statement[2]:
                    term = env[src] if k is None else env[src] * c[k]
                    value = term if value is None else value + term
                env[dest] = value
            elif kind == "square":
                env[dest] = env[statement[2]] * env[statement[2]]
            else:  # "u": the update direction m / (sqrt(v) + eps), bias-corrected by scales
                _, _, m, v, scale_m, scale_v, eps = statement
                env[dest] = env[m] * c[scale_m] / (env[v].clamp(min=0).sqrt() * c[scale_v] + c[eps])
        for buffer, value in event.writes:
            buffers[buffer].copy_(env[value])


# Inductor options per device type. CPU: sizes are symbolic, so the code must not pick
# its threads from the sizes seen at compile time (a small first model would leave a
# serial kernel for good). CUDA: one launch for a bucket's kernels instead of one each.
_COMPILE_OPTIONS = {"cpu": {"cpp.dynamic_threads": True}, "cuda": {"combo_kernels": True}}


@lru_cache(maxsize=None)
def compiled_event(event: Event, device_type: str) -> Callable[..., None]:
    """``run_event`` for one event, compiled. Each event gets a code object of its own so
    that dynamo's per-code recompile limit counts only that event's few variants."""

    def imex_event(params, grads, exp_avgs, exp_avg_sqs, scratch, coefficients):
        run_event(event, params, grads, exp_avgs, exp_avg_sqs, scratch, coefficients)

    code = imex_event.__code__.replace(co_name=f"imex_event_{abs(hash(event)):x}_{device_type}")
    fn = types.FunctionType(code, imex_event.__globals__, code.co_name, None, imex_event.__closure__)
    return torch.compile(fn, dynamic=True, fullgraph=True, options=_COMPILE_OPTIONS.get(device_type, {}))


def run_event_fused(event, params, grads, exp_avgs, exp_avg_sqs, scratch, coefficients: Tensor) -> None:
    """Calls the compiled event on buckets of the :data:`FUSED_BUCKETS` lengths."""
    fn = compiled_event(event, params[0].device.type)
    # Flat views: one symbolic size per tensor, whatever its shape or size-1 dimensions.
    # (State and scratch are laid out like their parameter; a channels-last one stays as is.)
    flat = [p.is_contiguous() for p in params]
    params, exp_avgs, exp_avg_sqs, *scratch_lists = (
        [t.view(-1) if f else t for t, f in zip(ts, flat)]
        for ts in (params, exp_avgs, exp_avg_sqs, *scratch.values())
    )
    grads = [g.reshape(-1) if f and g is not None else g for g, f in zip(grads, flat)]
    scratch = dict(zip(scratch, scratch_lists))
    n = len(params)
    spans, start = [], 0
    for size in FUSED_BUCKETS:
        while n - start >= size:
            spans.append((start, start + size))
            start += size
    # Sizes stay symbolic without "duck" sharing: otherwise two equal sizes in one bucket
    # would compile a variant that a bucket with different sizes cannot use.
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        for a, b in spans:
            fn(params[a:b], grads[a:b], exp_avgs[a:b], exp_avg_sqs[a:b],
               {k: v[a:b] for k, v in scratch.items()}, coefficients)


def select_fused(fused: bool | None, params: Sequence[Tensor]) -> bool:
    """The one place that picks the path. ``None``: fused on CUDA (compiled with Triton,
    the common case for real training), eager elsewhere (a compile costs seconds on CPU)."""
    if fused is not None:
        return fused
    return bool(params) and all(p.device.type == "cuda" for p in params)

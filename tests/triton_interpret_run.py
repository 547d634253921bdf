"""Checks of the Triton backend that run its kernels in Triton's interpreter on CPU tensors.

Run as ``TRITON_INTERPRET=1 python triton_interpret_run.py RESULTS.json [CHECK ...]``
(``test_triton_backend.py`` does, in a subprocess: the variable must be set before any
kernel is defined). Writes one JSON object, check name -> ``"ok"`` or the failure.

With ``LIGHTNING_IMEX_TRITON_DEVICE=cuda`` (and no ``TRITON_INTERPRET``) the same checks
run compiled, on CUDA tensors (``benchmarks/gpu_check.py`` does)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.testing import assert_close

from catalogue import CATALOGUE  # beside this script
from lightning_imex.optim import kernel
from lightning_imex.optim.kernel import Batch
from lightning_imex.optim.toolkit import PointerTables
from lightning_imex.optim.program import Event, clamp, lower, maximum, minimum, run_eager, runtime, scalar, sqrt, tensor
from lightning_imex.optim.triton_backend import BACKEND, BLOCK

CHECKS: dict[str, Callable[[], None]] = {}
# where the checks' tensors live (the default device while they run): cpu, interpreted
DEVICE = torch.device(os.environ.get("LIGHTNING_IMEX_TRITON_DEVICE", "cpu"))

# Tables mix a one-element tensor, a short one and one of many blocks plus one element
# (SIZES), or of one block plus a tail (SMALL_SIZES, where the large one would only cost time).
SIZES = (1, 3, 65_537)
SMALL_SIZES = (1, 3, BLOCK + 476)
TOLERANCES = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-14),
              torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=1e-3, atol=1e-3)}
ADAM_VALUES = {"b1": 0.9, "b2": 0.999, "lr": 1e-2, "eps": 1e-8}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


def adam_event() -> Event:
    p, g, m, v = (tensor(n) for n in "pgmv")
    b1, b2, lr, eps = (scalar(k) for k in ("b1", "b2", "lr", "eps"))
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g * g
    return Event(gradient=1, writes={"m": m1, "v": v1, "p": p - lr * m1 / (sqrt(maximum(v1, 0)) + eps)}, reduce=m1)


def filled(make: Callable[[int], torch.Tensor], n: int, values: torch.Tensor) -> torch.Tensor:
    """A tensor from ``make(n)`` (any shape and layout) holding ``values`` in logical order."""
    t = make(n)
    return t.copy_(values.view(t.shape))


def adam_buffers(make: Callable[[int], torch.Tensor], sizes=SIZES) -> dict[str, list[torch.Tensor]]:
    """p, m and v (v >= 0) of the given sizes, made by ``make``, from seeded values."""
    torch.manual_seed(0)
    return {"p": [filled(make, n, torch.randn(n)) for n in sizes],
            "m": [filled(make, n, torch.randn(n)) for n in sizes],
            "v": [filled(make, n, torch.rand(n)) for n in sizes]}


def compare(event: Event, make_buffers: Callable[[], dict[str, list[torch.Tensor]]], values_per_step: list[dict],
            grads_per_step: list, runtimes: dict[str, torch.Tensor] | None = None) -> None:
    """Runs ``event`` step by step on two copies of the buffers, through the Triton backend
    and eagerly, and asserts equal buffers and equal sums of squares after every step.
    The Triton side keeps its batch (and so its pointer tables) between steps, as an
    optimizer does.
    ``grads_per_step``: a step's gradients, or a function that makes them just before it."""
    triton_buffers, eager_buffers = make_buffers(), make_buffers()
    dtype = triton_buffers["p"][0].dtype
    batch = Batch(triton_buffers["p"], triton_buffers, backend=BACKEND)
    assert batch.compiled == list(range(len(triton_buffers["p"]))), "every tensor must take the Triton path"
    for values, grads in zip(values_per_step, grads_per_step):
        grads = grads() if callable(grads) else grads
        assert batch.matches(triton_buffers, BACKEND)
        batch.values = values
        triton_sums = batch.run(event, grads, runtimes)
        eager = Batch(eager_buffers["p"], eager_buffers, backend=None)
        eager.values = values
        eager_sums = eager.run(event, grads, runtimes)
        if event.reduce is not None:
            assert_close(sum(triton_sums), sum(eager_sums), rtol=1e-5, atol=1e-6)
        for name in triton_buffers:
            for ours, theirs in zip(triton_buffers[name], eager_buffers[name]):
                assert_close(ours, theirs, equal_nan=True, **TOLERANCES[dtype])


def dense(dtype: torch.dtype) -> Callable[[int], torch.Tensor]:
    return lambda n: torch.empty(n, dtype=dtype)


def gradients(make: Callable[[int], torch.Tensor], sizes=SIZES, seed: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [filled(make, n, torch.randn(n)) for n in sizes]


def check_adam(dtype: torch.dtype, sizes: tuple[int, ...]) -> None:
    make = dense(dtype)
    compare(adam_event(), lambda: adam_buffers(make, sizes), [ADAM_VALUES], [gradients(make, sizes)])


@check
def adam_float32() -> None:
    check_adam(torch.float32, SIZES)


@check
def adam_bfloat16() -> None:
    check_adam(torch.bfloat16, SIZES)


@check
def adam_float16() -> None:
    check_adam(torch.float16, SMALL_SIZES)


@check
def adam_float64() -> None:
    check_adam(torch.float64, SMALL_SIZES)


# Dense layouts the kernel walks in storage order: channels_last, transposed, and a view
# whose data pointer is not 16-byte aligned (full blocks take the masked branch).
LAYOUTS = {
    216: lambda: torch.empty(6, 4, 3, 3).to(memory_format=torch.channels_last),
    1200: lambda: torch.empty(40, 30).t(),
    2049: lambda: torch.empty(2050)[1:],
    7: lambda: torch.empty(7),
}


def laid_out(n: int) -> torch.Tensor:
    return LAYOUTS[n]()


@check
def layouts() -> None:
    sizes = tuple(LAYOUTS)
    grads = gradients(laid_out, sizes)
    assert grads[0].is_contiguous(memory_format=torch.channels_last) and grads[1].stride() == (1, 30)
    assert grads[2].data_ptr() % 16 != 0
    compare(adam_event(), lambda: adam_buffers(laid_out, sizes), [ADAM_VALUES], [grads])


@check
def groups_and_new_coefficients() -> None:
    """Two groups (batches with their own tables and scalars), then a step with a new lr
    and betas: the same kernel serves them all."""
    event, make = adam_event(), dense(torch.float32)
    other = {"b1": 0.5, "b2": 0.9, "lr": 3e-3, "eps": 1e-6}
    compare(event, lambda: adam_buffers(make, SMALL_SIZES), [ADAM_VALUES, other],
            [gradients(make, SMALL_SIZES), gradients(make, SMALL_SIZES, seed=2)])
    kernels = len(BACKEND._kernels)
    compare(event, lambda: adam_buffers(make, (5, 1030)), [other, ADAM_VALUES],
            [gradients(make, (5, 1030)), gradients(make, (5, 1030), seed=3)])
    assert len(BACKEND._kernels) == kernels, "a new coefficient value must not make a new kernel"


@check
def gradient_row_refreshed() -> None:
    """Same pointer tables, new gradient tensors (their row must be rebuilt), then the same
    gradient tensors refilled in place (same row, new data)."""
    make = dense(torch.float32)
    first, second = gradients(make, SMALL_SIZES, seed=1), gradients(make, SMALL_SIZES, seed=2)

    def refill(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        for g in grads:
            g.copy_(torch.randn_like(g))
        return grads

    steps = [lambda: first, lambda: second, lambda: refill(second)]
    compare(adam_event(), lambda: adam_buffers(make, SMALL_SIZES), [ADAM_VALUES] * len(steps), steps)


def every_operator_event(with_pow: bool = False) -> Event:
    """Every operator (pow on request: Triton's interpreter lacks it) and runtime scalars,
    alone and combined with coefficients."""
    p, g, m, v = (tensor(n) for n in "pgmv")
    scale, shift, lr, eps = runtime("scale"), runtime("shift"), scalar("lr"), scalar("eps")
    x = g * scale - m / (abs(-v) + eps) + shift
    v_new = sqrt(abs(v)) * minimum(g, 0.5)
    return Event(gradient=1, reduce=m * scale + v, writes={
        "p": clamp(x, -(scale * lr), scale * lr) - p, "m": maximum(m, g),
        "v": v_new + abs(g) ** eps if with_pow else v_new})


@check
def runtime_scalars_and_every_operator() -> None:
    """NaN and inf propagate as in torch, through max and min too."""
    make = dense(torch.float32)
    grads = gradients(make, SMALL_SIZES)
    grads[2][:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    runtimes = {"scale": torch.tensor(0.7), "shift": torch.tensor(-0.25, dtype=torch.float64)}
    compare(every_operator_event(), lambda: adam_buffers(make, SMALL_SIZES), [{"lr": 0.3, "eps": 1e-3}], [grads],
            runtimes)


@check
def partial_sums_per_block() -> None:
    """``launch`` returns one partial sum of squares per block; they add up to the eager sums."""
    lowered = lower(adam_event())
    make = dense(torch.float32)
    buffers = {**adam_buffers(make), "g": gradients(make)}
    eager = {name: [t.clone() for t in ts] for name, ts in buffers.items()}
    coefficients = lowered.coefficient_values(ADAM_VALUES)
    tables = PointerTables(DEVICE, SIZES)
    partial = BACKEND.launch(lowered, torch.float32, tables, buffers, coefficients, {})
    assert partial.dtype == torch.float64 and partial.shape == (sum(-(-n // BLOCK) for n in SIZES),)
    assert_close(partial.sum(), torch.stack(run_eager(lowered, eager, coefficients)).sum(), rtol=1e-10, atol=0)


# Optimizers: the fused path with the Triton backend standing in for the CPU one, over the
# tests' catalogue (imex_euler_decoupled aside: imex_ssp3_433 covers decoupled weight decay)
OPTIMIZERS = {name: config for name, config in CATALOGUE.items() if name != "imex_euler_decoupled"}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.Tanh(),
                         nn.Linear(5, 3)).to(memory_format=torch.channels_last)


def train(name: str, fused: bool, steps: int = 3) -> nn.Module:
    model = small_model()
    conv, first, last = model[0], model[3], model[5]
    groups = [{"params": list(conv.parameters()), "lr": 1e-2},
              {"params": [first.weight, last.weight], "lr": 3e-3, "betas": (0.8, 0.99)},
              {"params": [first.bias, last.bias]}]
    cls, kwargs = OPTIMIZERS[name]
    optimizer = cls(groups, fused=fused, **kwargs)
    generator = torch.Generator(DEVICE).manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(memory_format=torch.channels_last)), y)
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return model


@contextmanager
def triton_for_cpu_tensors() -> Iterator[list[int]]:
    """Makes the Triton backend the compiled backend of the checks' tensors (CPU ones
    included); yields the number of its launches so far (a one-element list)."""
    backends, launch, launches = kernel._BACKENDS, BACKEND.launch, [0]

    def counted(*args):
        launches[0] += 1
        return launch(*args)

    kernel._BACKENDS, BACKEND.launch = {DEVICE.type: BACKEND}, counted
    try:
        yield launches
    finally:
        kernel._BACKENDS = backends
        del BACKEND.launch


def check_optimizer(name: str) -> None:
    with triton_for_cpu_tensors() as launches:
        fused = train(name, fused=True)
    assert launches[0] > 0, "the Triton backend must have run"
    eager = train(name, fused=False)
    for ours, theirs in zip(fused.parameters(), eager.parameters()):
        assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


for _name in OPTIMIZERS:
    CHECKS[f"optimizer_{_name}"] = lambda name=_name: check_optimizer(name)


def main(out: str, names: list[str]) -> None:
    if (os.environ.get("TRITON_INTERPRET") == "1") != (DEVICE.type == "cpu"):
        raise SystemExit("set TRITON_INTERPRET=1 (Triton's interpreter on CPU tensors), or "
                         "LIGHTNING_IMEX_TRITON_DEVICE=cuda without it (compiled kernels)")
    torch.set_default_device(DEVICE)
    # the tensors are tiny: idle OpenMP threads spinning on a busy machine would cost 100x
    torch.set_num_threads(1)
    results = {}
    for name in names or CHECKS:
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:  # every check reports, whatever fails
            results[name] = traceback.format_exc()
    with open(out, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

"""Optimizer memory per parameter, and what a narrower state costs in step time.

Rows: every optimizer and IMEX tableau with each ``state_dtype`` (``None``: the
parameter's dtype, float32 here; ``bfloat16``: stochastically rounded; ``"8bit"``:
blockwise codes and scales), beside
torch.optim.Adam (float32 state) and, when installed, torchao's AdamW8bit and
bitsandbytes' Adam8bit. Columns: bytes per parameter of state plus the working buffers
of multi-stage steps (:meth:`~lightning_imex.optim.base.ElementwiseOptimizer.state_bytes`;
for the others the tensors in their ``state``), after one step; and the median step time
as a ratio to the same optimizer with float32 state, measured in the same run, on the
default path (``fused=None``: the generated C kernels on CPU).

    python benchmarks/bench_memory.py                      # 20M params in 200 tensors, 2 threads
    python benchmarks/bench_memory.py --numel 2e6 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch
from torch import Tensor

from lightning_imex.optim import AdaMax, AdaMomentum, ClippedAdam, IMEXAdam, PositivityWarning

OURS = [
    ("IMEXAdam euler", IMEXAdam, {"tableau": "euler"}),
    ("IMEXAdam trapezoidal", IMEXAdam, {"tableau": "trapezoidal"}),
    ("IMEXAdam trapezoidal reuse_gradient", IMEXAdam, {"tableau": "trapezoidal", "reuse_gradient": True}),
    ("IMEXAdam ssp3_433", IMEXAdam, {"tableau": "ssp3_433"}),
    ("IMEXAdam trapezoidal_pc", IMEXAdam, {"tableau": "trapezoidal_pc"}),
    ("IMEXAdam ars222", IMEXAdam, {"tableau": "ars222"}),
    ("IMEXAdam ars343", IMEXAdam, {"tableau": "ars343"}),
    ("IMEXAdam ars343 reuse_gradient", IMEXAdam, {"tableau": "ars343", "reuse_gradient": True}),
    ("AdaMax", AdaMax, {}),
    ("AdaMomentum", AdaMomentum, {}),
    ("ClippedAdam coordinate", ClippedAdam, {"clip": "coordinate"}),
    ("ClippedAdam global", ClippedAdam, {"clip": "global"}),
]
STATE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "8-bit": "8bit"}


def eight_bit_optimizers() -> list[tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]]]:
    """torchao's AdamW8bit and bitsandbytes' Adam8bit, those installed."""
    found = []
    try:
        from torchao.optim import AdamW8bit
        found.append(("torchao AdamW8bit", AdamW8bit))
    except ImportError:
        pass
    try:
        import bitsandbytes
        found.append(("bitsandbytes Adam8bit", bitsandbytes.optim.Adam8bit))
    except ImportError:
        pass
    return found


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    # tensor subclasses (quantized state) report their own storage through __tensor_flatten__
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                inner = value.__tensor_flatten__()[0] if hasattr(value, "__tensor_flatten__") else None
                parts = [getattr(value, name) for name in inner] if inner else [value]
                total += sum(t.numel() * t.element_size() for t in parts)
    return total


def measure(build: Callable[[list[Tensor]], torch.optim.Optimizer], params: list[Tensor], grads: list[Tensor],
            repeats: int) -> tuple[float, float]:
    """(state bytes per parameter after one step, median step ms)."""
    optimizer = build(params)

    def closure() -> float:
        for p, g in zip(params, grads):
            p.grad = g
        return 0.0

    optimizer.step(closure)
    per_parameter = state_bytes(optimizer) / sum(p.numel() for p in params)
    optimizer.step(closure)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step(closure)
        times.append(time.perf_counter() - start)
    return per_parameter, statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=float, default=20e6, help="total parameters")
    parser.add_argument("--tensors", type=int, default=200, help="number of equal 1-D tensors")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", PositivityWarning)  # ars222 and ars343 say so at every construction
    torch.manual_seed(0)
    size = int(args.numel) // args.tensors
    params = [torch.nn.Parameter(torch.randn(size)) for _ in range(args.tensors)]
    grads = [torch.randn(size) for _ in range(args.tensors)]
    print(f"{args.tensors} tensors, {size * args.tensors / 1e6:.1f}M float32 params, {torch.get_num_threads()} CPU "
          f"threads, torch {torch.__version__}; ratio: step time over the same optimizer's with float32 state")
    print(f"{'optimizer':38s} {'state':>9s} {'bytes/param':>11s} {'median ms':>10s} {'ratio':>6s}", flush=True)

    def row(label: str, state: str, bytes_per_parameter: float, ms: float, ratio: float | None) -> None:
        shown = f"{ratio:6.2f}" if ratio is not None else f"{'-':>6s}"
        print(f"{label:38s} {state:>9s} {bytes_per_parameter:11.2f} {ms:10.2f} {shown}", flush=True)

    per_parameter, ms = measure(lambda ps: torch.optim.Adam(ps, fused=True), params, grads, args.repeats)
    row("torch Adam fused", "float32", per_parameter, ms, None)
    for label, build in eight_bit_optimizers():
        try:
            per_parameter, ms = measure(build, params, grads, args.repeats)
            row(label, "8-bit", per_parameter, ms, None)
        except Exception as error:  # an optimizer that cannot run here: say so and go on
            print(f"{label:38s} error: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
    for label, cls, kwargs in OURS:
        baseline = None
        for state, dtype in STATE_DTYPES.items():
            per_parameter, ms = measure(lambda ps: cls(ps, state_dtype=dtype, **kwargs), params, grads, args.repeats)
            baseline = baseline or ms
            row(label, state, per_parameter, ms, ms / baseline)


if __name__ == "__main__":
    main()

"""Optimizer step time as a ratio to torch.optim.Adam(fused=True), measured in the same run.

Rows: torch's Adam paths; IMEXAdam per tableau (eager and fused); AdaMax, AdaMomentum,
ClippedAdam; and "AdaMomentum per-tensor loop", the plain Python loop of in-place torch
ops over the parameters that AdaM3's published script uses (what users have today).

    python benchmarks/bench_optim.py                 # 20M fp32 params in 200 tensors, 2 threads
    python benchmarks/bench_optim.py --numel 2e6     # quicker

Multi-gradient tableaux are timed on the optimizer's own work: the closure only puts
stored gradients back into ``.grad``. Medians of ``--repeats`` timed steps after warm-up
(the warm-up includes the one-time compile of the fused path, reported separately).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

from lightning_imex.optim import AdaMax, AdaMomentum, ClippedAdam, IMEXAdam


class PerTensorAdaMomentum(torch.optim.Optimizer):
    """AdaMomentum as a per-parameter loop of in-place ops: the baseline to beat."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                m, v, k = state["m"], state["v"], state["step"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(m, m, value=1 - beta2).add_(group["eps"])
                denom = v.sqrt().div_(math.sqrt(1 - beta2 ** k))
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** k))
        return loss


def median_ms(step: Callable[[], None], repeats: int, warmup: int, sync: Callable[[], None]) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=float, default=20e6, help="total parameters")
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tableaux", default="euler,trapezoidal,ssp3_433")
    parser.add_argument("--skip-eager", action="store_true", help="time only the fused path")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = int(args.numel) // args.tensors
    params = [torch.nn.Parameter(torch.randn(size, device=args.device)) for _ in range(args.tensors)]
    grads = [torch.randn(size, device=args.device) for _ in range(args.tensors)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def refill() -> float:
        for p, g in zip(params, grads):
            p.grad = g
        return 0.0

    def timed(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
        refill()
        return median_ms(lambda: optimizer.step(refill), args.repeats, args.warmup, sync)

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.tensors} tensors, {size * args.tensors / 1e6:.1f}M fp32 params, {where}, torch {torch.__version__}")
    print(f"{'optimizer':44s} {'median ms':>10s} {'ratio':>7s} {'warm-up s':>10s}")
    baseline, _ = timed(torch.optim.Adam(params, fused=True))

    def row(label: str, optimizer: torch.optim.Optimizer) -> None:  # printed at once: partial runs still report
        ms, warm = timed(optimizer)
        print(f"{label:44s} {ms:10.2f} {ms / baseline:7.2f} {warm:10.1f}", flush=True)

    print(f"{'torch Adam fused (baseline)':44s} {baseline:10.2f} {1.0:7.2f}", flush=True)
    row("torch Adam single-tensor", torch.optim.Adam(params, foreach=False))
    configs = [(f"IMEXAdam {name}", IMEXAdam, {"tableau": name}) for name in args.tableaux.split(",") if name]
    configs += [("IMEXAdam trapezoidal reuse", IMEXAdam, {"reuse_gradient": True})]
    configs += [("AdaMax", AdaMax, {}), ("AdaMomentum", AdaMomentum, {}),
                ("ClippedAdam coordinate", ClippedAdam, {}), ("ClippedAdam global", ClippedAdam, {"clip": "global"})]
    for label, cls, kwargs in configs:
        for fused in ([True] if args.skip_eager else [False, True]):
            row(f"{label} {'fused' if fused else 'eager'}", cls(params, fused=fused, **kwargs))
    row("AdaMomentum per-tensor loop", PerTensorAdaMomentum(params))
    # The baseline again, to show the drift of a noisy machine within this run.
    row("torch Adam fused (again)", torch.optim.Adam(params, fused=True))


if __name__ == "__main__":
    main()

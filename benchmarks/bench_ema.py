"""Model EMA update and swap costs, measured in the same run on the same model:
``ModelEMA.update`` against Lightning's ``EMAWeightAveraging`` (its
``AveragedModel.update_parameters``) and against one bare ``torch._foreach_lerp_`` over the
same tensors (the floor), on 20M fp32 parameters in 200 tensors and on real small networks
(a CIFAR-10 ResNet with BatchNorm buffers, the Adam paper's CNN). The three updates are
timed round-robin, so that load from other processes falls on all of them alike; medians
are printed with ratios to the named baseline. Then the memory one validation swap (in and
out) allocates: bytes, and the peak held at once.

    python benchmarks/bench_ema.py [--repeats 30] [--threads 2] [--device cpu]

Targets (issue 5): >= 3x faster than Lightning's update, <= 1.2x the bare lerp, a swap
allocating under 1% of the model's size.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from types import SimpleNamespace

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from lightning_imex.callbacks import ModelEMA
from lightning_imex.models import build_model


class Holder(L.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net


def synthetic(numel: float, tensors: int) -> nn.Module:
    return nn.ParameterList([nn.Parameter(torch.randn(int(numel) // tensors)) for _ in range(tensors)])


def round_robin_medians(candidates: dict, repeats: int, sync) -> dict[str, float]:
    """Median seconds of each candidate, timed in turn ``repeats`` times, in a shuffled order
    each round (so that none always runs in the cache another one left)."""
    for fn in candidates.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names, order = list(candidates), random.Random(0)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            sync()
            start = time.perf_counter()
            candidates[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def swap_allocation(fn) -> tuple[int, int]:
    """(bytes allocated, peak bytes held at once) by tensors created during ``fn``."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, allocations = torch.cuda.memory_allocated(), torch.cuda.memory_stats()["allocated_bytes.all.allocated"]
        fn()
        torch.cuda.synchronize()
        total = torch.cuda.memory_stats()["allocated_bytes.all.allocated"] - allocations
        return total, torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # in time order, each op's own allocations (+) and the frees ("[memory]" events, -)
    changes = [e.self_cpu_memory_usage for e in sorted(prof.events(), key=lambda e: e.time_range.start)]
    held, peak = 0, 0
    for change in changes:
        held += change
        peak = max(peak, held)
    return sum(c for c in changes if c > 0), peak


def compare(title: str, module: L.LightningModule, repeats: int, sync) -> None:
    ours = ModelEMA(decay=0.999, schedule="fixed")
    ours.on_fit_start(SimpleNamespace(optimizers=[]), module)
    ours.on_train_batch_start(SimpleNamespace(global_step=0), module, None, 0)  # e_0
    theirs = EMAWeightAveraging(decay=0.999)
    theirs.setup(None, module, "fit")
    averaged, _ = ours.tracked(module)  # weights and floating buffers
    floor = [t.detach().clone() for t in averaged]
    numel = sum(t.numel() for t in averaged)
    model_bytes = sum(t.numel() * t.element_size() for t in averaged)
    print(f"\n{title}: {numel / 1e6:.2f}M averaged numbers in {len(averaged)} tensors "
          f"({sum(1 for _ in module.parameters())} weights)")
    medians = round_robin_medians({
        "bare torch._foreach_lerp_": lambda: torch._foreach_lerp_(floor, averaged, 0.001),
        "ModelEMA.update": lambda: ours.update(module),
        "Lightning EMAWeightAveraging": lambda: theirs._average_model.update_parameters(module),
    }, repeats, sync)
    bare, mine, lightning = (medians[k] * 1e3 for k in medians)
    for name, ms in zip(medians, (bare, mine, lightning)):
        print(f"  {name:<30} {ms:9.3f} ms median")
    print(f"  ModelEMA vs bare lerp: {mine / bare:.2f}x the time (target <= 1.2x); "
          f"Lightning vs ModelEMA: {lightning / mine:.2f}x the time (target >= 3x)")
    for name, swap in (("ModelEMA", ours.swap), ("EMAWeightAveraging", theirs._swap_models)):
        total, peak = swap_allocation(lambda swap=swap: (swap(module), swap(module)))
        print(f"  swap in and out, {name:<19}: {total / 1e6:8.2f} MB allocated ({total / model_bytes:7.2%} of the "
              f"model), peak {peak / 1e6:8.2f} MB ({peak / model_bytes:7.2%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=float, default=20e6)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, lightning {L.__version__}, {device}, {args.threads} threads, "
          f"medians of {args.repeats}")
    compare("synthetic", Holder(synthetic(args.numel, args.tensors)).to(device), args.repeats, sync)
    for name in ("resnet", "cnn"):
        net = build_model({"name": name}, (3, 32, 32), 10)
        compare(f"{name} (CIFAR-10 size)", Holder(net).to(device), args.repeats, sync)


if __name__ == "__main__":
    main()

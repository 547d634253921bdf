"""Model EMA update and swap costs, in the same run: ``ModelEMA`` against Lightning's
``EMAWeightAveraging`` and against one bare ``torch._foreach_lerp_`` over the same
tensors (the floor), on 20M fp32 parameters in 200 tensors and on a real small network
(the Adam paper's CNN at CIFAR-10 size). Prints median update times as ratios to the
bare lerp, and the memory a validation swap allocates.

    python benchmarks/bench_ema.py [--repeats 30] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
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
    size = int(numel) // tensors
    return nn.ParameterList([nn.Parameter(torch.randn(size)) for _ in range(tensors)])


def median_ms(fn, repeats: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def allocated_bytes(fn) -> int:
    """Bytes that tensors created during ``fn`` allocate (CPU: summed over ops; CUDA: peak)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def compare(name: str, module: L.LightningModule, repeats: int, sync) -> None:
    params = list(module.parameters())
    numel = sum(p.numel() for p in params)
    ours = ModelEMA(decay=0.999, schedule="fixed", include_buffers=True)
    ours.on_fit_start(SimpleNamespace(optimizers=[]), module)
    theirs = EMAWeightAveraging(decay=0.999)
    theirs.setup(None, module, "fit")
    averages = [p.detach().clone() for p in params]
    currents = [p.detach() for p in params]
    rows = {
        "bare torch._foreach_lerp_ (baseline)": lambda: torch._foreach_lerp_(averages, currents, 0.001),
        "ModelEMA.update": lambda: ours.update(module),
        "Lightning EMAWeightAveraging": lambda: theirs._average_model.update_parameters(module),
    }
    print(f"\n{name}: {numel / 1e6:.1f}M parameters in {len(params)} tensors")
    base = None
    for label, fn in rows.items():
        ms = median_ms(fn, repeats, sync)
        base = base or ms
        print(f"  {label:<40} {ms:8.2f} ms  {ms / base:6.2f}x")
    model_bytes = numel * params[0].element_size()
    swap_ours = allocated_bytes(lambda: (ours.swap(module), ours.swap(module)))
    swap_theirs = allocated_bytes(lambda: (theirs._swap_models(module), theirs._swap_models(module)))
    print(f"  swap in and out, bytes allocated: ModelEMA {swap_ours} ({swap_ours / model_bytes:.2%} of the model), "
          f"EMAWeightAveraging {swap_theirs} ({swap_theirs / model_bytes:.2%})")


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
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, medians of {args.repeats}")
    compare("synthetic", Holder(synthetic(args.numel, args.tensors)).to(device), args.repeats, sync)
    cnn = build_model({"name": "cnn"}, (3, 32, 32), 10)
    compare("Adam-paper CNN (CIFAR-10 size)", Holder(cnn).to(device), args.repeats, sync)


if __name__ == "__main__":
    main()

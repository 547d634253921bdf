"""Model EMA update and swap costs, measured in the same run on the same model: the update
of ``ModelEMA`` (its core's, :class:`lightning_imex.ema.EMA`) against Lightning's
``EMAWeightAveraging`` (its ``AveragedModel.update_parameters``) and against one bare
``torch._foreach_lerp_`` over the same tensors (the floor), on 20M fp32 parameters in 200
tensors and on real small networks (a CIFAR-10 ResNet with BatchNorm buffers, the Adam
paper's CNN). The three updates are timed round-robin, so that load from other processes
falls on all of them alike; medians are printed with ratios to the named baseline. Then the
memory one validation swap (in and out) allocates: bytes, and the peak held at once.

    python benchmarks/bench_ema.py [--repeats 30] [--threads 2] [--device cpu]

Targets (issue 5): >= 3x faster than Lightning's update, <= 1.2x the bare lerp, a swap
allocating under 1% of the model's size.

Offload row (issue 21; CUDA only, on CPU it prints that it is not measured): a training
step of a ResNet-18-like CIFAR network (width 64, 4 stages of 2 blocks, Adam, batch
128) without an EMA (the baseline), with the EMA beside the weights, with
``EMA(device="cpu")`` updated synchronously, and with ``OffloadedEMA`` (side-stream
copies, host-thread average); runs of 20 steps each, timed round-robin, ratios to the
baseline.

Sharded row (issue 21): 2 gloo processes on this machine (1 thread each), the synthetic
model sharded with FSDP2 (``fully_shard``); on each rank the EMA's bytes against the
bytes of the rank's shards, and ``EMA.update`` against a bare ``torch._foreach_lerp_``
over the same local shards, timed round-robin.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from lightning_imex.ema import EMA
from lightning_imex.ema_offload import OffloadedEMA
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
    ours = EMA(module, decay=0.999, schedule="fixed")  # ModelEMA's update and swap are these
    theirs = EMAWeightAveraging(decay=0.999)
    theirs.setup(None, module, "fit")
    averaged = ours.tracked[:ours.n_averaged]  # weights and floating buffers
    floor = [t.detach().clone() for t in averaged]
    numel = sum(t.numel() for t in averaged)
    model_bytes = sum(t.numel() * t.element_size() for t in averaged)
    print(f"\n{title}: {numel / 1e6:.2f}M averaged numbers in {len(averaged)} tensors "
          f"({sum(1 for _ in module.parameters())} weights)")
    medians = round_robin_medians({
        "bare torch._foreach_lerp_": lambda: torch._foreach_lerp_(floor, averaged, 0.001),
        "ModelEMA.update": ours.update,
        "Lightning EMAWeightAveraging": lambda: theirs._average_model.update_parameters(module),
    }, repeats, sync)
    bare, mine, lightning = (medians[k] * 1e3 for k in medians)
    for name, ms in zip(medians, (bare, mine, lightning)):
        print(f"  {name:<30} {ms:9.3f} ms median")
    print(f"  ModelEMA vs bare lerp: {mine / bare:.2f}x the time (target <= 1.2x); "
          f"Lightning vs ModelEMA: {lightning / mine:.2f}x the time (target >= 3x)")
    for name, swap in (("ModelEMA", ours.swap), ("EMAWeightAveraging", lambda: theirs._swap_models(module))):
        total, peak = swap_allocation(lambda swap=swap: (swap(), swap()))
        print(f"  swap in and out, {name:<19}: {total / 1e6:8.2f} MB allocated ({total / model_bytes:7.2%} of the "
              f"model), peak {peak / 1e6:8.2f} MB ({peak / model_bytes:7.2%})")


def offload(device: torch.device, repeats: int, steps: int = 20) -> None:
    """Training steps of a ResNet-18-like network with and without the offloaded EMA."""
    print("\noffloaded EMA (device='cpu') on a ResNet-18-like training step:")
    if device.type != "cuda":
        print("  not measured: the offload overlaps device-to-host copies and a host average with the device's "
              "work, which needs a CUDA device (run with --device cuda)")
        return
    x = torch.randn(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)

    def runner(make_ema):
        torch.manual_seed(0)
        net = build_model({"name": "resnet", "width": 64, "blocks": 2, "stages": 4}, (3, 32, 32), 10).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        ema = make_ema(net)

        def run():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(net(x), y).backward()
                optimizer.step()
                if ema is not None:
                    ema.update()
            if isinstance(ema, OffloadedEMA):
                ema.synchronize()  # its last host average belongs to these steps
        return run

    medians = round_robin_medians({
        "no EMA": runner(lambda net: None),
        "EMA beside the weights": runner(lambda net: EMA(net, 0.999, "fixed")),
        "EMA(device='cpu'), synchronous": runner(lambda net: EMA(net, 0.999, "fixed", device="cpu")),
        "OffloadedEMA": runner(lambda net: OffloadedEMA(net, 0.999, "fixed")),
    }, repeats, torch.cuda.synchronize)
    base = medians["no EMA"]
    for name, seconds in medians.items():
        print(f"  {name:<32} {seconds / steps * 1e3:8.2f} ms a step  {seconds / base:5.2f}x the step without an EMA")


def sharded(numel: float, tensors: int, repeats: int, world: int = 2) -> None:
    """The sharded row: ``world`` forked ranks, each printing through rank 0's queue."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("fork")
    queue = context.SimpleQueue()
    ranks = [context.Process(target=_sharded_rank, args=(rank, world, port, numel, tensors, repeats, queue))
             for rank in range(world)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    print(f"\nsharded (FSDP2, {world} gloo processes, 1 thread each): {numel / 1e6:.0f}M parameters in {tensors} "
          "tensors")
    for rank, medians, ema_bytes, shard_bytes, model_bytes in sorted(queue.get() for _ in range(world)):
        bare, update = medians["bare torch._foreach_lerp_"] * 1e3, medians["EMA.update"] * 1e3
        print(f"  rank {rank}: EMA {ema_bytes / 1e6:.2f} MB = {ema_bytes / shard_bytes:.2f}x its shards' bytes "
              f"({shard_bytes / model_bytes:.2f}x the model's); update {update:.3f} ms vs bare lerp over the local "
              f"shards {bare:.3f} ms: {update / bare:.2f}x")


def _sharded_rank(rank: int, world: int, port: int, numel: float, tensors: int, repeats: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        module = Holder(synthetic(numel, tensors))
        model_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        fully_shard(module, mesh=init_device_mesh("cpu", (world,)))
        ema = EMA(module, decay=0.999, schedule="fixed")
        local = [p.to_local().detach() for p in module.parameters()]
        floor = [t.clone() for t in local]
        medians = round_robin_medians({"bare torch._foreach_lerp_": lambda: torch._foreach_lerp_(floor, local, 0.001),
                                       "EMA.update": ema.update}, repeats, lambda: None)
        ema_bytes = sum(t.numel() * t.element_size() for t in ema.shadow)
        queue.put((rank, medians, ema_bytes, sum(t.numel() * t.element_size() for t in local), model_bytes))
    finally:
        dist.destroy_process_group()


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
    offload(device, args.repeats)
    sharded(args.numel, args.tensors, args.repeats)


if __name__ == "__main__":
    main()

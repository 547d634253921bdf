"""Trains a small model with every optimizer configuration under FSDP2 (``fully_shard``,
DTensor parameters) on 2 gloo CPU processes and, on each rank, a non-sharded copy in one
process, then writes how far apart they end: ``python tests/fsdp2_run.py OUT.json``.
Run by test_fsdp2.py; it starts both ranks itself (forked, so imports are paid once).

Both ranks see the same full batch, so FSDP2's averaged gradient, (g + g) / 2, is the
one-process gradient exactly. Layer sizes do not divide by 2 (uneven shards) and the
last layer has one output, so rank 1 holds empty shards of its weight and bias. The
configurations with 8-bit and bfloat16 state train a wider model (:func:`make_model`)
whose two largest weights are quantized in blocks.

OUT.json maps "NAME/fused=BOOL" to {"param": max |FSDP2 - one process| over the full
parameters (gathered with ``full_tensor``), "local": the same over every rank's local
shards of the parameters and both optimizer state buffers against the matching slices
of the one-process run (8-bit scales: the blocks of the rank's shard), "moved": max
|final - initial| of the one-process run, "state_dtypes": the dtype of the first moment
of each weight of two blocks or more, "seconds"}, plus "clip_active" for
ClippedAdam(clip="global") and max_grad_norm: whether clipping changed the one-process
result. A configuration that raised has {"error": traceback} instead; fused=True without
a C compiler has {"skipped": reason}. "shard_offsets" holds :func:`shard_offset_checks`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lightning_imex.optim import AdaMax, AdaMomentum, ClippedAdam, IMEXAdam
from lightning_imex.optim.program import QUANT_BLOCK, quant_blocks

WORLD = 2
STEPS = 5

CONFIGS = {
    "imex_euler": lambda ps, fused: IMEXAdam(ps, lr=0.02, tableau="euler", fused=fused),
    "imex_trapezoidal": lambda ps, fused: IMEXAdam(ps, lr=0.02, tableau="trapezoidal", fused=fused),
    "imex_trapezoidal_reuse": lambda ps, fused: IMEXAdam(ps, lr=0.02, tableau="trapezoidal", reuse_gradient=True,
                                                         fused=fused),
    "imex_ssp3_433": lambda ps, fused: IMEXAdam(ps, lr=0.02, tableau="ssp3_433", fused=fused),
    "adamax": lambda ps, fused: AdaMax(ps, lr=0.02, fused=fused),
    "adamomentum": lambda ps, fused: AdaMomentum(ps, lr=0.02, fused=fused),
    "clipped_coordinate": lambda ps, fused: ClippedAdam(ps, lr=0.02, clip="coordinate", max_update=0.01, fused=fused),
    # the update's norm is about lr * sqrt(1 / (1 - b2)) * sqrt(numel) ~ 5: clipped to 0.05 every step
    "clipped_global": lambda ps, fused: ClippedAdam(ps, lr=0.02, clip="global", max_update=0.05, fused=fused),
    # one group mixing layouts: sharded parameters and one left whole (FSDP2's ignored_params)
    "clipped_global_mixed": lambda ps, fused: ClippedAdam(ps, lr=0.02, clip="global", max_update=0.05, fused=fused),
    # the gradient's global norm, over the ranks' shards; eps=0.01 makes the update depend on its scale
    "imex_max_grad_norm": lambda ps, fused: IMEXAdam(ps, lr=0.1, eps=0.01, tableau="trapezoidal", fused=fused,
                                                     max_grad_norm=0.02),
    # 8-bit moments (on the wide model: weights whose shards are whole quantization blocks)
    "imex_trapezoidal_8bit": lambda ps, fused: IMEXAdam(ps, lr=0.02, tableau="trapezoidal", state_dtype="8bit",
                                                        fused=fused),
    "adamomentum_bf16": lambda ps, fused: AdaMomentum(ps, lr=0.02, state_dtype="bfloat16", fused=fused),
}
MIXED = "clipped_global_mixed"
WIDE = ("imex_trapezoidal_8bit", "adamomentum_bf16")


def make_model(wide: bool = False) -> nn.Module:
    """The network; ``wide``: with a (64, 8) and a (16, 64) weight, whose shards (rows split
    in two) are 1 and 2 whole blocks of QUANT_BLOCK elements, starting on a block
    boundary of the whole weight (8-bit state quantizes each shard's blocks: the same
    blocks as one process then)."""
    torch.manual_seed(0)
    if wide:
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 16), nn.Tanh(),
                             nn.Linear(16, 3), nn.Tanh(), nn.Linear(3, 1))
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, generator=g)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def train(model: nn.Module, make_optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.optim.Optimizer:
    opt = make_optimizer(list(model.parameters()))

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(STEPS):
        opt.step(closure)
    return opt


def local_slice(full: torch.Tensor, like) -> torch.Tensor:
    """The part of ``full`` that this rank holds of the DTensor ``like`` (FSDP2 shards
    dim 0 with torch.chunk semantics: later ranks may get fewer rows, or none)."""
    (placement,) = like.placements
    chunks = list(torch.chunk(full, WORLD, dim=placement.dim))
    rank = like.device_mesh.get_local_rank()
    if rank < len(chunks):
        return chunks[rank]
    shape = list(full.shape)
    shape[placement.dim] = 0
    return full.new_empty(shape)


def local_blocks(full_scales: torch.Tensor, like) -> torch.Tensor:
    """The scales of full_scales' 8-bit blocks that this rank's shard of the DTensor
    ``like`` holds (sharded on dim 0, its shard starting on a block boundary)."""
    (placement,) = like.placements
    assert placement.dim == 0, placement
    rank = like.device_mesh.get_local_rank()
    rows = sum(len(chunk) for chunk in torch.chunk(torch.empty(like.shape[0]), WORLD)[:rank])
    start = rows * math.prod(like.shape[1:])
    assert start % QUANT_BLOCK == 0, f"shard of {tuple(like.shape)} starts inside a block, at element {start}"
    return full_scales[start // QUANT_BLOCK:][:quant_blocks(like.to_local().numel())]


def state_tensors(opt: torch.optim.Optimizer, params) -> list[list[tuple[str, torch.Tensor]]]:
    return [[(k, v) for k, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor) and v.dim() > 0]
            for p in params]


def run_config(name: str, fused: bool, x, y) -> dict[str, float | bool | list[str]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = make_model(wide=name in WIDE)
    reference = copy.deepcopy(base)
    initial = [p.detach().clone() for p in base.parameters()]
    mesh = init_device_mesh("cpu", (WORLD,))
    layout = {}
    if name == MIXED:
        from torch.distributed.tensor import Shard

        # FSDP2 shards dim 1 only evenly
        layout = {"shard_placement_fn": lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % WORLD == 0 else Shard(0)}
    linears = [layer for layer in base if isinstance(layer, nn.Linear)]
    for layer in linears if name != MIXED else linears[:-1]:
        fully_shard(layer, mesh=mesh, **layout)
    ignored = {linears[-1].bias} if name == MIXED else None
    sharded = fully_shard(base, mesh=mesh, ignored_params=ignored, **layout)

    fsdp_opt = train(sharded, lambda ps: CONFIGS[name](ps, fused), x, y)
    ref_opt = train(reference, lambda ps: CONFIGS[name](ps, fused), x, y)

    local, state_dtypes = 0.0, []
    sharded_params, ref_params = list(sharded.parameters()), list(reference.parameters())
    for p, r, ps, rs in zip(sharded_params, ref_params, state_tensors(fsdp_opt, sharded_params),
                            state_tensors(ref_opt, ref_params)):
        if name == MIXED and type(p).__name__ != "DTensor":  # the ignored bias: compared whole
            local = max(local, (p.detach() - r.detach()).abs().max().item())
            continue
        assert type(p).__name__ == "DTensor", type(p)
        assert [k for k, _ in ps] == [k for k, _ in rs] and len(ps) in (2, 4), ([k for k, _ in ps], [k for k, _ in rs])
        if p.numel() >= 2 * QUANT_BLOCK:  # the wide model's weights
            state_dtypes.append(str(ps[0][1].dtype).removeprefix("torch."))
        for a, b in [(p, r), *((mine, theirs) for (_, mine), (_, theirs) in zip(ps, rs))]:
            if type(a).__name__ == "DTensor":
                mine, theirs = a.to_local().detach(), local_slice(b.detach(), a)
            else:  # 8-bit scales: one per block of this rank's shard
                mine, theirs = a, local_blocks(b, p)
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, (mine.shape, theirs.shape)
            if mine.numel():  # (uint8 codes: their difference as numbers)
                local = max(local, (mine.float() - theirs.float()).abs().max().item())
    worst = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)

    full = max(((p.full_tensor() if hasattr(p, "full_tensor") else p).detach() - r.detach()).abs().max().item()
               for p, r in zip(sharded_params, ref_params))
    moved = max((r.detach() - i).abs().max().item() for r, i in zip(ref_params, initial))
    result: dict[str, float | bool | list[str]] = {"param": full, "local": worst.item(), "moved": moved,
                                                   "state_dtypes": state_dtypes}
    if name.startswith("clipped_global"):
        unclipped = copy.deepcopy(make_model())
        train(unclipped, lambda ps: ClippedAdam(ps, lr=0.02, clip="global", max_update=1e9, fused=fused), x, y)
        gap = max((u.detach() - r.detach()).abs().max().item()
                  for u, r in zip(unclipped.parameters(), ref_params))
        result["clip_active"] = gap > 1e-3
    if name == "imex_max_grad_norm":
        unclipped = copy.deepcopy(make_model())
        train(unclipped, lambda ps: IMEXAdam(ps, lr=0.1, eps=0.01, tableau="trapezoidal", fused=fused), x, y)
        result["clip_active"] = max((u.detach() - r.detach()).abs().max().item()
                                    for u, r in zip(unclipped.parameters(), ref_params)) > 1e-3
    return result


def shard_offset_checks() -> dict[str, bool | str]:
    """kernel.shard_offset on this rank: for tensors holding each element's offset in the
    whole tensor, sharded on dim 0 (uneven rows, an empty shard, channels_last, a 2-D mesh
    sharding dim 0 twice or replicating it), it is the first local element's value; a
    column shard is refused by an optimizer with bfloat16 state, before the parameter moves."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from lightning_imex.optim.kernel import shard_offset

    line, flat = init_device_mesh("cpu", (WORLD,)), init_device_mesh("cpu", (1, WORLD))
    cases = [((5, 3), line, [Shard(0)]), ((1, 3), line, [Shard(0)]), ((7, 2), flat, [Shard(0), Shard(0)]),
             ((7, 2), flat, [Replicate(), Shard(0)]), ((3, 2, 2, 2), line, [Shard(0)])]
    offsets_match = True
    for shape, mesh, placements in cases:
        full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
        if len(shape) == 4:
            full = full.contiguous(memory_format=torch.channels_last)
        local = distribute_tensor(full, mesh, placements)
        first = local.to_local()
        # channels_last: an element's value is its row-major offset, the first row's too
        expected = first.flatten()[0].item() if first.numel() else None
        offsets_match &= expected is None or shard_offset(local) == expected
    p = nn.Parameter(distribute_tensor(torch.randn(4, 4), line, [Shard(1)]))
    p.grad = torch.ones_like(p)
    before = p.detach().to_local().clone()
    try:
        AdaMomentum([p], lr=0.1, state_dtype="bfloat16").step()
        refusal = ""
    except ValueError as error:
        refusal = str(error)
    every_rank = torch.tensor([int(offsets_match)])
    dist.all_reduce(every_rank, op=dist.ReduceOp.MIN)
    return {"offsets_match": bool(every_rank.item()), "refusal": refusal,
            "unchanged": bool(torch.equal(p.detach().to_local(), before))}


def compiled_available() -> str | None:
    """Why fused=True cannot run here (no C compiler), or None."""
    from lightning_imex.optim.cpu_backend import BACKEND

    return None if BACKEND.available(torch.device("cpu"), torch.float32) else "no C compiler for the CPU kernels"


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)  # two ranks on a small machine
    # a rank left waiting in a collective (the other failed) errs instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        x, y = make_data()
        no_compiled = compiled_available()
        results: dict[str, dict] = {}
        for name in CONFIGS:
            for fused in (False, True):
                key = f"{name}/fused={fused}"
                if fused and no_compiled:
                    results[key] = {"skipped": no_compiled}
                    continue
                start = time.perf_counter()
                try:
                    results[key] = run_config(name, fused, x, y)
                    results[key]["seconds"] = round(time.perf_counter() - start, 3)
                except Exception as error:  # noqa: BLE001  (recorded: one broken path does not hide the others)
                    results[key] = {"error": f"rank {rank}: {traceback.format_exc()[-4000:]}"}
                    print(f"{key}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        results["shard_offsets"] = shard_offset_checks()
        if rank == 0:
            Path(out).write_text(json.dumps(results, indent=1))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    # Imported once here and forked: the ranks do not each pay seconds of imports.
    import torch._dynamo  # FSDP2 imports it on first use
    import torch.distributed.fsdp
    import torch.distributed.tensor

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(worker, args=(free_port(), sys.argv[1]), nprocs=WORLD, join=True, start_method=method)

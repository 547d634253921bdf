"""Whole training step (forward, backward, optimizer step with a closure) per gradient
evaluation, on real networks, as a ratio to torch.optim.Adam(fused=True) in the same run.

Networks: "resnet18", a ResNet-18 for 32x32 images (``lightning_imex.models.ResNet`` with
width 64 and four stages of two basic blocks, 11M parameters, 10 classes), and
"transformer", ``torch.nn.TransformerEncoder`` (6 layers, d_model 512, 8 heads, sequence
128) between a token embedding and a next-token-style head over a 1,024-token vocabulary.
Rows: torch Adam fused (the baseline, measured first and again last to show the drift of
the machine), IMEXAdam euler / trapezoidal / trapezoidal reuse_gradient / ssp3_433,
AdaMax, AdaMomentum, ClippedAdam coordinate / global, all on their default path
(``fused=None``).

    python benchmarks/bench_step.py --device cpu                  # small CPU run (batch 8)
    python benchmarks/bench_step.py --device cpu --only 'resnet18 IMEXAdam (euler|trap)'
    python benchmarks/bench_step.py --device cuda --batch 256 --amp bf16 --channels-last --steps 20

Columns: gradient evaluations per step (closure calls counted during the timed steps),
median ms per step over ``--steps`` timed steps (after the first step and ``--warmup``
more), median ms per gradient evaluation, its ratio to the baseline's, and the first step
in seconds (it includes any compilation of the optimizer's fused path). Every optimizer
starts from the same weights; the batch is random and fixed. Each row is printed as soon
as it is measured; a row that raises prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import re
import statistics
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench_optim import seconds  # the script's folder is on sys.path

from lightning_imex.models import ResNet
from lightning_imex.optim import AdaMax, AdaMomentum, ClippedAdam, IMEXAdam

# Row label -> builder of the optimizer over the given parameters.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "IMEXAdam euler": partial(IMEXAdam, tableau="euler"),
    "IMEXAdam trapezoidal": partial(IMEXAdam, tableau="trapezoidal"),
    "IMEXAdam trapezoidal reuse_gradient": partial(IMEXAdam, tableau="trapezoidal", reuse_gradient=True),
    "IMEXAdam ssp3_433": partial(IMEXAdam, tableau="ssp3_433"),
    "AdaMax": AdaMax,
    "AdaMomentum": AdaMomentum,
    "ClippedAdam coordinate": partial(ClippedAdam, clip="coordinate"),
    "ClippedAdam global": partial(ClippedAdam, clip="global"),
}
VOCABULARY, SEQUENCE = 1024, 128


def fused_adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, fused=True)


class TokenTransformer(nn.Module):
    """Token embedding plus learned positions, a 6-layer encoder, a linear head per token."""

    def __init__(self, d_model: int = 512, heads: int = 8, layers: int = 6) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, d_model)
        self.positions = nn.Parameter(torch.zeros(SEQUENCE, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, VOCABULARY)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embedding(tokens) + self.positions))


@dataclass
class Workload:
    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor

    def loss(self) -> Tensor:
        logits = self.model(self.inputs)
        return F.cross_entropy(logits.flatten(0, -2).float(), self.targets.flatten())


def resnet18(batch: int, device: str, channels_last: bool) -> Workload:
    model = ResNet((3, 32, 32), 10, width=64, blocks=2, stages=4).to(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    return Workload("resnet18", model, images, torch.randint(0, 10, (batch,), device=device))


def transformer(batch: int, device: str, channels_last: bool) -> Workload:
    tokens = torch.randint(0, VOCABULARY, (batch, SEQUENCE), device=device)
    targets = torch.randint(0, VOCABULARY, (batch, SEQUENCE), device=device)
    return Workload("transformer", TokenTransformer().to(device), tokens, targets)


NETWORKS = {"resnet18": resnet18, "transformer": transformer}


def time_training(workload: Workload, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                  sync: Callable[[], None]) -> tuple[float, float, float]:
    """(first step s, median ms per timed step, closure calls per timed step)."""
    closure_calls = 0

    def closure() -> Tensor:
        nonlocal closure_calls
        closure_calls += 1
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = workload.loss()
        loss.backward()
        return loss

    def step() -> None:
        optimizer.step(closure)

    first_step = seconds(step, sync)
    for _ in range(args.warmup):
        step()
    closure_calls = 0
    times = [seconds(step, sync) for _ in range(args.steps)]
    return first_step, statistics.median(times) * 1e3, closure_calls / args.steps


HEADER = f"{'optimizer':38s} {'grads':>6s} {'ms/step':>9s} {'ms/grad':>9s} {'ratio/grad':>10s} {'first step s':>12s}"


def one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:120]


def measure_row(label: str, build: Callable, workload: Workload, initial: dict[str, Tensor],
                baseline_ms_per_gradient: float | None, args: argparse.Namespace,
                sync: Callable[[], None]) -> float | None:
    """Print one row, started from the ``initial`` weights; return its ms per gradient
    evaluation (None if it raised: the error is printed and the run goes on)."""
    workload.model.load_state_dict(initial)
    try:
        first_step, ms_per_step, gradients = time_training(workload, build(workload.model.parameters()), args, sync)
        ms_per_gradient = ms_per_step / gradients
    except Exception as error:  # report and go on: one broken row must not end the run
        print(f"{label:38s} error: {one_line(error)}", flush=True)
        return None
    reference = ms_per_gradient if baseline_ms_per_gradient is None else baseline_ms_per_gradient
    print(f"{label:38s} {gradients:6.2g} {ms_per_step:9.1f} {ms_per_gradient:9.1f} "
          f"{ms_per_gradient / reference:10.2f} {first_step:12.2f}", flush=True)
    return ms_per_gradient


def benchmark(workload: Workload, chosen: dict[str, Callable], args: argparse.Namespace,
              sync: Callable[[], None]) -> None:
    """The baseline, the chosen optimizers with ratios to it, the baseline again."""
    initial = {name: value.clone() for name, value in workload.model.state_dict().items()}
    baseline = measure_row("torch Adam fused (baseline)", fused_adam, workload, initial, None, args, sync)
    if baseline is None:
        print("the baseline failed: no ratios to report", flush=True)
        return
    for label, build in chosen.items():
        measure_row(label, build, workload, initial, baseline, args, sync)
    measure_row("torch Adam fused (again)", fused_adam, workload, initial, baseline, args, sync)


def describe(workload: Workload, args: argparse.Namespace) -> str:
    numel = sum(p.numel() for p in workload.model.parameters())
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    layout = ", channels_last" if args.channels_last and workload.name == "resnet18" else ""
    return (f"{workload.name}: {numel / 1e6:.1f}M params, batch {args.batch}, amp {args.amp}{layout}, "
            f"{where}, torch {torch.__version__}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (ResNet)")
    parser.add_argument("--amp", choices=["bf16", "none"], default="none", help="bfloat16 autocast")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first one")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="run only rows whose 'network optimizer' matches, e.g. 'transformer.*ssp3' "
                             "(the baseline of a network with a chosen row always runs)")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for network, build_workload in NETWORKS.items():
        chosen = {label: build for label, build in OPTIMIZERS.items()
                  if args.only is None or re.search(args.only, f"{network} {label}")}
        if not chosen:
            continue
        torch.manual_seed(0)
        workload = build_workload(args.batch, args.device, args.channels_last)
        print(describe(workload, args))
        print(HEADER, flush=True)
        benchmark(workload, chosen, args, sync)
        print()


if __name__ == "__main__":
    main()

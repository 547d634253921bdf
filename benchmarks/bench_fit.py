"""What the Lightning glue costs in whole Lightning fits, as ratios to baselines measured
in the same run.

Every configuration is a LightningModule with the same network (same initial weights)
and the same ``training_step`` (cross-entropy, ``self.log("train_loss", ...)``):

- ``plain+torch_fused_adam``: a plain ``L.LightningModule`` with
  ``torch.optim.Adam(fused=True)`` (torch's default Adam where this torch has no fused
  kernel for the device): the baseline of ``imexmodule+euler``.
- ``imexmodule+euler``: an ``IMEXModule`` subclass with IMEXAdam(tableau="euler"), which
  is Adam: the module's cost on top (its config-built optimizer and default parameter
  groups, its ``optimizer_step``, and its clipping hook, which with clipping off still
  takes the global gradient norm to check for non-finite gradients).
- ``plain+imex_trapezoidal``: a plain ``L.LightningModule`` returning
  ``IMEXAdam(tableau="trapezoidal")``, two gradient evaluations per step (the package's
  closure adapter makes that correct in any LightningModule): the baseline of
- ``imexmodule+trapezoidal``: the same optimizer in an ``IMEXModule``; compared per
  gradient evaluation, the module's bookkeeping.
- ``imexmodule+euler+clip``: ``imexmodule+euler`` with norm clipping at 1.0 through the
  module's hook: what the clip adds to the norm and the non-finite check.

Data: random CIFAR-size batches (3x32x32, 10 classes) made on the device once. A callback
times the optimizer steps after the ``--warmup`` ones (with ``torch.cuda.synchronize``
on CUDA), so Trainer setup and first-step costs (kernel compilation) are left out.
``--rounds`` interleaved rounds run every configuration once each, in an order rotated
per round, so machine drift hits all alike. The table gives each configuration's median
over the rounds (ms per optimizer step and per gradient evaluation) and the rounds' own
values; each ratio line gives the ratio of medians, its target, and the per-round ratios.
Machines are noisy: read the ratios, not the absolute times.

    python benchmarks/bench_fit.py                      # cuda if available: resnet18, batch 256, bf16-mixed
    python benchmarks/bench_fit.py --device cuda --channels-last --json fit.json
    python benchmarks/bench_fit.py --device cuda --logger csv   # with a CSVLogger, log_every_n_steps=50
    python benchmarks/bench_fit.py --device cpu --model mlp --steps 30 --rounds 2
    python benchmarks/bench_fit.py --device cpu --model resnet18 --steps 3 --warmup 1 --batch 8 --rounds 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from lightning_imex import IMEXModule
from lightning_imex.models import build_model
from lightning_imex.optim import IMEXAdam

LR = 1e-3
IMAGE, CLASSES = (3, 32, 32), 10
POOL = 8  # distinct random batches, cycled through
MODELS = {  # --model -> lightning_imex.models config
    "resnet18": {"name": "resnet", "width": 64, "blocks": 2, "stages": 4},  # CIFAR-style ResNet-18, 11M params
    "mlp": {"name": "mlp", "hidden": [256, 256]},
}
BASELINE, EULER = "plain+torch_fused_adam", "imexmodule+euler"
PLAIN_TRAPEZOIDAL, TRAPEZOIDAL, CLIP = "plain+imex_trapezoidal", "imexmodule+trapezoidal", "imexmodule+euler+clip"


class Classifier:
    """The network and training step every configuration shares; put it before the
    LightningModule base. Counts gradient evaluations (``training_step`` calls)."""

    def __init__(self, net: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = net
        self.gradient_evaluations = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.log("train_loss", loss)
        self.gradient_evaluations += 1
        return loss


class PlainModule(Classifier, L.LightningModule):
    """A plain LightningModule whose ``configure_optimizers`` returns ``optimizer(self.parameters())``."""

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer]) -> None:
        super().__init__(net)
        self.build_optimizer = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.build_optimizer(self.parameters())


class IMEXClassifier(Classifier, IMEXModule):
    """An ``IMEXModule`` subclass; keywords after the network go to ``IMEXModule``."""


def fused_adam_supported(device: str) -> bool:
    """Whether this torch has a fused Adam kernel for ``device`` (CPU: torch 2.4+)."""
    try:
        torch.optim.Adam([nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except RuntimeError:
        return False
    return True


def configurations(fused: bool) -> dict[str, Callable[[nn.Module], L.LightningModule]]:
    """Configuration name -> the LightningModule around a given network; ``fused``: the
    baseline's Adam is torch's fused one."""
    euler = {"name": "imex_adam", "lr": LR, "tableau": "euler"}
    trapezoidal = {"name": "imex_adam", "lr": LR, "tableau": "trapezoidal"}
    return {
        BASELINE: lambda net: PlainModule(net, lambda ps: torch.optim.Adam(ps, lr=LR, fused=fused or None)),
        EULER: lambda net: IMEXClassifier(net, optimizer=euler),
        PLAIN_TRAPEZOIDAL: lambda net: PlainModule(net, lambda ps: IMEXAdam(ps, lr=LR, tableau="trapezoidal")),
        TRAPEZOIDAL: lambda net: IMEXClassifier(net, optimizer=trapezoidal),
        CLIP: lambda net: IMEXClassifier(net, optimizer=euler, clipping={"algorithm": "norm", "threshold": 1.0}),
    }


class StepTimer(L.Callback):
    """Wall time and gradient evaluations from the start of optimizer step ``first`` to
    the end of the fit's last step."""

    def __init__(self, first: int, sync: Callable[[], None]) -> None:
        self.first, self.sync = first, sync
        self.start = self.end = None
        self.evaluations_at_start = self.evaluations = 0

    def on_train_batch_start(self, trainer: L.Trainer, module: Classifier, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.first:
            self.sync()
            self.start = time.perf_counter()
            self.evaluations_at_start = module.gradient_evaluations

    def on_train_batch_end(self, trainer: L.Trainer, module: Classifier, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == trainer.max_steps:
            self.sync()
            self.end = time.perf_counter()
            self.evaluations = module.gradient_evaluations - self.evaluations_at_start


class RandomBatches:
    """One epoch of ``length`` batches cycling through ``POOL`` random ones made on the
    device once (an iterable that Lightning takes for a dataloader)."""

    def __init__(self, args: argparse.Namespace) -> None:
        generator = torch.Generator(args.device).manual_seed(0)
        images = torch.randn(POOL, args.batch, *IMAGE, device=args.device, generator=generator)
        labels = torch.randint(0, CLASSES, (POOL, args.batch), device=args.device, generator=generator)
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.pool = [(images[i].contiguous(memory_format=memory_format), labels[i]) for i in range(POOL)]
        self.length = args.warmup + args.steps

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return (self.pool[i % POOL] for i in range(self.length))


def timed_fit(module: Classifier, batches: RandomBatches, args: argparse.Namespace,
              log_dir: str | None) -> tuple[float, float]:
    """(ms per optimizer step, gradient evaluations per step) over the measured steps."""
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    timer = StepTimer(args.warmup, sync)
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=args.precision,
                        logger=CSVLogger(log_dir) if log_dir else False, log_every_n_steps=50,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        max_steps=args.warmup + args.steps, num_sanity_val_steps=0, callbacks=[timer],
                        default_root_dir=log_dir)
    trainer.fit(module, batches)
    if timer.start is None or timer.end is None:
        raise RuntimeError(f"the fit stopped at step {trainer.global_step} before the measured steps ended")
    return (timer.end - timer.start) * 1e3 / args.steps, timer.evaluations / args.steps


@dataclass
class Row:
    config: str
    gradient_evaluations_per_step: float
    ms_per_step: float  # median over the rounds
    ms_per_gradient: float
    ms_per_step_rounds: list[float]


def benchmark(args: argparse.Namespace, fused: bool, log_dir: str | None) -> list[Row]:
    """Every configuration once per round, the order rotated by one each round."""
    torch.manual_seed(0)
    net = build_model(MODELS[args.model], IMAGE, CLASSES).to(args.device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    batches = RandomBatches(args)
    configs = configurations(fused)
    names = list(configs)
    times: dict[str, list[float]] = {name: [] for name in names}
    evaluations: dict[str, float] = {}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            ms, evaluations[name] = timed_fit(configs[name](copy.deepcopy(net)), batches, args, log_dir)
            times[name].append(ms)
            print(f"  round {round_ + 1}: {name:24s} {ms:9.2f} ms/step", flush=True)
    rows = []
    for name in names:
        median = statistics.median(times[name])
        rows.append(Row(name, evaluations[name], median, median / evaluations[name], times[name]))
    return rows


def ratio_lines(rows: list[Row]) -> list[dict[str, Any]]:
    """The issue's ratios of medians (per optimizer step or per gradient evaluation),
    each with its target and the per-round ratios."""
    by_name = {row.config: row for row in rows}
    lines = []
    for numerator, denominator, per_gradient, target in ((EULER, BASELINE, False, 1.02),
                                                         (TRAPEZOIDAL, PLAIN_TRAPEZOIDAL, True, 1.02),
                                                         (CLIP, EULER, False, None)):
        top, bottom = by_name[numerator], by_name[denominator]
        scale = bottom.gradient_evaluations_per_step / top.gradient_evaluations_per_step if per_gradient else 1.0
        lines.append({"ratio": f"{numerator} / {denominator}", "per": "gradient" if per_gradient else "step",
                      "median": top.ms_per_step / bottom.ms_per_step * scale, "target": target,
                      "rounds": [a / b * scale for a, b in zip(top.ms_per_step_rounds, bottom.ms_per_step_rounds)]})
    return lines


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as cpuinfo:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "CPU")


def describe(args: argparse.Namespace, fused: bool) -> str:
    layout = ", channels_last" if args.channels_last else ""
    adam = "fused" if fused else "torch's default (no fused kernel for this device)"
    return (f"{device_name(args.device)} ({args.device}) | torch {torch.__version__}, lightning {L.__version__}, "
            f"threads {torch.get_num_threads()} | {args.model}, batch {args.batch}, {args.precision}{layout}, "
            f"logger {args.logger}, baseline Adam {adam} | steps {args.steps} after {args.warmup} warm-up, "
            f"rounds {args.rounds}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=list(MODELS), default=None, help="default: resnet18 on cuda, mlp on cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on cuda, 64 on cpu")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default=None,
                        help="default: bf16-mixed on cuda, 32-true on cpu (16-mixed's GradScaler cannot run "
                             "a trapezoidal step)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last network and images")
    parser.add_argument("--steps", type=int, default=None, help="measured optimizer steps (default: 100 on cuda, "
                                                                "50 on cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before the measured ones (default: 20 on "
                                                                 "cuda, 10 on cpu)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--logger", choices=["none", "csv"], default="none",
                        help="csv: a CSVLogger (log_every_n_steps=50) in a temporary folder")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on cpu")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows and ratios as JSON")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    defaults = {"model": ("resnet18", "mlp"), "batch": (256, 64), "precision": ("bf16-mixed", "32-true"),
                "steps": (100, 50), "warmup": (20, 10)}
    for name, (on_cuda, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
    return args


def main() -> None:
    args = parse_arguments()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: ..." per fit
    fused = fused_adam_supported(args.device)
    description = describe(args, fused)
    print(description, flush=True)
    with tempfile.TemporaryDirectory() as log_dir:
        rows = benchmark(args, fused, log_dir if args.logger == "csv" else None)
    ratios = ratio_lines(rows)
    print(f"\n{'config':24s} {'grads/step':>10s} {'ms/step':>9s} {'ms/grad':>9s}  ms/step per round")
    for row in rows:
        print(f"{row.config:24s} {row.gradient_evaluations_per_step:10.2f} {row.ms_per_step:9.2f} "
              f"{row.ms_per_gradient:9.2f}  {' '.join(f'{ms:.2f}' for ms in row.ms_per_step_rounds)}")
    print()
    for line in ratios:
        target = f"  (target <= {line['target']})" if line["target"] is not None else ""
        print(f"{line['ratio']} per {line['per']}: {line['median']:.3f}{target}  "
              f"rounds: {' '.join(f'{r:.3f}' for r in line['rounds'])}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"setup": description, "arguments": vars(args), "rows": [asdict(row) for row in rows],
                       "ratios": ratios}, file, indent=1)


if __name__ == "__main__":
    main()

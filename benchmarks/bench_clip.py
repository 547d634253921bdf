"""What global-norm gradient clipping costs on top of an optimizer step: each variant's
median step time as a ratio to the same optimizer's step alone, measured in the same run.

Variants, per optimizer and path:

- ``step``: the step alone (the baseline of its rows);
- ``clip_grad_norm_ + step``: ``torch.nn.utils.clip_grad_norm_`` after the gradients, then
  the step (the gradients are read by the norm, read and written by the scaling, read by
  the step);
- ``max_grad_norm``: our optimizers' clipping inside the step (one reduction over the
  gradients, the factor applied where the step reads them: docs/optimizer-core.md);
- ``hook``: ``lightning_imex.clipping.clip_gradients`` with ``algorithm="norm"`` (what the
  Lightning hook runs; non-finite policy ``raise``, which on a CPU reads the norm back),
  then the step: the fused path for our optimizers, torch's for torch's.

    python benchmarks/bench_clip.py                          # 20M params in 200 flat tensors, 2 threads
    python benchmarks/bench_clip.py --numel 2e6 --repeats 5  # quicker
    python benchmarks/bench_clip.py --device cuda --shapes gpt2 --dtype bfloat16

The timed work is the optimizer's and the clipping's: the closure only puts stored
gradients back into ``.grad`` (clipping in place shrinks them to the threshold once; the
work per step does not depend on the values). The variants of one optimizer are timed
round-robin, each on its own tensors; the columns: median ms over ``--repeats`` steps,
its ratio to the same optimizer's step alone, and the first step in seconds.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from bench_optim import DTYPES, argument_parser, describe, one_line, parameter_shapes, round_robin
from lightning_imex.clipping import clip_gradients
from lightning_imex.optim import AdaMax, ClippedAdam, IMEXAdam

OPTIMIZERS: list[tuple[str, Callable[..., torch.optim.Optimizer], dict[str, Any]]] = [
    ("IMEXAdam euler", IMEXAdam, {"tableau": "euler"}),
    ("IMEXAdam trapezoidal", IMEXAdam, {"tableau": "trapezoidal"}),
    ("AdaMax", AdaMax, {}),
    ("ClippedAdam global", ClippedAdam, {"clip": "global"}),
]
PATHS = {"default": None, "eager": False}
VARIANTS = ("step", "clip_grad_norm_ + step", "max_grad_norm", "hook")


class ClipThenStep:
    """``optimizer.step`` whose closure clips after putting the gradients back."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip: Callable[[], None]) -> None:
        self.optimizer, self.clip = optimizer, clip

    def step(self, closure: Callable[[], Any]) -> Any:
        def clipped() -> Any:
            loss = closure()
            self.clip()
            return loss

        return self.optimizer.step(clipped)


@dataclass
class Row:
    optimizer: str
    path: str
    variant: str
    median_ms: float | None = None
    ratio_to_step: float | None = None
    first_step_s: float | None = None
    error: str | None = None


def build(variant: str, make: Callable[..., torch.optim.Optimizer], params: list[Tensor],
          threshold: float) -> Any:
    if variant == "max_grad_norm":
        return make(params, max_grad_norm=threshold)
    optimizer = make(params)
    if variant == "clip_grad_norm_ + step":
        return ClipThenStep(optimizer, lambda: torch.nn.utils.clip_grad_norm_(params, threshold))
    if variant == "hook":
        holder = nn.ParameterList(params)  # the module the hook names parameters from
        config = {"algorithm": "norm", "threshold": threshold, "log": False}
        return ClipThenStep(optimizer, lambda: clip_gradients(holder, optimizer, config))
    return optimizer


def parse_arguments() -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--threshold", type=float, default=1.0, help="max_norm (below the gradients' norm)")
    parser.add_argument("--only", default=None, metavar="REGEX", help="optimizers whose 'label path' matches")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    return parser.parse_args()


def timed_rows(label: str, path: str, make: Callable[..., torch.optim.Optimizer], variants: list[str],
               args: argparse.Namespace, shapes: list[tuple[int, ...]], sync: Callable[[], None]) -> list[Row]:
    """One optimizer on one path, every variant on its own tensors, timed round-robin (one
    step of each in turn), so that load from other processes falls on all of them alike."""
    dtype = DTYPES[args.dtype]
    rows, steppers, refills = [], [], []
    for variant in variants:
        params = [nn.Parameter(torch.randn(s, device=args.device, dtype=dtype)) for s in shapes]
        grads = [torch.randn(s, device=args.device, dtype=dtype) for s in shapes]

        def refill(params=params, grads=grads) -> float:
            for p, g in zip(params, grads):
                p.grad = g
            return 0.0

        rows.append(Row(label, path, variant))
        steppers.append(build(variant, make, params, args.threshold))
        refills.append(refill)
    for row, (first_step, ms) in zip(rows, round_robin(steppers, refills, args.repeats, args.warmup, sync)):
        row.first_step_s, row.median_ms = first_step, ms
        row.ratio_to_step = ms / rows[0].median_ms
    return rows


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = parameter_shapes(args.shapes, int(args.numel), args.tensors)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    description = describe(shapes, args)
    print(description)
    print(f"{'optimizer':24s} {'path':>7s} {'variant':>24s} {'median ms':>10s} {'x step':>7s} {'first step s':>12s}",
          flush=True)
    rows: list[Row] = []
    choices = [(label, make, kwargs, path) for label, make, kwargs in OPTIMIZERS for path in PATHS]
    choices.append(("torch Adam", torch.optim.Adam, {"fused": True}, "fused"))
    for label, make, kwargs, path in choices:
        if args.only is not None and not re.search(args.only, f"{label} {path}"):
            continue
        options = kwargs if make is torch.optim.Adam else {**kwargs, "fused": PATHS[path]}
        variants = [v for v in VARIANTS if not (v == "max_grad_norm" and make is torch.optim.Adam)]
        try:
            found = timed_rows(label, path, lambda ps, **more: make(ps, **options, **more), variants, args, shapes,
                               sync)
        except Exception as error:  # report and go on
            found = [Row(label, path, "all", error=one_line(error))]
        for row in found:
            rows.append(row)
            if row.error is not None:
                print(f"{label:24s} {path:>7s} {row.variant:>24s} error: {row.error}", flush=True)
            else:
                print(f"{label:24s} {path:>7s} {row.variant:>24s} {row.median_ms:10.2f} {row.ratio_to_step:7.2f} "
                      f"{row.first_step_s:12.2f}", flush=True)
        if args.json:
            with open(args.json, "w") as file:
                json.dump({"setup": description, "arguments": vars(args), "rows": [asdict(r) for r in rows]},
                          file, indent=1)


if __name__ == "__main__":
    main()

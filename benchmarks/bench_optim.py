"""Optimizer step time as a ratio to torch.optim.Adam(fused=True), measured in the same run.

Rows: torch Adam fused (the baseline, measured first and again last to show the drift of
the machine within the run) and foreach; IMEXAdam per tableau (euler, trapezoidal,
trapezoidal with reuse_gradient, ssp3_433), AdaMax, AdaMomentum, ClippedAdam (coordinate
and global clipping), each on its default path (``fused=None``), ``fused=True`` and
``fused=False`` ("eager"); IMEXAdam euler resuming torch Adam's state (as fast as the
fresh euler row); and "AdaM3-style per-tensor loop", the plain Python loop of
in-place torch ops over the parameters that AdaM3's published script uses.
``--state-dtypes float32,bfloat16,8bit`` times each of our rows with each ``state_dtype``,
round-robin (one step of each in turn, each on its own tensors), and adds the ratio to the
same row with float32 state.

    python benchmarks/bench_optim.py                          # 20M params in 200 flat tensors
    python benchmarks/bench_optim.py --numel 2e6 --repeats 5  # quicker
    python benchmarks/bench_optim.py --shapes gpt2            # GPT-2 small: 124M params, 148 tensors
    python benchmarks/bench_optim.py --shapes many            # 1,000 tensors of 4,096 elements
    python benchmarks/bench_optim.py --only 'IMEXAdam.*fused' --json rows.json
    python benchmarks/bench_optim.py --only 'euler default' --state-dtypes float32,bfloat16,8bit
    python benchmarks/bench_optim.py --device cuda --dtype bfloat16 --shapes gpt2

Columns: the median of ``--repeats`` timed steps (after the first step and ``--warmup``
more); its ratio to the baseline's median; the gradient evaluations per step (closure
calls counted during the timed steps); the ratio per gradient evaluation (median / grads /
baseline), which is what a multi-gradient method costs per gradient it consumes; and the
first step in seconds, which includes state allocation and any compilation or code
generation. Compiled kernels are cached within the process, so a later row reusing a
kernel shows a shorter first step than the row that built it.

The timed work is the optimizer's own: the closure only puts stored gradients back into
``.grad``. Each row is printed as soon as it is measured; a row that raises prints its
error and the run goes on. ``--json PATH`` rewrites PATH with all rows after each row.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from lightning_imex.optim import AdaMax, AdaMomentum, ClippedAdam, IMEXAdam

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# --state-dtypes name -> our optimizers' ``state_dtype``
STATE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "8bit": "8bit"}
# Our optimizers: row label, class, constructor keywords.
OURS = [
    ("IMEXAdam euler", IMEXAdam, {"tableau": "euler"}),
    ("IMEXAdam trapezoidal", IMEXAdam, {"tableau": "trapezoidal"}),
    ("IMEXAdam trapezoidal reuse_gradient", IMEXAdam, {"tableau": "trapezoidal", "reuse_gradient": True}),
    ("IMEXAdam ssp3_433", IMEXAdam, {"tableau": "ssp3_433"}),
    ("AdaMax", AdaMax, {}),
    ("AdaMomentum", AdaMomentum, {}),
    ("ClippedAdam coordinate", ClippedAdam, {"clip": "coordinate"}),
    ("ClippedAdam global", ClippedAdam, {"clip": "global"}),
]
# Path name -> the ``fused`` argument.
PATHS = {"default": None, "fused": True, "eager": False}


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


@dataclass(frozen=True)
class Candidate:
    label: str
    path: str
    build: Callable[..., torch.optim.Optimizer]
    takes_state_dtype: bool = False

    @property
    def name(self) -> str:
        return f"{self.label} {self.path}"


@dataclass
class Row:
    label: str
    path: str
    median_ms: float | None = None
    ratio: float | None = None
    gradient_evaluations: float | None = None
    ratio_per_gradient: float | None = None
    first_step_s: float | None = None
    error: str | None = None
    state: str = "float32"
    ratio_to_float32_state: float | None = None  # with --state-dtypes: to this row in float32 state


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small's 148 parameter shapes (124M), in Hugging Face's Conv1D layout (in, out)."""
    d, vocab, context, blocks = 768, 50257, 1024, 12
    layer_norm = [(d,), (d,)]
    block = (layer_norm + [(d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn c_attn, attn c_proj
             + layer_norm + [(d, 4 * d), (4 * d,), (4 * d, d), (d,)])  # ln_2, mlp c_fc, mlp c_proj
    return [(vocab, d), (context, d)] + block * blocks + layer_norm


def parameter_shapes(kind: str, numel: int, tensors: int) -> list[tuple[int, ...]]:
    if kind == "gpt2":
        return gpt2_small_shapes()
    if kind == "many":
        return [(4096,)] * 1000
    return [(numel // tensors,)] * tensors


def candidates(skip_eager: bool) -> list[Candidate]:
    """Our optimizers on each path, then the per-tensor loop (the baselines run apart)."""
    paths = [path for path in PATHS if not (skip_eager and path == "eager")]
    rows = [Candidate(label, path, partial(cls, fused=PATHS[path], **kwargs), True) for label, cls, kwargs in OURS
            for path in paths]
    rows.append(Candidate("IMEXAdam euler, torch state loaded", "default", euler_from_torch_adam_state))
    return rows + [Candidate("AdaM3-style per-tensor loop", "eager", PerTensorAdaMomentum)]


def euler_from_torch_adam_state(params: list[Tensor]) -> IMEXAdam:
    """IMEXAdam(euler) resuming torch Adam's state (``step`` a tensor there): it must run
    as fast as the fresh "IMEXAdam euler default" row."""
    adam = torch.optim.Adam(params)
    for p in params:
        p.grad = torch.zeros_like(p)  # a step that leaves the parameters where they are
    adam.step()
    ours = IMEXAdam(params, tableau="euler")
    ours.load_state_dict(adam.state_dict())
    return ours


def seconds(action: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    action()
    sync()
    return time.perf_counter() - start


def measure(optimizer: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor], repeats: int,
            warmup: int, sync: Callable[[], None]) -> tuple[float, float, float]:
    """(first step s, median ms of the timed steps, closure calls per timed step)."""
    closure_calls = 0

    def refill_gradients() -> float:
        nonlocal closure_calls
        closure_calls += 1
        for p, g in zip(params, grads):
            p.grad = g
        return 0.0

    def step() -> None:
        optimizer.step(refill_gradients)

    first_step = seconds(step, sync)
    for _ in range(warmup):
        step()
    closure_calls = 0
    times = [seconds(step, sync) for _ in range(repeats)]
    return first_step, statistics.median(times) * 1e3, closure_calls / repeats


def round_robin(steppers: list, refills: list[Callable[[], float]], repeats: int, warmup: int,
                sync: Callable[[], None]) -> list[tuple[float, float]]:
    """(first step s, median ms) of each stepper (anything with ``step(closure)``), each
    with its own closure: the timed steps are taken one of each in turn, so that load
    from other processes falls on all of them alike."""
    firsts = []
    for stepper, refill in zip(steppers, refills):
        firsts.append(seconds(lambda: stepper.step(refill), sync))
        for _ in range(warmup):
            stepper.step(refill)
    times: list[list[float]] = [[] for _ in steppers]
    for _ in range(repeats):
        for t, stepper, refill in zip(times, steppers, refills):
            t.append(seconds(lambda: stepper.step(refill), sync))
    return [(first, statistics.median(t) * 1e3) for first, t in zip(firsts, times)]


def one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:120]


def measured_row(label: str, path: str, measure_steps: Callable[[], tuple[float, float, float]],
                 baseline_ms: float | None) -> Row:
    """One row; an exception becomes the row's error. ``baseline_ms=None``: this is the baseline."""
    row = Row(label, path)
    try:
        row.first_step_s, row.median_ms, row.gradient_evaluations = measure_steps()
    except Exception as error:  # report and go on: one broken row must not end the run
        row.error = one_line(error)
        return row
    row.ratio = row.median_ms / (row.median_ms if baseline_ms is None else baseline_ms)
    row.ratio_per_gradient = row.ratio / row.gradient_evaluations if row.gradient_evaluations else None
    return row


HEADER = (f"{'optimizer':38s} {'path':>7s} {'state':>8s} {'median ms':>10s} {'ratio':>7s} {'grads':>6s} "
          f"{'ratio/grad':>10s} {'first step s':>12s} {'x f32 state':>11s}")


def format_row(row: Row) -> str:
    start = f"{row.label:38s} {row.path:>7s} {row.state:>8s}"
    if row.error is not None:
        return f"{start} error: {row.error}"
    per_gradient = f"{row.ratio_per_gradient:10.2f}" if row.ratio_per_gradient is not None else f"{'-':>10s}"
    to_float32 = f"{row.ratio_to_float32_state:11.2f}" if row.ratio_to_float32_state is not None else f"{'-':>11s}"
    return (f"{start} {row.median_ms:10.2f} {row.ratio:7.2f} {row.gradient_evaluations:6.2g} "
            f"{per_gradient} {row.first_step_s:12.2f} {to_float32}")


def describe(shapes: list[tuple[int, ...]], args: argparse.Namespace) -> str:
    numel = sum(math.prod(shape) for shape in shapes)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return (f"{args.shapes} shapes: {len(shapes)} tensors, {numel / 1e6:.1f}M {args.dtype} params, "
            f"{where}, torch {torch.__version__}")


def write_json(path: str, description: str, args: argparse.Namespace, rows: list[Row]) -> None:
    with open(path, "w") as file:
        json.dump({"setup": description, "arguments": vars(args), "rows": [asdict(row) for row in rows]},
                  file, indent=1)


def argument_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every optimizer benchmark shares: the tensors, device, dtype, threads and repeats."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=["flat", "gpt2", "many"], default="flat",
                        help="flat: --tensors equal 1-D tensors of --numel in all; gpt2: GPT-2 small's "
                             "parameters; many: 1,000 tensors of 4,096 elements")
    parser.add_argument("--numel", type=float, default=20e6, help="total parameters (--shapes flat)")
    parser.add_argument("--tensors", type=int, default=200, help="number of tensors (--shapes flat)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first one")
    return parser


def parse_arguments() -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--skip-eager", action="store_true", help="leave out our optimizers' fused=False rows")
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="run only rows whose 'label path' matches (the baseline always runs)")
    parser.add_argument("--state-dtypes", default="float32", metavar="NAMES",
                        help=f"comma-separated state_dtype of our rows, from {', '.join(STATE_DTYPES)}; with more "
                             "than float32, each row's dtypes are timed round-robin beside float32")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    args.state_dtypes = args.state_dtypes.split(",")
    unknown = [name for name in args.state_dtypes if name not in STATE_DTYPES]
    if unknown:
        parser.error(f"--state-dtypes takes names from {', '.join(STATE_DTYPES)}, got {', '.join(unknown)}")
    return args


def state_rows(candidate: Candidate, args: argparse.Namespace, shapes: list[tuple[int, ...]],
               sync: Callable[[], None], baseline_ms: float) -> list[Row]:
    """``candidate`` with each of ``--state-dtypes``, each on its own tensors, timed round-robin."""
    dtype = DTYPES[args.dtype]
    rows = [Row(candidate.label, candidate.path, state=state) for state in args.state_dtypes]
    steppers, refills, calls = [], [], [0] * len(rows)
    try:
        for k, state in enumerate(args.state_dtypes):
            params = [torch.nn.Parameter(torch.randn(s, device=args.device, dtype=dtype)) for s in shapes]
            grads = [torch.randn(s, device=args.device, dtype=dtype) for s in shapes]

            def refill(params=params, grads=grads, k=k) -> float:
                calls[k] += 1
                for p, g in zip(params, grads):
                    p.grad = g
                return 0.0

            steppers.append(candidate.build(params, state_dtype=STATE_DTYPES[state]))
            refills.append(refill)
        timed = round_robin(steppers, refills, args.repeats, args.warmup, sync)
    except Exception as error:  # report and go on
        for row in rows:
            row.error = one_line(error)
        return rows
    float32_ms = dict(zip(args.state_dtypes, (ms for _, ms in timed))).get("float32")
    for row, (first_step, ms), count in zip(rows, timed, calls):
        row.first_step_s, row.median_ms = first_step, ms
        row.gradient_evaluations = count / (1 + args.warmup + args.repeats)
        row.ratio = ms / baseline_ms
        row.ratio_per_gradient = row.ratio / row.gradient_evaluations
        row.ratio_to_float32_state = ms / float32_ms if float32_ms else None
    return rows


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = parameter_shapes(args.shapes, int(args.numel), args.tensors)
    dtype = DTYPES[args.dtype]
    params = [torch.nn.Parameter(torch.randn(shape, device=args.device, dtype=dtype)) for shape in shapes]
    grads = [torch.randn(shape, device=args.device, dtype=dtype) for shape in shapes]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    description = describe(shapes, args)
    print(description)
    print(HEADER, flush=True)
    rows: list[Row] = []

    def run(label: str, path: str, build: Callable[[list[Tensor]], torch.optim.Optimizer]) -> Row:
        baseline_ms = rows[0].median_ms if rows else None
        row = measured_row(label, path, lambda: measure(build(params), params, grads, args.repeats, args.warmup, sync),
                           baseline_ms)
        rows.append(row)
        print(format_row(row), flush=True)
        if args.json:
            write_json(args.json, description, args, rows)
        return row

    baseline = run("torch Adam (baseline)", "fused", lambda params: torch.optim.Adam(params, fused=True))
    if baseline.error is not None:
        raise SystemExit("the baseline failed: no ratios to report")
    chosen = [Candidate("torch Adam", "foreach", lambda params: torch.optim.Adam(params, foreach=True))]
    chosen += candidates(args.skip_eager)
    for candidate in chosen:
        if args.only is not None and not re.search(args.only, candidate.name):
            continue
        if candidate.takes_state_dtype and args.state_dtypes != ["float32"]:
            for row in state_rows(candidate, args, shapes, sync, rows[0].median_ms):
                rows.append(row)
                print(format_row(row), flush=True)
            if args.json:
                write_json(args.json, description, args, rows)
        else:
            run(candidate.label, candidate.path, candidate.build)
    run("torch Adam (again)", "fused", lambda params: torch.optim.Adam(params, fused=True))


if __name__ == "__main__":
    main()

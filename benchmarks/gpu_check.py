"""Every check that needs a GPU, in one command (under 8 minutes on one H100):

1. ``triton``: the Triton backend's checks (``tests/triton_interpret_run.py``: every
   optimizer, dtype and layout against the eager path) run *compiled* on CUDA tensors;
2. ``sync``: a whole training step (IMEXModule + norm clipping + ModelEMA, a fit) under
   ``torch.cuda.set_sync_debug_mode("error")``: any host-device sync in the steps after
   the first ones fails the check and names the operation;
3. ``first_step``: the first step's time with an empty kernel cache (cold: code generation
   and Triton compilation) and again in a new process with the cache filled (warm);
4. the benchmarks: ``bench_optim`` (gpt2, flat, many shapes; float32 and bfloat16),
   ``bench_clip``, ``bench_step``, ``bench_fit``, and ``bench_memory`` when present.

Each part runs in its own process with a time limit; a part that fails is recorded and
the run goes on. Writes ``gpu_check.json`` (every part: command, exit status, seconds,
output tail, and the benchmark rows) and ``gpu_check.md`` (a summary) to ``--out``.

    python benchmarks/gpu_check.py --out gpu_check/        # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/x  # the plumbing on CPU, in seconds

``--dry-run`` runs the same parts on CPU at tiny sizes: Triton in its interpreter, two of
its checks; the sync part with torch.Tensor's read-back methods made to raise instead
(the CPU stand-in for the sync debug mode); the benchmarks at a few thousand parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@dataclass
class Part:
    name: str
    command: list[str]
    limit_s: int
    env: dict[str, str] = field(default_factory=dict)
    json_path: str | None = None  # where the part writes its rows
    returncode: int | None = None
    seconds: float | None = None
    output_tail: str = ""
    result: Any = None


def python(script: Path, *args: str) -> list[str]:
    return [sys.executable, str(script), *args]


def parts(dry_run: bool, work: Path) -> list[Part]:
    """The parts to run, in order (``work``: a folder for their files)."""
    device = "cpu" if dry_run else "cuda"
    found: list[Part] = []

    def rows(name: str, script: str, *args: str, limit_s: int = 120) -> None:
        path = str(work / f"{name}.json")
        found.append(Part(name, python(BENCHMARKS / script, *args, "--json", path), limit_s, json_path=path))

    triton_out = str(work / "triton.json")
    if dry_run:
        found.append(Part("triton", python(ROOT / "tests" / "triton_interpret_run.py", triton_out, "adam_float32",
                                           "optimizer_imex_euler"), 120,
                          env={"TRITON_INTERPRET": "1"}, json_path=triton_out))
    else:
        found.append(Part("triton", python(ROOT / "tests" / "triton_interpret_run.py", triton_out), 150,
                          env={"LIGHTNING_IMEX_TRITON_DEVICE": "cuda", "TRITON_INTERPRET": ""}, json_path=triton_out))
    sync_out = str(work / "sync.json")
    found.append(Part("sync", python(Path(__file__), "--part", "sync", "--device", device, "--json", sync_out), 120,
                      json_path=sync_out))
    cache = work / "first_step_cache"  # empty: the cold start compiles everything
    cache_env = {"LIGHTNING_IMEX_CACHE_DIR": str(cache / "imex"), "TRITON_CACHE_DIR": str(cache / "triton")}
    for which in ("cold", "warm"):
        out = str(work / f"first_step_{which}.json")
        found.append(Part(f"first_step_{which}", python(Path(__file__), "--part", "first_step", "--device", device,
                                                        "--json", out), 120, env=cache_env, json_path=out))
    tiny = ["--numel", "2e4", "--tensors", "4", "--repeats", "1", "--warmup", "0"]
    if dry_run:
        rows("bench_optim_flat_float32", "bench_optim.py", *tiny, "--skip-eager", "--only", "IMEXAdam euler")
        rows("bench_clip_flat_float32", "bench_clip.py", *tiny, "--only", "IMEXAdam euler default")
        rows("bench_fit", "bench_fit.py", "--device", "cpu", "--steps", "2", "--warmup", "1", "--rounds", "1",
             "--batch", "8")
    else:
        for dtype in ("float32", "bfloat16"):
            for shapes in ("gpt2", "flat", "many"):
                rows(f"bench_optim_{shapes}_{dtype}", "bench_optim.py", "--device", "cuda", "--dtype", dtype,
                     "--shapes", shapes, "--repeats", "10", "--warmup", "3", limit_s=150)
        rows("bench_clip_gpt2_float32", "bench_clip.py", "--device", "cuda", "--shapes", "gpt2", "--repeats", "10")
        found.append(Part("bench_step", python(BENCHMARKS / "bench_step.py", "--device", "cuda", "--batch", "256",
                                               "--amp", "bf16", "--channels-last", "--steps", "20"), 240))
        rows("bench_fit", "bench_fit.py", "--device", "cuda", limit_s=240)
    memory = BENCHMARKS / "bench_memory.py"
    if memory.exists():  # written alongside this script; run when present
        args = ["--numel", "2e4", "--tensors", "4", "--repeats", "1"] if dry_run else ["--repeats", "3"]
        if "--device" in memory.read_text():
            args += ["--device", device]
        found.append(Part("bench_memory", python(memory, *args), 180))
    return found


def run(part: Part, budget_end: float) -> None:
    limit = max(1, min(part.limit_s, int(budget_end - time.monotonic())))
    env = {**os.environ, **part.env}
    env = {k: v for k, v in env.items() if v != ""}  # "" unsets (TRITON_INTERPRET for compiled kernels)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS), env.get("PYTHONPATH")]))
    start = time.monotonic()
    try:
        done = subprocess.run(part.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        part.returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        part.returncode = 124
        output = (_text(expired.stdout) + _text(expired.stderr) + f"\n[timed out after {limit} s]")
    part.seconds = round(time.monotonic() - start, 2)
    part.output_tail = output[-4000:]
    if part.json_path and os.path.exists(part.json_path):
        try:
            part.result = json.loads(Path(part.json_path).read_text())
        except json.JSONDecodeError as error:  # a part killed while writing
            part.result = {"unreadable": str(error)}
    if part.name == "triton" and part.returncode == 0 and isinstance(part.result, dict):
        failed = [name for name, outcome in part.result.items() if outcome != "ok"]
        part.returncode = 1 if failed or not part.result else 0


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def summary(checks: list[Part], setup: dict[str, Any]) -> str:
    lines = ["# GPU check", "", f"{setup['device']}; torch {setup['torch']}; {setup['when']}"
             + (" (dry run: CPU, tiny sizes)" if setup["dry_run"] else ""), "",
             "| part | status | seconds |", "|---|---|---|"]
    for part in checks:
        status = "ok" if part.returncode == 0 else ("timed out" if part.returncode == 124 else
                                                     f"FAILED ({part.returncode})")
        lines.append(f"| {part.name} | {status} | {part.seconds} |")
    for part in checks:
        if part.name == "triton" and isinstance(part.result, dict):
            bad = {k: v.strip().splitlines()[-1] for k, v in part.result.items() if v != "ok"}
            lines += ["", f"## triton: {len(part.result) - len(bad)} of {len(part.result)} checks ok"]
            lines += [f"- {k}: {v}" for k, v in bad.items()]
        elif part.name in ("sync", "first_step_cold", "first_step_warm") and part.result is not None:
            lines += ["", f"## {part.name}", "```", json.dumps(part.result, indent=1), "```"]
        elif isinstance(part.result, dict) and "rows" in part.result:
            lines += ["", f"## {part.name}", part.result.get("setup", ""), ""]
            lines += [_row(row) for row in part.result["rows"]]
        elif part.returncode is not None and part.name.startswith("bench_"):
            lines += ["", f"## {part.name}", "```", part.output_tail[-2500:].strip(), "```"]
    return "\n".join(lines) + "\n"


def _row(row: dict[str, Any]) -> str:
    cells = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if v is not None]
    return "- " + ", ".join(cells)


# --- the parts that are this script itself ---------------------------------------------


def sync_part(device: str, out: str) -> None:
    """A short fit of IMEXModule with norm clipping and ModelEMA. On CUDA, steps 3 and 4
    (after compilation and the first step's allocations) run under the sync debug mode
    "error"; on CPU, the stand-in: Tensor's read-back methods raise during those steps.
    The checks' own syncs stay out: no logger, no progress bar, non-finite reads back only
    every log_every_n_steps (set beyond the fit)."""
    import lightning as L
    import torch
    from torch import nn
    from torch.nn import functional as F

    from lightning_imex import IMEXModule
    from lightning_imex.callbacks import ModelEMA

    checked = (3, 4)

    class Net(IMEXModule):
        def __init__(self) -> None:
            super().__init__(optimizer={"name": "imex_adam", "lr": 1e-3, "tableau": "trapezoidal"},
                             clipping={"algorithm": "norm", "threshold": 0.5, "log": False})
            self.net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

    blocked: list[str] = []

    class Guard(L.Callback):
        """Switches the check on at the checked steps' start and off at their end (first and
        last in the callback list, so the EMA update sits inside)."""

        def __init__(self, on: bool) -> None:
            self.on = on

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if self.on and trainer.global_step in checked:
                switch(True)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if not self.on and trainer.global_step - 1 in checked:
                switch(False)

    if device == "cuda":
        def switch(on: bool) -> None:
            torch.cuda.set_sync_debug_mode("error" if on else "default")
    else:
        from lightning_imex import clipping

        clipping._read_back_later = lambda device: True  # the non-finite check as on an accelerator
        originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__")}

        def switch(on: bool) -> None:
            for name, original in originals.items():
                setattr(torch.Tensor, name, _raising(name, blocked) if on else original)

    torch.manual_seed(0)
    x, y = torch.randn(512, 64, device=device), torch.randint(0, 10, (512,), device=device)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = L.Trainer(max_steps=6, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        log_every_n_steps=1000, callbacks=[Guard(True), ModelEMA(decay=0.99), Guard(False)])
    result: dict[str, Any] = {"device": device, "checked_steps": list(checked)}
    try:
        trainer.fit(Net(), data)
        result["ok"] = trainer.global_step == 6 and not blocked
    except Exception as error:  # the sync debug mode raises RuntimeError at the syncing operation
        switch(False)
        result.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
    result["blocked"] = list(blocked)
    switch(True)  # the guard itself: a read-back of a device value must fail now
    try:
        torch.ones(1, device=device).item()
        result.update(ok=False, guard="a read-back passed the guard: the check proves nothing")
    except RuntimeError:
        result["guard"] = "works"
    finally:
        switch(False)
    Path(out).write_text(json.dumps(result, indent=1))
    if not result["ok"]:
        raise SystemExit(1)


def _raising(name: str, blocked: list[str]):
    def read_back(self, *args, **kwargs):
        caller = traceback.extract_stack(limit=3)[0]
        blocked.append(f"Tensor.{name} at {caller.filename}:{caller.lineno}")
        raise RuntimeError(f"{blocked[-1]}: a host read-back inside a training step")
    return read_back


def first_step_part(device: str, out: str) -> None:
    """The first optimizer step (IMEXAdam trapezoidal, fused, GPT-2-like shapes on CUDA,
    small on CPU) in seconds, with whatever the kernel caches hold."""
    import torch

    from lightning_imex.optim import IMEXAdam
    from lightning_imex.optim.kernel import cache_dir

    shapes = [(768, 768), (768,), (768, 3072), (3072,)] * 4 if device == "cuda" else [(64, 64), (64,)]
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    cached = sum(1 for p in cache_dir().rglob("*") if p.is_file()) if cache_dir().exists() else 0
    optimizer = IMEXAdam(params, tableau="trapezoidal", fused=True, max_grad_norm=1.0)

    def closure():
        for p in params:
            p.grad = torch.ones_like(p)
        return 0.0

    seconds = []
    for _ in range(2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step(closure)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(round(time.perf_counter() - start, 4))
    Path(out).write_text(json.dumps({"files_cached_before": cached, "first_step_s": seconds[0],
                                     "second_step_s": seconds[1]}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="on CPU at tiny sizes: the plumbing only")
    parser.add_argument("--budget", type=int, default=470, help="seconds for all parts (each has its own limit)")
    parser.add_argument("--only", default=None, metavar="REGEX", help="run only the parts whose name matches")
    parser.add_argument("--part", choices=["sync", "first_step"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "sync":
        return sync_part(args.device, args.json)
    if args.part == "first_step":
        return first_step_part(args.device, args.json)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --dry-run to check the plumbing on CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"device": torch.cuda.get_device_name() if not args.dry_run else f"CPU ({platform.processor() or 'cpu'})",
             "torch": torch.__version__, "dry_run": args.dry_run,
             "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    budget_end = time.monotonic() + args.budget
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        checks = [part for part in parts(args.dry_run, Path(work))
                  if args.only is None or re.search(args.only, part.name)]
        for part in checks:
            print(f"[gpu_check] {part.name} ...", flush=True)
            if time.monotonic() >= budget_end:
                part.output_tail = "not run: the time budget was spent"
                continue
            run(part, budget_end)
            print(f"[gpu_check] {part.name}: exit {part.returncode} in {part.seconds} s", flush=True)
    report = {"setup": setup, "parts": [asdict(part) for part in checks]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(summary(checks, setup))
    failed = [part.name for part in checks if part.returncode != 0]
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}"
          + (f"; failed or not run: {', '.join(failed)}" if failed else "; every part passed"))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()

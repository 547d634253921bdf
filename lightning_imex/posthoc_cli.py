"""``lightning-imex-posthoc-ema``: the post-hoc EMA of a finished run at any widths
(docs/algorithms.md, section 7), from the snapshots ``PostHocEMA`` wrote into its folder::

    lightning-imex-posthoc-ema RUN_DIR --sigma-rel 0.03 0.05 0.08 [--out DIR] [--step T] [--evaluate]

writes ``DIR/sigma_rel=0.050.pt`` (a plain ``state_dict``; ``torch.load(...,
weights_only=True)``) per width, and prints each width's fit: the relative L2 residual of
its profile on the snapshots' profiles (0: exact; a width far outside the tracked ones, or
few snapshots, fits worse). ``--evaluate`` rebuilds the run's datamodule and module from
its saved Hydra config (``RUN_DIR/.hydra/config.yaml``; data paths as the run resolved
them, relative ones from the current folder) and runs the test loop on each average,
writing ``DIR/posthoc_ema.csv`` and ``DIR/posthoc_ema.png`` (each test metric against
``sigma_rel``).

Memory: one float32 copy of the model per width, plus the snapshot being read (memory-
mapped). Every error of the command line or the run folder is one line."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import torch

from .atomic import torch_save
from .callbacks.posthoc_ema import FOLDER
from .ema_posthoc import SnapshotError, check_sigma_rel, find_snapshots, load_snapshot, reconstruct

__all__ = ["main"]

PROG = "lightning-imex-posthoc-ema"


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _sigma_rel(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = text
    try:
        return check_sigma_rel(value, "--sigma-rel")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _step(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--step must be an integer >= 1, got {text!r}")
    return int(text)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("::")[0].strip())
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's folder (hydra.run.dir)")
    parser.add_argument("--sigma-rel", type=_sigma_rel, nargs="+", required=True, metavar="S",
                        help="widths to rebuild, each in (0, 0.2887)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default RUN_DIR/{FOLDER}/rebuilt)")
    parser.add_argument("--snapshots", type=Path, default=None, help=f"snapshot folder (default RUN_DIR/{FOLDER})")
    parser.add_argument("--step", type=_step, default=None, help="the step to rebuild at (default: the last "
                                                                  "snapshot's)")
    parser.add_argument("--evaluate", action="store_true", help="run the app's test loop on each average")
    parser.error = lambda message: fail(f"{message} (see {PROG} --help)")  # type: ignore[method-assign]
    return parser.parse_args(argv)


def usable_snapshots(folder: Path, step: int | None) -> list[Path]:
    """The snapshots at or before ``step``; an unreadable one is skipped with a line on stderr."""
    paths = []
    for found_step, path in find_snapshots(folder):
        if step is not None and found_step > step:
            continue
        try:
            load_snapshot(path)
        except SnapshotError as error:
            print(f"{PROG}: skipping {error}", file=sys.stderr)
            continue
        paths.append(path)
    return paths


def evaluate(run_dir: Path, out: Path, states: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """The test metrics of each ``state_dict`` on the run's module and data."""
    from omegaconf import OmegaConf

    from . import train as app

    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        fail(f"--evaluate: {run_dir} has no .hydra/config.yaml (a folder lightning-imex-train made)")
    app.quiet()
    cfg = OmegaConf.load(config)
    cfg.paths.output_dir = str(out)  # the run's was Hydra's runtime folder
    cfg.callbacks, cfg.logger, cfg.ckpt_path = None, None, None  # no EMA swaps: the weights as loaded
    cfg.trainer.update(strategy="auto", devices=1, num_nodes=1, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, fast_dev_run=False)
    try:
        datamodule, module, trainer = app.build(cfg)
    except app.ConfigError as error:
        fail(f"--evaluate: the run's config does not build: {error}")
    results = []
    for state in states:
        module.load_state_dict(state)
        trainer.test(module, datamodule=datamodule, verbose=False)
        results.append({k: float(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith("test/") and v.numel() == 1})
    return results


def plot(sigma_rels: list[float], metrics: list[dict[str, float]], tracked: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    names = sorted({k for m in metrics for k in m})
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.8), dpi=110, squeeze=False)
    order = sorted(range(len(sigma_rels)), key=sigma_rels.__getitem__)
    for ax, name in zip(axes[0], names):
        ax.plot([sigma_rels[i] for i in order], [metrics[i].get(name, float("nan")) for i in order], "o-")
        for s in tracked:
            ax.axvline(s, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("sigma_rel (dashed: tracked)")
        ax.set_ylabel(name)
        ax.set_title(f"{name} of the post-hoc EMA")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not args.run_dir.is_dir():
        fail(f"RUN_DIR={args.run_dir}: no such folder")
    folder = args.snapshots or args.run_dir / FOLDER
    if not find_snapshots(folder):
        fail(f"RUN_DIR={args.run_dir}: no post-hoc EMA snapshots (step=*.pt) in {folder}: train with the "
             "PostHocEMA callback (lightning-imex-train 'callbacks=[default,posthoc_ema]')")
    paths = usable_snapshots(folder, args.step)
    if not paths:
        fail(f"--step={args.step}: no readable snapshot at or before it in {folder}")
    out = args.out or folder / "rebuilt"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"--out={out}: cannot create this folder ({error.strerror or error})")
    sigma_rels = list(dict.fromkeys(args.sigma_rel))
    try:
        states, residuals = reconstruct(paths, sigma_rels, args.step)
    except SnapshotError as error:
        fail(str(error))
    last = load_snapshot(paths[-1])
    step = args.step or last["step"]
    tracked = [float(s) for s in last["sigma_rels"]]
    print(f"{len(paths)} snapshots (steps {load_snapshot(paths[0])['step']}..{last['step']}, tracked sigma_rel "
          f"{', '.join(f'{s:g}' for s in tracked)}); the average at step {step}:")
    files = []
    for sigma_rel, state, residual in zip(sigma_rels, states, residuals.tolist()):
        path = out / f"sigma_rel={sigma_rel:.3f}.pt"
        torch_save(state, path)
        files.append(path)
        print(f"  sigma_rel {sigma_rel:<7g} profile fit residual {residual:.2e}  {path}")
    if not args.evaluate:
        return
    metrics = evaluate(args.run_dir, out, states)
    rows: list[dict[str, Any]] = [{"sigma_rel": s, "fit_residual": r, **m, "state_dict": str(f)}
                                  for s, r, m, f in zip(sigma_rels, residuals.tolist(), metrics, files)]
    table = out / "posthoc_ema.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    names = sorted({k for m in metrics for k in m})
    print(f"  {'sigma_rel':<10}" + "".join(f"{n:>14}" for n in names))
    for s, m in sorted(zip(sigma_rels, metrics)):
        print(f"  {s:<10g}" + "".join(f"{m.get(n, float('nan')):>14.4f}" for n in names))
    figure = out / "posthoc_ema.png"
    plot(sigma_rels, metrics, tracked, figure)
    print(f"  table {table}\n  plot  {figure}")


if __name__ == "__main__":
    main()

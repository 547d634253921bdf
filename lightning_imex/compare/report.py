"""The comparison's outputs from its runs: ``results.md`` (per optimizer: final training
loss, validation and test metric as mean ± std over seeds, gradient evaluations,
wall-clock, the learning rate, and the winner at equal gradient evaluations),
``results.csv`` (one row per run) and PNG plots against gradient evaluations and
wall-clock. Where an optimizer ran a grid of learning rates, the one with the best mean
validation metric is reported (and the grid listed)."""

from __future__ import annotations

import csv
import math
import os
import platform
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .recipe import Recipe
from .runs import Run, loss_at, metric_at

__all__ = ["Comparison", "compare_runs", "higher_is_better", "write_results"]

CSV_FIELDS = ("optimizer", "lr", "selected", "seed", "steps", "gradient_evaluations", "train_seconds",
              "final_train_loss", "metric", "metric_value", "metric_at_common_budget", "test_metrics", "folder")
PLOT_POINTS = 200  # the common evaluation grid a band over seeds is drawn on


def higher_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in ("acc", "accuracy", "f1", "auroc")


@dataclass
class Comparison:
    metric: str
    runs: list[Run]  # every run, grid included
    chosen: dict[str, list[Run]]  # per optimizer label, the runs at its chosen learning rate (seed order)
    grid: dict[str, dict[float | None, list[Run]]]  # per label, per learning rate
    common_budget: float  # the gradient evaluations every chosen run reached
    winner: str | None
    wins: dict[str, int]  # per label, the seeds (present for every label) it was best on
    seeds_compared: int


def compare_runs(runs: Sequence[Run], metric: str | None = None, order: Sequence[str] = ()) -> Comparison:
    """Groups runs by label and learning rate, picks each label's learning rate by its
    mean final validation metric, and finds the winner at equal gradient evaluations.
    Ties of the metric (a saturated accuracy) are broken by the training loss. Labels
    come in ``order`` (a recipe's), then alphabetically."""
    metric = metric or _default_metric(runs)
    sign = -1.0 if higher_is_better(metric) else 1.0

    def key(values: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
        """Smaller is better: the mean metric (oriented), then the mean training loss."""
        return sign * _mean(values) if not math.isnan(_mean(values)) else math.inf, _finite_or_inf(_mean(losses))

    rank = {label: i for i, label in enumerate(order)}
    grid: dict[str, dict[float | None, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(runs, key=lambda r: (rank.get(r.label, len(rank)), r.label, r.lr or 0.0, r.seed)):
        grid[run.label][run.lr].append(run)
    chosen = {label: min(by_lr.values(), key=lambda g: key([r.final(metric) for r in g],
                                                            [r.final_train_loss for r in g]))
              for label, by_lr in grid.items()}
    common = min(r.gradient_evaluations for group in chosen.values() for r in group)
    at_budget = {label: {r.seed: (metric_at(r, metric, common), loss_at(r, common)) for r in group}
                 for label, group in chosen.items()}
    means = {label: key([m for m, _ in v.values()], [loss for _, loss in v.values()])
             for label, v in at_budget.items()}
    winner = min(means, key=means.get) if len(means) > 1 and min(means.values())[0] < math.inf else None
    seeds = set.intersection(*(set(v) for v in at_budget.values()))
    wins = dict.fromkeys(chosen, 0)
    for seed in seeds:
        keys = {label: key([at_budget[label][seed][0]], [at_budget[label][seed][1]]) for label in chosen}
        best = min(keys.values())
        leaders = [label for label, k in keys.items() if k == best]
        if len(keys) > 1 and len(leaders) == 1 and best[0] < math.inf:
            wins[leaders[0]] += 1
    return Comparison(metric=metric, runs=list(runs), chosen=chosen, grid={k: dict(v) for k, v in grid.items()},
                      common_budget=common, winner=winner, wins=wins, seeds_compared=len(seeds))


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _mean(values: Sequence[float]) -> float:
    finite = _finite(values)
    return float(np.mean(finite)) if finite else math.nan


def _finite_or_inf(value: float) -> float:
    return math.inf if math.isnan(value) else value


def write_results(comparison: Comparison, out: Path, recipe: Recipe | None = None, fairness: str | None = None,
                  device: str | None = None) -> list[Path]:
    """``results.md``, ``results.csv`` and the plots into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(comparison, out)
    (out / "results.md").write_text(_markdown(comparison, recipe, fairness, device, plots))
    _csv(comparison, out / "results.csv")
    return [out / "results.md", out / "results.csv", *plots]


def _default_metric(runs: Sequence[Run]) -> str:
    names = {k for r in runs for k in r.validation if k != "evaluations"}
    for name in ("val/acc", "val/ppl", "val/mse", "val/loss"):
        if name in names:
            return name
    return sorted(names)[0] if names else "val/loss"


def _mean_std(values: Sequence[float], digits: int = 4) -> str:
    values = _finite(values)
    if not values:
        return "n/a"
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{mean:.{digits}g} ± {std:.2g}" if std else f"{mean:.{digits}g}"


def _markdown(c: Comparison, recipe: Recipe | None, fairness: str | None, device: str | None,
              plots: list[Path]) -> str:
    lines = [f"# {recipe.name if recipe else 'Comparison'}", ""]
    if recipe:
        lines += [f"**Claim** ({recipe.paper}): {recipe.claim}", "", f"**Scale**: {recipe.scale}", ""]
    seeds = sorted({r.seed for group in c.chosen.values() for r in group})
    lines += [f"Run {datetime.now(timezone.utc):%Y-%m-%d} on {device or platform.machine()} ({platform.node()}); "
              f"seeds {', '.join(map(str, seeds))}; metric `{c.metric}` "
              f"({'higher' if higher_is_better(c.metric) else 'lower'} is better); "
              f"compared at {int(c.common_budget)} gradient evaluations.", ""]
    if fairness:
        lines += [fairness, ""]
    test_names = sorted({k for group in c.chosen.values() for r in group for k in r.test})
    header = ["optimizer", "lr", "steps", "gradient evaluations", "wall-clock (s)", "final train loss",
              f"{c.metric} at {int(c.common_budget)} evals", *test_names, "seeds won"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, group in c.chosen.items():
        cells = [f"**{label}**" if label == c.winner else label, _lr_text(group[0].lr),
                 _mean_std([r.steps for r in group], 6), _mean_std([r.gradient_evaluations for r in group], 6),
                 _mean_std([r.train_seconds for r in group], 3), _mean_std([r.final_train_loss for r in group]),
                 _mean_std([metric_at(r, c.metric, c.common_budget) for r in group]),
                 *(_mean_std([r.test.get(name, math.nan) for r in group]) for name in test_names),
                 f"{c.wins[label]}/{c.seeds_compared}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if c.winner:
        lines += [f"Winner at {int(c.common_budget)} gradient evaluations by mean `{c.metric}` (ties broken by the "
                  f"training loss): **{c.winner}** (best on {c.wins[c.winner]} of {c.seeds_compared} seeds).", ""]
    grids = {label: by_lr for label, by_lr in c.grid.items() if len(by_lr) > 1}
    if grids:
        lines += ["## Learning-rate grid", "",
                  f"Chosen per optimizer by the mean final `{c.metric}` (ties broken by the training loss).", "",
                  f"| optimizer | lr | {c.metric} | final train loss |", "|---|---|---|---|"]
        for label, by_lr in grids.items():
            for lr, group in by_lr.items():
                mark = " (chosen)" if group is c.chosen[label] else ""
                lines.append(f"| {label} | {_lr_text(lr)}{mark} | {_mean_std([r.final(c.metric) for r in group])} | "
                             f"{_mean_std([r.final_train_loss for r in group])} |")
        lines.append("")
    lines += ["## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots), "",
              "Mean over seeds with a band from the lowest to the highest seed; `results.csv` has one row per run."]
    return "\n".join(lines) + "\n"


def _lr_text(lr: float | None) -> str:
    return "n/a" if lr is None else f"{lr:g}"


def _csv(c: Comparison, path: Path) -> None:
    chosen = {id(r) for group in c.chosen.values() for r in group}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for run in (r for by_lr in c.grid.values() for group in by_lr.values() for r in group):
            writer.writerow({"optimizer": run.label, "lr": run.lr, "selected": id(run) in chosen, "seed": run.seed,
                             "steps": run.steps, "gradient_evaluations": run.gradient_evaluations,
                             "train_seconds": run.train_seconds, "final_train_loss": run.final_train_loss,
                             "metric": c.metric, "metric_value": run.final(c.metric),
                             "metric_at_common_budget": metric_at(run, c.metric, c.common_budget),
                             "test_metrics": " ".join(f"{k}={v:.6g}" for k, v in sorted(run.test.items())),
                             "folder": os.path.relpath(run.folder, path.parent)})


def _plots(c: Comparison, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    specs = [("train_loss_vs_gradient_evaluations", "evaluations", "loss", "gradient evaluations",
              "training loss (minibatch)", "curve"),
             ("train_loss_vs_wall_clock", "seconds", "loss", "wall-clock in training steps (s)",
              "training loss (minibatch)", "curve"),
             (f"{c.metric.replace('/', '_')}_vs_gradient_evaluations", "evaluations", c.metric,
              "gradient evaluations", c.metric, "validation")]
    paths = []
    for name, x_key, y_key, x_label, y_label, source in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        lows, highs = [], []
        for label, group in c.chosen.items():
            series = [(getattr(r, source)[x_key], getattr(r, source)[y_key]) for r in group
                      if y_key in getattr(r, source) and len(getattr(r, source)[y_key])]
            series = [(x, y) for x, y in series if np.isfinite(x).all() and len(x)]
            if not series:
                continue
            x, mean, low, high = _band(series)
            line, = ax.plot(x, mean, label=f"{label} (lr {_lr_text(group[0].lr)})")
            if len(series) > 1:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            lows.append(np.nanmin(low)), highs.append(np.nanmax(high))
        if lows and y_key == "loss" and min(lows) > 0 and max(highs) / min(lows) > 10:
            ax.set_yscale("log")  # spans decades
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(y_label + " vs " + x_label.split(" (")[0])
        ax.grid(alpha=0.3)
        if lows:
            ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _band(series: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Mean, lowest and highest over seeds on a common x grid (the range all cover)."""
    start, stop = max(x[0] for x, _ in series), min(x[-1] for x, _ in series)
    if len(series) == 1 or stop <= start:
        x, y = series[0]
        return x, y, y, y
    grid = np.linspace(start, stop, PLOT_POINTS)
    values = np.stack([np.interp(grid, x, y) for x, y in series])
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)

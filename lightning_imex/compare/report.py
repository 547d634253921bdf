"""The comparison's outputs from its runs: ``results.md`` (the settings run; per
optimizer: steps, gradient evaluations, wall-clock, final training loss, validation and
test metric as mean ± std over seeds, the learning rate; the winner at equal gradient
evaluations with paired statistics, or a tie), ``results.csv`` (one row per run) and PNG
plots of the training loss against gradient evaluations, optimizer steps and wall-clock,
and of the validation metric against gradient evaluations. Where an optimizer ran a grid of
learning rates, the one with the best mean validation metric is reported (and the grid
listed, with a warning when it sits at the grid's end).

Who wins is decided on paired per-seed differences (:mod:`.stats`): ``A`` is ahead of
``B`` when ``A`` is better on the validation metric by a resolved difference (above the
relative tolerance, interval over seeds excluding 0), or when the metric ties and ``A``
is ahead on the training loss; the winner is ahead of every other optimizer, else the
result is a tie. Runs are compared at the largest gradient-evaluation count all of them
reached (runs of unequal budgets, e.g. an epoch-bounded multirun, are cut to it, and the
report says so); where an optimizer logged no validation within it, the training loss
from the logged curves decides."""

from __future__ import annotations

import csv
import math
import os
import platform
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .recipe import Recipe
from .runs import Run, loss_at, metric_at
from .stats import REL_TOL, Paired, paired

__all__ = ["Comparison", "compare_runs", "figures", "higher_is_better", "metric_words", "write_results"]

CSV_FIELDS = ("optimizer", "lr", "selected", "seed", "steps", "gradient_evaluations", "train_seconds",
              "final_train_loss", "metric", "metric_value", "metric_at_common_budget", "test_metrics", "diverged",
              "folder")
PLOT_POINTS = 200  # the common evaluation grid a band over seeds is drawn on
TRAIN_LOSS = "training loss"
SAME_COUNT = 1e-6  # logged evaluation counts this close (relative) are the same point
EDGE = "Grid edge: "  # starts the line results.md has for an optimizer whose best lr is its grid's end
METRIC_WORDS = {"acc": "accuracy", "accuracy": "accuracy", "mse": "mean squared error", "ppl": "perplexity",
                "loss": "loss", "f1": "F1 score", "auroc": "area under the ROC curve"}
LINE_STYLES = ("-", "--", ":", "-.")  # with the markers: overlapping lines stay told apart
MARKERS = ("o", "s", "^", "D", "v", "P")
MARKS = 8  # markers per line


def higher_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in ("acc", "accuracy", "f1", "auroc")


def metric_words(metric: str) -> str:
    """A logged metric's key in words: ``val/acc`` is "validation accuracy"."""
    stage, _, name = metric.rpartition("/")
    prefix = {"val": "validation ", "test": "test ", "train": "training "}.get(stage, f"{stage} " if stage else "")
    return prefix + METRIC_WORDS.get(name, name)


@dataclass
class Comparison:
    metric: str
    runs: list[Run]  # every run, grid included
    chosen: dict[str, list[Run]]  # per optimizer label, the runs at its chosen learning rate (seed order)
    grid: dict[str, dict[float | None, list[Run]]]  # per label, per learning rate
    common_budget: float  # the largest gradient-evaluation count every chosen run reached
    metric_at: float  # where the metric is read: the last validation count every chosen run logged within it
    quantity: str  # what decides: the metric, or TRAIN_LOSS where an optimizer has no validation by metric_at
    diverged: list[str]  # labels with a chosen run that diverged (behind every finite result)
    unmeasured: list[str]  # labels that logged no value of the quantity within the common budget (not comparable)
    values: dict[str, dict[int, float]]  # per label, per compared seed: the metric at metric_at
    losses: dict[str, dict[int, float]]  # per label, per compared seed: the training loss at common_budget
    winner: str | None
    reference: str | None  # the winner, else the best mean: what the paired differences are taken against
    tied: list[str]  # without a winner: the optimizers none is ahead of
    pairs: dict[str, tuple[Paired, Paired | None]]  # reference vs label: on the quantity; on the loss (metric tie)
    wins: dict[str, int]  # per label, the compared seeds it was ahead of every other on
    seeds_compared: int
    edges: dict[str, str]  # per label whose chosen lr is the end of its grid: "lowest" or "highest"


def compare_runs(runs: Sequence[Run], metric: str | None = None, order: Sequence[str] = ()) -> Comparison:
    """Groups runs by label and learning rate, picks each label's learning rate by its
    mean final validation metric (ties by the training loss), and decides the winner at
    the common budget on paired differences over the seeds every label ran. Labels come
    in ``order`` (a recipe's), then alphabetically."""
    metric = metric or _default_metric(runs)
    lower = not higher_is_better(metric)
    sign = 1.0 if lower else -1.0

    def key(values: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
        """Smaller is better: the mean metric (oriented), then the mean training loss."""
        return _finite_or_inf(sign * _mean(values)), _finite_or_inf(_mean(losses))

    rank = {label: i for i, label in enumerate(order)}
    grid: dict[str, dict[float | None, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(runs, key=lambda r: (rank.get(r.label, len(rank)), r.label, r.lr or 0.0, r.seed)):
        grid[run.label][run.lr].append(run)
    chosen = {label: min(by_lr.values(), key=lambda g: key([_final(r, metric) for r in g],
                                                            [r.final_train_loss for r in g]))
              for label, by_lr in grid.items()}
    common = min(r.gradient_evaluations for group in chosen.values() for r in group)
    at = _shared_validation([r for group in chosen.values() for r in group], metric, common)
    seeds = sorted(set.intersection(*({r.seed for r in group} for group in chosen.values())))
    by_seed = {label: {r.seed: r for r in group} for label, group in chosen.items()}
    diverged = [label for label, group in chosen.items() if any(_diverged(r, common) for r in group)]
    values = {label: {s: math.nan if label in diverged else metric_at(group[s], metric, at) for s in seeds}
              for label, group in by_seed.items()}
    losses = {label: {s: math.nan if label in diverged else loss_at(group[s], common) for s in seeds}
              for label, group in by_seed.items()}
    quantity = metric if all(_all_finite(values[a]) for a in chosen if a not in diverged) else TRAIN_LOSS
    decided = values if quantity == metric else losses
    q_lower = lower if quantity == metric else True
    unmeasured = [a for a in chosen if a not in diverged and not _all_finite(decided[a])]

    def ahead(a: str, b: str, on: Sequence[int]) -> tuple[bool, Paired | None, Paired | None]:
        """Whether ``a`` is ahead of ``b`` on the seeds ``on``, and the paired differences."""
        if not _all_finite(decided[a], on) or b in unmeasured:
            return False, None, None  # not known
        if b in diverged:
            return True, None, None  # behind any finite result
        first = paired([decided[a][s] for s in on], [decided[b][s] for s in on], q_lower)
        second = None
        if (first.below_tolerance or first.inside_spread) and quantity != TRAIN_LOSS \
                and _all_finite(losses[a], on) and _all_finite(losses[b], on):  # the metric ties: the loss decides
            second = paired([losses[a][s] for s in on], [losses[b][s] for s in on], True)
        return first.ahead or (second is not None and second.ahead), first, second

    def score(a: str) -> tuple[float, float]:
        """Smaller is better: the mean of the deciding quantity (oriented), then the mean loss."""
        return (_finite_or_inf((1.0 if q_lower else -1.0) * _mean(list(decided[a].values()))),
                _finite_or_inf(_mean(list(losses[a].values()))))

    labels = list(chosen)
    winner, tied, pairs, reference = None, [], {}, None
    wins = dict.fromkeys(labels, 0)
    if len(labels) > 1 and seeds:
        winners = [a for a in labels if all(ahead(a, b, seeds)[0] for b in labels if b != a)]
        winner = winners[0] if winners else None
        finite = [a for a in labels if _all_finite(decided[a])]
        if winner is None:
            tied = [a for a in finite if not any(ahead(b, a, seeds)[0] for b in labels if b != a)]
        candidates = [winner] if winner else tied or finite
        reference = min(candidates, key=score) if candidates else None
        if reference:
            for b in labels:
                if b != reference:
                    _, first, second = ahead(reference, b, seeds)
                    if first is not None:
                        pairs[b] = (first, second)
        for seed in seeds:
            for a in labels:
                if all(ahead(a, b, [seed])[0] for b in labels if b != a):
                    wins[a] += 1
    edges = {}
    for label, by_lr in grid.items():
        lrs = sorted(lr for lr in by_lr if lr is not None)
        lr = chosen[label][0].lr
        if len(lrs) > 1 and lr in (lrs[0], lrs[-1]):
            edges[label] = "lowest" if lr == lrs[0] else "highest"
    return Comparison(metric=metric, runs=list(runs), chosen=chosen, grid={k: dict(v) for k, v in grid.items()},
                      common_budget=common, metric_at=at, quantity=quantity, diverged=diverged,
                      unmeasured=unmeasured, values=values, losses=losses,
                      winner=winner, reference=reference, tied=tied, pairs=pairs, wins=wins,
                      seeds_compared=len(seeds), edges=edges)


def _diverged(run: Run, budget: float) -> bool:
    """Stopped by a non-finite gradient, or logged a non-finite loss within ``budget``."""
    within = run.curve["evaluations"] <= budget * (1 + SAME_COUNT)
    return bool(run.diverged) or not np.isfinite(run.curve["loss"][within]).all()


def _final(run: Run, metric: str) -> float:
    """The run's final metric; a diverged run has none (it ranks last)."""
    return math.nan if run.diverged else run.final(metric)


def _shared_validation(runs: Sequence[Run], metric: str, budget: float) -> float:
    """The largest validation count within ``budget`` that every run logged the metric
    at (equal budgets: the last validation); ``budget`` where there is none."""
    def counts(run: Run) -> np.ndarray:
        at, values = run.validation.get("evaluations"), run.validation.get(metric)
        if at is None or values is None:
            return np.array([])
        return at[np.isfinite(values) & (at <= budget * (1 + SAME_COUNT))]

    shared = counts(runs[0]) if runs else np.array([])
    for count in sorted(shared, reverse=True):
        if all(np.any(np.abs(counts(r) - count) <= SAME_COUNT * count) for r in runs[1:]):
            return float(count)
    return float(budget)


def _all_finite(values: dict[int, float], seeds: Sequence[int] | None = None) -> bool:
    return all(math.isfinite(values[s]) for s in (values if seeds is None else seeds))


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _mean(values: Sequence[float]) -> float:
    finite = _finite(values)
    return float(np.mean(finite)) if finite else math.nan


def _finite_or_inf(value: float) -> float:
    return math.inf if math.isnan(value) else value


def write_results(comparison: Comparison, out: Path, recipe: Recipe | None = None, fairness: str | None = None,
                  device: str | None = None, overrides: Sequence[str] = (),
                  extended: dict[str, list[float]] | None = None, extend_limit: int | None = None) -> list[Path]:
    """``results.md``, ``results.csv`` and the plots into ``out``; returns their paths.
    ``overrides`` are the command line's, ``extended`` the learning rates ``--extend``
    added per optimizer (at most ``extend_limit`` each)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(comparison, out, recipe)
    (out / "results.md").write_text(_markdown(comparison, recipe, fairness, device, plots, overrides, extended or {},
                                              extend_limit))
    _csv(comparison, out / "results.csv")
    return [out / "results.md", out / "results.csv", *plots]


def _edge_lines(c: Comparison, extended: dict[str, list[float]] | None = None, extend_limit: int | None = None
               ) -> list[str]:
    """A warning per optimizer whose chosen learning rate is the end of its grid."""
    lines = []
    for label, side in c.edges.items():
        lrs = sorted(lr for lr in c.grid[label] if lr is not None)
        lr = c.chosen[label][0].lr
        added = (extended or {}).get(label, [])
        original = [x for x in lrs if x not in added] or lrs
        tried = sum(x < min(original) if side == "lowest" else x > max(original) for x in added)
        why = (f" even after {tried} extension{'s' * (tried != 1)} (the limit)" if extend_limit is not None
               and tried >= extend_limit else "; `--extend` runs the next learning rates outward until it is not")
        lines.append(f"{EDGE}{label}'s chosen learning rate {_lr_text(lr)} is the {side} of its grid "
                     f"({', '.join(map(_lr_text, lrs))}); the optimum may lie "
                     f"{'below' if side == 'lowest' else 'above'} it{why}.")
    return lines


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


def _markdown(c: Comparison, recipe: Recipe | None, fairness: str | None, device: str | None, plots: list[Path],
              overrides: Sequence[str], extended: dict[str, list[float]], extend_limit: int | None) -> str:
    budget, at = int(c.common_budget), int(c.metric_at)
    lines = [f"# {recipe.name if recipe else 'Comparison'}", ""]
    seeds = sorted({r.seed for group in c.chosen.values() for r in group})
    if recipe:
        lines += [f"**Claim** ({recipe.paper}): {recipe.claim}", "",
                  f"**Scale** (the recipe's): {recipe.scale}", ""]
        changed = f"; changed on the command line: {' '.join(recipe.changed)}" if recipe.changed else ""
        extra = f"; overrides of every run: `{' '.join(overrides)}`" if overrides else ""
        lines += [f"**Run with**: a budget of {recipe.budget} gradient evaluations per run, "
                  f"{_count(recipe.seeds, 'seed')}, {_count(recipe.validations, 'validation')}{changed}{extra}.", ""]
    points = {label: len(by_lr) for label, by_lr in c.grid.items()}
    seed_counts = {label: len({r.seed for group in by_lr.values() for r in group}) for label, by_lr in c.grid.items()}
    if len(set(points.values())) == 1 and len(set(seed_counts.values())) == 1:
        n = next(iter(points.values()))
        tuning = (f"**Tuning budget** (equal): every optimizer {_count(n, 'learning rate')} x "
                  f"{_count(next(iter(seed_counts.values())), 'seed')}" + ("" if n > 1 else " (given, not tuned)"))
    else:
        tuning = "**Tuning budget** (unequal): " + ", ".join(
            f"{label} {_count(points[label], 'learning rate')} x {_count(seed_counts[label], 'seed')}"
            for label in c.grid)
    if extended:
        tuning += "; `--extend` added " + ", ".join(f"{label} {', '.join(map(_lr_text, lrs))}"
                                                      for label, lrs in extended.items() if lrs)
    lines += [tuning + ".", ""]
    lines += [f"Run {datetime.now(timezone.utc):%Y-%m-%d} on {device or platform.machine()} ({platform.node()}); "
              f"seeds {', '.join(map(str, seeds))}; metric `{c.metric}` "
              f"({'higher' if higher_is_better(c.metric) else 'lower'} is better); "
              f"compared at {budget} gradient evaluations.", ""]
    totals = {label: sorted({r.gradient_evaluations for r in group}) for label, group in c.chosen.items()}
    if len({t for ts in totals.values() for t in ts}) > 1:
        made = ", ".join(f"{label} {'/'.join(map(str, ts))}" for label, ts in totals.items())
        lines += [f"**Unequal budgets**: the runs made different numbers of gradient evaluations ({made}); every "
                  f"optimizer is compared at {budget}, the largest count all of them reached, from the logged "
                  f"curves: `{c.metric}` at the last validation within it ({at}), the training loss over the "
                  "logged steps within it.", ""]
    if c.quantity == TRAIN_LOSS:
        missing = [label for label, v in c.values.items() if label not in c.diverged
                   and any(math.isnan(x) for x in v.values())]
        lines += [f"`{c.metric}` was not logged within {at} gradient evaluations by {', '.join(missing)}: the "
                  f"comparison is on the training loss at {budget} gradient evaluations.", ""]
    if c.unmeasured:
        lines += [f"Not comparable: {', '.join(c.unmeasured)} logged no {_quantity(c, True).removeprefix('the ')} "
                  f"within {budget} gradient evaluations (log more often: `trainer.log_every_n_steps`, "
                  "`trainer.val_check_interval`).", ""]
    if fairness:
        lines += [fairness, ""]
    lines += [*_edge_lines(c, extended, extend_limit), ""] if c.edges else []
    test_names = sorted({k for group in c.chosen.values() for r in group for k in r.test})
    header = ["optimizer", "lr", "steps", "gradient evaluations", "wall-clock (s)", "final train loss",
              *([f"train loss at {budget} evals"] if c.quantity == TRAIN_LOSS else []),
              f"{c.metric} at {at} evals", *test_names, "seeds won"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, group in c.chosen.items():
        diverged = sum(bool(r.diverged) for r in group)
        cells = [f"**{label}**" if label == c.winner else label + (f" ({diverged} diverged)" if diverged else ""),
                 _lr_text(group[0].lr),
                 _mean_std([r.steps for r in group], 6), _mean_std([r.gradient_evaluations for r in group], 6),
                 _mean_std([r.train_seconds for r in group], 3), _mean_std([r.final_train_loss for r in group]),
                 *([_mean_std(list(c.losses[label].values()))] if c.quantity == TRAIN_LOSS else []),
                 _mean_std(list(c.values[label].values())),
                 *(_mean_std([r.test.get(name, math.nan) for r in group]) for name in test_names),
                 f"{c.wins[label]}/{c.seeds_compared}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_verdict(c), ""]
    if c.pairs:
        lines += _paired_table(c)
    grids = {label: by_lr for label, by_lr in c.grid.items() if len(by_lr) > 1}
    if grids:
        lines += ["## Learning-rate grid", "",
                  f"Chosen per optimizer by the mean final `{c.metric}` (ties broken by the training loss).", "",
                  f"| optimizer | lr | {c.metric} | final train loss |", "|---|---|---|---|"]
        for label, by_lr in grids.items():
            for lr, group in by_lr.items():
                mark = " (chosen)" if group is c.chosen[label] else ""
                mark += " (diverged)" if any(r.diverged for r in group) else ""
                lines.append(f"| {label} | {_lr_text(lr)}{mark} | {_mean_std([_final(r, c.metric) for r in group])} | "
                             f"{_mean_std([r.final_train_loss for r in group])} |")
        lines.append("")
    lines += ["## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots), "",
              "Mean over seeds with a band from the lowest to the highest seed. Optimizers are compared per gradient "
              "evaluation (a two-gradient method's step costs two); the per-step plot is the papers' view. Wall-clock "
              "counts the training steps only. `results.csv` has one row per run."]
    return "\n".join(lines) + "\n"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _quantity(c: Comparison, first: bool) -> str:
    return f"`{c.metric}`" if first and c.quantity != TRAIN_LOSS else "the training loss"


def _difference(pair: Paired) -> str:
    return (f"{abs(pair.mean):.3g} ({abs(pair.relative):.2%}; {pair.interval} [{pair.low:.3g}, {pair.high:.3g}]), "
            f"on {pair.seeds_ahead}/{len(pair.differences)} seeds")


def _verdict(c: Comparison) -> list[str]:
    """The winner line: who is ahead of whom, by how much, or a tie."""
    where = f"at {int(c.common_budget)} gradient evaluations"
    if c.quantity != TRAIN_LOSS and c.metric_at != c.common_budget:
        where += f" (`{c.metric}` at {int(c.metric_at)})"
    if c.seeds_compared == 0 or len(c.chosen) < 2:
        return [f"No winner {where}: " + ("one optimizer." if len(c.chosen) < 2 else "no seed common to all.")]
    if c.winner:
        reasons = []
        for label, (first, second) in c.pairs.items():
            if first.ahead:
                reasons.append(f"ahead of {label} on {_quantity(c, True)} by {_difference(first)}")
            elif second is not None:
                reasons.append(f"ahead of {label} on the training loss by {_difference(second)} "
                               f"({_quantity(c, True)}: {first.verdict})")
        behind = [label for label in c.chosen if label != c.winner and label not in c.pairs]
        reasons += [f"ahead of {label} (diverged)" for label in behind]
        return [f"Winner {where}: **{c.winner}**, " + "; ".join(reasons) + "."]
    lines = [f"No winner {where}: {', '.join(c.unmeasured)} cannot be compared there (nothing logged within it)."
             ] if c.unmeasured else []
    if len(c.tied) > 1:
        ties = [f"{label}: {first.verdict} on {_quantity(c, True)}"
                + (f", {second.verdict} on the training loss" if second is not None else "")
                for label, (first, second) in c.pairs.items() if label in c.tied]
        lines.append(f"{'Among the others' if lines else f'No winner {where}'}: {', '.join(c.tied)} tie (against "
                     f"{c.reference}: {'; '.join(ties)}). A difference counts when it is above the {REL_TOL:.1%} "
                     "tolerance and outside the spread over seeds.")
    return lines or [f"No winner {where}: no optimizer is ahead of every other (see the paired differences)."]


def _paired_table(c: Comparison) -> list[str]:
    lines = ["## Paired differences", "",
             f"Per seed (same initial weights and batches), {c.reference} against each other optimizer at "
             f"{int(c.common_budget)} gradient evaluations, oriented so that > 0 means {c.reference} is better: the "
             f"mean, relative to the larger mean value, an interval (95% t-interval over 3+ seeds; the range over 2; "
             f"none over 1) and the seeds on which {c.reference} is ahead by more than the {REL_TOL:.1%} tolerance. "
             "A difference below the tolerance or with an interval that includes 0 is a tie.", "",
             "| against | on | mean difference | relative | interval | seeds ahead | verdict |",
             "|---|---|---|---|---|---|---|"]
    for label, (first, second) in c.pairs.items():
        for pair, on in ((first, _quantity(c, True)), (second, "the training loss")):
            if pair is not None:
                lines.append(f"| {label} | {on} | {pair.mean:.4g} | {pair.relative:+.2%} | {pair.interval} "
                             f"[{pair.low:.3g}, {pair.high:.3g}] | {pair.seeds_ahead}/{len(pair.differences)} | "
                             f"{pair.verdict} |")
    return [*lines, ""]


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
                             "metric_at_common_budget": metric_at(run, c.metric, c.metric_at),
                             "test_metrics": " ".join(f"{k}={v:.6g}" for k, v in sorted(run.test.items())),
                             "diverged": run.diverged or "",
                             "folder": os.path.relpath(run.folder, path.parent)})


def figures(c: Comparison, recipe: Recipe | None = None) -> list[tuple[str, Any]]:
    """The plots as (file stem, matplotlib figure): the training loss against gradient
    evaluations (the fair axis), optimizer steps (the papers' axis) and the wall-clock of the
    training steps, and the validation metric against gradient evaluations; each titled with
    the recipe, its claim and what the line and band are."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    loss = "training loss (minibatch mean)"
    specs = [("train_loss_vs_gradient_evaluations", "evaluations", "loss", "gradient evaluations", loss, "curve"),
             ("train_loss_vs_optimizer_steps", "steps", "loss", "optimizer steps", loss, "curve"),
             ("train_loss_vs_wall_clock", "seconds", "loss", "wall-clock time of the training steps (s)", loss,
              "curve"),
             (f"{c.metric.replace('/', '_')}_vs_gradient_evaluations", "evaluations", c.metric,
              "gradient evaluations", metric_words(c.metric), "validation")]
    seeds = sorted({r.seed for group in c.chosen.values() for r in group})
    about = (f"{recipe.name}: {recipe.claim}" if recipe else "Comparison")
    band = (f"mean over {_count(len(seeds), 'seed')} ({', '.join(map(str, seeds))}), band from the lowest to the "
            "highest seed" if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else "")
    made = []
    for name, x_key, y_key, x_label, y_label, source in specs:
        fig, ax = plt.subplots(figsize=(7.2, 5.0), dpi=110)
        lows, highs = [], []
        for index, (label, group) in enumerate(c.chosen.items()):
            series = [(getattr(r, source)[x_key], getattr(r, source)[y_key]) for r in group
                      if y_key in getattr(r, source) and len(getattr(r, source)[y_key])]
            series = [(x, y) for x, y in series if np.isfinite(x).all() and len(x)]
            if not series:
                continue
            x, mean, low, high = _band(series)
            line, = ax.plot(x, mean, label=f"{label} (lr {_lr_text(group[0].lr)})",
                            linestyle=LINE_STYLES[index % len(LINE_STYLES)], marker=MARKERS[index % len(MARKERS)],
                            markevery=max(1, len(x) // MARKS), markersize=4)
            if len(series) > 1:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            lows.append(np.nanmin(low)), highs.append(np.nanmax(high))
        if lows and y_key == "loss" and min(lows) > 0 and max(highs) / min(lows) > 10:
            ax.set_yscale("log")  # spans decades
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title("\n".join([f"{y_label} vs {x_label.removesuffix(' (s)')}", *textwrap.wrap(about, 80), band]),
                     fontsize=9)
        ax.grid(alpha=0.3)
        if lows:
            ax.legend()
        fig.tight_layout()
        made.append((name, fig))
    return made


def _plots(c: Comparison, out: Path, recipe: Recipe | None) -> list[Path]:
    from matplotlib import pyplot as plt

    paths = []
    for name, fig in figures(c, recipe):
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

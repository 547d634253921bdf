"""``lightning-imex-compare``'s verdicts on synthetic run records: paired differences over
seeds (a known difference wins, a known tie does not: below the tolerance or inside the
spread), runs of unequal budgets compared at the common one (and said so), a diverged run
behind, a grid whose best is its end flagged; and the recipe's grid forms."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from lightning_imex.compare.recipe import RecipeError, parse_recipe
from lightning_imex.compare.report import _markdown, compare_runs
from lightning_imex.compare.runs import Run
from lightning_imex.compare.stats import REL_TOL, paired


def run(label: str, seed: int, loss: float, acc: float | None = None, evaluations: int = 100, lr: float = 0.01,
        validate_every: int | None = None, diverged: str | None = None) -> Run:
    """A run logging its training loss every 10 evaluations (falling to ``loss``) and ``acc``
    at every ``validate_every`` evaluations (default: at the end)."""
    at = np.arange(10, evaluations + 1, 10, dtype=float)
    validated = np.arange(validate_every or evaluations, evaluations + 1, validate_every or evaluations, dtype=float)
    validation = {"evaluations": validated} if acc is None else {"evaluations": validated,
                                                                 "val/acc": np.full(len(validated), acc)}
    return Run(folder=Path(label, str(seed)), label=label, seed=seed, lr=lr, steps=evaluations,
               gradient_evaluations=evaluations, train_seconds=1.0,
               curve={"steps": at, "evaluations": at, "seconds": at / 100,
                      "loss": np.linspace(2 * loss, loss, len(at))},
               validation=validation, test={}, record={"diverged": diverged} if diverged else {})


def markdown(comparison) -> str:
    return _markdown(comparison, None, None, "test", [], (), {}, None)


def test_a_known_difference_is_resolved_with_a_t_interval():
    first, second = [1.0, 1.1, 0.9], [1.04, 1.15, 0.96]  # losses: the first better by 0.05 ± 0.01
    pair = paired(first, second, lower_is_better=True)
    half = 4.302653 * 0.01 / math.sqrt(3)  # t(0.975, 2) s / sqrt(n)
    assert pair.mean == pytest.approx(0.05) and (pair.low, pair.high) == pytest.approx((0.05 - half, 0.05 + half))
    assert pair.interval == "95% t-interval" and pair.seeds_ahead == 3 and pair.ahead and pair.verdict == "ahead"
    assert pair.relative == pytest.approx(0.05 / 1.05)
    flipped = paired(first, second, lower_is_better=False)  # an accuracy: the same numbers, the other way
    assert flipped.mean == pytest.approx(-0.05) and not flipped.ahead and flipped.verdict == "behind"


def test_known_ties_below_the_tolerance_or_inside_the_spread():
    seven_digits = paired([1.7564207, 1.80001], [1.7564206, 1.80002], lower_is_better=True)  # Adam vs IMEX Euler
    assert seven_digits.below_tolerance and not seven_digits.ahead and seven_digits.seeds_ahead == 0
    assert seven_digits.verdict.startswith("tie (below the 0.1% tolerance")
    spread = paired([1.0, 1.0, 1.0], [1.1, 0.95, 1.02], lower_is_better=True)  # +0.1, -0.05, +0.02
    assert spread.inside_spread and not spread.below_tolerance and not spread.ahead
    assert spread.verdict == "tie (inside the spread over seeds)" and spread.seeds_ahead == 2
    two = paired([1.0, 1.0], [1.1, 0.95], lower_is_better=True)  # two seeds: the range, which includes 0
    assert two.interval == "range over 2 seeds" and (two.low, two.high) == pytest.approx((-0.05, 0.1)) and not two.ahead
    one = paired([1.0], [1.0 + 2 * REL_TOL], lower_is_better=True)  # one seed: only the tolerance applies
    assert one.interval == "one seed" and one.ahead
    with pytest.raises(ValueError, match="finite and of equal"):
        paired([1.0, math.nan], [1.0, 1.0], lower_is_better=True)


def test_adam_and_imex_euler_equal_to_seven_digits_tie():
    runs = [run(name, seed, loss) for name, losses in (("imex_euler", (1.7564206, 1.61)), ("adam", (1.7564207, 1.61)))
            for seed, loss in enumerate(losses)]
    for r in runs:
        r.validation["val/loss"] = np.array([r.curve["loss"][-1]])
    c = compare_runs(runs, "val/loss")
    assert c.winner is None and sorted(c.tied) == ["adam", "imex_euler"] and c.wins == {"imex_euler": 0, "adam": 0}
    text = markdown(c)
    assert "No winner at 100 gradient evaluations: adam, imex_euler tie" in text and "**adam**" not in text
    assert c.reference == "imex_euler" and list(c.pairs) == ["adam"]  # the lower mean: 1.7564206
    assert c.pairs["adam"][0].verdict == c.pairs["adam"][1].verdict == "tie (below the 0.1% tolerance)"


def test_a_known_win_and_a_metric_tie_broken_by_the_training_loss():
    runs = [run("a", s, loss=0.50 + s / 100, acc=0.90) for s in range(3)]
    runs += [run("b", s, loss=0.60 + s / 100, acc=0.80 + s / 1000) for s in range(3)]
    runs += [run("c", s, loss=0.40 + s / 100, acc=0.90) for s in range(3)]  # a's accuracy, a lower loss
    c = compare_runs(runs, "val/acc", ["a", "b", "c"])
    assert c.winner == "c" and c.wins == {"a": 0, "b": 0, "c": 3}
    first, second = c.pairs["b"]
    assert first.ahead and first.mean == pytest.approx(0.099) and second is None  # c vs b: 9.9 points of accuracy
    first, second = c.pairs["a"]
    assert first.below_tolerance and second.ahead and second.mean == pytest.approx(0.1)
    text = markdown(c)
    assert re.search(r"Winner at 100 gradient evaluations: \*\*c\*\*, ahead of a on the training loss by 0\.1 "
                     r"\(.*`val/acc`: tie \(below the 0\.1% tolerance\)\); ahead of b on `val/acc` by 0\.099", text)
    assert "## Paired differences" in text and "| b | `val/acc` | 0.099 |" in text


def test_inside_the_spread_is_no_win_even_with_a_better_mean():
    gains = [0.05, -0.03, 0.04]  # b's accuracy minus a's per seed: better on average, not resolved
    runs = [run("a", s, loss=0.5, acc=0.8) for s in range(3)] + [run("b", s, loss=0.5, acc=0.8 + g)
                                                                   for s, g in enumerate(gains)]
    c = compare_runs(runs, "val/acc")
    assert c.winner is None and c.reference == "b" and c.pairs["a"][0].verdict == "tie (inside the spread over seeds)"
    assert c.wins == {"a": 1, "b": 2}  # per seed: b ahead on two, a on one


def test_unequal_budgets_are_compared_at_the_common_one_and_said_so():
    runs = [run("adam", s, loss=0.5, acc=0.8, evaluations=100, validate_every=50) for s in range(2)]
    runs += [run("trapezoidal", s, loss=0.3, acc=0.9, evaluations=200, validate_every=50) for s in range(2)]
    c = compare_runs(runs, "val/acc")
    assert c.common_budget == 100 and c.metric_at == 100 and c.quantity == "val/acc"
    text = markdown(c)
    assert ("**Unequal budgets**: the runs made different numbers of gradient evaluations (adam 100, trapezoidal "
            "200); every optimizer is compared at 100, the largest count all of them reached") in text
    assert "val/acc at 100 evals" in text
    # trapezoidal validated only at its end: the training loss from the logged curves decides at 100
    runs = runs[:2] + [run("trapezoidal", s, loss=0.3, acc=0.9, evaluations=200) for s in range(2)]
    c = compare_runs(runs, "val/acc")
    assert c.quantity == "training loss" and c.winner == "trapezoidal"  # its loss at 100 evaluations: 0.458 < 0.5
    assert c.losses["trapezoidal"] == {0: pytest.approx(0.6 - 0.3 * 9 / 19), 1: pytest.approx(0.6 - 0.3 * 9 / 19)}
    assert "`val/acc` was not logged within 100 gradient evaluations by trapezoidal" in markdown(c)


def test_a_diverged_run_is_behind_and_a_grid_edge_is_flagged():
    runs = [run("adam", 0, loss=0.5, acc=0.8, lr=lr) for lr in (1e-3, 1e-2)]
    runs += [run("sgd", 0, loss=0.4, acc=0.9, diverged="non-finite gradient")]
    c = compare_runs(runs, "val/acc")
    assert c.winner == "adam" and c.diverged == ["sgd"] and "ahead of sgd (diverged)" in markdown(c)
    assert c.edges == {"adam": "lowest"}  # equal: the first of the grid is kept, its lowest end
    assert "Grid edge: adam's chosen learning rate 0.001 is the lowest of its grid (0.001, 0.01); the optimum may " \
           "lie below it; `--extend`" in markdown(c)


def test_a_recipe_grid_by_center_factor_points_and_an_equal_tuning_budget():
    base = {"claim": "c", "paper": "p", "scale": "s", "budget": 10}
    recipe = parse_recipe("r", {**base, "optimizers": {
        "adam": {"overrides": ["optimizer=adam"], "lr": {"center": 1e-2, "factor": 10, "points": 3}},
        "sgd": {"overrides": ["optimizer=sgd"], "lr": [0.1, 0.01, 0.001]}}})
    assert [(e.lrs, e.factor) for e in recipe.optimizers] == [((1e-3, 1e-2, 1e-1), 10.0), ((1e-3, 1e-2, 1e-1),
                                                                                          pytest.approx(10.0))]
    with pytest.raises(RecipeError, match=r"^recipe r: every optimizer must get the same number of learning rates "
                                          r"\(an equal tuning budget\), got adam: 3, sgd: 1$"):
        parse_recipe("r", {**base, "optimizers": {"adam": {"lr": {"center": 1e-2, "factor": 10, "points": 3}},
                                                  "sgd": {"lr": 0.1}}})
    for bad in ({"center": 1e-2, "factor": 1, "points": 3}, {"center": 1e-2, "points": 3},
                {"center": 1e-2, "factor": 3, "points": 0}):
        with pytest.raises(RecipeError, match=r"optimizers.a.lr must be a positive number, a list of distinct ones, "
                                              r"or \{center: LR, factor: F > 1, points: N >= 1\}"):
            parse_recipe("r", {**base, "optimizers": {"a": {"lr": bad}}})

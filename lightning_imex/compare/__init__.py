"""``lightning-imex-compare``: a paper's claim one command away, measured fairly.

    lightning-imex-compare RECIPE [seeds=N] [budget=N] [validations=N] [OVERRIDE ...] [--out DIR]
    lightning-imex-compare --from DIR [DIR ...] [--out DIR] [--metric val/acc]
    lightning-imex-compare --list

A recipe (:mod:`.recipe`) names a base experiment, the optimizers, a budget of gradient
evaluations and the seeds; every run is a fit of the app (:mod:`.runner`), and the
results (:mod:`.report`) are ``results.md``, ``results.csv`` and PNG plots in the output
folder. ``--from`` makes the same from existing run folders (a multirun's output)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .. import train as app
from .recipe import OptimizerEntry, Recipe, RecipeError, check_settings, load_recipe, recipe_names
from .report import Comparison, compare_runs, write_results
from .runner import check_fairness, plan_runs, run_all, task_metric
from .runs import RUN_RECORD, find_runs, labels_from_overrides, load_run

__all__ = ["compare", "compare_from", "main"]

PROG = "lightning-imex-compare"
SETTINGS = ("seeds", "budget", "validations")  # recipe fields a command line may set (key=N)
SESSION = "compare.json"  # the recipe as run, the device and the fairness check: what --from needs


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def compare(recipe: Recipe, out: Path, overrides: Sequence[str] = ()) -> tuple[Comparison, list[Path]]:
    """Runs (or finishes) the recipe into ``out`` and writes its results."""
    runs = plan_runs(recipe, out, overrides)
    out.mkdir(parents=True, exist_ok=True)
    device = device_name()
    with _exclusive(out):
        run_all(runs)
    records = [json.loads((run.folder / RUN_RECORD).read_text()) for run in runs]
    fairness = check_fairness(records)
    metric = task_metric(recipe, runs[0].config)
    session = {"recipe": dataclasses.asdict(recipe), "overrides": list(overrides), "metric": metric, "device": device,
               "fairness": fairness}
    (out / SESSION).write_text(json.dumps(session, indent=1))
    comparison = compare_runs([load_run(run.folder) for run in runs], metric, [e.name for e in recipe.optimizers])
    return comparison, write_results(comparison, out, recipe, fairness, device)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Holds ``out/.lock`` while runs train: a second compare into the same folder would
    delete and redo the first one's unfinished runs. The lock ends with the process."""
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecipeError(f"{out}: another lightning-imex-compare is running into this folder; wait for it "
                              "or use --out") from None
        yield


def compare_from(folders: Sequence[str | Path], out: Path | None = None, metric: str | None = None
                 ) -> tuple[Comparison, list[Path]]:
    """The table and plots from existing run folders: a compare's output folder, or a
    multirun's (runs labelled by the overrides they differ in, seed aside)."""
    found = find_runs(folders)
    session_file = Path(folders[0]) / SESSION
    session = json.loads(session_file.read_text()) if session_file.is_file() else {}
    recipe = None
    if session:
        fields = session["recipe"]
        recipe = Recipe(**{**fields, "overrides": tuple(fields["overrides"]),
                           "optimizers": tuple(_entry(e) for e in fields["optimizers"])})
    labels = labels_from_overrides(found)
    runs = [load_run(folder, labels.get(folder)) for folder in found]
    comparison = compare_runs(runs, metric or session.get("metric"), [e.name for e in recipe.optimizers] if recipe else ())
    return comparison, write_results(comparison, out or Path(folders[0]), recipe, session.get("fairness"),
                                     session.get("device"))


def _entry(fields: dict) -> OptimizerEntry:
    return OptimizerEntry(fields["name"], tuple(fields["overrides"]), tuple(fields["lrs"]))


def parse_settings(recipe: Recipe, tokens: Sequence[str]) -> tuple[Recipe, list[str]]:
    """``seeds=N``, ``budget=N`` and ``validations=N`` change the recipe; every other
    token is a Hydra override of every run."""
    changes, overrides = {}, []
    for token in tokens:
        key, _, value = token.partition("=")
        if key in SETTINGS:
            try:
                changes[key] = int(value)
            except ValueError:
                raise RecipeError(f"{key} must be an integer, got {value!r}") from None
        else:
            overrides.append(token)
    recipe = recipe.replace(**changes)
    check_settings(recipe)
    return recipe, overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Compare optimizers on a recipe (a paper's claim) by gradient evaluations and\n"
        "wall-clock: every optimizer over the same seeds, initial weights, data order and budget.\n"
        "Writes results.md, results.csv and plots; a rerun skips finished runs.",
        epilog="examples:\n  lightning-imex-compare imex_spirals\n  lightning-imex-compare imex_spirals seeds=5 "
        "budget=6000 trainer.accelerator=gpu\n  lightning-imex-compare --from multirun/2026-11-23/12-00-00\n\n"
        "recipes: " + ", ".join(recipe_names()), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="a packaged recipe's name or a recipe .yaml file")
    parser.add_argument("settings", nargs="*", help="seeds=N, budget=N (gradient evaluations per run), "
                        "validations=N, or a Hydra override of every run (key=value)")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/compare/RECIPE; with --from the "
                        "first folder)")
    parser.add_argument("--from", dest="sources", nargs="+", metavar="DIR",
                        help="make the results from existing run folders instead of running")
    parser.add_argument("--metric", help="with --from: the validation metric to compare (default: the recipe's, else "
                        "val/acc, val/ppl, val/mse or val/loss, whichever was logged)")
    parser.add_argument("--list", action="store_true", help="list the packaged recipes and their claims")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    app.quiet()
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.list:
            for name in recipe_names():
                recipe = load_recipe(name)
                print(f"{name:<22} {recipe.claim} ({recipe.paper})")
            return
        if args.sources:
            if args.recipe or args.settings:
                parser.error("--from makes results from run folders: give no recipe or settings with it")
            _, paths = compare_from(args.sources, args.out, args.metric)
        else:
            if not args.recipe:
                parser.error("give a recipe (see --list), or --from DIR")
            if args.metric:
                parser.error("--metric goes with --from; a recipe names its metric")
            recipe, overrides = parse_settings(load_recipe(args.recipe), args.settings)
            _, paths = compare(recipe, args.out or Path("outputs") / "compare" / recipe.name, overrides)
    except (RecipeError, app.ConfigError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the same command finishes the missing runs", file=sys.stderr)
        sys.exit(130)
    print((paths[0]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths))

"""``lightning-imex-compare``: a paper's claim one command away, measured fairly.

    lightning-imex-compare RECIPE [seeds=N] [budget=N] [validations=N] [OVERRIDE ...] [--out DIR] [--extend]
                           [--jobs N] [--threads N]
    lightning-imex-compare --from DIR [DIR ...] [--out DIR] [--metric val/acc]
    lightning-imex-compare --list

A recipe (:mod:`.recipe`) names a base experiment, the optimizers, a budget of gradient
evaluations and the seeds; every run is a fit of the app (:mod:`.runner`), and the
results (:mod:`.report`) are ``results.md``, ``results.csv`` and PNG plots in the output
folder. ``--extend`` runs more learning rates where an optimizer's best is the end of its
grid; ``--from`` makes the same from existing run folders (a multirun's output). Runs train
``--jobs`` at a time (one per core, or per GPU) with ``--threads`` torch threads each, or
as SLURM jobs with ``hydra/launcher=slurm``.

``--help``, ``--list`` and a bad setting or override (:func:`check_overrides`) answer
without importing Lightning or torch (seconds saved on every look): the runner and the
app load when a comparison starts."""

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
from typing import TYPE_CHECKING, NoReturn

from ..app.cores import usable_cores
from ..validate import integer
from .recipe import (OptimizerEntry, Recipe, RecipeError, check_settings, dataset_files, estimated_seconds,
                     load_recipe, recipe_names, run_count)

if TYPE_CHECKING:
    from .report import Comparison

__all__ = ["compare", "compare_from", "main"]

PROG = "lightning-imex-compare"
SETTINGS = ("seeds", "budget", "validations")  # recipe fields a command line may set (key=N)
SESSION = "compare.json"  # the recipe as run, the device and the fairness check: what --from needs
EXTENSIONS = 3  # --extend: at most this many learning rates added to each end of an optimizer's grid


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def compare(recipe: Recipe, out: Path, overrides: Sequence[str] = (), extend: bool = False, jobs: int = 1,
            threads: int | None = None) -> tuple[Comparison, list[Path]]:
    """Runs (or finishes) the recipe into ``out`` and writes its results, ``jobs`` runs
    at a time with ``threads`` torch threads each (:func:`.runner.run_all`). With ``extend``,
    an optimizer whose best learning rate is the end of its grid gets the next one outward
    (a factor of its grid's beyond), round after round, until its best is inside the grid
    or ``EXTENSIONS`` were added at that end (a diverging learning rate brackets too)."""
    from .report import compare_runs, write_results
    from .runner import check_fairness, launcher_config, plan_runs, run_all, split_launcher, task_metric
    from .runs import RUN_RECORD, load_run

    for key, value in (("jobs", jobs), ("threads", threads)):
        try:
            if value is not None:
                integer(key, value, 1)
        except ValueError as error:
            raise RecipeError(str(error)) from None
    overrides, to_launcher = split_launcher(overrides)
    runs = plan_runs(recipe, out, overrides)
    launcher = launcher_config(recipe, [*overrides, *to_launcher], out) if to_launcher else None
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if launcher is not None:
        per_run = threads or launcher.get("cpus_per_task") or 1
        device = f"{launcher['_target_'].rsplit('.', 1)[-1]} jobs (hydra-submitit-launcher)"
    else:
        per_run = threads or (max(1, usable_cores() // jobs) if jobs > 1 else torch.get_num_threads())
        device = f"{device_name()}; {jobs} run{'s' * (jobs > 1)} at a time"
    device += f", {per_run} torch thread{'s' * (per_run > 1)} each"
    extended: dict[str, list[float]] = {}
    with _exclusive(out):
        run_all(runs, jobs, threads, launcher)
        metric = task_metric(recipe, runs[0].config)
        names = [e.name for e in recipe.optimizers]
        comparison = compare_runs([load_run(run.folder) for run in runs], metric, names)
        grids = {e.name: e.lrs for e in recipe.optimizers}  # as the recipe gives them
        while extend:
            entries = {e.name: e for e in recipe.optimizers}
            added = {name: _outward(entries[name], side) for name, side in comparison.edges.items()
                     if entries[name].factor
                     and sum(_beyond(lr, grids[name], side) for lr in extended.get(name, [])) < EXTENSIONS}
            if not added:
                break
            for name, lr in added.items():
                extended.setdefault(name, []).append(lr)
            recipe = recipe.replace(optimizers=tuple(
                dataclasses.replace(e, lrs=tuple(sorted((*e.lrs, added[e.name])))) if e.name in added else e
                for e in recipe.optimizers))
            runs = plan_runs(recipe, out, overrides)
            run_all(runs, jobs, threads, launcher)
            comparison = compare_runs([load_run(run.folder) for run in runs], metric, names)
    records = [json.loads((run.folder / RUN_RECORD).read_text()) for run in runs]
    fairness = check_fairness(records)
    session = {"recipe": dataclasses.asdict(recipe), "overrides": list(overrides), "metric": metric, "device": device,
               "fairness": fairness, "extended": extended, "extend_limit": EXTENSIONS if extend else None}
    (out / SESSION).write_text(json.dumps(session, indent=1))
    return comparison, write_results(comparison, out, recipe, fairness, device, overrides, extended,
                                     session["extend_limit"])


def _outward(entry: OptimizerEntry, side: str) -> float:
    """The next learning rate beyond the end ``side`` of the entry's grid."""
    lr = entry.lrs[0] / entry.factor if side == "lowest" else entry.lrs[-1] * entry.factor
    return float(f"{lr:.6g}")


def _beyond(lr: float, grid: Sequence[float], side: str) -> bool:
    """Whether ``lr`` lies beyond the end ``side`` of the recipe's grid (was added there)."""
    return lr < min(grid) if side == "lowest" else lr > max(grid)


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
    multirun's (runs labelled by the overrides they differ in, seed aside). One compare
    folder's recipe, settings and fairness check are reported; several folders' are not
    (none holds them all)."""
    from .report import compare_runs, write_results
    from .runs import find_runs, labels_from_overrides, load_run

    found = find_runs(folders)
    session_file = Path(folders[0]) / SESSION
    session = json.loads(session_file.read_text()) if len(folders) == 1 and session_file.is_file() else {}
    recipe = None
    if session:
        fields = session["recipe"]
        recipe = Recipe(**{**fields, "overrides": tuple(fields["overrides"]),
                           "changed": tuple(fields.get("changed", ())),
                           "optimizers": tuple(_entry(e) for e in fields["optimizers"])})
    labels = labels_from_overrides(found)
    runs = [load_run(folder, labels.get(folder)) for folder in found]
    comparison = compare_runs(runs, metric or session.get("metric"), [e.name for e in recipe.optimizers] if recipe else ())
    return comparison, write_results(comparison, out or Path(folders[0]), recipe, session.get("fairness"),
                                     session.get("device"), session.get("overrides", ()), session.get("extended"),
                                     session.get("extend_limit"))


def _entry(fields: dict) -> OptimizerEntry:
    return OptimizerEntry(fields["name"], tuple(fields["overrides"]), tuple(fields["lrs"]), fields.get("factor"))


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
    changed = tuple(f"{key}={value}" for key, value in changes.items() if getattr(recipe, key) != value)
    recipe = recipe.replace(**changes, changed=changed)
    check_settings(recipe)
    return recipe, overrides


def check_overrides(recipe: Recipe, overrides: Sequence[str]) -> None:
    """Each optimizer's config composed with ``overrides`` before Lightning loads (seconds
    saved on a typo): a bad group option, key or value fails here, with the message the
    runs' composition (:func:`.runner.compose_config`) gives."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..app.cli import compose_without_lightning
    from ..app.errors import compose_error

    for entry in recipe.optimizers:
        try:
            compose_without_lightning([*recipe.overrides, *entry.overrides, *overrides])
        except (HydraException, OmegaConfBaseException) as error:
            raise RecipeError(compose_error(error)) from error


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
                        "validations=N, a Hydra override of every run (key=value), or hydra/launcher=slurm "
                        "(hydra.launcher.KEY=VALUE) to send each run as a SLURM job")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/compare/RECIPE; with --from the "
                        "first folder)")
    parser.add_argument("--from", dest="sources", nargs="+", metavar="DIR",
                        help="make the results from existing run folders instead of running")
    parser.add_argument("--metric", help="with --from: the validation metric to compare (default: the recipe's, else "
                        "val/acc, val/ppl, val/mse or val/loss, whichever was logged)")
    parser.add_argument("--extend", action="store_true", help=f"where an optimizer's best learning rate is the end "
                        f"of its grid, run the next one outward (by the grid's factor), up to {EXTENSIONS} per end")
    parser.add_argument("--jobs", type=int, metavar="N", help="runs at a time, each in a worker process (default: "
                        f"one per GPU, else one per CPU core: {usable_cores()} here)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads per run (default: the "
                        "cores shared out among the runs at a time, at least 1)")
    parser.add_argument("--list", action="store_true", help="list the packaged recipes: their claims, runs, a time "
                        "estimate and the dataset files they need")
    return parser


def list_recipes(jobs: int) -> None:
    """Each packaged recipe: its claim, how many runs of what budget, about how long on
    this machine's CPU with ``jobs`` runs at a time (:func:`.recipe.estimated_seconds`),
    and the dataset files it needs."""
    for name in recipe_names():
        recipe = load_recipe(name)
        grid = len(recipe.optimizers[0].lrs)
        seconds = estimated_seconds(recipe, jobs)
        time = (f"~{max(1, round(seconds / 60))} min on {jobs} core{'s' * (jobs > 1)}" if seconds is not None
                else "time not measured")
        print(f"{name:<22} {recipe.claim} ({recipe.paper})\n{'':<22} {run_count(recipe)} runs ("
              f"{len(recipe.optimizers)} optimizers x {grid} learning rate{'s' * (grid > 1)} x "
              f"{recipe.seeds} seeds) of {recipe.budget} gradient evaluations; {time}")
        files = dataset_files(recipe)
        if files:
            print(f"{'':<22} needs dataset files: {files}")


def _fail(error: BaseException) -> NoReturn:
    print(f"{PROG}: error: {error}", file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # options before the settings too
    for key in ("jobs", "threads"):
        try:
            if getattr(args, key) is not None:
                integer(f"--{key}", getattr(args, key), 1)
        except ValueError as error:
            _fail(error)
    if args.list:
        list_recipes(args.jobs or usable_cores())
        return
    if args.sources:
        if args.recipe or args.settings or args.extend or args.jobs or args.threads:
            parser.error("--from makes results from run folders: give no recipe, settings, --extend, --jobs or "
                         "--threads with it")
    else:
        if not args.recipe:
            parser.error("give a recipe (see --list), or --from DIR")
        if args.metric:
            parser.error("--metric goes with --from; a recipe names its metric")
        try:
            recipe, overrides = parse_settings(load_recipe(args.recipe), args.settings)
            check_overrides(recipe, overrides)
        except RecipeError as error:
            _fail(error)
    from .. import train as app
    from .report import EDGE
    from .runner import default_jobs

    app.quiet()
    try:
        if args.sources:
            _, paths = compare_from(args.sources, args.out, args.metric)
        else:
            jobs = args.jobs or default_jobs()
            _, paths = compare(recipe, args.out or Path("outputs") / "compare" / recipe.name, overrides,
                               args.extend, jobs, args.threads or max(1, usable_cores() // jobs))
    except (RecipeError, app.ConfigError) as error:
        _fail(error)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the same command finishes the missing runs", file=sys.stderr)
        sys.exit(130)
    print((paths[0]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    for line in paths[0].read_text().splitlines():
        if line.startswith(EDGE):
            print(f"{PROG}: warning: {line}", file=sys.stderr)

"""A recipe: one paper's claim as a comparison to run. A small YAML file names the base
experiment (the app's Hydra overrides), the optimizers with their settings and learning
rates (one, or a log-spaced grid chosen from on the validation metric), the budget in
gradient evaluations and the seeds, and says what the paper claims and at what scale we
run it.

    claim: higher-order IMEX beats Adam on spiral classification
    paper: Bhattacharjee et al. 2024, arXiv 2403.13704
    scale: 2-D spirals, a 2x64 tanh MLP, 3000 gradient evaluations (the paper: ...)
    overrides: [experiment=imex_spirals, ~callbacks.ema]
    budget: 3000
    seeds: 3
    optimizers:
      adam: {overrides: [optimizer=adam], lr: {center: 1.0e-2, factor: 3, points: 3}}
      imex_trapezoidal: {overrides: [optimizer=imex_trapezoidal], lr: [3.0e-3, 1.0e-2, 3.0e-2]}

A grid is a list or ``{center, factor, points}`` (``points`` learning rates ``factor``
apart, centred on ``center`` in log scale). Every optimizer of a recipe gets the same
number of grid points (and the same seeds): an equal tuning budget. ``--extend`` steps a
grid outward by its factor (a list's: the geometric mean of its neighbours' ratios).

The packaged recipes live in ``lightning_imex.recipes`` (the repository's ``recipes/``)."""

from __future__ import annotations

import importlib.resources
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..validate import integer, is_integer, is_real

__all__ = ["OptimizerEntry", "Recipe", "RecipeError", "dataset_files", "estimated_seconds", "load_recipe",
           "recipe_names"]

PACKAGE = "lightning_imex.recipes"
CONFIGS = "lightning_imex.conf"
# Seconds of training steps per gradient evaluation, per packaged recipe: the mean over the
# runs of docs/results/RECIPE/results.csv (train_seconds / gradient_evaluations) on the CI
# machine's 2 shared x86_64 cores; load-dependent (imex_spirals seeds=1 budget=600 at one
# thread per run, 2 runs at a time: 2.3-8.3 ms in two compares). Unmeasured (no estimate):
# the recipes on MNIST and CIFAR-10.
SECONDS_PER_EVALUATION = {"adam_logreg": 6.8e-3, "adam_mlp": 7.2e-3, "adamomentum_cnn": 8.1e-3,
                          "adamomentum_lm": 68e-3, "clipped_adam_ema": 4.0e-3, "imex_gaussians": 5.6e-3,
                          "imex_lorenz63": 3.7e-3, "imex_mnist1d": 6.4e-3, "imex_spirals": 5.4e-3,
                          # the network and data of imex_spirals and of adamomentum_lm (their own
                          # compares ran on a loaded machine: 1.5e-2 for low_precision_state)
                          "low_precision_state": 5.4e-3, "low_precision_lm": 68e-3}
# A run's whole fit (start-up, validations, test, checkpoints) over its training steps' time:
# 1.34-1.52 in those two compares
FIT_OVER_TRAIN = 1.5
FIELDS = ("claim", "paper", "scale", "overrides", "budget", "seeds", "metric", "validations", "optimizers")
OPTIMIZER_FIELDS = ("overrides", "lr")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # an optimizer's name is a folder name


class RecipeError(ValueError):
    """A recipe or a command-line setting that cannot run; its message is one line."""


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    overrides: tuple[str, ...]
    lrs: tuple[float, ...]  # one: given; several: a grid, chosen from on the validation metric
    factor: float | None = None  # the grid's ratio between neighbours (None: one learning rate)


@dataclass(frozen=True)
class Recipe:
    name: str
    claim: str
    paper: str
    scale: str
    overrides: tuple[str, ...]
    budget: int  # gradient evaluations per run
    seeds: int  # seeds 0 .. seeds-1
    optimizers: tuple[OptimizerEntry, ...]
    metric: str | None = None  # the validation metric; None: the task's (val/acc, val/mse, val/ppl)
    validations: int = 10  # validation points along the budget
    source: str = field(default="", compare=False)
    changed: tuple[str, ...] = field(default=(), compare=False)  # settings changed on the command line

    def replace(self, **changes: Any) -> Recipe:
        values = {**self.__dict__, **changes}
        return Recipe(**values)


def recipe_names() -> list[str]:
    """The packaged recipes' names."""
    folder = importlib.resources.files(PACKAGE)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A packaged recipe by name (``imex_spirals``) or a YAML file by path; every field is
    checked, a bad one raises :class:`RecipeError` naming it."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {name_or_path!r} does not exist")
        text, name = path.read_text(), path.stem
    else:
        names = recipe_names()
        if name_or_path not in names:
            raise RecipeError(f"no recipe {name_or_path!r}; packaged recipes: {', '.join(names)} "
                              "(or give a path to a recipe's .yaml file)")
        text = importlib.resources.files(PACKAGE).joinpath(f"{name_or_path}.yaml").read_text()
        name = name_or_path
    try:
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except (OmegaConfBaseException, ValueError) as error:
        raise RecipeError(f"recipe {name}: not a YAML mapping ({str(error).splitlines()[0]})") from error
    return parse_recipe(name, data, source=str(path) if path.is_file() else f"{PACKAGE}/{name}.yaml")


def parse_recipe(name: str, data: Any, source: str = "") -> Recipe:
    def fail(key: str, allowed: str, value: Any) -> RecipeError:
        return RecipeError(f"recipe {name}: {key} must be {allowed}, got {value!r}")

    if not isinstance(data, dict):
        raise fail("the file", "a mapping of " + ", ".join(FIELDS), data)
    for key in data:
        if key not in FIELDS:
            raise RecipeError(f"recipe {name}: unknown field {key!r}; allowed: {', '.join(FIELDS)}")
    for key in ("claim", "paper", "scale"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise fail(key, "a non-empty text", data.get(key))
    optimizers = data.get("optimizers")
    if not isinstance(optimizers, dict) or len(optimizers) < 1:
        raise fail("optimizers", "a mapping of at least one name to {overrides, lr}", optimizers)
    entries = []
    for opt_name, entry in optimizers.items():
        key = f"optimizers.{opt_name}"
        if not isinstance(opt_name, str) or not NAME.match(opt_name):
            raise fail("an optimizer's name", "letters, digits, '_', '.', '-'", opt_name)
        if not isinstance(entry, dict):
            raise fail(key, "a mapping with overrides and lr", entry)
        for sub in entry:
            if sub not in OPTIMIZER_FIELDS:
                raise RecipeError(f"recipe {name}: unknown field {key}.{sub!r}; allowed: {', '.join(OPTIMIZER_FIELDS)}")
        lrs, factor = _grid(entry.get("lr"), lambda allowed: fail(f"{key}.lr", allowed, entry.get("lr")))
        entries.append(OptimizerEntry(opt_name, _overrides(name, f"{key}.overrides", entry.get("overrides", [])),
                                      lrs, factor))
    points = {e.name: len(e.lrs) for e in entries}
    if len(set(points.values())) > 1:
        raise RecipeError(f"recipe {name}: every optimizer must get the same number of learning rates (an equal "
                          f"tuning budget), got {', '.join(f'{k}: {v}' for k, v in points.items())}")
    recipe = Recipe(name=name, claim=data["claim"].strip(), paper=data["paper"].strip(), scale=data["scale"].strip(),
                    overrides=_overrides(name, "overrides", data.get("overrides", [])),
                    budget=data.get("budget"), seeds=data.get("seeds", 3), optimizers=tuple(entries),
                    metric=data.get("metric"), validations=data.get("validations", 10), source=source)
    check_settings(recipe)
    return recipe


def run_count(recipe: Recipe) -> int:
    return sum(len(e.lrs) for e in recipe.optimizers) * recipe.seeds


def estimated_seconds(recipe: Recipe, jobs: int) -> float | None:
    """A CPU estimate of the recipe's wall-clock with ``jobs`` runs at a time (one torch
    thread each): runs x budget x the measured seconds per gradient evaluation x
    :data:`FIT_OVER_TRAIN` / jobs (None where unmeasured). A method making k gradient
    evaluations per step costs about k times a step, so the budget, not the steps, sets it."""
    per_evaluation = SECONDS_PER_EVALUATION.get(recipe.name)
    if per_evaluation is None:
        return None
    return math.ceil(run_count(recipe) / jobs) * recipe.budget * per_evaluation * FIT_OVER_TRAIN


def dataset_files(recipe: Recipe) -> str | None:
    """What files the recipe's dataset reads (its config's first line, for a dataset that is
    never downloaded: MNIST, CIFAR-10, PTB), else None: read from the recipe's
    ``dataset=`` override, or its ``experiment=``'s default dataset."""
    configs = importlib.resources.files(CONFIGS)
    choice = {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in recipe.overrides if "=" in o}
    dataset = choice.get("dataset")
    if dataset is None and "experiment" in choice:
        experiment = configs.joinpath("experiment", f"{choice['experiment']}.yaml")
        defaults = OmegaConf.create(experiment.read_text()).get("defaults", []) if experiment.is_file() else []
        dataset = next((d["override /dataset"] for d in defaults
                        if isinstance(d, dict) and "override /dataset" in d), None)
    config = configs.joinpath("dataset", f"{dataset}.yaml")
    if dataset is None or not config.is_file():
        return None
    text = config.read_text()
    first = text.splitlines()[0].lstrip("# ")
    if "never downloaded" not in first:
        return None
    root = OmegaConf.to_container(OmegaConf.create(text), resolve=False).get("root")
    return f"{first.split(';')[0]} (dataset.root={root})"


def check_settings(recipe: Recipe) -> None:
    """The fields a command line may change (``budget=``, ``seeds=``) and the metric."""
    for key, minimum in (("budget", 1), ("seeds", 1), ("validations", 1)):
        value = getattr(recipe, key)
        try:
            integer(key, value, minimum)
        except ValueError as error:
            raise RecipeError(f"recipe {recipe.name}: {error}") from None
    if recipe.metric is not None and not (isinstance(recipe.metric, str) and recipe.metric.startswith("val/")):
        raise RecipeError(f"recipe {recipe.name}: metric must be a logged validation metric such as 'val/acc', "
                          f"got {recipe.metric!r}")


def _grid(value: Any, fail: Any) -> tuple[tuple[float, ...], float | None]:
    """A recipe's ``lr``: the learning rates in increasing order and the grid's factor."""
    allowed = "a positive number, a list of distinct ones, or {center: LR, factor: F > 1, points: N >= 1}"
    if isinstance(value, dict):
        center, factor, points = value.get("center"), value.get("factor"), value.get("points")
        if (set(value) != {"center", "factor", "points"} or not _positive(center) or not _positive(factor)
                or factor <= 1 or not is_integer(points) or points < 1):
            raise fail(allowed)
        lrs = tuple(float(f"{center * factor ** (i - (points - 1) / 2):.6g}") for i in range(points))
        return lrs, (float(factor) if points > 1 else None)
    lrs = value if isinstance(value, list) else [value]
    if not lrs or not all(_positive(lr) for lr in lrs) or len(set(lrs)) != len(lrs):
        raise fail(allowed)
    lrs = tuple(sorted(float(lr) for lr in lrs))
    return lrs, ((lrs[-1] / lrs[0]) ** (1 / (len(lrs) - 1)) if len(lrs) > 1 else None)


def _positive(value: Any) -> bool:
    return is_real(value) and value > 0


def _overrides(name: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RecipeError(f"recipe {name}: {key} must be a list of Hydra overrides (key=value), got {value!r}")
    return tuple(value)

"""A recipe: one paper's claim as a comparison to run. A small YAML file names the base
experiment (the app's Hydra overrides), the optimizers with their settings and learning
rates (one, or a grid chosen from on the validation metric), the budget in gradient
evaluations and the seeds, and says what the paper claims and at what scale we run it.

    claim: higher-order IMEX beats Adam on spiral classification
    paper: Bhattacharjee et al. 2024, arXiv 2403.13704
    scale: 2-D spirals, a 2x64 tanh MLP, 3000 gradient evaluations (the paper: ...)
    overrides: [experiment=imex_spirals, ~callbacks.ema]
    budget: 3000
    seeds: 3
    optimizers:
      adam: {overrides: [optimizer=imex_euler], lr: 1.0e-2}
      imex_trapezoidal: {overrides: [optimizer=imex_trapezoidal], lr: [3.0e-3, 1.0e-2]}

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

__all__ = ["OptimizerEntry", "Recipe", "RecipeError", "load_recipe", "recipe_names"]

PACKAGE = "lightning_imex.recipes"
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
        lrs = entry.get("lr")
        lrs = lrs if isinstance(lrs, list) else [lrs]
        if not lrs or not all(_positive(lr) for lr in lrs) or len(set(lrs)) != len(lrs):
            raise fail(f"{key}.lr", "a positive number or a list of distinct ones (a grid)", entry.get("lr"))
        entries.append(OptimizerEntry(opt_name, _overrides(name, f"{key}.overrides", entry.get("overrides", [])),
                                      tuple(float(lr) for lr in lrs)))
    recipe = Recipe(name=name, claim=data["claim"].strip(), paper=data["paper"].strip(), scale=data["scale"].strip(),
                    overrides=_overrides(name, "overrides", data.get("overrides", [])),
                    budget=data.get("budget"), seeds=data.get("seeds", 3), optimizers=tuple(entries),
                    metric=data.get("metric"), validations=data.get("validations", 10), source=source)
    check_settings(recipe)
    return recipe


def check_settings(recipe: Recipe) -> None:
    """The fields a command line may change (``budget=``, ``seeds=``) and the metric."""
    for key, minimum in (("budget", 1), ("seeds", 1), ("validations", 1)):
        value = getattr(recipe, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise RecipeError(f"recipe {recipe.name}: {key} must be an integer >= {minimum}, got {value!r}")
    if recipe.metric is not None and not (isinstance(recipe.metric, str) and recipe.metric.startswith("val/")):
        raise RecipeError(f"recipe {recipe.name}: metric must be a logged validation metric such as 'val/acc', "
                          f"got {recipe.metric!r}")


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _overrides(name: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RecipeError(f"recipe {name}: {key} must be a list of Hydra overrides (key=value), got {value!r}")
    return tuple(value)

"""Run folders read back: the app's (a Hydra run or multirun: ``.hydra/config.yaml``, the
CSV logger's ``metrics.csv``) and the compare command's (the same, plus ``run.json``).
Cost comes from the :class:`~lightning_imex.callbacks.TrainingCost` columns, logged every
``log_every_n_steps`` steps: a row's ``step`` is the index of the step just done, so the
steps a run made are the last row's ``step`` + 1 (a validation or epoch-end row) and the
gradient evaluations at any row are read off the logged ``(steps, evaluations)`` points,
extrapolated past the last one at its ratio (a fixed number per step: exact)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from .recipe import RecipeError

__all__ = ["RUN_RECORD", "Run", "find_runs", "labels_from_overrides", "load_run", "loss_at", "metric_at"]

RUN_RECORD = "run.json"  # written when a compare run has finished
EVALUATIONS, SECONDS, TRAIN_LOSS = "cost/gradient_evaluations", "cost/train_seconds", "train/loss_step"
TAIL = 0.1  # the final training loss: the mean minibatch loss over the last 10% of the logged steps


@dataclass
class Run:
    folder: Path
    label: str
    seed: int
    lr: float | None
    steps: int
    gradient_evaluations: int
    train_seconds: float | None
    curve: dict[str, np.ndarray]  # "evaluations", "seconds", "loss": one entry per logged training step
    validation: dict[str, np.ndarray]  # "evaluations" and each val/... metric: one entry per validation
    test: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)  # run.json (compare runs)

    @property
    def diverged(self) -> str | None:
        """Why the run stopped early (a non-finite gradient), or None."""
        return self.record.get("diverged")

    @property
    def final_train_loss(self) -> float:
        return loss_at(self, math.inf)

    def final(self, metric: str) -> float:
        values = self.validation.get(metric)
        return float(values[-1]) if values is not None and len(values) else math.nan


def find_runs(folders: Iterable[str | Path]) -> list[Path]:
    """Every run folder (one holding ``.hydra/config.yaml``) at or under the folders."""
    found: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise RecipeError(f"--from {folder}: not a folder")
        found += sorted(p.parent.parent for p in folder.glob("**/.hydra/config.yaml"))
    if not found:
        raise RecipeError(f"--from {' '.join(map(str, folders))}: no run folders (with .hydra/config.yaml) there")
    return found


def load_run(folder: Path, label: str | None = None) -> Run:
    """One run folder. The label is ``run.json``'s, else ``label``, else the optimizer's
    config name."""
    config = OmegaConf.load(folder / ".hydra" / "config.yaml")
    record = json.loads((folder / RUN_RECORD).read_text()) if (folder / RUN_RECORD).is_file() else {}
    rows = _metric_rows(folder)
    train = [r for r in rows if _float(r.get(TRAIN_LOSS)) is not None]  # a non-finite loss stays: it diverged
    if not train:
        raise RecipeError(f"{folder}: its metrics.csv has no {TRAIN_LOSS} rows (did the run train?)")
    if _number(train[-1].get(EVALUATIONS)) is None:
        raise RecipeError(f"{folder}: its metrics.csv has no {EVALUATIONS} column: run with the TrainingCost callback "
                          "(callbacks.cost, in the app's default callbacks)")
    done = np.array([float(r["step"]) + 1 for r in train])  # steps done at each logged row
    logged = np.array([float(r[EVALUATIONS]) for r in train])
    curve = {"steps": done, "evaluations": logged,
             "seconds": np.array([_number(r.get(SECONDS)) or math.nan for r in train]),
             "loss": np.array([_float(r[TRAIN_LOSS]) for r in train])}
    fit_rows = [r for r in rows if _number(r.get("step")) is not None  # a test row's step is the count, not an index
                and not any(k.startswith("test/") and _number(v) is not None for k, v in r.items())]
    steps = int(max(float(r["step"]) for r in fit_rows)) + 1
    validation_rows = [r for r in rows if any(k.startswith("val/") and _number(v) is not None for k, v in r.items())]
    validation: dict[str, np.ndarray] = {
        "evaluations": _evaluations_at(np.array([float(r["step"]) + 1 for r in validation_rows]), done, logged)}
    for key in {k for r in validation_rows for k in r if k.startswith("val/")}:
        validation[key] = np.array([_number(r.get(key)) if _number(r.get(key)) is not None else math.nan
                                    for r in validation_rows])
    test = {k: float(v) for r in rows for k, v in r.items() if k.startswith("test/") and _number(v) is not None}
    seconds = curve["seconds"][-1]
    return Run(folder=folder, label=record.get("label") or label or _optimizer_name(folder, config),
               seed=int(config.seed), lr=_lr(config), steps=int(record.get("steps", steps)),
               gradient_evaluations=int(record.get("gradient_evaluations",
                                                   round(float(_evaluations_at(np.array([steps]), done, logged)[0])))),
               train_seconds=record.get("train_seconds", None if math.isnan(seconds) else float(seconds)),
               curve=curve, validation=validation, test=test,
               record=record)


def labels_from_overrides(folders: Sequence[Path]) -> dict[Path, str]:
    """For a multirun: each run's overrides without its seed and without those every run
    shares (``optimizer=adam optimizer.lr=0.01``; ``adam`` where only the optimizer
    differs); runs that differ in nothing but the seed get none."""
    overrides = {}
    for folder in folders:
        path = folder / ".hydra" / "overrides.yaml"
        items = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
        overrides[folder] = [o for o in items if not o.startswith("seed=")]
    shared = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    labels = {folder: " ".join(o for o in items if o not in shared) for folder, items in overrides.items()}
    return {folder: label.removeprefix("optimizer=") if label.count("=") == 1 else label
            for folder, label in labels.items() if label}


def metric_at(run: Run, metric: str, evaluations: float) -> float:
    """The validation metric at the last validation within ``evaluations`` gradient
    evaluations (NaN if there is none)."""
    values, at = run.validation.get(metric), run.validation.get("evaluations")
    if values is None or at is None:
        return math.nan
    within = np.nonzero(at <= evaluations * (1 + 1e-9))[0]
    return float(values[within[-1]]) if len(within) else math.nan


def loss_at(run: Run, evaluations: float) -> float:
    """The final training loss as of ``evaluations`` gradient evaluations: the mean over
    the last 10% of the logged steps within them."""
    within = run.curve["loss"][run.curve["evaluations"] <= evaluations * (1 + 1e-9)]
    if not len(within):
        return math.nan
    return float(np.mean(within[-max(1, math.ceil(TAIL * len(within))):]))


def _evaluations_at(done: np.ndarray, logged_done: np.ndarray, logged: np.ndarray) -> np.ndarray:
    """Gradient evaluations after ``done`` steps, from the logged points (and 0 at 0)."""
    x, y = np.concatenate([[0.0], logged_done]), np.concatenate([[0.0], logged])
    beyond = done > x[-1]
    return np.where(beyond, done * (y[-1] / x[-1]), np.interp(done, x, y))


def _metric_rows(folder: Path) -> list[dict[str, str]]:
    """The run's logged rows in order. A resumed run logs into a ``resumed_N/metrics.csv``
    of its own, from the checkpoint's step on: rows an earlier file logged from that step
    on (after the checkpoint, before the interruption) were done again and are dropped."""
    files = sorted(folder.glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RecipeError(f"{folder}: no metrics.csv (the run needs logger=csv)")
    rows: list[dict[str, str]] = []
    for path in files:
        with open(path, newline="") as f:
            later = list(csv.DictReader(f))
        steps = [_number(r.get("step")) for r in later]
        start = min((s for s in steps if s is not None), default=None)
        if start is not None:
            rows = [r for r in rows if (_number(r.get("step")) or 0.0) < start]
        rows += later
    return rows


def _float(value: Any) -> float | None:
    """A CSV cell as a float, NaN and infinities included; None when empty."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _lr(config: Any) -> float | None:
    lr = OmegaConf.select(config, "optimizer.lr")
    return float(lr) if isinstance(lr, (int, float)) else None


def _optimizer_name(folder: Path, config: Any) -> str:
    hydra = folder / ".hydra" / "hydra.yaml"
    if hydra.is_file():
        choice = OmegaConf.select(OmegaConf.load(hydra), "hydra.runtime.choices.optimizer")
        if choice:
            return str(choice)
    target = OmegaConf.select(config, "optimizer._target_") or "optimizer"
    return str(target).rsplit(".", 1)[-1]

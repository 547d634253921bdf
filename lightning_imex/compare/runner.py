"""Runs a recipe: every optimizer (and learning rate of its grid) over the seeds, each
run a fit of the app (:func:`lightning_imex.train.train`) in its own folder, in this
process. Fairness is built in: every run of a seed starts from the same weights and sees
the same data order (the app seeds both from ``seed``; digests recorded by
:class:`~lightning_imex.callbacks.TrainingCost` check it), and every run gets the same
budget of gradient evaluations (a method making k per step gets budget // k steps).

Bookkeeping: a finished run writes ``run.json``; a rerun skips finished runs, resumes an
interrupted one from its ``last.ckpt`` (exactly, as the app resumes) and refuses a folder
whose finished runs were made with other settings."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import train as app
from ..callbacks import TrainingCost
from ..data import DATAMODULES
from ..multigradient import gradient_evaluations_per_step
from .recipe import Recipe, RecipeError
from .runs import RUN_RECORD

__all__ = ["PlannedRun", "check_fairness", "plan_runs", "run_all"]

METRICS = {"classification": "val/acc", "regression": "val/mse", "language_model": "val/ppl"}
SINGLE_PROCESS = ("auto", "single_device")
LOG_POINTS = 100  # logged training steps per run (the curves' resolution)
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
# what the command sets for every run (the budget, the seeds, the recipe's learning rates, the logs it reads)
CONTROLLED = {"seed": "seeds=N", "optimizer.lr": "the recipe's lr", "trainer.max_steps": "budget=N",
              "trainer.max_epochs": "budget=N", "trainer.min_epochs": "budget=N",
              "trainer.check_val_every_n_epoch": "validations=N", "trainer.val_check_interval": "validations=N",
              "logger": "the CSV logger it reads", "paths.output_dir": "--out"}


@dataclass
class PlannedRun:
    label: str
    lr: float
    seed: int
    folder: Path
    config: DictConfig
    overrides: list[str]
    evaluations_per_step: int
    steps: int

    @property
    def finished(self) -> bool:
        return (self.folder / RUN_RECORD).is_file()


def task_metric(recipe: Recipe, config: DictConfig) -> str:
    """The recipe's metric, else the dataset task's (val/acc, val/mse or val/ppl)."""
    return recipe.metric or METRICS[DATAMODULES[config.dataset.name].task]


def compose_config(overrides: Sequence[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lightning_imex.conf", version_base="1.3"):
            return compose("train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise RecipeError(app.compose_error(error)) from error
    finally:
        GlobalHydra.instance().clear()


def plan_runs(recipe: Recipe, out: Path, user_overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """Every run's folder and composed config, checked before anything trains: the
    configs compose, each optimizer builds with the app's checks, the strategy runs in
    this process, and finished runs in ``out`` were made with the same settings."""
    for override in user_overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in CONTROLLED:
            raise RecipeError(f"{key} is set by the compare command for every run (use {CONTROLLED[key]} instead), "
                              f"got {override!r}")
    runs = []
    for entry in recipe.optimizers:
        base = [*recipe.overrides, *entry.overrides, *user_overrides]
        probe = compose_config([*base, f"paths.output_dir={_quoted(out)}", f"optimizer.lr={entry.lrs[0]}"])
        if probe.trainer.get("strategy") not in SINGLE_PROCESS:
            raise RecipeError(f"strategy: the compare command trains every run in its own process; use strategy=auto "
                              f"(one device), got trainer.strategy={OmegaConf.to_container(probe.trainer)['strategy']!r}")
        with _quiet():  # the app's own checks, once per optimizer, before any training
            try:
                app.build(probe)
            except app.ConfigError as error:
                raise RecipeError(f"recipe {recipe.name}, optimizer {entry.name}: {error}") from error
        per_step = _evaluations_per_step(probe, entry.name)
        steps = recipe.budget // per_step
        if steps < 1:
            raise RecipeError(f"budget={recipe.budget} is less than one step of {entry.name} "
                              f"({per_step} gradient evaluations per step)")
        validate_every = max(1, recipe.budget // recipe.validations // per_step)
        for lr in entry.lrs:
            for seed in range(recipe.seeds):
                folder = out / "runs" / entry.name / f"lr_{lr:g}" / f"seed_{seed}"
                overrides = [*base, f"seed={seed}", f"optimizer.lr={lr}", f"trainer.max_steps={steps}",
                             "trainer.max_epochs=-1", "trainer.min_epochs=null", "trainer.check_val_every_n_epoch=null",
                             f"trainer.val_check_interval={validate_every}", "trainer.num_sanity_val_steps=0",
                             f"trainer.log_every_n_steps={max(1, steps // LOG_POINTS)}", "trainer.enable_model_summary=false",
                             "trainer.enable_progress_bar=false", "logger=csv", f"paths.output_dir={_quoted(folder)}"]
                config = compose_config(overrides)
                _run_callbacks(config)
                runs.append(PlannedRun(entry.name, lr, seed, folder, config, overrides, per_step, steps))
    for run in runs:
        saved = run.folder / ".hydra" / "config.yaml"
        if run.finished and saved.is_file() and OmegaConf.load(saved) != run.config:
            raise RecipeError(f"{run.folder} holds a finished run made with other settings (budget, seeds, "
                              "overrides or the recipe changed): use --out for a new folder, or delete it")
    return runs


def _quoted(path: Path) -> str:
    """A path as a Hydra override's value (quoted: a folder name may hold '=' or ',')."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _evaluations_per_step(config: DictConfig, name: str) -> int:
    try:
        optimizer = instantiate(config.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except Exception as error:  # app.build has checked the fields: not expected
        raise RecipeError(f"optimizer {name}: {app.one_line(error)}") from error
    per_step = gradient_evaluations_per_step(optimizer)
    if per_step is None:
        raise RecipeError(f"optimizer {name} makes a varying number of gradient evaluations per step "
                          f"({type(optimizer).__name__}): a budget of evaluations cannot be split into steps")
    return per_step


def _run_callbacks(config: DictConfig) -> None:
    """The compare command's own cost counter and progress bar replace the config's; the
    checkpoint keeps only ``last.ckpt`` (what an interrupted run resumes from)."""
    callbacks = config.callbacks or {}
    with open_dict(config):
        for name in ("cost", "rich_progress_bar"):
            callbacks.pop(name, None)
        if "checkpoint" in callbacks:
            callbacks.checkpoint.update(monitor=None, save_top_k=0, save_last=True)


class _StepProgress(L.Callback):
    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task = progress, task

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.progress.update(self.task, completed=trainer.global_step)


def run_all(runs: Sequence[PlannedRun], progress: Progress | None = None) -> None:
    """Runs the unfinished runs; each writes ``run.json`` when it ends."""
    progress = progress or Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn())
    with progress:
        overall = progress.add_task("runs", total=len(runs), completed=sum(r.finished for r in runs))
        for run in runs:
            if run.finished:
                continue
            task = progress.add_task(f"  {run.label} lr={run.lr:g} seed={run.seed}", total=run.steps)
            _run_one(run, _StepProgress(progress, task))
            progress.remove_task(task)
            progress.advance(overall)


def _run_one(run: PlannedRun, progress: L.Callback) -> None:
    config = run.config.copy()
    last = run.folder / "checkpoints" / "last.ckpt"
    if last.is_file():  # interrupted: resume exactly where it stopped
        config.ckpt_path = str(last)
    elif run.folder.exists():
        shutil.rmtree(run.folder)  # interrupted before its first checkpoint
    (run.folder / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(run.config, run.folder / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(run.overrides), run.folder / ".hydra" / "overrides.yaml")
    cost = TrainingCost()
    started = time.perf_counter()
    with _quiet() as caught:
        metrics = app.train(config, extra_callbacks=[cost, progress], print_summary=False)
    if caught:
        (run.folder / "warnings.txt").write_text("".join(f"{w.category.__name__}: {w.message}\n" for w in caught))
    record = {"label": run.label, "lr": run.lr, "seed": run.seed, "evaluations_per_step": run.evaluations_per_step,
              "steps": run.steps, "gradient_evaluations": cost.gradient_evaluations,
              "train_seconds": cost.train_seconds, "fit_seconds": time.perf_counter() - started,
              "initial_weights": cost.initial_weights, "batch_digests": cost.batch_digests, "metrics": metrics,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    temporary = run.folder / (RUN_RECORD + ".tmp")
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, run.folder / RUN_RECORD)  # the run counts as finished only once this is whole


@contextlib.contextmanager
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Lightning's information lines off and warnings recorded (into the run's
    ``warnings.txt``): the console shows the progress bars only."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:  # the app's filters (quiet()) still apply
            yield caught
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_fairness(records: Sequence[dict[str, Any]]) -> str:
    """One line on whether the runs of each seed started from the same weights and saw
    the same first training batches (from the runs' digests); raises if they did not."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_seed.setdefault(record["seed"], []).append(record)
    batches = 0
    for seed, group in by_seed.items():
        if len({r["initial_weights"] for r in group}) != 1:
            raise RecipeError(f"unfair comparison: the runs of seed {seed} started from different weights "
                              f"({', '.join(sorted({r['label'] for r in group}))})")
        common = min(len(r["batch_digests"]) for r in group)
        if len({tuple(r["batch_digests"][:common]) for r in group}) != 1:
            raise RecipeError(f"unfair comparison: the runs of seed {seed} saw different training batches")
        batches = common if not batches else min(batches, common)
    return (f"Fairness (checked): for each seed every run started from the same initial weights and saw the same "
            f"first {batches} training batches; every optimizer had the same budget of gradient evaluations.")

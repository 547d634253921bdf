"""Runs a recipe: every optimizer (and learning rate of its grid) over the seeds, each
run a fit of the app (:func:`lightning_imex.train.train`) in its own folder, in this
process. Fairness is built in: every run of a seed starts from the same weights and sees
the same data order (the app seeds both from ``seed``; digests recorded by
:class:`~lightning_imex.callbacks.TrainingCost` check it), and every run gets the same
budget of gradient evaluations (a method making k per step gets budget // k steps).

Bookkeeping: a finished run writes ``run.json``; a rerun skips finished runs, resumes an
interrupted one from its ``last.ckpt`` (exactly, as the app resumes) and refuses a folder
whose finished runs were made with other settings.

Runs are independent, so :func:`run_all` trains ``jobs`` of them at a time, each in a
worker process of a pool (the ``spawn`` context: a fork of a process holding torch's
thread pools and CUDA can deadlock), with a fixed number of torch intra-op threads per
run (one per core when runs share the cores: torch's default of a thread per core in
every run slows each down many times over) and, on a machine with several GPUs, one GPU
per worker (``CUDA_VISIBLE_DEVICES``); or, with ``hydra/launcher=slurm`` (or another of
hydra-submitit-launcher's), each run as a job of submitit's executor. A run's numbers do
not depend on which process trains it: every run seeds its weights and data from its own
config."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import train as app
from ..app.cores import usable_cores
from ..callbacks import TrainingCost
from ..checkpoint import load_checkpoint
from ..clipping import NonFiniteGradientError
from ..data import DATAMODULES
from ..multigradient import gradient_evaluations_per_step
from .recipe import Recipe, RecipeError
from .runs import RUN_RECORD
from .workers import start_worker

__all__ = ["PlannedRun", "check_fairness", "default_jobs", "plan_runs", "run_all"]

METRICS = {"classification": "val/acc", "regression": "val/mse", "language_model": "val/ppl"}
SINGLE_PROCESS = ("auto", "single_device")
# strategies whose fit starts processes of its own (Lightning re-runs the command in each): a run under one is the
# app's command in a process of its own (strategy=fsdp_cpu, fsdp)
OWN_PROCESSES = ("lightning_imex.sharding.FSDP2Strategy",)
LOG_POINTS = 100  # logged training steps per run (the curves' resolution)
LAUNCHER = ("hydra/launcher=", "hydra.launcher.")  # overrides that send the runs to hydra-submitit-launcher
SUBMITIT = {"SlurmLauncher": "slurm", "LocalLauncher": "local"}  # its launchers: submitit's cluster names
POLL_SECONDS = 1.0  # how often submitted jobs are looked at
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
# what the command sets for every run (the budget, the seeds, the recipe's learning rates, the logs it reads)
CONTROLLED = {"seed": "seeds=N", "optimizer.lr": "the recipe's lr", "trainer.max_steps": "budget=N",
              "trainer.max_epochs": "budget=N", "trainer.min_epochs": "budget=N",
              "trainer.check_val_every_n_epoch": "validations=N", "trainer.val_check_interval": "validations=N",
              "logger": "the CSV logger it reads", "paths.output_dir": "--out", "threads": "--threads N"}


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


def compose_config(overrides: Sequence[str], hydra: bool = False) -> DictConfig:
    """The app's config for ``overrides`` (with Hydra's own node, ``hydra``, if asked)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lightning_imex.conf", version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=hydra)
    except (HydraException, OmegaConfBaseException) as error:
        raise RecipeError(app.compose_error(error)) from error
    finally:
        GlobalHydra.instance().clear()


def split_launcher(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """The overrides of every run, and those choosing where runs go (``hydra/launcher=``,
    ``hydra.launcher.*``)."""
    launcher = [o for o in overrides if o.lstrip("+~").startswith(LAUNCHER)]
    return [o for o in overrides if o not in launcher], launcher


def launcher_config(recipe: Recipe, overrides: Sequence[str], out: Path) -> dict[str, Any]:
    """The launcher's fields as the app composes them for the recipe (interpolations such
    as ``${trainer.devices}`` resolved), its jobs' files in ``out/.submitit``."""
    config = compose_config([*recipe.overrides, *overrides], hydra=True)
    launcher = config.hydra.launcher
    with open_dict(launcher):
        launcher.submitit_folder, launcher.name = str(out / ".submitit" / "%j"), "lightning-imex-compare"
    return OmegaConf.to_container(launcher, resolve=True)


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
        if probe.trainer.get("strategy") not in SINGLE_PROCESS and not _own_processes(probe):
            raise RecipeError(f"strategy: the compare command trains every run in its own process; use strategy=auto "
                              f"(one device) or a sharded strategy (fsdp, fsdp_cpu), got "
                              f"trainer.strategy={OmegaConf.to_container(probe.trainer)['strategy']!r}")
        with _quiet():  # the app's own checks, once per optimizer, before any training
            try:
                _, module, _ = app.build(probe)
            except app.ConfigError as error:
                raise RecipeError(f"recipe {recipe.name}, optimizer {entry.name}: {error}") from error
        per_step = _evaluations_per_step(module, entry.name)
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


def _own_processes(config: DictConfig) -> bool:
    strategy = config.trainer.get("strategy")
    return isinstance(strategy, DictConfig) and strategy.get("_target_") in OWN_PROCESSES


def _quoted(path: Path) -> str:
    """A path as a Hydra override's value (quoted: a folder name may hold '=' or ',')."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _evaluations_per_step(module: L.LightningModule, name: str) -> int:
    """Gradient evaluations per step of the optimizer the fit builds: the one the app
    built and checked (no other is built)."""
    optimizer = module.checked_optimizer()
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
    """:attr:`steps` the optimizer steps done (a diverged run stops early), shown on the
    run's progress bar if it has one (a run in a worker process has none)."""

    def __init__(self, progress: Progress | None = None, task: Any = None) -> None:
        self.progress, self.task, self.steps = progress, task, 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps = trainer.global_step
        if self.progress is not None:
            self.progress.update(self.task, completed=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps = trainer.global_step  # a resumed fit may have no batch left to run


def default_jobs() -> int:
    """Runs at a time: one per GPU where there are GPUs, else one per core."""
    return torch.cuda.device_count() or usable_cores()


def run_all(runs: Sequence[PlannedRun], jobs: int = 1, threads: int | None = None,
            launcher: dict[str, Any] | None = None) -> None:
    """Trains the unfinished runs, ``jobs`` at a time, each with ``threads`` torch intra-op
    threads (None: this process's setting when ``jobs`` is 1, else the cores shared out),
    or each as a job of the ``launcher`` (:func:`launcher_config`; threads: its
    ``cpus_per_task``); each writes ``run.json`` when it ends. On a terminal a progress bar
    shows, else a line per finished run."""
    todo = [run for run in runs if not run.finished]
    if any(_own_processes(run.config) for run in todo):
        jobs = 1  # a sharded run starts processes of its own over the devices: one run at a time
    console = Console()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not console.is_terminal)
    done = len(runs) - len(todo)
    with progress:
        overall = progress.add_task("runs", total=len(runs), completed=done)

        def finished(run: PlannedRun, record: dict[str, Any]) -> None:
            nonlocal done
            done += 1
            progress.advance(overall)
            if not console.is_terminal:
                print(f"[{done}/{len(runs)}] {run.label} lr={run.lr:g} "
                      f"seed={run.seed}: {record['steps']} steps in {record['fit_seconds']:.1f} s"
                      + (f", diverged ({record['diverged']})" if record["diverged"] else ""), flush=True)

        if launcher is not None:
            _run_submitit(todo, launcher, threads or launcher.get("cpus_per_task") or 1, finished)
            return
        if jobs > 1:
            threads = threads or max(1, usable_cores() // jobs)
        if jobs == 1 or len(todo) < 2:
            with _torch_threads(threads):
                for run in todo:
                    task = progress.add_task(f"  {run.label} lr={run.lr:g} seed={run.seed}", total=run.steps)
                    finished(run, _run_one(run, _StepProgress(progress, task)))
                    progress.remove_task(task)
            return
        _run_parallel(todo, min(jobs, len(todo)), threads, finished)


def _run_parallel(runs: Sequence[PlannedRun], jobs: int, threads: int, finished: Any) -> None:
    """The runs in a pool of ``jobs`` worker processes; the first error cancels the runs
    not started and waits for those running (each ends with ``run.json`` or resumes)."""
    context = multiprocessing.get_context("spawn")
    gpus, devices = torch.cuda.device_count(), None
    if gpus > 1:
        devices = context.Queue()  # one GPU per worker, handed out as the workers start
        for index in range(jobs):
            devices.put(str(index % gpus))
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=start_worker,
                             initargs=(os.getpid(), threads, devices)) as pool:
        pending = {pool.submit(_run_in_worker, dataclasses.replace(run, config=None)): run for run in runs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    finished(pending.pop(future), future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def submitit_executor(launcher: dict[str, Any]) -> Any:
    """hydra-submitit-launcher's executor for the launcher's fields: its common fields
    (the plugin's ``BaseQueueConf``) as submitit takes them, the others prefixed with the
    cluster's name, as the plugin passes them."""
    params = dict(launcher)
    target = str(params.pop("_target_", ""))
    cluster = SUBMITIT.get(target.rsplit(".", 1)[-1])
    if cluster is None:
        raise RecipeError(f"hydra/launcher: the compare command sends runs to hydra-submitit-launcher (slurm, "
                          f"submitit_slurm or submitit_local), got {target}")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    common = set(OmegaConf.structured(BaseQueueConf).keys())
    folder = params.pop("submitit_folder")
    timeouts = {f"{cluster}_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **timeouts)
        executor.update_parameters(**{k if k in common else f"{cluster}_{k}": v for k, v in params.items()})
    except (NameError, TypeError, ValueError) as error:  # submitit's for an unknown or a bad parameter
        raise RecipeError(f"hydra.launcher: {app.one_line(error)}") from error
    return executor


def _run_submitit(runs: Sequence[PlannedRun], launcher: dict[str, Any], threads: int, finished: Any) -> None:
    """The runs as jobs of hydra-submitit-launcher's executor (:func:`submitit_executor`),
    one job per run. Interrupting the command cancels the jobs not finished."""
    executor = submitit_executor(launcher)
    pending = {executor.submit(_run_in_worker, dataclasses.replace(run, config=None), threads): run for run in runs}
    try:
        while pending:
            for job in [job for job in pending if job.done()]:
                finished(pending.pop(job), job.result())
            time.sleep(POLL_SECONDS if pending else 0)
    except BaseException:
        for job in pending:
            job.cancel(check=False)
        raise


def _run_in_worker(run: PlannedRun, threads: int | None = None) -> dict[str, Any]:
    """A run sent without its config (the schema's types do not pickle), composed again
    from its overrides as :func:`plan_runs` composed it; ``threads``: torch's, if given
    (a pool's worker set them when it started)."""
    if threads:
        torch.set_num_threads(threads)
    app.quiet()
    config = compose_config(run.overrides)
    _run_callbacks(config)
    return _run_one(dataclasses.replace(run, config=config))


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (None: unchanged) for the block."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_one(run: PlannedRun, progress: _StepProgress | None = None) -> dict[str, Any]:
    progress = progress or _StepProgress()
    config = run.config.copy()
    last = run.folder / "checkpoints" / "last.ckpt"
    if last.exists():  # interrupted: resume exactly where it stopped (a sharded fit's checkpoint is a folder)
        config.ckpt_path = str(last)
    elif run.folder.exists():
        shutil.rmtree(run.folder)  # interrupted before its first checkpoint
    (run.folder / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(run.config, run.folder / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(run.overrides), run.folder / ".hydra" / "overrides.yaml")
    cost = TrainingCost()
    started = time.perf_counter()
    diverged, caught = None, []
    if _own_processes(config):
        metrics, diverged = _run_command(run, config, cost, progress)
    else:
        with _quiet() as caught:
            try:
                metrics = app.train(config, extra_callbacks=[cost, progress], print_summary=False)
            except NonFiniteGradientError as error:  # a learning rate too large: a result (the worst), not a crash
                metrics, diverged = {}, app.one_line(error)
    if caught:
        (run.folder / "warnings.txt").write_text("".join(f"{w.category.__name__}: {w.message}\n" for w in caught))
    record = {"label": run.label, "lr": run.lr, "seed": run.seed, "evaluations_per_step": run.evaluations_per_step,
              "steps": progress.steps, "gradient_evaluations": cost.gradient_evaluations,
              "train_seconds": cost.train_seconds, "fit_seconds": time.perf_counter() - started,
              "initial_weights": cost.initial_weights, "batch_digests": cost.batch_digests, "metrics": metrics,
              "diverged": diverged, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    temporary = run.folder / (RUN_RECORD + ".tmp")
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, run.folder / RUN_RECORD)  # the run counts as finished only once this is whole
    return record


def _run_command(run: PlannedRun, config: DictConfig, cost: TrainingCost, progress: _StepProgress
                 ) -> tuple[dict[str, float], str | None]:
    """The run as ``python -m lightning_imex.train`` with its overrides, its output in
    ``command.log``; ``cost`` and ``progress`` read from its last checkpoint (the
    config's own TrainingCost counts there; the checkpoint holds its counters and
    digests). Returns no metrics (the report reads metrics.csv, as for any run) and why
    it diverged, if it did."""
    checkpoint = ["callbacks.checkpoint.monitor=null", "callbacks.checkpoint.save_top_k=0",
                  "callbacks.checkpoint.save_last=true"] if "checkpoint" in (config.callbacks or {}) else []
    resume = [f"ckpt_path={_quoted(Path(config.ckpt_path))}"] if config.ckpt_path else []
    command = [sys.executable, "-m", "lightning_imex.train", *run.overrides, *checkpoint, *resume,
               f"hydra.run.dir={_quoted(run.folder)}", "hydra.output_subdir=null"]  # the runner wrote .hydra
    with open(run.folder / "command.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    output = (run.folder / "command.log").read_text(errors="replace")
    diverged = next((line.split("NonFiniteGradientError: ", 1)[1] for line in output.splitlines()
                     if "NonFiniteGradientError: " in line), None)
    if done.returncode and diverged is None:
        raise RecipeError(f"{run.label} lr={run.lr:g} seed={run.seed}: lightning-imex-train ended with exit "
                          f"{done.returncode}; its output ends: {' '.join(output.splitlines()[-3:])}")
    last = run.folder / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(last) if last.exists() else {}
    if "TrainingCost" not in saved.get("callbacks", {}):
        raise RecipeError(f"{run.label}: a run in its own processes counts its cost with the config's TrainingCost "
                          "callback (callbacks.cost), saved in its last checkpoint (callbacks.checkpoint): keep both")
    cost.load_state_dict(saved["callbacks"]["TrainingCost"])
    progress.steps = saved["global_step"]
    return {}, diverged


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

"""The Hydra app: every config composes and runs, the default job learns digits, multirun,
2-process DDP on CPU, resume from a checkpoint, and bad overrides fail fast in one line."""

from __future__ import annotations

import atexit
import csv
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fork_runner import AppServer
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback

import lightning_imex.train as app
from lightning_imex.app import threads
from lightning_imex.data import DATAMODULES
from lightning_imex.models import LANGUAGE_MODELS

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = sorted(p.stem for p in (ROOT / "conf" / "optimizer").glob("*.yaml"))
IMAGE_DATASETS = {"digits", "mnist", "cifar10"}
# read from the user's files: covered with synthetic files below (ptb: in tests/test_language_model.py)
FILE_DATASETS = {"mnist", "cifar10", "ptb"}


def config(tmp_path: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_imex.conf", version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}/data",
                                           "trainer=debug", "logger=none", *overrides])


_SERVER: list[AppServer] = []  # this process's fork server (app_server)


def run_app(tmp_path: Path, *overrides: str, timeout: int = 300, fresh: bool | None = None
            ) -> subprocess.CompletedProcess:
    """``lightning-imex-train`` as a user runs it, in ``tmp_path`` (warnings shown, errors in
    one line): a process of its own, forked from a server that has the imports done
    (``fork_runner``), or with ``fresh=True`` a new interpreter (what a check of the
    warnings printed while importing needs). By default a run that starts processes of
    its own (a ``strategy``) gets a new interpreter: Lightning relaunches its command."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "HYDRA_FULL_ERROR")}
    if fresh is None:
        fresh = any(o.startswith("strategy=") for o in overrides)
    if fresh:
        return subprocess.run([sys.executable, "-m", "lightning_imex.train", *overrides], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)
    return app_server().run(tmp_path, list(overrides), timeout=timeout, env=env)


def app_server() -> AppServer:
    """This process's fork server, started at the first run that can use it."""
    if not _SERVER:
        _SERVER.append(AppServer(Path(tempfile.mkdtemp(prefix="fork-runner-"))))
        _SERVER[0].wait_ready()
        atexit.register(_SERVER[0].close)
    return _SERVER[0]


# what Lightning prints on stderr besides warnings: its device lines, why the fit stopped,
# fast_dev_run's note, and DDP's start
LIGHTNING_INFO = re.compile(r"(GPU|TPU|HPU) available: |`Trainer\.fit` stopped: |Running in `fast_dev_run` mode|"
                            r"Initializing distributed: |distributed_backend=|All distributed processes registered|"
                            r"-{20,}$")


def unexpected_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not Lightning's usual information: warnings, tips."""
    return [line for line in stderr.splitlines() if line.strip() and not LIGHTNING_INFO.match(line)]


@pytest.mark.filterwarnings("ignore::lightning_imex.optim.PositivityWarning")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_config_runs(tmp_path, optimizer):
    metrics = app.train(config(tmp_path, f"optimizer={optimizer}", "callbacks=none"))
    assert "train/loss" in metrics


COMBOS = [(d, m) for d in sorted(DATAMODULES) if d not in FILE_DATASETS
          for m in ("logreg", "mlp", "cnn", "resnet", "vgg", "lstm")
          # token windows need a language model, which reads nothing else
          if (DATAMODULES[d].task == "language_model") == (m in LANGUAGE_MODELS)
          and (m in ("logreg", "mlp", "lstm") or d in IMAGE_DATASETS)]


@pytest.mark.parametrize("dataset,model", COMBOS)
def test_every_dataset_and_compatible_model_runs(tmp_path, dataset, model):
    metrics = app.train(config(tmp_path, f"dataset={dataset}", f"model={model}"))
    assert {"train/loss", "val/loss"} <= set(metrics)


@pytest.mark.parametrize("dataset,model", [("mnist", "cnn"), ("mnist", "logreg"), ("cifar10", "resnet")])
def test_file_datasets_run_from_local_files(tmp_path, dataset, model):
    from test_data import write_cifar, write_mnist
    write_mnist(tmp_path / "data" / "mnist") if dataset == "mnist" else write_cifar(
        tmp_path / "data" / "cifar10" / "cifar-10-batches-py")
    metrics = app.train(config(tmp_path, f"dataset={dataset}", f"model={model}", "callbacks=none"))
    assert {"train/loss", "val/loss"} <= set(metrics)


def test_incompatible_model_is_a_config_error(tmp_path):
    with pytest.raises(app.ConfigError, match="model 'cnn' needs image inputs"):
        app.build(config(tmp_path, "dataset=spirals", "model=cnn"))


def test_default_job_learns_digits(tmp_path):
    result = run_app(tmp_path, fresh=True)  # the main job as a user runs it: any import-time warning shows
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"test/acc\s+([0-9.]+)", result.stdout).group(1))
    assert accuracy >= 0.90, result.stdout
    last = list(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt"))  # Hydra's run dir
    assert last
    # quiet: no tip, deprecation or other warning; the summary's FLOPs counted (not 0)
    assert unexpected_lines(result.stderr) == [], result.stderr
    assert "Total params" in result.stdout and re.search(r"Total FLOPs: [1-9]", result.stdout)
    # the epoch as the progress bar and the checkpoint give it (the last one's index)
    assert torch.load(last[0], weights_only=True)["epoch"] == 19
    assert "finished at step 420 (epoch 19)" in result.stdout


@pytest.mark.slow
def test_ddp_cpu_runs_two_processes(tmp_path):
    result = run_app(tmp_path, "strategy=ddp_cpu", "trainer.max_steps=4", "callbacks=none", "logger=none",
                     "test=false")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "MEMBER: 1/2" in output and "MEMBER: 2/2" in output
    assert "finished at step 4" in result.stdout
    # every warning once (rank zero's), the fit's own too; the task's logging syncs right
    warnings = unexpected_lines(result.stderr)
    assert len(warnings) == len(set(warnings)), result.stderr
    assert sum("is not shorter than this fit (4 scheduler steps)" in line for line in warnings) == 1, result.stderr
    assert "sync_dist" not in result.stderr


def steps_logged(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss_step")]


@pytest.mark.slow  # CLI processes: the full tier runs it
def test_resume_continues_from_the_saved_step(tmp_path):
    common = ["trainer.max_epochs=null", "trainer.log_every_n_steps=1", "callbacks=checkpoint", "test=false"]
    first = run_app(tmp_path, "trainer.max_steps=12", "hydra.run.dir=first", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    second = run_app(tmp_path, "trainer.max_steps=20", "hydra.run.dir=second", f"ckpt_path={checkpoint}",
                     "scheduler.on_resume=keep", *common)  # its plan has ended (tests/test_resume_extend.py)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "finished at step 20" in second.stdout
    assert min(steps_logged(tmp_path / "second")) >= 12 and max(steps_logged(tmp_path / "second")) == 19


@pytest.mark.slow  # one CLI process each: the full tier runs them (tests/test_bad_inputs.py: many more, in-process)
@pytest.mark.parametrize("overrides,message", [
    (["optimizer=nope"], r"error: optimizer=nope: no such optimizer config; available: adagrad, adam, adamax, "),
    (["dataset=nope"], r"error: dataset=nope: no such dataset config; available: cifar10, diabetes, "),
    (["optimizer.lr=-1"], r"error: optimizer.lr must be a finite number >= 0, got -1"),
    (["optimizer.betas=[1.5,0.9]"], r"error: optimizer.betas\[0\] must be in \[0, 1\), got 1.5"),
    (["trainer.max_epochs=abc"], r"error: trainer.max_epochs=abc: Value 'abc' of type 'str' could not be converted "
                                 r"to Integer"),
    (["clipping.algorithm=norm"], r"error: clipping.threshold must be a finite number > 0"),
    (["dataset=mnist"], r"error: .*train-images-idx3-ubyte"),
])
def test_bad_overrides_fail_fast_in_one_line(tmp_path, overrides, message):
    result = run_app(tmp_path, *overrides, "trainer=debug", timeout=120)
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1 and re.search(message, result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))  # nothing trained


class _ThreadsDuringFit(Callback):
    def on_train_start(self, trainer, pl_module):
        self.threads = torch.get_num_threads()


def test_threads_sets_torchs_threads_for_the_fit_only(tmp_path):
    before, seen = torch.get_num_threads(), _ThreadsDuringFit()
    app.train(config(tmp_path, f"threads={before + 1}", "callbacks=none", "test=false"), extra_callbacks=[seen],
              print_summary=False)
    assert (seen.threads, torch.get_num_threads()) == (before + 1, before)
    app.train(config(tmp_path, "callbacks=none", "test=false"), extra_callbacks=[seen], print_summary=False)
    assert seen.threads == before  # null, one process: torch's, as it was


def test_threads_null_shares_the_cores_between_cpu_processes(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fit = SimpleNamespace(accelerator=CPUAccelerator(), num_devices=2)
    assert (threads.TorchThreads().resolve(fit), threads.TorchThreads(3).resolve(fit)) == (4, 3)
    assert threads.TorchThreads().resolve(SimpleNamespace(accelerator=CPUAccelerator(), num_devices=1)) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's choice for several processes, or the user's
    assert threads.TorchThreads().resolve(fit) is None


def test_a_fit_builds_its_optimizer_once(tmp_path, monkeypatch):
    """The optimizer the app checks before the fit (its hyper-parameters, the schedule,
    the Trainer's settings) is the one the fit trains with, and it trains as a fresh one:
    checking the schedule (a warm-up sets the learning rates) leaves no trace."""
    from lightning_imex import module
    from lightning_imex.optim import IMEXAdam
    built, init = [], IMEXAdam.__init__
    monkeypatch.setattr(IMEXAdam, "__init__", lambda self, *a, **k: (built.append(self), init(self, *a, **k))[1])
    overrides = ["callbacks=none", "test=false", "scheduler=constant", "scheduler.warmup_steps=3",
                 "trainer.fast_dev_run=false", "trainer.max_steps=12", "trainer.limit_val_batches=2"]
    checked = app.train(config(tmp_path / "checked", *overrides), print_summary=False)
    assert len(built) == 1
    monkeypatch.setattr(module, "_optimizes", lambda optimizer, pl_module: False)  # the fit builds its own
    fresh = app.train(config(tmp_path / "fresh", *overrides), print_summary=False)
    assert len(built) == 3 and checked == fresh


@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
def test_pure_bf16_training_with_rounded_parameter_writes(tmp_path, rounding):
    """``trainer.precision=bf16-true``: the optimizer is built on the bfloat16 weights (its
    param_rounding accepts them) and the model summary feeds them a bfloat16 example."""
    metrics = app.train(config(tmp_path, "optimizer=imex_euler", f"optimizer.param_rounding={rounding}",
                               "trainer.precision=bf16-true", "trainer.enable_model_summary=true", "callbacks=none"))
    assert math.isfinite(metrics["train/loss"])

"""What ``lightning-imex-train`` prints: quiet runs (the warm-up warning only where the
user can act on it), the progress bar as the callbacks say, errors in one line, --help.
The default job's and DDP's output are checked in test_app.py, with those runs."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar

import lightning_imex.train as app
from test_app import config, run_app, unexpected_lines

WARMUP = "is not shorter than this fit"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@pytest.mark.slow  # one CLI process
def test_debug_run_prints_no_warning(tmp_path):
    # forked from the imports done: test_app.py's default job checks, in a new interpreter,
    # that importing them warns of nothing
    result = run_app(tmp_path, "trainer=debug")
    assert result.returncode == 0, result.stderr[-3000:]
    assert unexpected_lines(result.stderr) == [], result.stderr
    assert "finished at step 1 (epoch 0)" in result.stdout


def test_debug_fit_keeps_the_whole_warmup_without_a_warning(tmp_path):
    datamodule, module, trainer = app.build(config(tmp_path, "callbacks=none"))  # fast_dev_run: 1 step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=datamodule)
    assert not [w for w in caught if WARMUP in str(w.message)]
    schedule = trainer.lr_scheduler_configs[0].scheduler
    assert schedule.warmup_steps == 20  # the step taken is the real run's first: warm-up over 20


def test_fit_shorter_than_the_warmup_warns(tmp_path):
    cfg = config(tmp_path, "trainer.fast_dev_run=false", "trainer.max_steps=3", "trainer.limit_val_batches=1",
                 "callbacks=none", "test=false")
    with pytest.warns(UserWarning, match=r"scheduler.warmup_steps=20 is not shorter than this fit \(3 scheduler"):
        app.train(cfg)


@pytest.mark.parametrize("overrides,bar", [([], RichProgressBar), (["~callbacks.rich_progress_bar"], None),
                                           (["trainer.enable_progress_bar=false"], None)])
def test_progress_bar_follows_the_callbacks(tmp_path, overrides, bar):
    _, _, trainer = app.build(config(tmp_path, *overrides))
    assert type(trainer.progress_bar_callback) is bar if bar else trainer.progress_bar_callback is None


def test_monitoring_a_metric_the_fit_does_not_log_is_a_config_error(tmp_path):
    # Lightning would find out an epoch into the fit (ModelCheckpoint only warns)
    with pytest.raises(app.ConfigError, match=r"^scheduler.monitor='nope' is not a metric this fit logs; it logs: "
                                              r"grad_norm, train/acc, .*, val/loss$"):
        app.build(config(tmp_path, "scheduler=plateau", "scheduler.monitor=nope", "callbacks=none"))


ERRORS = [
    pytest.param(["logger=tensorboard"], r"logger=tensorboard needs the tensorboard package, which is not "
                 r"installed: pip install 'lightning-imex\[tensorboard\]' \(or pip install tensorboard\)",
                 marks=pytest.mark.skipif(_installed("tensorboard"), reason="tensorboard is installed"),
                 id="tensorboard"),
    pytest.param(["-m", "hydra/launcher=slurm"], r"hydra/launcher=slurm needs the hydra-submitit-launcher plugin, "
                 r"which is not installed: pip install 'lightning-imex\[slurm\]'",
                 marks=pytest.mark.skipif(_installed("hydra_plugins.hydra_submitit_launcher"),
                                          reason="hydra-submitit-launcher is installed"), id="slurm"),
    pytest.param(["trainer.accumulate_grad_batches=2"], r"IMEXAdam\(tableau='trapezoidal'\) evaluates the gradient "
                 r"several times per step .* use accumulate_grad_batches=1", id="accumulate"),
    pytest.param(["strategy=ddp"], r"trainer.accelerator=gpu but this machine has no GPU .*: use strategy=ddp_cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available"), id="ddp"),
]


@pytest.mark.slow  # one CLI process each
@pytest.mark.parametrize("overrides,message", ERRORS)
def test_cli_error_is_one_line(tmp_path, overrides, message):
    # forked, strategy=ddp too: the error comes before Lightning would start any process
    result = run_app(tmp_path, "trainer=debug", *overrides, timeout=120, fresh=False)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.fullmatch(r"lightning-imex-train: error: .+", lines[0]) and re.search(message, lines[0]), lines[0]
    assert not list(tmp_path.glob("*/**/checkpoints"))  # nothing trained


@pytest.mark.slow  # one CLI process
def test_help_shows_the_groups_and_examples(tmp_path):
    result = run_app(tmp_path, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("lightning-imex-train: trains a network"), result.stdout[:300]
    assert "powered by Hydra" not in result.stdout
    for group in ("dataset", "model", "optimizer", "scheduler", "strategy", "trainer", "callbacks", "logger",
                  "experiment"):
        assert re.search(rf"^{group}: \w+, \w+", result.stdout, re.MULTILINE), group
    examples = result.stdout.split("== Examples ==")[1]
    assert len(re.findall(r"^ +lightning-imex-train", examples, re.MULTILINE)) == 5


LIGHTNING_FREE = """
import sys
from hydra.core.global_hydra import GlobalHydra
from lightning_imex.app.cli import main
from lightning_imex.compare import main as compare
for argv, command in ((["--help"], None), (["optimizer=nope"], None), (["model.nope=1"], None),
                      (["imex_spirals", "dataset=nope"], compare), (["imex_spirals", "model.nope=1"], compare)):
    sys.argv = ["lightning-imex-train", *argv]
    try:
        command(argv) if command else main()
    except SystemExit as exit:
        print(argv[-1], exit.code, flush=True)
    GlobalHydra.instance().clear()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lightning", "pytorch_lightning"))
    assert not loaded, (argv, loaded[:5])
"""


@pytest.mark.slow  # one process
def test_help_and_a_bad_override_answer_without_importing_lightning(tmp_path):
    # the console scripts' path, the train and the compare command's: without Lightning and torch, seconds faster
    result = subprocess.run([sys.executable, "-c", LIGHTNING_FREE], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("lightning-imex-train: trains a network")
    assert result.stdout.splitlines()[-5:] == ["--help 0", "optimizer=nope 1", "model.nope=1 1", "dataset=nope 2",
                                               "model.nope=1 2"]
    model_keys = ("no such key in model; model has: name, hidden, activation, dropout, batch_norm (to add one: "
                  "+model.nope=1)")
    assert result.stderr.splitlines() == [
        "lightning-imex-train: error: optimizer=nope: no such optimizer config; available: adagrad, adam, adamax, "
        "adamomentum, adamw, clipped_adam, imex_ars222, imex_ars343, imex_euler, imex_ssp3_433, imex_trapezoidal, "
        "imex_trapezoidal_pc, imex_trapezoidal_reuse, sgd",
        f"lightning-imex-train: error: model.nope: {model_keys}",
        "lightning-imex-compare: error: dataset=nope: no such dataset config; available: cifar10, diabetes, digits, "
        "gaussians, lorenz63, mnist, mnist1d, ptb, pydoc_topics, spirals",
        f"lightning-imex-compare: error: model.nope: {model_keys}"]

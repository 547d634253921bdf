"""Every bad input answered in one line: the app's command line (Hydra's composition, the
build, a checkpoint to resume from, Lightning's settings) exits non-zero with one line
``lightning-imex-train: error: ...`` that names the field, prints no traceback and no
summary and writes no checkpoint; the Python API raises a ``ValueError``/``TypeError``
whose message is one line naming the argument, at construction.

The command-line cases run in this process (``main()`` for what Hydra composes, the
composed config through the task function for the rest: the same code minus the
interpreter's start); a few ``slow`` ones run ``lightning-imex-train`` for real. The
API tables add to the per-module ones (test_factory, test_ema, test_adam_family,
test_imex_adam, test_clipping, test_models, test_data): this file is about the count and
the one-line property across the whole surface."""

from __future__ import annotations

import copy
import functools
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig
from torch import nn

import lightning_imex.train as app
from lightning_imex.app import checks
from lightning_imex import IMEXModule, configure_optimizers
from lightning_imex.callbacks import ModelEMA
from lightning_imex.checkpoint import CheckpointError, check_checkpoint
from lightning_imex.data import DATAMODULES
from lightning_imex.models import build_model
from lightning_imex.optim import AdaMax, AdaMomentum, ClippedAdam, IMEXAdam, IMEXTableau
from lightning_imex.task import SupervisedTask
from test_app import ROOT, config, run_app

PREFIX = "lightning-imex-train: error: "
SMALL = ("model.hidden=[16]",)  # the checkpoint's network (small: a quick fit, a small file)
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available")
GROUPS = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "hydra"}


@functools.cache
def _composed(groups: tuple[str, ...]) -> DictConfig:
    return config(ROOT / "outputs" / "unused", *groups)


def compose(tmp_path: Path, *overrides: str) -> DictConfig:
    """``test_app.config(tmp_path, *overrides)`` in a few milliseconds instead of 0.1 s: the
    config groups' selections are composed once (Hydra's compose), then the value overrides
    are applied to a copy as Hydra's compose applies them (after the selections, the
    config in struct mode)."""
    groups = tuple(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in GROUPS)
    values = [f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}/data",
              *(o for o in overrides if o not in groups)]
    cfg = copy.deepcopy(_composed(groups))
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(values), cfg)
    return cfg


@pytest.fixture(autouse=True)
def one_line_errors(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # which asks for tracebacks


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A real ``last.ckpt`` (a 2-step fit of a small MLP) and broken or foreign files."""
    folder = tmp_path_factory.mktemp("checkpoints")
    with warnings.catch_warnings():  # a 2-step fit: shorter than the warm-up, no validation before it ends
        warnings.filterwarnings("ignore", message=r"scheduler.warmup_steps=.* is not shorter than this fit")
        warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor='val/loss'\)` could not find")
        app.train(config(folder / "run", *SMALL, "trainer.fast_dev_run=false", "trainer.max_steps=2",
                         "trainer.limit_val_batches=1", "callbacks=checkpoint", "test=false"))
    last = folder / "run" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    files = {"last": last, "missing": folder / "nope.ckpt", "folder": folder / "run", "empty": folder / "empty.ckpt",
             "truncated": folder / "truncated.ckpt", "garbage": folder / "garbage.ckpt",
             "foreign": folder / "foreign.ckpt", "weights": folder / "weights.ckpt", "unsafe": folder / "unsafe.ckpt"}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(data[:len(data) // 2])
    files["garbage"].write_bytes(b"this is not a checkpoint\n" * 20)
    torch.save({"a": 1}, files["foreign"])
    saved = torch.load(last, weights_only=True)
    torch.save({"state_dict": saved["state_dict"], "pytorch-lightning_version": saved["pytorch-lightning_version"]},
               files["weights"])
    torch.save({"model": nn.Linear(2, 2)}, files["unsafe"])
    return files


def assert_one_line(code, out: str, err: str, fragment: str, folder: Path) -> str:
    assert code not in (0, None), (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert "finished at step" not in out  # no summary
    assert not list(folder.rglob("last.ckpt"))  # nothing trained
    return lines[0]


# ---------------------------------------------------------------------------------------
# the command line: Hydra's composition (main() with a command line)

COMPOSE = [
    pytest.param(["optimizer=nope"], "optimizer=nope: no such optimizer config; available: adagrad, adam, adamax",
                 id="optimizer-option"),
    pytest.param(["dataset=nope"], "dataset=nope: no such dataset config; available: cifar10", id="dataset-option"),
    pytest.param(["callbacks=[default,nope]"], "callbacks=nope: no such callbacks config; available: checkpoint",
                 id="callbacks-option"),
    pytest.param(["trainer.max_epochs=abc"], "trainer.max_epochs=abc: Value 'abc' of type 'str' could not be "
                 "converted to Integer", id="trainer-type"),
    pytest.param(["test=maybe"], "test=maybe: Value 'maybe' is not a valid bool", id="test-type"),
    pytest.param(["seed=abc"], "seed=abc: Value 'abc'", id="seed-type"),
    pytest.param(["model.width=3"], "model.width: no such key in model; model has: name, hidden, activation",
                 id="model-key"),
    pytest.param(["trainer.max_epochs=[1"], "cannot parse the override 'trainer.max_epochs=[1'", id="syntax"),
    pytest.param(["+seed=1"], "An item is already at 'seed'", id="append-existing"),
    pytest.param(["~nope"], "'nope' does not exist", id="delete-missing"),
    pytest.param(["--bogus"], "unrecognized arguments: --bogus", id="flag"),
]


@pytest.mark.parametrize("overrides,fragment", COMPOSE)
def test_composition_error_is_one_line(tmp_path, monkeypatch, capsys, overrides, fragment):
    monkeypatch.setattr(sys, "argv", [app.PROG, f"hydra.run.dir={tmp_path}/run", f"paths.data_dir={tmp_path}",
                                      "trainer=debug", "logger=none", *overrides])
    with pytest.raises(SystemExit) as exit:
        app.main()
    out, err = capsys.readouterr()
    assert_one_line(exit.value.code, out, err, fragment, tmp_path)


# ---------------------------------------------------------------------------------------
# the command line: the build (the composed config through the task function)

BUILD = [
    # model
    pytest.param(["model.hidden=[-5]"], "model.hidden must be a list of integers >= 1", id="mlp-hidden-negative"),
    pytest.param(["model.hidden=[0]"], "model.hidden[0] is 0", id="mlp-hidden-zero"),
    pytest.param(["model.hidden=[1.5]"], "model.hidden[0] is 1.5", id="mlp-hidden-float"),
    pytest.param(["model.hidden=5"], "model.hidden must be a list of integers >= 1 (one per layer), got 5",
                 id="mlp-hidden-int"),
    pytest.param(["model.dropout=1.5"], "model.dropout must be a number in [0, 1)", id="mlp-dropout"),
    pytest.param(["model.activation=sigmoid"], "model.activation must be one of", id="mlp-activation"),
    pytest.param(["model.batch_norm=maybe"], "model.batch_norm must be a bool (true or false)", id="mlp-batch-norm"),
    pytest.param(["+model.width=3"], "model.width: not a field of model 'mlp'; allowed: hidden", id="mlp-unknown"),
    pytest.param(["model=resnet", "model.width=0"], "model.width must be an integer >= 1", id="resnet-width"),
    pytest.param(["model=resnet", "model.blocks=-1"], "model.blocks must be an integer >= 1", id="resnet-blocks"),
    pytest.param(["model=cnn", "model.channels=[64,0]"], "model.channels[1] is 0", id="cnn-channels"),
    pytest.param(["model=cnn", "model.hidden=-1"], "model.hidden must be an integer >= 1", id="cnn-hidden"),
    pytest.param(["model=cnn", "dataset=spirals"], "model 'cnn' needs image inputs", id="cnn-on-vectors"),
    pytest.param(["model=vgg", "model.widths=[8,M,M,M,M]"], "model.widths has 4 max poolings ('M'): a 8x8 image "
                 "allows at most 3", id="vgg-poolings"),
    pytest.param(["model=lstm"], "model 'lstm' does not fit this dataset's task 'classification'",
                 id="lstm-on-digits"),
    pytest.param(["model=lstm", "dataset=pydoc_topics", "model.tie_weights=true", "model.hidden=32"],
                 "model.tie_weights needs model.embedding == model.hidden", id="lstm-tie-weights"),
    # dataset
    pytest.param(["dataset.batch_size=0"], "dataset.batch_size must be an integer >= 1, got 0", id="batch-size"),
    pytest.param(["dataset.val_fraction=1.5"], "dataset.val_fraction must be a number in [0, 1)", id="val-fraction"),
    pytest.param(["+dataset.foo=1"], "dataset.foo: not a field of dataset 'digits'; allowed: batch_size",
                 id="dataset-unknown"),
    pytest.param(["dataset=spirals", "+dataset.n_classes=1"], "dataset.n_classes must be an integer >= 2",
                 id="spirals-classes"),
    pytest.param(["dataset=mnist"], "train-images-idx3-ubyte", id="mnist-files"),
    pytest.param(["dataset=pydoc_topics", "model=lstm", "dataset.bptt=0"],
                 "dataset.bptt must be an integer >= 1, got 0", id="bptt"),
    pytest.param(["dataset=pydoc_topics"], "model 'mlp' does not fit this dataset's task 'language_model'",
                 id="mlp-on-text"),
    pytest.param(["dataset=ptb", "model=lstm"], "ptb.train.txt", id="ptb-files"),
    # optimizer, schedule, clipping, parameter groups
    pytest.param(["optimizer.lr=-1"], "optimizer.lr must be a finite number >= 0, got -1", id="lr"),
    pytest.param(["optimizer.betas=[1.5,0.9]"], "optimizer.betas[0] must be in [0, 1)", id="betas"),
    pytest.param(["optimizer.tableau=rk4"], "optimizer: unknown tableau 'rk4'; known tableaux: euler", id="tableau"),
    pytest.param(["optimizer.fused=yes"], "optimizer.fused must be a bool or None", id="fused"),
    pytest.param(["optimizer=imex_ssp3_433", "optimizer.reuse_gradient=true"], "optimizer.reuse_gradient=True needs",
                 id="reuse-gradient"),
    pytest.param(["+optimizer.foo=1"], "optimizer.foo: not a field of IMEXAdam; allowed: lr",
                 id="optimizer-unknown"),
    pytest.param(["scheduler.warmup_steps=-1"], "scheduler.warmup_steps must be an integer >= 0", id="warmup"),
    pytest.param(["scheduler.eta_min=-1"], "scheduler.eta_min must be a finite number >= 0", id="eta-min"),
    pytest.param(["scheduler=plateau", "scheduler.monitor=nope"], "scheduler.monitor='nope' is not a metric this fit "
                 "logs; it logs: ", id="plateau-monitor"),
    pytest.param(["clipping.algorithm=norm"], "clipping.threshold must be a finite number > 0", id="clip-threshold"),
    pytest.param(["clipping.nonfinite=warn"], "clipping.nonfinite must be one of", id="clip-nonfinite"),
    pytest.param(["param_groups.no_weight_decay=[nope]"], "param_groups.no_weight_decay: pattern 'nope' matches no",
                 id="no-weight-decay"),
    # callbacks and top-level keys
    pytest.param(["callbacks.ema.decay=2"], "callbacks.ema: decay must be a number in (0, 1)", id="ema-decay"),
    pytest.param(["callbacks.checkpoint.monitor=nope"], "callbacks.checkpoint.monitor='nope' is not a metric",
                 id="checkpoint-monitor"),
    pytest.param(["callbacks.checkpoint.mode=avg"], "callbacks.checkpoint: `mode` can be min, max",
                 id="checkpoint-mode"),
    pytest.param(["seed=-1"], "seed must be an integer in [0, 4294967295], got -1", id="seed"),
    pytest.param(["threads=0"], "threads must be an integer >= 1 (null: torch's default", id="threads"),
    # the Trainer
    pytest.param(["trainer.max_epochs=-5"], "trainer: `max_epochs` must be a non-negative integer", id="max-epochs"),
    pytest.param(["trainer.precision=17"], "trainer: Precision 17 is invalid. Allowed precision values:",
                 id="precision"),
    pytest.param(["trainer.devices=0"], "trainer.devices must be a number of devices >= 1, -1", id="devices"),
    pytest.param(["trainer.log_every_n_steps=-1"], "trainer.log_every_n_steps must be an integer >= 0",
                 id="log-every"),
    pytest.param(["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be an integer >= 1",
                 id="accumulate-zero"),
    pytest.param(["trainer.accumulate_grad_batches=2"], "accumulate_grad_batches=2 would add its later evaluations",
                 id="accumulate-multigradient"),
    pytest.param(["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be a finite number >= 0",
                 id="gradient-clip-val"),
    pytest.param(["trainer.gradient_clip_val=1", "clipping.algorithm=norm", "clipping.threshold=1"],
                 "gradient clipping is configured twice", id="clipping-twice"),
    pytest.param(["trainer.fast_dev_run=false", "trainer.limit_train_batches=-1"],
                 "trainer: You have passed invalid value -1 for limit_train_batches", id="limit-train"),
    pytest.param(["trainer.fast_dev_run=false", "trainer.max_epochs=1", "trainer.val_check_interval=1000"],
                 "trainer.val_check_interval=1000 is more than the 21 training batches of an epoch", id="val-check"),
    pytest.param(["trainer.num_sanity_val_steps=-5"], "trainer.num_sanity_val_steps must be an integer >= -1",
                 id="sanity-steps"),
    pytest.param(["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch must be an integer >= 1",
                 id="check-val-every"),
    pytest.param(["trainer.accelerator=nope"], "trainer: You selected an invalid accelerator name", id="accelerator"),
    pytest.param(["+trainer.foo=1"], "trainer.foo: not an argument of lightning.Trainer; allowed: accelerator",
                 id="trainer-unknown"),
    pytest.param(["strategy=ddp"], "trainer.accelerator=gpu but this machine has no GPU", marks=NO_GPU, id="ddp"),
    pytest.param(["trainer.default_root_dir=/proc/nope"], "trainer.default_root_dir=/proc/nope: cannot create this "
                 "folder", id="root-dir"),
]

# a checkpoint to resume from (file names from the checkpoints fixture)
RESUME = [
    pytest.param("missing", [], "nope.ckpt: no such file", id="missing"),
    pytest.param("folder", [], ": a folder, not a checkpoint file", id="folder"),
    pytest.param("empty", [], ": an empty file (0 bytes), not a checkpoint", id="empty"),
    pytest.param("truncated", [], ": a truncated or corrupt checkpoint", id="truncated"),
    pytest.param("garbage", [], ": not a PyTorch checkpoint", id="garbage"),
    pytest.param("foreign", [], ": not a Lightning checkpoint (no state_dict / loops): it holds a dict with keys a",
                 id="foreign"),
    pytest.param("weights", [], ": holds the weights only (no optimizer_states / loops", id="weights-only"),
    pytest.param("unsafe", [], "torch.load(weights_only=True) refuses (Unsupported global", id="unsafe"),
    pytest.param("last", ["model.hidden=[32]"], "was saved from a different model (model.hidden=[16] in the "
                 "checkpoint, [32] here): net.1.weight has shape [16, 64] in the checkpoint, [32, 64] here",
                 id="model"),
    pytest.param("last", ["optimizer=adam"], "was saved with the optimizer imex_adam (tableau='trapezoidal'), this "
                 "fit has adam", id="optimizer"),
    pytest.param("last", ["optimizer=imex_euler"], "its optimizer state does not fit this fit's IMEXAdam: this state "
                 "was saved with tableau='trapezoidal'", id="tableau"),
    pytest.param("last", ["scheduler=step"], "was saved with the scheduler 'warmup_cosine', this fit has 'step'",
                 id="scheduler"),
]


def run_task(tmp_path: Path, capsys, *overrides: str) -> tuple:
    cfg = compose(tmp_path, *overrides)
    with pytest.raises(SystemExit) as exit:
        app._hydra_main(cfg)  # the task function on a composed config
    return (exit.value.code, *capsys.readouterr())


@pytest.mark.parametrize("overrides,fragment", BUILD)
def test_build_error_is_one_line(tmp_path, capsys, overrides, fragment):
    assert_one_line(*run_task(tmp_path, capsys, *overrides), fragment, tmp_path)


@pytest.mark.parametrize("name,overrides,fragment", RESUME)
def test_checkpoint_error_is_one_line(tmp_path, capsys, checkpoints, name, overrides, fragment):
    line = assert_one_line(*run_task(tmp_path, capsys, *SMALL, "callbacks=checkpoint", *overrides,
                                     f"ckpt_path={checkpoints[name]}"), fragment, tmp_path)
    assert line.startswith(f"{PREFIX}ckpt_path={checkpoints[name]}")


@pytest.mark.filterwarnings("ignore:The dirpath has changed from")  # resumed in another folder on purpose
@pytest.mark.filterwarnings("ignore:scheduler.warmup_steps=.* is not shorter than this fit")  # a few steps
def test_the_checkpoint_resumes_when_it_fits(tmp_path, checkpoints):
    metrics = app.train(config(tmp_path, *SMALL, "callbacks=checkpoint", f"ckpt_path={checkpoints['last']}",
                               "trainer.fast_dev_run=false", "trainer.max_steps=3", "trainer.limit_val_batches=1",
                               "test=false", "scheduler.on_resume=keep"))  # one step more than planned
    assert "train/loss" in metrics


# ---------------------------------------------------------------------------------------
# an error once the fit runs: a bug keeps its traceback; Lightning's own checks at the
# start of the fit (those build() does not repeat) are one line


def test_a_bug_in_training_keeps_its_traceback(tmp_path, monkeypatch):
    def training_step(self, batch, batch_idx):
        raise ValueError("a bug in training_step")

    monkeypatch.setattr(SupervisedTask, "training_step", training_step)
    monkeypatch.setattr(sys, "argv", [app.PROG, f"hydra.run.dir={tmp_path}/run", "trainer=debug", "logger=none",
                                      "callbacks=none"])
    with pytest.raises(ValueError, match="a bug in training_step"):  # not SystemExit: Python prints the traceback
        app.main()


@pytest.mark.filterwarnings("ignore:scheduler.warmup_steps=.* is not shorter than this fit")  # a few steps
def test_a_bug_in_the_sanity_check_keeps_its_traceback(tmp_path, monkeypatch):
    def validation_step(self, batch, batch_idx):
        raise ValueError("a bug in validation_step")

    monkeypatch.setattr(SupervisedTask, "validation_step", validation_step)
    with pytest.raises(ValueError, match="a bug in validation_step"):
        app.train(config(tmp_path, "trainer.fast_dev_run=false", "trainer.max_steps=1", "callbacks=none",
                         "trainer.num_sanity_val_steps=1"))


@pytest.mark.parametrize("overrides,error", [(["optimizer=nope"], "MissingConfigException"),
                                             (["model.hidden=[-5]"], "ConfigError")])
def test_hydra_full_error_shows_the_traceback(tmp_path, monkeypatch, overrides, error):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", [app.PROG, f"hydra.run.dir={tmp_path}/run", "trainer=debug", "logger=none",
                                      *overrides])
    with pytest.raises(Exception) as raised:  # not SystemExit: Python prints the traceback
        app.main()
    assert type(raised.value).__name__ == error
    assert os.environ["HYDRA_FULL_ERROR"] == "1"  # the user's setting, as it was


def test_lightning_check_at_the_start_of_the_fit_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "check_val_check_interval", lambda trainer, datamodule: None)  # leave it to Lightning
    with pytest.raises(app.ConfigError, match=r"^ ?`val_check_interval` \(1000\) must be less than or equal to the "
                                              r"number of the training batches \(21\)"):
        app.train(config(tmp_path, "trainer.fast_dev_run=false", "trainer.max_epochs=1",
                         "trainer.val_check_interval=1000", "callbacks=none", "trainer.num_sanity_val_steps=0"))
    assert not list(tmp_path.rglob("last.ckpt"))


# ---------------------------------------------------------------------------------------
# the Python API


class Net(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(2, 3), nn.Linear(3, 1))


class Module(IMEXModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = Net()


def params():
    return [nn.Parameter(torch.zeros(2))]


def task(hidden=16, optimizer=None, scheduler=None):
    """The app's module as the checkpoints fixture saved it (or with one thing changed)."""
    return SupervisedTask(model={"name": "mlp", "hidden": [hidden]}, input_shape=(1, 8, 8), num_outputs=10,
                          optimizer=optimizer or {"name": "imex_adam"},
                          scheduler=scheduler or {"name": "warmup_cosine", "warmup_steps": 20})


def euler_checked(ckpt):
    module = task(optimizer={"name": "imex_adam", "tableau": "euler"})
    return check_checkpoint(ckpt["last"], module, IMEXAdam(module.parameters(), tableau="euler"))


NOT_A_TABLEAU = dict(a_explicit=[[0, 0], [1, 0]], b_explicit=[0.5, 0.6], a_implicit=[[0, 0], [0.5, 0.5]],
                     b_implicit=[0.5, 0.5], order=2)


API = [
    # optimizers
    pytest.param(lambda c: IMEXAdam(params(), lr=-1), "lr", id="imex-lr"),
    pytest.param(lambda c: IMEXAdam(params(), betas=(0.9, 1.5)), "betas[1]", id="imex-betas"),
    pytest.param(lambda c: IMEXAdam(params(), betas=0.9), "betas", id="imex-betas-scalar"),
    pytest.param(lambda c: IMEXAdam(params(), eps=-1), "eps", id="imex-eps"),
    pytest.param(lambda c: IMEXAdam(params(), weight_decay=-0.1), "weight_decay", id="imex-weight-decay"),
    pytest.param(lambda c: IMEXAdam(params(), tableau="rk4"), "tableau", id="imex-tableau-name"),
    pytest.param(lambda c: IMEXAdam(params(), tableau={"a": 1}), "tableau", id="imex-tableau-type"),
    pytest.param(lambda c: IMEXAdam(params(), tableau=IMEXTableau(**NOT_A_TABLEAU)), "b_explicit",
                 id="imex-invalid-tableau"),
    pytest.param(lambda c: IMEXAdam(params(), tableau="ssp3_433", reuse_gradient=True), "reuse_gradient",
                 id="imex-reuse-forbidden"),
    pytest.param(lambda c: IMEXAdam(params(), fused="yes"), "fused", id="imex-fused"),
    pytest.param(lambda c: IMEXAdam(params(), bias_correction="no"), "bias_correction", id="imex-bias-correction"),
    pytest.param(lambda c: AdaMax(params(), lr=-1), "lr", id="adamax-lr"),
    pytest.param(lambda c: AdaMax(params(), betas=(1.0, 0.9)), "betas[0]", id="adamax-betas"),
    pytest.param(lambda c: AdaMomentum(params(), eps=math.inf), "eps", id="adamomentum-eps"),
    pytest.param(lambda c: AdaMomentum(params(), fused=1), "fused", id="adamomentum-fused"),
    pytest.param(lambda c: ClippedAdam(params(), max_update=-1), "max_update", id="clipped-max-update"),
    pytest.param(lambda c: ClippedAdam(params(), clip="norm"), "clip", id="clipped-clip"),
    pytest.param(lambda c: ClippedAdam(params(), ema_schedule="cosine"), "ema_schedule", id="clipped-ema-schedule"),
    # configure_optimizers
    pytest.param(lambda c: configure_optimizers(Net(), "adamz"), "optimizer.name", id="optimizer-name"),
    pytest.param(lambda c: configure_optimizers(Net(), {"name": "imex_adam", "lrr": 1}), "optimizer.lrr",
                 id="optimizer-field"),
    pytest.param(lambda c: configure_optimizers(Net(), "adam", scheduler="cosine"), "scheduler.name",
                 id="scheduler-name"),
    pytest.param(lambda c: configure_optimizers(Net(), "adam", scheduler={"name": "step", "step_size": 2, "gama": 1}),
                 "scheduler.gama", id="scheduler-field"),
    pytest.param(lambda c: configure_optimizers(Net(), "adam", scheduler={"name": "constant", "frequency": 0}),
                 "scheduler.frequency", id="scheduler-frequency"),
    pytest.param(lambda c: configure_optimizers(Net(), "adam", scheduler={"name": "warmup_cosine", "total_steps": 5,
                                                                          "warmup_steps": 9}),
                 "scheduler.warmup_steps", id="scheduler-warmup"),
    pytest.param(lambda c: configure_optimizers(Net(), "adam", scheduler={"name": "step", "step_size": 0}),
                 "step_size", id="scheduler-step-size"),
    pytest.param(lambda c: configure_optimizers(Net(), "adam", lr_multipliers={"0.*": -2}), "lr_multipliers",
                 id="lr-multiplier-value"),
    pytest.param(lambda c: configure_optimizers(Net(), "adam", lr_multipliers={"head.*": 2}), "lr_multipliers",
                 id="lr-multiplier-pattern"),
    pytest.param(lambda c: configure_optimizers(Net(), "adam", no_weight_decay=["nope"]), "no_weight_decay",
                 id="no-weight-decay-pattern"),
    pytest.param(lambda c: configure_optimizers(Net(), "adam", decay_norm_and_bias="yes"), "decay_norm_and_bias",
                 id="decay-norm-and-bias"),
    # IMEXModule
    pytest.param(lambda c: Module(optimizer=3), "optimizer", id="module-optimizer"),
    pytest.param(lambda c: Module(scheduler={"name": "plateau"}), "scheduler.monitor", id="module-plateau"),
    pytest.param(lambda c: Module(clipping={"algorithm": "norms"}), "clipping.algorithm", id="module-clip-algorithm"),
    pytest.param(lambda c: Module(clipping={"algorithm": "norm"}), "clipping.threshold", id="module-clip-threshold"),
    pytest.param(lambda c: Module(clipping={"max_norm": 1}), "clipping.max_norm", id="module-clip-field"),
    pytest.param(lambda c: Module(clipping={"nonfinite": "warn"}), "clipping.nonfinite", id="module-clip-nonfinite"),
    pytest.param(lambda c: Module(lr_multipliers=[1]), "lr_multipliers", id="module-lr-multipliers-list"),
    pytest.param(lambda c: Module(no_weight_decay=3), "no_weight_decay", id="module-no-weight-decay-int"),
    # ModelEMA
    pytest.param(lambda c: ModelEMA(decay=1.5), "decay", id="ema-decay"),
    pytest.param(lambda c: ModelEMA(schedule="cosine"), "schedule", id="ema-schedule"),
    pytest.param(lambda c: ModelEMA(update_every=0), "update_every", id="ema-update-every"),
    pytest.param(lambda c: ModelEMA(min_decay=1), "min_decay", id="ema-min-decay"),
    pytest.param(lambda c: ModelEMA(device="warp-drive"), "device", id="ema-device"),
    pytest.param(lambda c: ModelEMA(gamma="x"), "gamma", id="ema-gamma-type"),
    pytest.param(lambda c: ModelEMA(swap_test="yes"), "swap_test", id="ema-swap-test"),
    # datamodules
    pytest.param(lambda c: DATAMODULES["digits"](batch_size=0), "dataset.batch_size", id="data-batch-size"),
    pytest.param(lambda c: DATAMODULES["digits"](val_fraction=1.5), "dataset.val_fraction", id="data-val-fraction"),
    pytest.param(lambda c: DATAMODULES["digits"](num_workers=-1), "dataset.num_workers", id="data-workers"),
    pytest.param(lambda c: DATAMODULES["spirals"](n_classes=1), "dataset.n_classes", id="data-classes"),
    pytest.param(lambda c: DATAMODULES["lorenz63"](dt=0.0), "dataset.dt", id="data-dt"),
    pytest.param(lambda c: DATAMODULES["mnist"](root=3), "dataset.root", id="data-root"),
    pytest.param(lambda c: DATAMODULES["pydoc_topics"](bptt=0), "dataset.bptt", id="data-bptt"),
    pytest.param(lambda c: DATAMODULES["ptb"](max_vocab=1), "dataset.max_vocab", id="data-max-vocab"),
    # models
    pytest.param(lambda c: build_model({"name": "mlp", "hidden": [-5]}, (4,), 2), "model.hidden", id="mlp-negative"),
    pytest.param(lambda c: build_model({"name": "mlp", "hidden": [0]}, (4,), 2), "model.hidden", id="mlp-zero"),
    pytest.param(lambda c: build_model({"name": "mlp", "hidden": [1.5]}, (4,), 2), "model.hidden", id="mlp-float"),
    pytest.param(lambda c: build_model({"name": "mlp", "hidden": 5}, (4,), 2), "model.hidden", id="mlp-not-a-list"),
    pytest.param(lambda c: build_model({"name": "mlp", "activation": "sigmoid"}, (4,), 2), "model.activation",
                 id="mlp-activation"),
    pytest.param(lambda c: build_model({"name": "mlp", "batch_norm": "yes"}, (4,), 2), "model.batch_norm",
                 id="mlp-batch-norm"),
    pytest.param(lambda c: build_model({"name": "mlp", "width": 3}, (4,), 2), "model.width", id="mlp-unknown"),
    pytest.param(lambda c: build_model({"name": "logreg", "hidden": [3]}, (4,), 2), "model.hidden",
                 id="logreg-unknown"),
    pytest.param(lambda c: build_model({"name": "resnet", "width": 0}, (1, 8, 8), 2), "model.width",
                 id="resnet-width"),
    pytest.param(lambda c: build_model({"name": "resnet", "blocks": -1}, (1, 8, 8), 2), "model.blocks",
                 id="resnet-blocks"),
    pytest.param(lambda c: build_model({"name": "resnet", "stages": 0}, (1, 8, 8), 2), "model.stages",
                 id="resnet-stages"),
    pytest.param(lambda c: build_model({"name": "cnn", "channels": [64, 0]}, (1, 8, 8), 2), "model.channels",
                 id="cnn-channels"),
    pytest.param(lambda c: build_model({"name": "cnn", "hidden": -1}, (1, 8, 8), 2), "model.hidden", id="cnn-hidden"),
    pytest.param(lambda c: build_model({"name": "cnn", "dropout": 2}, (1, 8, 8), 2), "model.dropout",
                 id="cnn-dropout"),
    pytest.param(lambda c: build_model({"name": "vgg", "widths": [8, 0]}, (1, 8, 8), 2), "model.widths",
                 id="vgg-widths"),
    pytest.param(lambda c: build_model({"name": "lstm", "hidden": 32, "tie_weights": True}, (5,), 2),
                 "model.tie_weights", id="lstm-tie-weights"),
    pytest.param(lambda c: build_model({"name": "nope"}, (1, 8, 8), 2), "model.name", id="model-name"),
    # checkpoints
    pytest.param(lambda c: check_checkpoint(c["missing"], task()), "ckpt_path", id="ckpt-missing"),
    pytest.param(lambda c: check_checkpoint(c["folder"], task()), "ckpt_path", id="ckpt-folder"),
    pytest.param(lambda c: check_checkpoint(c["empty"], task()), "ckpt_path", id="ckpt-empty"),
    pytest.param(lambda c: check_checkpoint(c["truncated"], task()), "ckpt_path", id="ckpt-truncated"),
    pytest.param(lambda c: check_checkpoint(c["garbage"], task()), "ckpt_path", id="ckpt-garbage"),
    pytest.param(lambda c: check_checkpoint(c["foreign"], task()), "ckpt_path", id="ckpt-foreign"),
    pytest.param(lambda c: check_checkpoint(c["last"], task(hidden=32)), "net.1.weight", id="ckpt-model"),
    pytest.param(lambda c: check_checkpoint(c["last"], task(optimizer="adam")), "optimizer", id="ckpt-optimizer"),
    pytest.param(euler_checked, "tableau", id="ckpt-tableau"),
    pytest.param(lambda c: check_checkpoint(c["last"], task(scheduler="step")), "scheduler", id="ckpt-scheduler"),
]


@pytest.mark.filterwarnings("ignore::lightning_imex.optim.PositivityWarning")
@pytest.mark.parametrize("construct,field", API)
def test_api_error_is_one_line_naming_the_field(checkpoints, construct, field):
    with pytest.raises((ValueError, TypeError)) as error:
        construct(checkpoints)
    message = str(error.value)
    assert "\n" not in message and message.strip(), message
    assert field in message, message


def test_a_checkpoint_that_fits_passes(checkpoints):
    module = task()
    checkpoint = check_checkpoint(checkpoints["last"], module, IMEXAdam(module.parameters()))
    assert checkpoint["global_step"] == 2
    with pytest.raises(CheckpointError, match=r"; and 1 more key differs$"):  # 2 named, the rest counted
        check_checkpoint(checkpoints["last"], task(hidden=32))


# ---------------------------------------------------------------------------------------
# the real command: one line on stderr, end to end

SLOW = [
    pytest.param(["optimizer=nope"], "optimizer=nope: no such optimizer config", id="compose"),
    pytest.param(["--bogus"], "unrecognized arguments: --bogus", id="flag"),
    pytest.param(["model.hidden=[-5]"], "model.hidden must be a list of integers >= 1", id="build"),
    pytest.param(["trainer.fast_dev_run=false", "trainer.max_epochs=1", "trainer.val_check_interval=1000"],
                 "trainer.val_check_interval=1000 is more than", id="lightning"),
    pytest.param(["truncated"], ": a truncated or corrupt checkpoint", id="checkpoint-truncated"),
    pytest.param(["optimizer=adam", "last"], "was saved with the optimizer imex_adam", id="checkpoint-optimizer"),
]


@pytest.mark.slow  # one CLI process each
@pytest.mark.parametrize("overrides,fragment", SLOW)
def test_cli_error_is_one_line_end_to_end(tmp_path, checkpoints, overrides, fragment):
    overrides = [f"ckpt_path={checkpoints[o]}" if o in checkpoints else o for o in overrides]
    if any(o.startswith("ckpt_path") for o in overrides):
        overrides = [*SMALL, "callbacks=checkpoint", *overrides]
    result = run_app(tmp_path, "trainer=debug", *overrides, timeout=120)
    assert_one_line(result.returncode, result.stdout, result.stderr, fragment, tmp_path)

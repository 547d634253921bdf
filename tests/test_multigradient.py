"""Optimizers that evaluate several gradients per step, inside Lightning, whatever the
module: IMEXModule, a plain LightningModule returning IMEXAdam, the factory, and
LightningCLI's ``--optimizer``. The fit-start guards, and steps whose later evaluations
leave no trace besides their gradients."""

import copy
import sys
from types import SimpleNamespace
from unittest import mock

import lightning as L
import pytest
import torch
import torchmetrics
from conftest import flat
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lit import MODULE_KINDS, Classifier, ClassifierBody, PlainClassifier, column, loader, logged_rows, trainer
from torch.nn import functional as F

from lightning_imex.multigradient import IncompatibleSetupError, check_trainer
from lightning_imex.optim import IMEXAdam

TRAPEZOIDAL = {"name": "imex_adam", "lr": 0.01, "tableau": "trapezoidal"}
REUSE = {**TRAPEZOIDAL, "reuse_gradient": True}
kinds = pytest.mark.parametrize("kind", MODULE_KINDS, ids=lambda k: k.__name__)


def fp16_with_scaler():
    """What precision="16-mixed" is on a GPU (on a CPU Lightning turns it into bf16-mixed)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@kinds
@pytest.mark.parametrize("options,match", [
    (dict(plugins=[fp16_with_scaler()]), "use precision='bf16-mixed' or '32-true'"),
    (dict(accumulate_grad_batches=2), "accumulate_grad_batches=2 would add its later evaluations"),
])
def test_guards_raise_before_the_first_step(kind, options, match):
    """IMEXModule and the factory check when configure_optimizers runs (no training_step
    yet); an optimizer returned bare checks at its first step, before it moves anything."""
    module = kind(optimizer=TRAPEZOIDAL)
    before = flat(module)
    with pytest.raises(RuntimeError, match=match):
        trainer(max_steps=2, **options).fit(module, loader())
    assert module.calls == (1 if kind is PlainClassifier else 0)
    assert torch.equal(flat(module), before)


@kinds
@pytest.mark.parametrize("options", [dict(plugins=[fp16_with_scaler()]), dict(accumulate_grad_batches=2)])
@pytest.mark.parametrize("optimizer", [REUSE, {**TRAPEZOIDAL, "tableau": "euler"}], ids=["reuse", "euler"])
def test_one_gradient_per_step_passes_the_guards(kind, options, optimizer):
    module = kind(optimizer=optimizer)
    before = flat(module)
    trainer(max_steps=2, **options).fit(module, loader())
    assert module.calls == 2 * options.get("accumulate_grad_batches", 1)
    assert not torch.equal(flat(module), before)


def test_deepspeed_guard():
    model = torch.nn.Linear(2, 2)
    fake = SimpleNamespace(precision_plugin=None, precision="32-true", strategy=object.__new__(DeepSpeedStrategy),
                           accumulate_grad_batches=1)
    with pytest.raises(IncompatibleSetupError, match="DeepSpeed steps its engine without the closure: use strategy"):
        check_trainer(fake, IMEXAdam(model.parameters()))
    check_trainer(fake, IMEXAdam(model.parameters(), reuse_gradient=True))


class Manual(Classifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        self.manual_backward(F.cross_entropy(self(x), y))
        opt.step()  # no closure: Lightning passes one that returns None


def test_manual_optimization_without_closure_fails_before_moving_anything():
    module = Manual(optimizer=TRAPEZOIDAL)
    before = flat(module)
    with pytest.raises(RuntimeError, match=r"call `opt.step\(closure=closure\)` with a closure"):
        trainer(max_steps=2).fit(module, loader())
    assert torch.equal(flat(module), before)
    module = Manual(optimizer=REUSE)  # one gradient per step: fine without a closure
    trainer(max_steps=2).fit(module, loader())
    assert not torch.equal(flat(module), before)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trapezoidal_fit_lowers_the_loss(precision):
    module = Classifier(optimizer={**TRAPEZOIDAL, "lr": 0.03})
    data = loader(n=128, batch_size=32)
    x, y = data.dataset.tensors
    start = F.cross_entropy(module(x), y).item()
    trainer(max_steps=40, precision=precision).fit(module, data)
    assert module.calls == 80
    assert F.cross_entropy(module(x), y).item() < 0.8 * start


class StartLoss(L.Callback):
    """The loss at each step's start point, computed independently; and the step outputs."""

    def __init__(self):
        self.losses, self.outputs = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with torch.no_grad():
            self.losses.append(F.cross_entropy(module(batch[0]), batch[1]).item())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.outputs.append(outputs["loss"].item())


@kinds
@pytest.mark.parametrize("tableau,evaluations", [("trapezoidal", 2), ("ssp3_433", 3)])
def test_logged_loss_once_per_step_at_the_start_point(tmp_path, kind, tableau, evaluations):
    module = kind(optimizer={**TRAPEZOIDAL, "tableau": tableau})
    start = StartLoss()
    fit = trainer(tmp_path, max_steps=6, callbacks=[start])
    fit.fit(module, loader())
    assert module.calls == 6 * evaluations
    assert_logged_once_per_step(logged_rows(fit), start, steps=6)


def assert_logged_once_per_step(rows, start, steps, per_epoch=4):
    logged = column(rows, "train_loss_step")
    assert len(logged) == steps  # one row per optimizer step, not per evaluation
    assert logged == pytest.approx(start.losses, abs=1e-6)
    assert start.outputs == pytest.approx(start.losses, abs=1e-6)  # the step's output is its first evaluation's
    epoch_mean = column(rows, "train_loss_epoch")  # mean over the epoch's steps, not over steps * evaluations
    assert epoch_mean[0] == pytest.approx(sum(start.losses[:per_epoch]) / per_epoch, abs=1e-6)


class Counting:
    """Counts samples with a torchmetrics object; the network has BatchNorm."""

    def __init__(self, **kwargs):
        super().__init__(batch_norm=True, **kwargs)
        self.seen = torchmetrics.SumMetric()

    def training_step(self, batch, batch_idx):
        self.seen.update(torch.tensor(float(len(batch[0]))))
        return super().training_step(batch, batch_idx)


@kinds
def test_batchnorm_statistics_and_metrics_update_once_per_step(kind):
    module = type("Counting" + kind.__name__, (Counting, kind), {})(optimizer=TRAPEZOIDAL)
    reference = copy.deepcopy(module.net)
    data = loader(n=16, batch_size=16)
    trainer(max_steps=3).fit(module, data)
    assert module.calls == 6
    bn = module.net[1]
    assert bn.num_batches_tracked.item() == 3  # steps, not evaluations
    assert module.seen.compute().item() == 3 * 16  # not 6 * 16
    # the first step's statistics: one forward pass at the start point
    module = type("Counting" + kind.__name__, (Counting, kind), {})(optimizer=TRAPEZOIDAL)
    trainer(max_steps=1).fit(module, data)
    reference.train()(data.dataset.tensors[0])
    assert torch.equal(module.net[1].running_mean, reference[1].running_mean)
    assert torch.equal(module.net[1].running_var, reference[1].running_var)
    assert not torch.equal(module.net[0].weight, reference[0].weight)  # it did step


class Noisy:
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.draws = []

    def training_step(self, batch, batch_idx):
        self.draws.append(torch.rand(4))  # as dropout or an augmentation would draw
        return super().training_step(batch, batch_idx)


@kinds
def test_later_evaluations_draw_the_same_random_numbers(kind):
    noisy = type("Noisy" + kind.__name__, (Noisy, kind), {})
    module = noisy(optimizer={**TRAPEZOIDAL, "tableau": "ssp3_433"})
    trainer(max_steps=2).fit(module, loader())
    first, second = module.draws[:3], module.draws[3:]
    assert all(torch.equal(d, first[0]) for d in first) and all(torch.equal(d, second[0]) for d in second)
    assert not torch.equal(first[0], second[0])
    euler = noisy(optimizer={**TRAPEZOIDAL, "tableau": "euler"})
    trainer(max_steps=2).fit(euler, loader())
    assert torch.equal(euler.draws[1], second[0])  # the random stream advances as with one evaluation


def test_same_trajectory_whatever_the_module():
    """IMEXModule, a bare IMEXAdam and the factory train the same weights."""
    weights = []
    for kind in MODULE_KINDS:
        module = kind(optimizer={**TRAPEZOIDAL, "tableau": "ssp3_433"})
        trainer(max_steps=5).fit(module, loader())
        weights.append(flat(module))
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])


class OwnFitStart(Classifier):
    def on_fit_start(self):  # no super(): the guards do not depend on this hook
        pass


def test_guards_hold_when_on_fit_start_is_overridden():
    module = OwnFitStart(optimizer=TRAPEZOIDAL)
    before = flat(module)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=2 would add"):
        trainer(max_steps=2, accumulate_grad_batches=2).fit(module, loader())
    assert torch.equal(flat(module), before)


def test_lbfgs_in_imex_module_logs_once_per_step(tmp_path):
    """torch's LBFGS calls the closure itself (several times): IMEXModule adapts it."""
    module = Classifier(optimizer={"_target_": "torch.optim.LBFGS", "lr": 0.1, "max_iter": 3})
    start = StartLoss()
    fit = trainer(tmp_path, max_steps=4, callbacks=[start])
    fit.fit(module, loader())
    assert module.calls > 4
    assert_logged_once_per_step(logged_rows(fit), start, steps=4)


class CLIClassifier(ClassifierBody, L.LightningModule):
    """What a LightningCLI user writes: no configure_optimizers (``--optimizer`` adds one)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.build(hidden, batch_norm=False)


class CLIData(L.LightningDataModule):
    def train_dataloader(self):
        return loader()


def lightning_cli(tmp_path, *args):
    from lightning.pytorch.cli import LightningCLI

    defaults = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, log_every_n_steps=1, default_root_dir=str(tmp_path),
                    logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                            "init_args": {"save_dir": str(tmp_path), "name": "", "version": ""}})
    # pytest's own command line is no business of the CLI's (it warns when it sees one); a
    # fixed seed (the default draws one and says so)
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return LightningCLI(CLIClassifier, CLIData, run=False, save_config_callback=None, trainer_defaults=defaults,
                            seed_everything_default=0,
                            args=["--optimizer", "lightning_imex.optim.IMEXAdam", "--optimizer.lr", "0.01",
                                  "--optimizer.tableau", "trapezoidal", *args])


def test_lightning_cli_optimizer(tmp_path):
    cli = lightning_cli(tmp_path, "--trainer.max_steps", "6")
    start = StartLoss()
    cli.trainer.callbacks.append(start)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert isinstance(cli.trainer.optimizers[0], IMEXAdam) and cli.model.calls == 12
    assert_logged_once_per_step(logged_rows(cli.trainer), start, steps=6)
    cli = lightning_cli(tmp_path / "accumulate", "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "2")
    before = flat(cli.model)
    with pytest.raises(IncompatibleSetupError, match="accumulate_grad_batches=2 would add"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert torch.equal(flat(cli.model), before)

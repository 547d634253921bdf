"""Optimizers that evaluate several gradients per step, inside Lightning: the fit-start
guards, and steps whose later evaluations leave no trace besides their gradients."""

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torchmetrics
from conftest import flat
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lit import Classifier, column, loader, logged_rows, trainer
from torch.nn import functional as F

from lightning_imex.multigradient import check_fit
from lightning_imex.optim import IMEXAdam

TRAPEZOIDAL = {"name": "imex_adam", "lr": 0.01, "tableau": "trapezoidal"}
REUSE = {**TRAPEZOIDAL, "reuse_gradient": True}


def fp16_with_scaler():
    """What precision="16-mixed" is on a GPU (on a CPU Lightning turns it into bf16-mixed)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("options,match", [
    (dict(plugins=[fp16_with_scaler()]), "use precision='bf16-mixed' or '32-true'"),
    (dict(accumulate_grad_batches=2), "accumulate_grad_batches=2 would add its later evaluations"),
])
def test_guards_raise_at_fit_start(options, match):
    module = Classifier(optimizer=TRAPEZOIDAL)
    before = flat(module)
    with pytest.raises(RuntimeError, match=match):
        trainer(max_steps=2, **options).fit(module, loader())
    assert module.calls == 0 and torch.equal(flat(module), before)


@pytest.mark.parametrize("options", [dict(plugins=[fp16_with_scaler()]), dict(accumulate_grad_batches=2)])
@pytest.mark.parametrize("optimizer", [REUSE, {**TRAPEZOIDAL, "tableau": "euler"}])
def test_one_gradient_per_step_passes_the_guards(options, optimizer):
    module = Classifier(optimizer=optimizer)
    before = flat(module)
    trainer(max_steps=2, **options).fit(module, loader())
    assert module.calls == 2 * options.get("accumulate_grad_batches", 1)
    assert not torch.equal(flat(module), before)


def test_deepspeed_guard():
    model = torch.nn.Linear(2, 2)
    fake = SimpleNamespace(optimizers=[IMEXAdam(model.parameters())], precision_plugin=None, precision="32-true",
                           strategy=object.__new__(DeepSpeedStrategy), accumulate_grad_batches=1)
    with pytest.raises(RuntimeError, match="DeepSpeed steps its engine without the closure: use strategy='ddp'"):
        check_fit(fake)
    fake.optimizers = [IMEXAdam(model.parameters(), reuse_gradient=True)]
    check_fit(fake)


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


@pytest.mark.parametrize("tableau,evaluations", [("trapezoidal", 2), ("ssp3_433", 3)])
def test_logged_loss_once_per_step_at_the_start_point(tmp_path, tableau, evaluations):
    module = Classifier(optimizer={**TRAPEZOIDAL, "tableau": tableau})
    start = StartLoss()
    fit = trainer(tmp_path, max_steps=6, callbacks=[start])
    fit.fit(module, loader())
    assert module.calls == 6 * evaluations
    rows = logged_rows(fit)
    logged = column(rows, "train_loss_step")
    assert len(logged) == 6  # one row per optimizer step, not per evaluation
    assert logged == pytest.approx(start.losses, abs=1e-6)
    assert start.outputs == pytest.approx(start.losses, abs=1e-6)  # the step's output is its first evaluation's
    per_epoch = column(rows, "train_loss_epoch")  # mean over the epoch's 4 steps, not over 4 * evaluations
    assert per_epoch[0] == pytest.approx(sum(start.losses[:4]) / 4, abs=1e-6)


class Counting(Classifier):
    def __init__(self, **kwargs):
        super().__init__(batch_norm=True, **kwargs)
        self.seen = torchmetrics.SumMetric()

    def training_step(self, batch, batch_idx):
        self.seen.update(torch.tensor(float(len(batch[0]))))
        return super().training_step(batch, batch_idx)


def test_batchnorm_statistics_and_metrics_update_once_per_step():
    module = Counting(optimizer=TRAPEZOIDAL)
    reference = copy.deepcopy(module.net)
    data = loader(n=16, batch_size=16)
    trainer(max_steps=1).fit(module, data)
    assert module.calls == 2
    reference.train()(data.dataset.tensors[0])  # one forward pass at the start point
    bn, expected = module.net[1], reference[1]
    assert torch.equal(bn.running_mean, expected.running_mean)
    assert torch.equal(bn.running_var, expected.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert module.seen.compute().item() == 16  # not 32
    assert not torch.equal(module.net[0].weight, reference[0].weight)  # it did step


class Noisy(Classifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.draws = []

    def training_step(self, batch, batch_idx):
        self.draws.append(torch.rand(4))  # as dropout or an augmentation would draw
        return super().training_step(batch, batch_idx)


def test_later_evaluations_draw_the_same_random_numbers():
    module = Noisy(optimizer={**TRAPEZOIDAL, "tableau": "ssp3_433"})
    trainer(max_steps=2).fit(module, loader())
    first, second = module.draws[:3], module.draws[3:]
    assert all(torch.equal(d, first[0]) for d in first) and all(torch.equal(d, second[0]) for d in second)
    assert not torch.equal(first[0], second[0])
    euler = Noisy(optimizer={**TRAPEZOIDAL, "tableau": "euler"})
    trainer(max_steps=2).fit(euler, loader())
    assert torch.equal(euler.draws[1], second[0])  # the random stream advances as with one evaluation


class OwnFitStart(Classifier):
    def on_fit_start(self):  # no super(): the guards still run, at the first optimizer step
        pass


def test_guards_hold_when_on_fit_start_is_overridden():
    module = OwnFitStart(optimizer=TRAPEZOIDAL)
    before = flat(module)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=2 would add"):
        trainer(max_steps=2, accumulate_grad_batches=2).fit(module, loader())
    assert torch.equal(flat(module), before)

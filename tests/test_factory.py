"""configure_optimizers factory: optimizer specs, parameter groups, schedulers, and
checkpoints that load with weights_only=True."""

import functools
import math
import warnings

import lightning as L
import pytest
import torch
from conftest import flat
from hydra.utils import instantiate
from lit import Classifier, column, loader, logged_rows, trainer
from omegaconf import OmegaConf
from torch import nn

from lightning_imex.optimizers import OptimizerSpec, build_optimizer, optimizer_spec, parameter_groups
from lightning_imex.schedules import WarmupCosine, build_scheduler
from lightning_imex.optim import IMEXAdam


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8, bias=False),
                                  nn.LayerNorm(8))
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 2)


def decay_of(groups):
    return {name: group["weight_decay"] for group in groups for name in group["param_names"]}


def test_no_weight_decay_for_biases_norm_layers_and_vectors():
    groups = parameter_groups(Net(), lr=1e-3, weight_decay=0.1)
    assert decay_of(groups) == {
        "embed.weight": 0.1, "body.0.weight": 0.1, "body.3.weight": 0.1, "head.weight": 0.1,
        "body.0.bias": 0.0, "body.1.weight": 0.0, "body.1.bias": 0.0, "body.4.weight": 0.0, "body.4.bias": 0.0,
        "scale": 0.0, "head.bias": 0.0}
    every = decay_of(parameter_groups(Net(), lr=1e-3, weight_decay=0.1, decay_norm_and_bias=True))
    assert set(every.values()) == {0.1}
    patterned = decay_of(parameter_groups(Net(), lr=1e-3, weight_decay=0.1, no_weight_decay=["embed.*"]))
    assert patterned["embed.weight"] == 0.0 and patterned["head.weight"] == 0.1
    # an optimizer without weight decay gets no weight_decay key at all
    assert all("weight_decay" not in g for g in parameter_groups(Net(), lr=1e-3, weight_decay=None))


def test_lr_multipliers_first_matching_pattern_wins():
    net = Net()
    opt = build_optimizer(net, {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
                          lr_multipliers={"head.*": 10.0, "head.bias": 0.5, "body.0.*": 0.0})
    lr_of = {name: g["lr"] for g in opt.param_groups for name in g["param_names"]}
    assert lr_of["head.weight"] == pytest.approx(0.1) and lr_of["head.bias"] == pytest.approx(0.1)
    assert lr_of["body.0.weight"] == 0.0 and lr_of["embed.weight"] == 0.01
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


@pytest.mark.parametrize("kwargs,match", [
    ({"lr_multipliers": {"haed.*": 2.0}}, "lr_multipliers: pattern 'haed.*' matches no trainable parameter"),
    ({"no_weight_decay": ["nope"]}, "no_weight_decay: pattern 'nope'"),
    ({"lr_multipliers": {"head.*": -1.0}}, r"lr_multipliers\['head.\*'\] must be a finite number >= 0"),
])
def test_group_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(Net(), "adam", **kwargs)


def test_optimizer_specs_agree():
    """A name + kwargs, a Hydra partial, a DictConfig with _target_, a functools.partial
    and a class all give the same optimizer, and resolve to the same spec (a spec is taken
    as it is) and plain config."""
    hydra_partial = instantiate(OmegaConf.create(
        {"_target_": "lightning_imex.optim.IMEXAdam", "_partial_": True, "lr": 0.02, "betas": [0.8, 0.99]}))
    specs = [
        {"name": "imex_adam", "lr": 0.02, "betas": [0.8, 0.99]},
        hydra_partial,
        OmegaConf.create({"_target_": "lightning_imex.optim.IMEXAdam", "_partial_": True, "lr": 0.02,
                          "betas": [0.8, 0.99]}),
        functools.partial(IMEXAdam, lr=0.02, betas=[0.8, 0.99]),
    ]
    resolved = [optimizer_spec(s) for s in specs]
    assert all(r == OptimizerSpec(IMEXAdam, {"lr": 0.02, "betas": [0.8, 0.99]}) for r in resolved), resolved
    assert resolved[0].plain() == {"name": "imex_adam", "lr": 0.02, "betas": [0.8, 0.99]}
    assert optimizer_spec(resolved[0]) is resolved[0]
    for spec in specs + [IMEXAdam, "imex_adam"]:
        opt = build_optimizer(Net(), spec)
        assert isinstance(opt, IMEXAdam)
    assert build_optimizer(Net(), specs[1]).param_groups[0]["betas"] == (0.8, 0.99)


@pytest.mark.parametrize("spec,match", [
    ("adamm", r"optimizer.name must be one of \['adam', "),
    ({"name": "adam", "learning_rate": 0.1}, "optimizer.learning_rate: not a field of Adam; allowed: lr,"),
    ({"_target_": "torch.nn.Linear"}, "must name a torch.optim.Optimizer subclass"),
    ({"_target_": "torch.optim.Nope"}, r"optimizer._target_: cannot import 'torch.optim.Nope'"),
])
def test_bad_optimizer_spec_errors(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        optimizer_spec(spec)


class LrRecorder(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def lr_schedule(scheduler, max_steps=12, batches=4, val=None, **trainer_kwargs):
    module = Classifier(optimizer={"name": "adam", "lr": 0.1}, scheduler=scheduler)
    recorder = LrRecorder()
    trainer(max_steps=max_steps, callbacks=[recorder], num_sanity_val_steps=0, **trainer_kwargs).fit(
        module, loader(n=16 * batches), val)
    return recorder.lrs


def test_constant_schedule_with_warmup():
    assert lr_schedule("constant") == [0.1] * 12
    lrs = lr_schedule({"name": "constant", "warmup_steps": 4, "warmup_start_factor": 0.2})
    assert lrs == pytest.approx([0.1 * (0.2 + 0.8 * k / 4) for k in range(4)] + [0.1] * 8)


def test_warmup_cosine_spans_the_fit_per_step():
    warmup, total = 3, 12  # total from the trainer's max_steps
    lrs = lr_schedule({"name": "warmup_cosine", "warmup_steps": warmup, "warmup_start_factor": 0.1,
                       "eta_min": 0.001})
    expected = [0.1 * (0.1 + 0.9 * k / warmup) if k < warmup
                else 0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2
                for k in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_step_schedule_per_epoch_and_frequency():
    per_epoch = lr_schedule({"name": "step", "step_size": 1, "gamma": 0.5}, max_steps=12, batches=4)
    assert per_epoch == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4)
    every_other_step = lr_schedule({"name": "StepLR", "step_size": 1, "gamma": 0.5, "interval": "step",
                                    "frequency": 2}, max_steps=6)
    assert every_other_step == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_plateau_watches_the_monitored_metric():
    lrs = lr_schedule({"name": "plateau", "monitor": "val_loss", "patience": 0, "factor": 0.5, "mode": "max"},
                      max_steps=16, batches=4, val=loader(n=16))
    # val_loss falls every epoch, so in mode="max" every epoch after the first is a plateau
    assert lrs == pytest.approx([0.1] * 8 + [0.05] * 4 + [0.025] * 4)


@pytest.mark.parametrize("scheduler,match", [
    ({"name": "plateau"}, "scheduler.monitor is required by 'plateau'"),
    ({"name": "cosine"}, "scheduler.name must be one of"),
    ({"name": "step", "step": 3}, "scheduler.step: not a field of scheduler 'step'; allowed: step_size, gamma"),
    ({"name": "constant", "interval": "batch"}, "scheduler.interval must be one of 'step', 'epoch', got 'batch'"),
    ({"name": "constant", "frequency": 0}, "scheduler.frequency must be an integer >= 1"),
])
def test_bad_scheduler_errors_name_the_field(scheduler, match):
    with pytest.raises(ValueError, match=match):
        Classifier(scheduler=scheduler)


def test_warmup_cosine_outside_a_trainer_needs_total_steps():
    opt = build_optimizer(Net(), "adam")
    with pytest.raises(ValueError, match="scheduler.total_steps is required outside a Trainer"):
        build_scheduler(opt, {"name": "warmup_cosine"})
    config = build_scheduler(opt, {"name": "warmup_cosine", "total_steps": 10, "warmup_steps": 2})
    assert isinstance(config["scheduler"], WarmupCosine) and config["scheduler"].total_steps == 10


def test_warmup_cosine_holds_its_final_value_past_the_end():
    opt = build_optimizer(Net(), {"name": "adam", "lr": 0.1})
    schedule = WarmupCosine(opt, total_steps=10, warmup_steps=2, eta_min=0.001)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[10:] == [0.001] * 20  # torch's CosineAnnealingLR would climb back to 0.1 by step 18
    assert lrs[2] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_warmup_cosine_resumed_with_a_longer_fit_keeps_its_plan_when_asked():
    """(the other choices: tests/test_resume_extend.py)"""
    opt = build_optimizer(Net(), {"name": "adam", "lr": 0.1})
    planned = WarmupCosine(opt, total_steps=10, warmup_steps=2)
    for _ in range(6):
        opt.step()
        planned.step()
    longer = WarmupCosine(build_optimizer(Net(), {"name": "adam", "lr": 0.1}), total_steps=40, warmup_steps=2,
                          on_resume="keep")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        longer.load_state_dict(planned.state_dict())
    assert longer.total_steps == 10 and longer.get_last_lr() == planned.get_last_lr()


@pytest.mark.parametrize("kwargs,match", [
    (dict(total_steps=0), "scheduler.total_steps must be an integer >= 1"),
    (dict(total_steps=5, warmup_steps=5), r"scheduler.warmup_steps must be an integer in \[0, total_steps=5\)"),
    (dict(total_steps=5, warmup_start_factor=0.0), r"scheduler.warmup_start_factor must be a number in \(0, 1\]"),
    (dict(total_steps=5, eta_min=-1.0), "scheduler.eta_min must be a finite number >= 0"),
])
def test_warmup_cosine_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosine(build_optimizer(Net(), "adam"), **kwargs)


def fit_steps(tmp_path, steps, ckpt_path=None, dropout=0.0):
    module = Classifier(
        dropout=dropout,
        optimizer=instantiate(OmegaConf.create({"_target_": "lightning_imex.optim.IMEXAdam", "_partial_": True,
                                                "lr": 0.01, "tableau": "trapezoidal"})),
        scheduler=OmegaConf.create({"name": "warmup_cosine", "warmup_steps": 3}),
        clipping={"algorithm": "norm", "threshold": 0.5})
    fit = trainer(tmp_path, max_steps=steps, enable_checkpointing=True,
                  callbacks=[L.pytorch.callbacks.ModelCheckpoint(save_top_k=-1)])
    # full batch, one step an epoch: Lightning resumes an epoch-end checkpoint by re-entering
    # that epoch for one more batch of a fresh iterator, which is the same batch only here
    fit.fit(module, loader(batch_size=64), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return module, fit


@pytest.mark.filterwarnings("ignore:The dirpath has changed from")  # resumed in another folder on purpose
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_checkpoint_loads_weights_only_and_resumes_exactly(tmp_path, dropout):
    """With dropout too: the checkpoint carries the random generators' states."""
    straight, fit = fit_steps(tmp_path / "straight", 8, dropout=dropout)
    path = tmp_path / "straight" / "checkpoints" / "epoch=3-step=4.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # no pickled partials or DictConfigs
    assert checkpoint["hyper_parameters"]["optimizer"]["lr"] == 0.01
    assert "hparams_type" not in checkpoint
    loaded = Classifier.load_from_checkpoint(path, weights_only=True)
    assert loaded.optimizer_spec.plain() == {"name": "imex_adam", "lr": 0.01, "tableau": "trapezoidal"}
    assert set(checkpoint["random_state"]) >= {"torch", "python", "numpy"}
    assert torch.equal(loaded.state_dict()["net.0.weight"], checkpoint["state_dict"]["net.0.weight"])
    resumed, fit = fit_steps(tmp_path / "resumed", 8, ckpt_path=path, dropout=dropout)
    assert fit.global_step == 8
    assert torch.equal(flat(resumed), flat(straight))  # weights, optimizer and schedule state restored
    assert min(column(logged_rows(fit), "step")) >= 4  # the resumed run logged only its own steps


@pytest.mark.filterwarnings("ignore:Attribute 'backbone' is an instance of `nn.Module`")  # the module given on purpose
def test_unstorable_hyper_parameter_fails_at_construction():
    class WithModule(Classifier):
        def __init__(self, backbone: nn.Module, **kwargs):
            super().__init__(**kwargs)

    with pytest.raises(TypeError, match="hyper-parameter.backbone: a Linear cannot be stored in a checkpoint"):
        WithModule(nn.Linear(2, 2))

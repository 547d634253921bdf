"""One config path: ``optimizer.lr=3e-3`` followed from a composed config to the optimizer
that trains, through ``lightning-imex-train`` (:func:`lightning_imex.train.train`) and
``lightning-imex-compare`` (its planner and runner). Each composed config is resolved once
into its specs (optimizer, schedule, clipping: one of each per built module), the module
and the fit take them as they are, one optimizer is built per module (the one the app
checks is the one the fit trains), and the saved hyper-parameters are the specs' plain
forms, loadable with ``weights_only=True``."""

from __future__ import annotations

import functools
import io
import json

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import Callback
from test_compare import tiny_recipe

import lightning_imex.train as app
from lightning_imex.clipping import GradientClipping
from lightning_imex.compare.recipe import load_recipe
from lightning_imex.compare.runner import plan_runs, run_all
from lightning_imex.optimizers import OptimizerSpec
from lightning_imex.schedules import SchedulerSpec
from lightning_imex.task import SupervisedTask

SPECS = (OptimizerSpec, SchedulerSpec, GradientClipping)


class Made:
    """Every spec resolved (each spec class's ``__post_init__``: its checks run once per
    resolution), optimizer built (``torch.optim.Optimizer.__init__``) and task module
    built, in order."""

    def __init__(self, monkeypatch) -> None:
        self.specs, self.optimizers, self.modules = [], [], []
        for cls in SPECS:
            monkeypatch.setattr(cls, "__post_init__", self._spy(cls.__post_init__, self.specs))
        monkeypatch.setattr(torch.optim.Optimizer, "__init__", self._spy(torch.optim.Optimizer.__init__,
                                                                         self.optimizers))
        monkeypatch.setattr(SupervisedTask, "__init__", self._spy(SupervisedTask.__init__, self.modules))

    @staticmethod
    def _spy(method, made: list):
        @functools.wraps(method)  # Lightning reads __init__'s signature
        def spied(self, *args, **kwargs):
            made.append(self)
            return method(self, *args, **kwargs)
        return spied

    @staticmethod
    def specs_of(module: SupervisedTask) -> list:
        """The module's specs (no schedule: none)."""
        return [s for s in (module.optimizer_spec, module.scheduler_spec, module.clipping) if s is not None]


class Trained(Callback):
    def on_train_end(self, trainer, pl_module) -> None:
        self.module, self.optimizers = pl_module, list(trainer.optimizers)


def check_module(module: SupervisedTask, lr: float) -> None:
    """The module's specs carry ``lr``, its hyper-parameters are their plain forms, and
    those load with ``weights_only=True``."""
    assert module.optimizer_spec.lr == lr and module.lr == lr
    scheduler = module.scheduler_spec.plain() if module.scheduler_spec is not None else None
    assert module.hparams["optimizer"] == module.optimizer_spec.plain()
    assert module.hparams["scheduler"] == scheduler
    assert GradientClipping.from_config(module.hparams["clipping"]) == module.clipping
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["optimizer"]["lr"] == lr


def test_train_resolves_each_config_once_and_builds_one_optimizer(tmp_path, monkeypatch):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_imex.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "trainer=debug", "logger=none",
                                          "callbacks=none", "test=false", "scheduler=constant", "optimizer.lr=3e-3"])
    made, trained = Made(monkeypatch), Trained()
    app.train(cfg, extra_callbacks=[trained], print_summary=False)
    (module,) = made.modules
    assert trained.module is module
    assert made.specs == made.specs_of(module)  # optimizer, schedule, clipping: each resolved once
    assert [type(s) for s in made.specs] == list(SPECS)
    assert made.optimizers == trained.optimizers  # one optimizer: checked by the app, trained by the fit
    assert {group["lr"] for group in trained.optimizers[0].param_groups} == {3e-3}
    check_module(module, 3e-3)


def test_compare_takes_the_same_path(tmp_path, monkeypatch):
    """The planner checks each optimizer with the app's build (one module, its specs, one
    optimizer that also gives the evaluations per step); each run is the app's fit (the
    same again): two modules for a one-run compare, their specs (no schedule here) and one
    optimizer each."""
    recipe = load_recipe(str(tiny_recipe(tmp_path, {"adam": {"overrides": ["optimizer=adam"], "lr": 3e-3}},
                                         budget=4, seeds=1, validations=1)))
    made = Made(monkeypatch)
    runs = plan_runs(recipe, tmp_path / "out", ["test=false"])
    assert len(runs) == 1 and len(made.modules) == 1 and len(made.optimizers) == 1
    run_all(runs)
    checked, fitted = made.modules
    assert made.specs == made.specs_of(checked) + made.specs_of(fitted)
    assert len(made.optimizers) == 2 and fitted.trainer.optimizers == made.optimizers[1:]
    assert {group["lr"] for group in made.optimizers[1].param_groups} == {3e-3}
    check_module(fitted, 3e-3)
    assert json.loads((runs[0].folder / "run.json").read_text())["steps"] == 4

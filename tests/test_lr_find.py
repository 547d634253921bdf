"""Lightning's tuners on our modules: ``Tuner.lr_find`` writes its suggestion where the fit
then builds the optimizer from (``IMEXModule.lr``, or the ``lr`` a factory module
carries), and ``Tuner.scale_batch_size`` sets the app's datamodule's batch size."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.tuner import Tuner
from lit import Classifier, FactoryClassifier, loader, trainer

from lightning_imex import configure_optimizers
from lightning_imex.data import DATAMODULES
from lightning_imex.task import SupervisedTask


class FirstLR(L.Callback):
    """The learning rate of the first training step of the (last) fit."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and batch_idx == 0:
            self.lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]


def find_then_fit(module: L.LightningModule, tmp_path) -> tuple[float, list[float]]:
    first = FirstLR()
    fit = trainer(default_root_dir=tmp_path, max_steps=2, callbacks=[first])
    found = Tuner(fit).lr_find(module, train_dataloaders=loader(), min_lr=1e-5, max_lr=1.0, num_training=30,
                               early_stop_threshold=None)
    fit.fit(module, train_dataloaders=loader())
    return found.suggestion(), first.lrs


def test_lr_find_sets_the_lr_an_imex_module_fits_with(tmp_path):
    module = Classifier(optimizer={"name": "adam", "lr": 3e-3})  # save_hyperparameters(), as the README's
    suggestion, lrs = find_then_fit(module, tmp_path)
    assert suggestion != 3e-3 and lrs == [suggestion]
    assert module.lr == suggestion and module.hparams["optimizer"]["lr"] == suggestion  # load_from_checkpoint's


def test_lr_find_sets_the_lr_of_a_module_on_the_factory(tmp_path):
    class Tuned(FactoryClassifier):  # the lr where lr_find looks: an attribute, left out of the config
        def __init__(self):
            super().__init__({"name": "imex_adam"})
            self.lr = 3e-3

    module = Tuned()
    suggestion, lrs = find_then_fit(module, tmp_path)
    assert suggestion != 3e-3 and lrs == [suggestion]


def test_a_factory_lr_that_ignores_the_module_lr_is_an_error():
    class Ignored(FactoryClassifier):
        def __init__(self):
            super().__init__({"name": "adam", "lr": 3e-3})
            self.lr = 1e-2  # what lr_find would have written

    with pytest.raises(ValueError, match=r"optimizer.lr=0.003 but the module's lr=0.01 \(where Tuner.lr_find "
                                         r"writes its suggestion\): pass the module's"):
        configure_optimizers(Ignored(), {"name": "adam", "lr": 3e-3})


class FirstBatch(FirstLR):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.size = len(batch[0])


def test_both_tuners_on_the_app_module(tmp_path):
    """``Tuner.scale_batch_size`` sets the datamodule's ``batch_size`` (the fit then
    estimates the schedule's length with it), ``lr_find`` the ``SupervisedTask``'s lr."""
    datamodule = DATAMODULES["spirals"](batch_size=8)
    module = SupervisedTask(model={"name": "mlp", "hidden": [8]}, input_shape=datamodule.input_shape,
                            num_outputs=datamodule.num_outputs, task=datamodule.task,
                            optimizer={"name": "adam", "lr": 1e-2}, scheduler={"name": "constant"})
    first = FirstBatch()
    fit = trainer(default_root_dir=tmp_path, max_steps=1, limit_val_batches=0, callbacks=[first])
    size = Tuner(fit).scale_batch_size(module, datamodule=datamodule, mode="power", steps_per_trial=1, init_val=16,
                                       max_trials=3)
    found = Tuner(fit).lr_find(module, datamodule=datamodule, min_lr=1e-5, max_lr=1.0, num_training=30,
                               early_stop_threshold=None)
    fit.fit(module, datamodule=datamodule)
    assert size == datamodule.batch_size == first.size == 64
    assert found.suggestion() != 1e-2 and first.lrs == [found.suggestion()] == [module.hparams["optimizer"]["lr"]]

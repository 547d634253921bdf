"""ModelEMA: each schedule against its formula by hand, swaps for validation / test /
predict, evaluate="both", exact resume, export, ddp_spawn, torch.compile, bad arguments."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import flat
from lit import Classifier, column, loader, logged_rows, trainer
from torch import nn
from torch.nn import functional as F

from lightning_imex.callbacks import ModelEMA

ADAM = {"name": "adam", "lr": 0.05}


class Weights(L.Callback):
    """theta_0 and the weights after every optimizer step."""

    def __init__(self):
        self.after = []

    def on_train_start(self, trainer, module):
        self.initial = flat(module).clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(flat(module).clone())


def fit(ema: ModelEMA, steps: int = 50, module=None, tmp_path=None, **kwargs):
    module = module or Classifier(optimizer=ADAM)
    weights = Weights()
    fit = trainer(tmp_path, max_steps=steps, callbacks=[weights, ema], **kwargs)
    fit.fit(module, loader())
    return module, weights, fit


def ema_flat(ema: ModelEMA, module) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ema.ema_state_dict(module).values() if t.is_floating_point()])


def by_hand(weights: Weights, decays, zero_start=False, every=1):
    e = torch.zeros_like(weights.initial) if zero_start else weights.initial.clone()
    product = 1.0
    for j, d in enumerate(decays):
        theta = weights.after[(j + 1) * every - 1]
        e = d * e + (1 - d) * theta
        product *= d
    return e / (1 - product) if zero_start else e


@pytest.mark.parametrize("schedule,decay_of_k", [
    ("fixed", lambda k: 0.9),
    ("warmup", lambda k: min(0.9, (1 + k) / (10 + k))),
    ("power", lambda k: min(0.9, max(0.05, 1 - (1 + k / 2.0) ** -0.75))),
    ("zero_start", lambda k: 0.9),
])
def test_schedules_match_their_formulas(schedule, decay_of_k):
    ema = ModelEMA(decay=0.9, schedule=schedule, gamma=2.0, power=0.75, min_decay=0.05, end_with="raw")
    module, weights, _ = fit(ema)
    assert ema.updates == 50
    expected = by_hand(weights, [decay_of_k(k) for k in range(50)], zero_start=schedule == "zero_start")
    torch.testing.assert_close(ema_flat(ema, module), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(flat(module), weights.after[-1])  # end_with="raw": training weights untouched


def test_update_every_applies_the_skipped_steps_decay():
    ema = ModelEMA(decay=0.9, schedule="fixed", update_every=5, end_with="raw")
    module, weights, _ = fit(ema)
    assert ema.updates == 10
    torch.testing.assert_close(ema_flat(ema, module), by_hand(weights, [0.9 ** 5] * 10, every=5),
                               rtol=1e-5, atol=1e-6)


def test_decay_optimizer_takes_beta1_and_the_zero_start_schedule():
    ema = ModelEMA(decay="optimizer", end_with="raw")
    module, weights, _ = fit(ema, steps=20, module=Classifier(optimizer={**ADAM, "betas": [0.8, 0.9]}))
    assert (ema.decay, ema.schedule) == (0.8, "zero_start")
    torch.testing.assert_close(ema_flat(ema, module), by_hand(weights, [0.8] * 20, zero_start=True),
                               rtol=1e-5, atol=1e-6)
    preset = ModelEMA(decay="optimizer", schedule="fixed")
    fit(preset, steps=2, module=Classifier(optimizer={"name": "clipped_adam", "betas": [0.7, 0.49]}))
    assert (preset.decay, preset.schedule) == (0.7, "fixed")  # an explicit schedule wins


class Seen(Classifier):
    """Records the weights each validation / test / predict step runs with."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = {"val": [], "test": [], "predict": []}

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append((self.trainer.global_step, flat(self).clone()))
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self.seen["test"].append(flat(self).clone())

    def predict_step(self, batch, batch_idx):
        self.seen["predict"].append(flat(self).clone())
        return self(batch[0])


def test_validation_sees_the_ema_and_training_continues_from_raw():
    ema = ModelEMA(decay=0.9, schedule="fixed", end_with="raw")
    module = Seen(optimizer=ADAM)
    weights = Weights()
    fit_ = trainer(max_steps=8, val_check_interval=4, num_sanity_val_steps=1, callbacks=[weights, ema])
    fit_.fit(module, loader(), loader(n=16))
    checks = {step: params for step, params in module.seen["val"]}
    assert torch.equal(checks[0], weights.initial)  # the sanity check ran before any update: raw weights
    torch.testing.assert_close(checks[4], by_hand(weights, [0.9] * 4), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(checks[4], weights.after[3])
    assert torch.equal(flat(module), weights.after[-1])  # training went on from the raw weights


def test_no_swap_before_the_first_update():
    """Lightning issue 21724's setup: validation runs before start_step."""
    ema = ModelEMA(decay=0.9, start_step=6, end_with="raw")
    module = Seen(optimizer=ADAM)
    weights = Weights()
    trainer(max_steps=8, val_check_interval=4, num_sanity_val_steps=0, callbacks=[weights, ema]).fit(
        module, loader(), loader(n=16))
    checks = dict(module.seen["val"])
    assert torch.equal(checks[4], weights.after[3])  # raw, not some stale initial copy
    assert ema.updates == 3  # steps 6, 7, 8
    decays = [min(0.9, (1 + k) / (10 + k)) for k in range(3)]
    e = weights.after[5].clone()  # e_0 = the weights at start_step
    for d, theta in zip(decays, weights.after[5:8]):
        e = d * e + (1 - d) * theta
    torch.testing.assert_close(ema_flat(ema, module), e, rtol=1e-5, atol=1e-6)


def test_test_and_predict_use_the_ema(tmp_path):
    ema = ModelEMA(decay=0.9, schedule="fixed", end_with="raw")
    module = Seen(optimizer=ADAM)
    fit_ = trainer(max_steps=6, callbacks=[ema])
    fit_.fit(module, loader())
    averaged = ema_flat(ema, module)
    fit_.test(module, loader(n=16), verbose=False)
    fit_.predict(module, loader(n=16))
    assert torch.equal(module.seen["test"][0], averaged) and torch.equal(module.seen["predict"][0], averaged)
    assert not torch.equal(flat(module), averaged)  # swapped back after each


def test_end_with_ema_leaves_the_ema_in_the_module():
    ema = ModelEMA(decay=0.9, schedule="fixed")
    module, weights, fit_ = fit(ema, steps=6, module=Seen(optimizer=ADAM))
    torch.testing.assert_close(flat(module), by_hand(weights, [0.9] * 6), rtol=1e-5, atol=1e-6)
    before = flat(module).clone()
    fit_.test(module, loader(n=16), verbose=False)  # already the EMA: nothing to swap
    assert torch.equal(flat(module), before)


def test_evaluate_both_logs_raw_and_ema_metrics(tmp_path):
    ema = ModelEMA(decay=0.9, schedule="fixed", evaluate="both", end_with="raw")
    module = Classifier(optimizer=ADAM)
    val = loader(n=32, seed=5)
    fit_ = trainer(tmp_path, max_steps=8, callbacks=[ema], num_sanity_val_steps=0)
    fit_.fit(module, loader(), val)
    rows = logged_rows(fit_)
    raw, averaged = column(rows, "val_loss"), column(rows, "val_loss_ema")
    assert len(raw) == len(averaged) == 2  # one validation per epoch (4 batches an epoch)
    x, y = val.dataset.tensors
    with torch.no_grad():
        assert raw[-1] == pytest.approx(F.cross_entropy(module(x), y).item(), rel=1e-5)
        ema.swap(module)
        assert averaged[-1] == pytest.approx(F.cross_entropy(module(x), y).item(), rel=1e-5)
        ema.swap(module)
    assert raw[-1] != averaged[-1]


def test_evaluate_both_with_logged_metric_objects(tmp_path):
    from lightning_imex.data import DigitsDataModule
    from lightning_imex.task import SupervisedTask
    data = DigitsDataModule(batch_size=128)
    module = SupervisedTask({"name": "logreg"}, data.input_shape, data.num_outputs, optimizer=ADAM)
    ema = ModelEMA(decay=0.9, evaluate="both", end_with="raw")
    fit_ = trainer(tmp_path, max_epochs=2, callbacks=[ema], num_sanity_val_steps=0)
    fit_.fit(module, data)
    rows = logged_rows(fit_)
    raw, averaged = column(rows, "val/acc"), column(rows, "val/acc_ema")
    x, y = data.splits["val"].tensors
    with torch.no_grad():
        ema.swap(module)
        accuracy = (module(x).argmax(1) == y).float().mean().item()
        ema.swap(module)
    assert len(raw) == len(averaged) == 2 and averaged[-1] == pytest.approx(accuracy, abs=1e-6)


def fit_resume(tmp_path, steps, ckpt_path=None):
    ema = ModelEMA(decay=0.9, schedule="warmup", end_with="raw")
    module = Classifier(optimizer={"name": "imex_adam", "lr": 0.05, "tableau": "trapezoidal"}, batch_norm=True)
    fit_ = trainer(tmp_path, max_steps=steps, enable_checkpointing=True,
                   callbacks=[ema, L.pytorch.callbacks.ModelCheckpoint(save_top_k=-1)])
    # full batch: Lightning re-enters an epoch-end checkpoint's epoch for one batch of a fresh iterator
    fit_.fit(module, loader(batch_size=64), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return module, ema


def test_resume_is_bit_identical(tmp_path):
    straight, straight_ema = fit_resume(tmp_path / "straight", 10)
    path = tmp_path / "straight" / "checkpoints" / "epoch=4-step=5.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(checkpoint["current_model_state"])
    loaded = Classifier.load_from_checkpoint(path, weights_only=True)  # the EMA model
    assert not torch.equal(loaded.state_dict()["net.0.weight"], checkpoint["current_model_state"]["net.0.weight"])
    resumed, resumed_ema = fit_resume(tmp_path / "resumed", 10, ckpt_path=path)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)  # raw weights and buffers
    for a, b in zip(straight_ema.ema_state_dict(straight).values(), resumed_ema.ema_state_dict(resumed).values()):
        assert torch.equal(a, b)  # EMA weights and buffers
    assert straight_ema.state_dict() == resumed_ema.state_dict()  # counters and schedule


def test_export_path_writes_a_weights_only_state_dict(tmp_path):
    ema = ModelEMA(decay=0.9, schedule="fixed", export_path=str(tmp_path / "ema" / "weights.pt"))
    module, weights, _ = fit(ema, steps=5)
    exported = torch.load(tmp_path / "ema" / "weights.pt", weights_only=True)
    assert set(exported) == set(module.state_dict())
    torch.testing.assert_close(torch.cat([v.flatten() for v in exported.values()]), flat(module))


def test_buffers_are_averaged_or_copied():
    ema = ModelEMA(decay=0.5, schedule="fixed", end_with="raw")
    module = Classifier(optimizer=ADAM, batch_norm=True)
    fit(ema, steps=3, module=module)
    bn = module.net[1]
    state = ema.ema_state_dict(module)
    assert state["net.1.num_batches_tracked"].item() == bn.num_batches_tracked.item() == 3  # copied
    assert not torch.equal(state["net.1.running_mean"], bn.running_mean)  # averaged


def test_swap_exchanges_storage_without_allocating():
    ema = ModelEMA(decay=0.9, end_with="raw")
    module, _, _ = fit(ema, steps=2)
    pointers = [t.data_ptr() for t in ema.ema]
    ema.swap(module)
    assert [p.data_ptr() for p in ema._all(module)] == pointers
    ema.swap(module)


class Compiled(Classifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = torch.compile(self.net)


@pytest.mark.slow
def test_compiled_module_gets_the_same_ema():
    plain, compiled = ModelEMA(decay=0.9, end_with="raw"), ModelEMA(decay=0.9, end_with="raw")
    a, _, _ = fit(plain, steps=5)
    b, _, _ = fit(compiled, steps=5, module=Compiled(optimizer=ADAM))
    assert list(b.state_dict())[0].startswith("net._orig_mod.")  # names differ, tensors match by order
    torch.testing.assert_close(ema_flat(compiled, b), ema_flat(plain, a), rtol=1e-5, atol=1e-6)


class RankDump(ModelEMA):
    def __init__(self, folder, **kwargs):
        super().__init__(**kwargs)
        self.folder = folder

    def on_train_end(self, trainer, module):
        torch.save(torch.cat([t.flatten() for t in self.ema]), f"{self.folder}/rank{trainer.global_rank}.pt")
        super().on_train_end(trainer, module)


@pytest.mark.slow
def test_ddp_spawn_ranks_hold_identical_emas(tmp_path):
    ema = RankDump(str(tmp_path), decay=0.9, end_with="raw")
    trainer(max_steps=4, devices=2, strategy="ddp_spawn", callbacks=[ema]).fit(Classifier(optimizer=ADAM), loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0], ranks[1]) and ranks[0].abs().sum() > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(decay=1.0), r"decay must be a number in \(0, 1\) or 'optimizer'"),
    (dict(decay=0), r"decay must be a number in \(0, 1\)"),
    (dict(decay="beta1"), r"decay must be a number in \(0, 1\) or 'optimizer'"),
    (dict(schedule="cosine"), r"schedule must be one of \('fixed', 'warmup', 'power', 'zero_start'\)"),
    (dict(evaluate="all"), r"evaluate must be one of \('ema', 'raw', 'both'\)"),
    (dict(update_every=0), "update_every must be an integer >= 1"),
    (dict(start_step=-1), "start_step must be an integer >= 0"),
    (dict(end_with="best"), "end_with must be 'ema' or 'raw'"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelEMA(**kwargs)


def test_sharded_strategies_are_refused():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    fake = SimpleNamespace(strategy=object.__new__(FSDPStrategy))
    with pytest.raises(RuntimeError, match="does not average sharded weights"):
        ModelEMA().setup(fake, nn.Linear(1, 1), "fit")

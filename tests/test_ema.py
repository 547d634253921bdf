"""ModelEMA: each schedule against its formula by hand, one update per optimizer step, swaps
for validation / test / predict, evaluate="both" and the checkpoints each name ranks, exact
resume (also of EMAWeightAveraging's checkpoints), export, reuse across fits (and
TrainingCost's), StochasticWeightAveraging refused, ddp_spawn, torch.compile, bad arguments."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_imex.callbacks import ModelEMA
from lightning_imex.optim import OPTIMIZERS


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


class Net(L.LightningModule):
    """A small classifier that records the weights each validation / test / predict step sees."""

    def __init__(self, optimizer: str = "adam", options: dict | None = None, batch_norm: bool = False,
                 compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        norm = [nn.BatchNorm1d(16)] if batch_norm else []
        net = nn.Sequential(nn.Linear(6, 16), *norm, nn.Tanh(), nn.Linear(16, 3))
        self.net = torch.compile(net) if compile else net
        self.seen = {"val": [], "test": [], "predict": []}
        self.training_steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append((self.trainer.global_step, flat(self)))
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        self.seen["test"].append(flat(self))

    def predict_step(self, batch, batch_idx):
        self.seen["predict"].append(flat(self))
        return self(batch[0])

    def configure_optimizers(self):
        return OPTIMIZERS[self.hparams.optimizer](self.parameters(), **(self.hparams.options or {"lr": 0.05}))


def loader(n: int = 64, batch_size: int = 16, seed: int = 1) -> DataLoader:
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=batch_size)


def trainer(tmp_path=None, **kwargs) -> L.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
               "logger": False, "enable_checkpointing": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1}
    if tmp_path is not None:
        options.update(logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""), default_root_dir=tmp_path)
    return L.Trainer(**{**options, **kwargs})


class Weights(L.Callback):
    """theta_0, and theta_k after each optimizer step k (after[k - 1])."""

    def on_train_start(self, trainer, module):
        self.initial, self.after = flat(module), []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.after):
            self.after.append(flat(module))


def fit(ema: ModelEMA, steps: int = 50, module: Net | None = None, val=None, tmp_path=None, callbacks=(), **kwargs):
    module = module or Net()
    weights = Weights()
    run = trainer(tmp_path, max_steps=steps, callbacks=[weights, ema, *callbacks], **kwargs)
    run.fit(module, loader(), val)
    return module, weights, run


def ema_flat(ema: ModelEMA, module: nn.Module) -> torch.Tensor:
    state = ema.ema.averaged_state_dict()
    return torch.cat([state[name].flatten() for name, _ in module.named_parameters()])


def by_hand(start: torch.Tensor, thetas, decays, zero_start: bool = False) -> torch.Tensor:
    """e_j = d_j e_{j-1} + (1 - d_j) theta_j from e_0 = start (zero_start: from 0, then / (1 - prod d))."""
    e = torch.zeros_like(start) if zero_start else start.clone()
    product = 1.0
    for d, theta in zip(decays, thetas, strict=True):
        e = d * e + (1 - d) * theta
        product *= d
    return e / (1 - product) if zero_start else e


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ formulas
@pytest.mark.parametrize("schedule,decay_of_k", [
    ("fixed", lambda k: 0.9),
    ("warmup", lambda k: min(0.9, (1 + k) / (10 + k))),
    ("power", lambda k: min(0.9, max(0.3, 1 - (1 + k / 2.0) ** -0.75))),
    ("zero_start", lambda k: 0.9),
])
def test_schedules_match_their_formulas(schedule, decay_of_k):
    ema = ModelEMA(decay=0.9, schedule=schedule, gamma=2.0, power=0.75, min_decay=0.3, end_with="raw")
    module, w, _ = fit(ema)
    assert ema.updates == 50
    decays = [decay_of_k(k) for k in range(1, 51)]
    assert len(set(decays)) > 1 or schedule in ("fixed", "zero_start")  # the schedule is exercised
    close(ema_flat(ema, module), by_hand(w.initial, w.after, decays, zero_start=schedule == "zero_start"))
    assert torch.equal(flat(module), w.after[-1])  # end_with="raw": the training weights stay


def test_zero_start_is_the_adam_papers_bias_corrected_average():
    """Adam paper 7.2: a_k = b a_{k-1} + (1-b) theta_k, a_0 = 0, reported a_k / (1 - b^k)."""
    ema = ModelEMA(decay=0.95, schedule="zero_start", end_with="raw")
    module, w, _ = fit(ema, steps=12)
    a = torch.zeros_like(w.initial)
    for theta in w.after:
        a = 0.95 * a + 0.05 * theta
    close(ema_flat(ema, module), a / (1 - 0.95 ** 12))
    assert ema.ema.decay_product == pytest.approx(0.95 ** 12)


@pytest.mark.parametrize("schedule,decay_of_k", [
    ("fixed", lambda k: 0.9),
    ("warmup", lambda k: min(0.9, (1 + k) / (10 + k))),
])
def test_update_every_applies_the_skipped_steps_decay(schedule, decay_of_k):
    ema = ModelEMA(decay=0.9, schedule=schedule, update_every=5, end_with="raw")
    module, w, _ = fit(ema, steps=50)
    assert ema.updates == 10
    decays = [decay_of_k(k) ** 5 for k in range(5, 51, 5)]  # d_k^N at optimizer steps 5, 10, ...
    close(ema_flat(ema, module), by_hand(w.initial, w.after[4::5], decays))


def test_decay_optimizer_takes_beta1_and_the_zero_start_schedule():
    ema = ModelEMA(decay="optimizer", end_with="raw")
    module, w, _ = fit(ema, steps=20, module=Net(options={"lr": 0.05, "betas": (0.8, 0.9)}))
    assert (ema.decay, ema.schedule) == (0.8, "zero_start")
    close(ema_flat(ema, module), by_hand(w.initial, w.after, [0.8] * 20, zero_start=True))


@pytest.mark.parametrize("schedule,group,expected", [
    (None, {}, "zero_start"),
    (None, {"ema_schedule": "warmup"}, "warmup"),  # the optimizer's preset
    ("fixed", {"ema_schedule": "warmup"}, "fixed"),  # the user's choice wins
])
def test_decay_optimizer_honours_the_groups_ema_schedule(schedule, group, expected):
    optimizer = OPTIMIZERS["clipped_adam"](nn.Linear(2, 2).parameters(), betas=(0.7, 0.49), **group)
    ema = ModelEMA(decay="optimizer", schedule=schedule)
    ema.on_fit_start(SimpleNamespace(optimizers=[optimizer]), nn.Linear(2, 2))
    assert (ema.decay, ema.schedule) == (0.7, expected)
    ahn_cutkosky = OPTIMIZERS["clipped_adam"].ahn_cutkosky(nn.Linear(2, 2).parameters(), beta=0.6)
    ema.schedule_option = None
    ema.on_fit_start(SimpleNamespace(optimizers=[ahn_cutkosky]), nn.Linear(2, 2))
    assert (ema.decay, ema.schedule) == (0.6, "zero_start")


@pytest.mark.parametrize("options,evaluations", [
    (dict(accumulate_grad_batches=2), 2),  # 8 batches for 4 steps
    (dict(module_options={"lr": 0.05, "tableau": "ssp3_433"}), 3),  # 3 gradients per step on one batch
])
def test_one_update_per_optimizer_step_with_accumulation_or_a_multi_evaluation_optimizer(options, evaluations):
    ema = ModelEMA(decay=0.9, schedule="fixed", end_with="raw")
    module_options = options.pop("module_options", None)
    module = Net(optimizer="imex_adam", options=module_options or {"lr": 0.05, "tableau": "euler"})
    module, w, _ = fit(ema, steps=4, module=module, **options)
    assert module.training_steps == 4 * evaluations
    assert ema.updates == len(w.after) == 4
    close(ema_flat(ema, module), by_hand(w.initial, w.after, [0.9] * 4))


# ------------------------------------------------------------------ swaps
def test_validation_sees_the_ema_and_training_continues_from_raw():
    ema = ModelEMA(decay=0.9, schedule="fixed", end_with="raw")
    module, w, _ = fit(ema, steps=8, val=loader(n=16), val_check_interval=4, num_sanity_val_steps=1)
    seen = dict(module.seen["val"])
    assert torch.equal(seen[0], w.initial)  # the sanity check, before any update: raw weights
    close(seen[4], by_hand(w.initial, w.after[:4], [0.9] * 4))
    assert not torch.allclose(seen[4], w.after[3])
    assert torch.equal(flat(module), w.after[-1])  # training went on from the raw weights
    close(seen[8], ema_flat(ema, module))


def test_evaluate_raw_validates_the_raw_weights():
    ema = ModelEMA(decay=0.9, schedule="fixed", evaluate="raw", end_with="raw")
    module, w, _ = fit(ema, steps=4, val=loader(n=16))
    assert torch.equal(dict(module.seen["val"])[4], w.after[3])


@pytest.mark.parametrize("start_step,update_every,schedule", [(6, 1, "warmup"), (0, 5, "fixed")])
def test_no_swap_before_the_first_update(start_step, update_every, schedule):
    """Lightning issue 21724's setup: a validation before the EMA's first update."""
    ema = ModelEMA(decay=0.9, schedule=schedule, start_step=start_step, update_every=update_every, end_with="raw")
    module, w, _ = fit(ema, steps=8, val=loader(n=16), val_check_interval=4)
    seen = dict(module.seen["val"])
    assert torch.equal(seen[4], w.after[3])  # the raw weights, not a stale initial copy
    if start_step:  # e_0 = theta_6, then updates at steps 7 and 8
        expected = by_hand(w.after[5], w.after[6:8], [2 / 11, 3 / 12])
    else:  # e_0 = theta_0, one update at step 5
        expected = by_hand(w.initial, w.after[4:5], [0.9 ** 5])
    close(seen[8], expected)


def test_evaluate_both_logs_ema_and_raw_metrics(tmp_path):
    from torchmetrics import MeanMetric

    class Metered(Net):
        def __init__(self):
            super().__init__()
            self.mean_loss = MeanMetric()

        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            x, y = batch
            self.mean_loss.update(F.cross_entropy(self(x), y))
            self.log("mean_loss", self.mean_loss)

    ema = ModelEMA(decay=0.9, schedule="fixed", evaluate="both", end_with="raw")
    metered = Metered()
    metric = metered.mean_loss
    module, _, run = fit(ema, steps=8, module=metered, val=loader(n=32, seed=5), tmp_path=tmp_path)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(bool(r["val_loss"]) for r in rows) == sum(bool(r["val_loss_raw"]) for r in rows) == 2  # per epoch
    x, y = loader(n=32, seed=5).dataset.tensors
    metrics = run.callback_metrics
    with torch.no_grad():
        raw = F.cross_entropy(module(x), y).item()
        with ema.ema.swapped():
            averaged = F.cross_entropy(module(x), y).item()
    assert metrics["val_loss"].item() == pytest.approx(averaged, rel=1e-5)  # the names the module logs: the EMA
    assert metrics["val_loss_raw"].item() == pytest.approx(raw, rel=1e-5)
    assert raw != pytest.approx(averaged, rel=1e-3)
    # each torchmetrics Metric had a twin: the two averages did not mix
    assert metrics["mean_loss"].item() == pytest.approx(averaged, rel=1e-5)
    assert metrics["mean_loss_raw"].item() == pytest.approx(raw, rel=1e-5)
    assert "validation_step" not in module.__dict__ and "log" not in module.__dict__  # nothing patched
    assert type(module) is Metered and module.mean_loss is metric  # the module itself was not touched


def test_test_and_predict_use_the_ema():
    ema = ModelEMA(decay=0.9, schedule="fixed", end_with="raw")
    module, w, run = fit(ema, steps=6)
    averaged = ema_flat(ema, module)
    run.test(module, loader(n=16), verbose=False)
    run.predict(module, loader(n=16))
    assert torch.equal(module.seen["test"][-1], averaged) and torch.equal(module.seen["predict"][-1], averaged)
    assert torch.equal(flat(module), w.after[-1])  # swapped back after each
    ema.swap_test = False
    run.test(module, loader(n=16), verbose=False)
    assert torch.equal(module.seen["test"][-1], w.after[-1])


def test_end_with_ema_leaves_the_ema_in_the_module():
    ema = ModelEMA(decay=0.9, schedule="fixed")
    module, w, run = fit(ema, steps=6)
    close(flat(module), by_hand(w.initial, w.after, [0.9] * 6))
    before = flat(module)
    run.test(module, loader(n=16), verbose=False)  # the EMA is already in: nothing to swap
    assert torch.equal(module.seen["test"][-1], before) and torch.equal(flat(module), before)


def test_swap_exchanges_storage_without_allocating():
    ema = ModelEMA(decay=0.9, end_with="raw")
    module, _, _ = fit(ema, steps=2)
    tensors = [*module.parameters(), *module.buffers()]
    assert [id(t) for t in ema.ema.tracked] == [id(t) for t in tensors]
    raw, averaged = [t.data_ptr() for t in tensors], [t.data_ptr() for t in ema.ema.shadow]
    ema.ema.swap()
    assert [t.data_ptr() for t in tensors] == averaged and [t.data_ptr() for t in ema.ema.shadow] == raw
    assert all(a is b for a, b in zip(ema.ema.tracked, tensors, strict=True))  # same Parameters: optimizer refs hold
    ema.ema.swap()
    assert [t.data_ptr() for t in tensors] == raw


@pytest.mark.parametrize("include_buffers", [True, False])
def test_buffers_are_averaged_or_copied(include_buffers):
    ema = ModelEMA(decay=0.5, schedule="fixed", include_buffers=include_buffers, end_with="raw")
    module, _, _ = fit(ema, steps=3, module=Net(batch_norm=True))
    bn, state = module.net[1], ema.ema.averaged_state_dict()
    assert state["net.1.num_batches_tracked"].item() == bn.num_batches_tracked.item() == 3  # copied
    assert torch.equal(state["net.1.running_mean"], bn.running_mean) != include_buffers  # averaged


# ------------------------------------------------------------------ checkpoints
def fit_resume(tmp_path, ckpt_path=None):
    ema = ModelEMA(decay=0.9, schedule="warmup", update_every=2, end_with="raw")
    module = Net(optimizer="imex_adam", options={"lr": 0.05, "tableau": "trapezoidal"}, batch_norm=True)
    run = trainer(tmp_path, max_steps=10, enable_checkpointing=True,
                  callbacks=[ema, L.pytorch.callbacks.ModelCheckpoint(save_top_k=-1)])
    # full batch: Lightning re-enters an epoch-end checkpoint's epoch for one batch of a fresh iterator
    run.fit(module, loader(batch_size=64), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return module, ema


@pytest.mark.filterwarnings("ignore:The dirpath has changed from")  # resumed in another folder on purpose
def test_resume_is_bit_identical(tmp_path):
    straight, straight_ema = fit_resume(tmp_path / "straight")
    path = tmp_path / "straight" / "checkpoints" / "epoch=4-step=5.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(checkpoint["current_model_state"])
    assert checkpoint["averaging_state"]["n_averaged"].item() == 2  # steps 2 and 4
    loaded = Net.load_from_checkpoint(path, weights_only=True)  # the EMA model
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][name])
    assert not torch.equal(loaded.state_dict()["net.0.weight"], checkpoint["current_model_state"]["net.0.weight"])
    resumed, resumed_ema = fit_resume(tmp_path / "resumed", ckpt_path=path)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # raw weights and buffers
    ours, theirs = straight_ema.ema.averaged_state_dict(), resumed_ema.ema.averaged_state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # EMA weights and buffers
    assert straight_ema.state_dict() == resumed_ema.state_dict() and straight_ema.updates == 5


def test_export_path_writes_a_weights_only_state_dict(tmp_path):
    ema = ModelEMA(decay=0.9, schedule="fixed", export_path=tmp_path / "ema" / "weights.pt")
    module, _, _ = fit(ema, steps=5)
    exported = torch.load(tmp_path / "ema" / "weights.pt", weights_only=True)
    assert list(exported) == list(module.state_dict())
    assert torch.equal(torch.cat([v.flatten() for v in exported.values()]), flat(module))  # end_with="ema"


# ------------------------------------------------------------------ compile, DDP, FSDP
@pytest.mark.slow
def test_compiled_module_gets_the_same_ema():
    plain, compiled = ModelEMA(decay=0.9), ModelEMA(decay=0.9)
    a, _, run_a = fit(plain, steps=4, val=loader(n=16))
    b, _, run_b = fit(compiled, steps=4, module=Net(compile=True), val=loader(n=16))
    assert next(iter(b.state_dict())).startswith("net._orig_mod.")  # names differ; tensors match by order
    close(flat(b), flat(a))  # end_with="ema"
    # the compiled forward ran on the swapped-in EMA
    assert run_b.callback_metrics["val_loss"].item() == pytest.approx(run_a.callback_metrics["val_loss"].item())


class RankDump(ModelEMA):
    def __init__(self, folder, **kwargs):
        super().__init__(**kwargs)
        self.folder = folder

    def on_train_end(self, trainer, module):
        torch.save(torch.cat([t.flatten() for t in self.ema.shadow]), f"{self.folder}/rank{trainer.global_rank}.pt")
        super().on_train_end(trainer, module)


@pytest.mark.slow
def test_ddp_spawn_ranks_hold_identical_emas(tmp_path):
    ema = RankDump(str(tmp_path), decay=0.9, end_with="raw")
    trainer(max_steps=4, devices=2, strategy="ddp_spawn", callbacks=[ema]).fit(Net(), loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0], ranks[1]) and not torch.equal(ranks[0], flat(Net()))


def test_sharded_strategies_it_cannot_follow_are_refused_in_one_line():
    """A ModelParallelStrategy that gathers its checkpoints into one file (which would not
    hold the EMA's shards); FSDP2Strategy, Lightning's own ModelParallelStrategy with sharded
    checkpoints and FSDPStrategy pass the check (their fits and resumes:
    tests/test_fsdp_app.py::test_model_ema_under_lightnings_own_model_parallel_strategy,
    tests/test_ema_fsdp1.py)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_imex.sharding import FSDP2Strategy

    for strategy, match in ((ModelParallelStrategy(save_distributed_checkpoint=False),
                             "ModelEMA under ModelParallelStrategy needs save_distributed_checkpoint=True"),
                            (FSDP2Strategy(save_distributed_checkpoint=False),
                             "ModelEMA under FSDP2Strategy needs save_distributed_checkpoint=True")):
        with pytest.raises(RuntimeError, match=match) as error:
            ModelEMA().setup(SimpleNamespace(strategy=strategy), nn.Linear(1, 1), "fit")
        assert "\n" not in str(error.value)
    ModelEMA.check_strategy(FSDP2Strategy())
    ModelEMA.check_strategy(ModelParallelStrategy())
    ModelEMA.check_strategy(FSDPStrategy())


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs,match", [
    ({"decay": 1.0}, r"decay must be a number in \(0, 1\) or 'optimizer', got 1.0"),
    ({"decay": 0}, r"decay must be a number in \(0, 1\)"),
    ({"decay": True}, r"decay must be a number in \(0, 1\)"),
    ({"decay": "beta1"}, r"decay must be a number in \(0, 1\) or 'optimizer', got 'beta1'"),
    ({"schedule": "cosine"}, r"schedule must be one of \('fixed', 'warmup', 'power', 'zero_start', None\)"),
    ({"evaluate": "all"}, "evaluate must be one of 'ema', 'raw', 'both', got 'all'"),
    ({"end_with": "best"}, "end_with must be one of 'ema', 'raw', got 'best'"),
    ({"update_every": 0}, "update_every must be an integer >= 1, got 0"),
    ({"update_every": 2.0}, "update_every must be an integer >= 1"),
    ({"start_step": -1}, "start_step must be an integer >= 0"),
    ({"gamma": 0}, "gamma must be a number > 0"),
    ({"power": -1}, "power must be a number > 0"),
    ({"min_decay": 1}, r"min_decay must be a number in \[0, 1\)"),
    ({"device": "warp-drive"}, "device must be a torch device or None, got 'warp-drive'"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelEMA(**kwargs)


# ------------------------------------------------------------------ reuse across fits
def test_reused_with_the_same_model_starts_a_new_average():
    """Issue 19 item 4a: a second fit (a new Trainer: global_step from 0) averages from its
    first step, from the weights the module holds then (the first fit's EMA, end_with="ema")."""
    ema, module = ModelEMA(decay=0.9, schedule="fixed"), Net()
    fit(ema, steps=6, module=module)
    first = flat(module).clone()
    module, w, _ = fit(ema, steps=4, module=module)
    assert torch.equal(w.initial, first) and ema.updates == 4
    close(flat(module), by_hand(first, w.after, [0.9] * 4))  # end_with="ema": this fit's EMA, not a stale one


def test_reused_with_a_new_model_never_swaps_the_old_models_weights_in():
    """Issue 19 item 4b: the first fit's weights stay out of the second fit's module."""
    ema, first = ModelEMA(decay=0.9, schedule="fixed"), Net()
    fit(ema, steps=6, module=first)
    kept = flat(first).clone()
    second = Net()
    torch.nn.init.zeros_(second.net[0].bias)  # a model unlike the first's initial or final weights
    initial = flat(second).clone()
    second, w, _ = fit(ema, steps=4, module=second)
    assert torch.equal(w.initial, initial)
    close(flat(second), by_hand(initial, w.after, [0.9] * 4))
    assert torch.equal(flat(first), kept)


def test_training_cost_reused_counts_each_fit_from_zero():
    from lightning_imex.callbacks import TrainingCost

    cost = TrainingCost()
    for steps in (5, 3):
        trainer(max_steps=steps, callbacks=[cost]).fit(Net(), loader())
        assert cost.gradient_evaluations == steps and len(cost.batch_digests) == steps
        assert cost.initial_weights is not None


@pytest.mark.parametrize("ema_first", [True, False])
def test_stochastic_weight_averaging_alongside_is_refused_in_either_order(ema_first):
    swa = L.pytorch.callbacks.StochasticWeightAveraging(swa_lrs=0.01)
    callbacks = [ModelEMA(), swa] if ema_first else [swa, ModelEMA()]
    module = Net()
    with pytest.raises(ValueError, match="ModelEMA cannot run with StochasticWeightAveraging: both put averaged "
                                         "weights into the module"):
        trainer(max_steps=2, callbacks=callbacks).fit(module, loader())
    assert module.training_steps == 0


# ------------------------------------------------------------------ checkpoints of other callbacks
def test_evaluate_both_checkpoints_rank_by_ema_or_raw_and_load_the_ranked_weights(tmp_path):
    """Issue 21 item 5: monitor="val_loss" ranks the EMA, "val_loss_raw" the raw weights; the
    best checkpoint of each, given to test, is evaluated on the weights that were ranked."""
    checkpoints = {name: L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename=name + "-{step}",
                                                             monitor=name, save_top_k=1)
                   for name in ("val_loss", "val_loss_raw")}
    ema = ModelEMA(decay=0.9, schedule="fixed", evaluate="both", end_with="raw")
    module, w, run = fit(ema, steps=16, val=loader(n=32, seed=5), tmp_path=tmp_path, enable_checkpointing=True,
                         callbacks=[*checkpoints.values()], max_epochs=4)
    with open(tmp_path / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r["val_loss"]]
    best = {name: c.best_model_path for name, c in checkpoints.items()}  # before test restores their states
    assert best["val_loss"] != best["val_loss_raw"]
    for name, checkpoint in checkpoints.items():
        assert checkpoint.best_model_score.item() == pytest.approx(min(float(r[name]) for r in logged))
    for name in ("val_loss_raw", "val_loss"):
        saved = torch.load(best[name], weights_only=True)
        ranked = saved["state_dict" if name == "val_loss" else "current_model_state"]
        run.test(module, loader(n=16), ckpt_path=best[name], verbose=False, weights_only=True)
        assert torch.equal(module.seen["test"][-1], torch.cat([ranked[k].flatten() for k in ("net.0.weight",
                           "net.0.bias", "net.2.weight", "net.2.bias")])), name
    ema_best = Net.load_from_checkpoint(best["val_loss"], weights_only=True)
    saved = torch.load(best["val_loss"], weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in ema_best.state_dict().items())


@pytest.mark.filterwarnings("ignore:The dirpath has changed from")  # resumed in another folder on purpose
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create")  # no EMAWeightAveraging, on purpose
def test_resumes_a_checkpoint_of_lightnings_ema_weight_averaging(tmp_path):
    """Issue 21 item 6: same layout (state_dict = EMA, current_model_state = raw,
    averaging_state.n_averaged); the resumed fit goes on as EMAWeightAveraging would."""
    def run(ema, folder, steps, ckpt_path=None):
        module = Net()
        run = trainer(tmp_path / folder, max_steps=steps, enable_checkpointing=True,
                      callbacks=[ema, L.pytorch.callbacks.ModelCheckpoint(save_top_k=-1)])
        run.fit(module, loader(batch_size=64), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
        return module

    lightning = run(L.pytorch.callbacks.EMAWeightAveraging(decay=0.9), "lightning", 6)  # ends holding its EMA
    ours = ModelEMA(decay=0.9, schedule="fixed", end_with="raw")
    resumed = run(ours, "resumed", 6, ckpt_path=tmp_path / "lightning" / "checkpoints" / "epoch=2-step=3.ckpt")
    raw = torch.load(tmp_path / "lightning" / "checkpoints" / "epoch=5-step=6.ckpt", weights_only=True)
    assert all(torch.equal(v, raw["current_model_state"][k]) for k, v in resumed.state_dict().items())
    assert ours.updates == 6 and ours.last_step == 6
    close(ema_flat(ours, resumed), flat(lightning))


def test_evaluating_another_module_never_swaps_this_ema_into_it():
    ema = ModelEMA(decay=0.9, schedule="fixed", end_with="raw")
    _, _, run = fit(ema, steps=4)
    other = Net()
    with pytest.warns(UserWarning, match="this module is not the one the EMA averaged; it is evaluated as it is"):
        run.test(other, loader(n=16), verbose=False)
    assert torch.equal(other.seen["test"][-1], flat(Net()))

"""The gradient-clipping hook: norm / value / agc against references, every gradient
evaluation of a multi-gradient step clipped, the Trainer's settings honoured, and the
non-finite policies (raise names parameter and step; skip leaves everything as it was)."""

import copy
import math

import lightning as L
import pytest
import torch
from conftest import flat, make_data, make_net
from lit import Classifier, column, loader, logged_rows, trainer
from torch import nn
from torch.nn import functional as F

from lightning_imex import clipping
from lightning_imex.clipping import GradientClipping, NonFiniteGradientError, clip_gradients
from lightning_imex.optim import IMEXAdam


def with_gradients(seed: int = 0, scale: float = 1.0) -> nn.Module:
    net = make_net(seed)
    x, y = make_data()
    (scale * F.cross_entropy(net(x), y)).backward()
    return net


def grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def clip(net: nn.Module, **config) -> list[torch.Tensor]:
    clip_gradients(net, torch.optim.SGD(net.parameters()), {"log": False, **config})
    return grads(net)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_norm_matches_torch(norm_type):
    ours, reference = with_gradients(scale=10.0), with_gradients(scale=10.0)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5, norm_type)
    for a, b in zip(clip(ours, algorithm="norm", threshold=0.5, norm_type=norm_type), grads(reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_value_matches_torch():
    ours, reference = with_gradients(), with_gradients()
    torch.nn.utils.clip_grad_value_(reference.parameters(), 0.01)
    assert any((g.abs() > 0.01).any() for g in grads(ours))
    for a, b in zip(clip(ours, algorithm="value", threshold=0.01), grads(reference)):
        assert torch.equal(a, b)


def agc_reference(weight: torch.Tensor, grad: torch.Tensor, clip: float, eps: float) -> torch.Tensor:
    """Row by row (an output unit is a row), ALGORITHMS.md section 6."""
    rows = []
    for w, g in zip(weight.reshape(len(weight), -1), grad.reshape(len(grad), -1)):
        limit = max(w.norm().item(), eps) * clip
        rows.append(g * (limit / g.norm().item()) if g.norm().item() > limit else g)
    return torch.stack(rows).reshape(grad.shape)


def test_agc_matches_reference_and_spares_the_output_layer():
    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(16, 3))
    torch.manual_seed(0)
    F.cross_entropy(net(torch.randn(8, 2, 6)), torch.randint(0, 3, (8,))).backward()
    before = grads(net)
    clip_factor, eps = 0.01, 1e-3
    after = clip(net, algorithm="agc", threshold=clip_factor, agc_eps=eps)
    conv_w, conv_b, out_w, out_b = before
    torch.testing.assert_close(after[0], agc_reference(net[0].weight.detach(), conv_w, clip_factor, eps))
    # a bias is one unit: its whole norm against the bias' norm (floored at eps)
    limit = max(net[0].bias.detach().norm().item(), eps) * clip_factor
    torch.testing.assert_close(after[1], conv_b * min(1.0, limit / conv_b.norm().item()))
    assert not torch.equal(after[0], conv_w)  # it did clip
    assert torch.equal(after[2], out_w) and torch.equal(after[3], out_b)  # output layer excluded by default
    net.zero_grad()
    F.cross_entropy(net(torch.randn(8, 2, 6)), torch.randint(0, 3, (8,))).backward()
    out_grad = net[2].weight.grad.clone()
    clipped = clip(net, algorithm="agc", threshold=clip_factor, agc_exclude_output=False, agc_exclude=["0.*"])
    torch.testing.assert_close(clipped[2], agc_reference(net[2].weight.detach(), out_grad, clip_factor, eps))


@pytest.mark.parametrize("config,match", [
    (dict(algorithm="norms"), "clipping.algorithm must be one of 'off', 'norm', 'value', 'agc', got 'norms'"),
    (dict(algorithm="norm"), "clipping.threshold must be a finite number > 0 for algorithm 'norm'"),
    (dict(algorithm="value", threshold=-1.0), "clipping.threshold must be a finite number > 0"),
    (dict(nonfinite="warn"), "clipping.nonfinite must be one of 'raise', 'skip', 'ignore', got 'warn'"),
    (dict(algorithm="norm", threshold=1.0, max_norm=2),
     "clipping.max_norm: not a field of GradientClipping; allowed: algorithm,"),
    (dict(threshold=1.0), "clipping.threshold is set but clipping.algorithm is 'off'"),
])
def test_bad_config_errors_name_the_field(config, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Classifier(clipping=config)


class Recording(Classifier):
    """Records each gradient evaluation's gradient norm before and after the hook."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norms = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        norm = lambda: torch.nn.utils.get_total_norm([p.grad for p in self.parameters()]).item()  # noqa: E731
        before = norm()
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.norms.append((before, norm()))


def test_every_gradient_evaluation_is_clipped_like_a_clipping_closure():
    threshold, steps = 0.05, 4
    module = Recording(optimizer={"name": "imex_adam", "lr": 0.05, "tableau": "trapezoidal"},
                       clipping={"algorithm": "norm", "threshold": threshold})
    reference = copy.deepcopy(module.net)
    data = loader(n=16, batch_size=16)
    trainer(max_steps=steps).fit(module, data)
    assert len(module.norms) == 2 * steps
    # our optimizer clips inside its step: the hook leaves .grad as it was (tests/test_fused_clipping.py)
    assert all(before > threshold and after == before for before, after in module.norms)
    # the same step written by hand: clip inside the closure
    opt = IMEXAdam(reference.parameters(), lr=0.05, tableau="trapezoidal")
    x, y = data.dataset.tensors

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), threshold)
        return loss

    for _ in range(steps):
        opt.step(closure)
    torch.testing.assert_close(flat(module.net), flat(reference), rtol=0, atol=1e-7)


class Plain(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


@pytest.mark.parametrize("algorithm,threshold", [("norm", 0.05), ("value", 0.002)])
def test_trainer_gradient_clip_val_is_honoured(tmp_path, algorithm, threshold):
    ours = Classifier(optimizer={"name": "adam", "lr": 0.05})
    theirs = Plain()
    for module in (ours, theirs):
        module.net.load_state_dict(make_net().state_dict())
        trainer(tmp_path / type(module).__name__, max_steps=3, gradient_clip_val=threshold,
                gradient_clip_algorithm=algorithm).fit(
            module, loader())
    torch.testing.assert_close(flat(ours.net), flat(theirs.net), rtol=0, atol=1e-7)


def test_clipping_configured_twice_is_an_error():
    module = Classifier(clipping={"algorithm": "norm", "threshold": 1.0})
    with pytest.raises(ValueError, match="gradient clipping is configured twice"):
        trainer(max_steps=1, gradient_clip_val=0.5).fit(module, loader())


def test_logs_pre_clip_norm_and_clipped_flag_once_per_step(tmp_path):
    module = Recording(optimizer={"name": "imex_adam", "lr": 0.01, "tableau": "trapezoidal"},
                       clipping={"algorithm": "norm", "threshold": 0.6})
    fit = trainer(tmp_path, max_steps=6)
    fit.fit(module, loader())
    rows = logged_rows(fit)
    norms, clipped = column(rows, "grad_norm"), column(rows, "grad_clipped")
    assert len(norms) == len(clipped) == 6
    first_evaluations = module.norms[::2]
    assert norms == pytest.approx([before for before, _ in first_evaluations], rel=1e-5)
    assert clipped == [float(before > 0.6) for before, _ in first_evaluations]
    assert 0 < sum(clipped) < 6  # the threshold sits inside the range the test exercises
    sparse = trainer(tmp_path / "every_third", max_steps=6, log_every_n_steps=3)
    sparse.fit(Recording(clipping={"algorithm": "norm", "threshold": 0.6}), loader())
    logged_steps = [int(r["step"]) for r in logged_rows(sparse) if r["grad_norm"]]
    assert logged_steps == [2, 5]  # only on the steps the logger records


def optimizer_snapshot(fit):
    state = fit.optimizers[0].state_dict()["state"]
    return {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in state.items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            assert torch.equal(a[i][k], b[i][k]) if torch.is_tensor(a[i][k]) else a[i][k] == b[i][k]


class Snapshots(L.Callback):
    def __init__(self):
        self.params, self.states = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.params.append(flat(module).clone())
        self.states.append(optimizer_snapshot(trainer))


@pytest.mark.parametrize("tableau,evaluation", [("euler", 0), ("trapezoidal", 0), ("trapezoidal", 1),
                                                ("ssp3_433", 2)])
def test_skip_leaves_parameters_and_optimizer_state_bit_identical(tmp_path, tableau, evaluation):
    module = Classifier(optimizer={"name": "imex_adam", "lr": 0.01, "tableau": tableau},
                        clipping={"algorithm": "norm", "threshold": 1.0, "nonfinite": "skip"})
    module.poison = (2, evaluation)  # step 2's evaluation `evaluation` sees a NaN loss
    snapshots = Snapshots()
    fit = trainer(tmp_path, max_steps=4, callbacks=[snapshots])
    fit.fit(module, loader())
    assert fit.global_step == 4
    assert torch.equal(snapshots.params[3], snapshots.params[2])  # step 2 changed nothing
    assert_same_state(snapshots.states[3], snapshots.states[2])
    assert not torch.equal(snapshots.params[2], snapshots.params[1])  # the other steps did step
    assert torch.isfinite(flat(module)).all()
    assert column(logged_rows(fit), "skipped_steps") == [0.0, 0.0, 1.0, 1.0]
    assert module.skipped_steps == 1


class StepState(L.Callback):
    """Before every step: the EMA's weights and counters, the LR scheduler's state, the LR."""

    def __init__(self, ema):
        self.ema, self.seen = ema, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        ema = torch.cat([t.flatten() for t in self.ema.ema.average()]).clone() if self.ema.ema else None
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        self.seen.append((ema, self.ema.updates, scheduler.state_dict(), trainer.optimizers[0].param_groups[0]["lr"]))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("tableau,evaluation", [("euler", 0), ("trapezoidal", 1)])
def test_a_skipped_step_moves_neither_the_ema_nor_the_schedule(tableau, evaluation, value):
    from lightning_imex.callbacks import ModelEMA

    module = Classifier(optimizer={"name": "imex_adam", "lr": 0.01, "tableau": tableau},
                        scheduler={"name": "warmup_cosine", "warmup_steps": 3},
                        clipping={"algorithm": "norm", "threshold": 1.0, "nonfinite": "skip"})
    module.poison, module.poison_value = (3, evaluation), value
    ema = ModelEMA(decay=0.9, schedule="fixed", end_with="raw")
    seen = StepState(ema)
    snapshots = Snapshots()
    trainer(max_steps=6, callbacks=[ema, seen, snapshots]).fit(module, loader())
    before, after = seen.seen[3], seen.seen[4]  # around the skipped step 3
    assert torch.equal(after[0], before[0]) and after[1] == before[1] == 3  # EMA: same weights, same count
    assert after[2] == before[2] and after[3] == before[3]  # scheduler state and LR unchanged
    assert torch.equal(snapshots.params[4], snapshots.params[3])
    assert_same_state(snapshots.states[4], snapshots.states[3])
    assert seen.seen[5][1] == 4 and seen.seen[5][2]["last_epoch"] == before[2]["last_epoch"] + 1  # then on
    assert module.skipped_steps == 1


@pytest.mark.parametrize("tableau,evaluation", [("euler", 0), ("trapezoidal", 1)])
def test_raise_names_parameter_and_step(tableau, evaluation):
    module = Classifier(optimizer={"name": "imex_adam", "lr": 0.01, "tableau": tableau})  # raise is the default
    module.poison = (3, evaluation)
    where = " \\(gradient evaluation 2 of the step\\)" if evaluation else ""
    with pytest.raises(NonFiniteGradientError, match=f"non-finite gradient in parameter 'net.0.weight' at global "
                                                     f"step 3{where} \\(3 more parameters too\\)"):
        trainer(max_steps=5).fit(module, loader())


@pytest.mark.parametrize("tableau,evaluation", [("euler", 0), ("trapezoidal", 1)])
def test_raise_on_an_accelerator_reads_back_only_on_syncing_steps(monkeypatch, tableau, evaluation):
    """As on a GPU (forced here on the CPU): no read-back per step; the first non-finite
    gradient is recorded on the device and reported at the next logging interval."""
    monkeypatch.setattr(clipping, "_read_back_later", lambda device: True)
    reads = []
    monkeypatch.setattr(clipping, "_syncs_now", lambda trainer: reads.append(trainer.global_step) or
                        trainer.global_step % 4 == 0)
    module = Classifier(optimizer={"name": "imex_adam", "lr": 0.01, "tableau": tableau})
    module.poison = (5, evaluation)
    where = " \\(gradient evaluation 2 of the step\\)" if evaluation else ""
    with pytest.raises(NonFiniteGradientError, match=f"parameter 'net.0.weight' at global step 5{where}, "
                                                     "found at step 8"):
        trainer(max_steps=12).fit(module, loader())
    assert reads[-1] == 8
    module = Classifier(optimizer={"name": "imex_adam", "lr": 0.01, "tableau": tableau})
    trainer(max_steps=12).fit(module, loader())  # finite: nothing raised, nothing left recorded
    assert module not in clipping._FIRST_NON_FINITE or clipping._FIRST_NON_FINITE[module][1][0] == -1


def test_ignore_lets_the_non_finite_gradient_through():
    module = Classifier(optimizer={"name": "adam", "lr": 0.01}, clipping={"nonfinite": "ignore"})
    module.poison = (1, 0)
    trainer(max_steps=2).fit(module, loader())
    assert not torch.isfinite(flat(module)).all()


def test_skip_needs_a_module_that_can_undo_a_step():
    net = with_gradients()
    with pytest.raises(ValueError, match="nonfinite='skip' needs a module whose optimizer_step can undo a step"):
        clip_gradients(net, torch.optim.SGD(net.parameters()), GradientClipping(nonfinite="skip"))


def test_a_fit_that_crashes_between_read_backs_leaves_nothing_to_the_next_fit(monkeypatch):
    """On an accelerator (forced here on the CPU), a fit that crashes after a non-finite
    gradient but before its read-back leaves the record unread: the next fit of the same
    module, on the same Trainer or a new one, neither raises it nor carries it."""
    monkeypatch.setattr(clipping, "_read_back_later", lambda device: True)
    monkeypatch.setattr(clipping, "_syncs_now", lambda trainer: trainer.global_step % 4 == 0)
    module = Classifier(optimizer={"name": "imex_adam", "lr": 0.01})
    train = module.training_step

    def crashes_at_step_6(batch, batch_idx):
        if module.trainer.global_step == 6:
            raise RuntimeError("crashed between read-backs")
        return train(batch, batch_idx)

    for refit in (lambda crashed: crashed, lambda crashed: trainer(max_steps=12)):
        module.poison, module.training_step = (5, 0), crashes_at_step_6
        finite = copy.deepcopy(module.state_dict())
        crashed = trainer(max_steps=12)
        with pytest.raises(RuntimeError, match="crashed between read-backs"):
            crashed.fit(module, loader())
        assert clipping._FIRST_NON_FINITE[module][1][0] == 5  # recorded, never read back
        module.poison, module.training_step = None, train
        module.load_state_dict(finite)  # step 5 made the weights NaN: train finite ones
        refit(crashed).fit(module, loader())  # reads back at its first step: nothing of its own
        assert clipping._FIRST_NON_FINITE[module][1][0] == -1  # read back at step 8: nothing

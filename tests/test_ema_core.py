"""lightning_imex.ema.EMA, the framework-free core: each schedule's decay, the state_dict
round trip (weights_only) continuing bit for bit, the swap, bad input; and a plain PyTorch
loop in a fresh interpreter (no Lightning imported) giving, bit for bit, the EMA that
ModelEMA gives over the same training steps, for every schedule."""

from __future__ import annotations

import io
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_imex.callbacks import ModelEMA
from lightning_imex.ema import EMA, SCHEDULES
from lightning_imex.optim.clipped_adam import EMA_SCHEDULES


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


def test_clipped_adam_validates_against_the_cores_schedule_names():
    assert EMA_SCHEDULES is SCHEDULES == ("fixed", "warmup", "power", "zero_start")


@pytest.mark.parametrize("schedule,expected", [
    ("fixed", [0.9] * 4),
    ("zero_start", [0.9] * 4),
    ("warmup", [2 / 11, 3 / 12, 4 / 13, 0.9]),  # min(d, (1 + k) / (10 + k)) reaches d at k = 80
    ("power", [max(0.3, 1 - (1 + k / 2) ** -0.75) for k in (1, 2, 3)] + [0.9]),
])
def test_get_decay_is_the_schedules_formula(schedule, expected):
    ema = EMA(nn.Linear(2, 2), decay=0.9, schedule=schedule, gamma=2.0, power=0.75, min_decay=0.3)
    assert [ema.get_decay(k) for k in (1, 2, 3, 10**6)] == pytest.approx(expected)


def test_state_dict_round_trip_continues_bit_for_bit():
    """Saved mid-run through torch.save / weights_only load into a fresh EMA of a fresh
    model, both continue identically; update_every's phase and zero_start's product too."""
    model, x = net(), torch.randn(8, 6)
    ema = EMA(model, decay=0.8, schedule="zero_start", update_every=2)

    def step(m: nn.Module) -> None:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.sin(p) * 0.1)
        m(x)  # BatchNorm statistics move (averaged) and num_batches_tracked counts (copied)

    for _ in range(5):
        step(model)
        ema.update()
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    other_model = net()
    other_model.load_state_dict(model.state_dict())
    other = EMA(other_model, decay=0.8, schedule="zero_start", update_every=2)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(3):
        for m, e in ((model, ema), (other_model, other)):
            step(m)
            e.update()
    assert (ema.steps, ema.updates) == (other.steps, other.updates) == (8, 4)
    assert all(torch.equal(a, b) for a, b in zip(ema.average(), other.average(), strict=True))
    assert ema.averaged_state_dict()["1.num_batches_tracked"].item() == 8
    with pytest.raises(ValueError, match="EMA state was saved with schedule='zero_start', this EMA has "
                                         "schedule='warmup'"):
        EMA(net(), decay=0.8, update_every=2).load_state_dict(ema.state_dict())


def test_swapped_exchanges_the_weights_and_not_before_the_first_update():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5, schedule="fixed")
    initial = model.weight.detach().clone()
    with ema.swapped():  # nothing averaged yet: the model as it is
        assert ema.holding == "raw"
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    with ema.swapped():
        torch.testing.assert_close(model.weight, initial + 0.5)  # lerp(theta_0, theta_0 + 1, 0.5)
        with pytest.raises(RuntimeError, match="update outside ema.swapped"):
            ema.update()
    torch.testing.assert_close(model.weight, initial + 1.0)
    assert ema.raw_state_dict()["weight"] is not ema.averaged_state_dict()["weight"]


def test_decay_from_an_optimizer_is_its_beta1_with_its_ema_schedule():
    from lightning_imex.optim import ClippedAdam

    model = nn.Linear(2, 2)
    assert (lambda e: (e.decay, e.schedule))(EMA(model, torch.optim.Adam(model.parameters(), betas=(0.7, 0.9)))) \
        == (0.7, "zero_start")
    preset = ClippedAdam(model.parameters(), betas=(0.6, 0.36), ema_schedule="warmup")
    assert (lambda e: (e.decay, e.schedule))(EMA(model, preset)) == (0.6, "warmup")
    with pytest.raises(ValueError, match="reads the first parameter group's betas"):
        EMA(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("kwargs,match", [
    ({"decay": 1.5}, r"decay must be a number in \(0, 1\) or 'optimizer', got 1.5"),
    ({"decay": "optimizer"}, r"decay='optimizer' needs the optimizer: pass it, EMA\(model, decay=optimizer\)"),
    ({"schedule": "cosine"}, r"schedule must be one of \('fixed', 'warmup', 'power', 'zero_start', None\)"),
    ({"update_every": 0}, "update_every must be an integer >= 1, got 0"),
    ({"min_decay": 1}, r"min_decay must be a number in \[0, 1\)"),
    ({"device": "warp-drive"}, "device must be a torch device or None, got 'warp-drive'"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMA(nn.Linear(1, 1), **kwargs)


# the plain loop, in a fresh interpreter: the three lines of the module docstring
CONFIGS = {"fixed": dict(decay=0.9, schedule="fixed"), "warmup": dict(decay=0.9, schedule="warmup", update_every=2),
           "power": dict(decay=0.9, schedule="power", gamma=2.0, power=0.75, min_decay=0.3),
           "zero_start": dict(decay=0.9, schedule="zero_start"), "optimizer": dict(decay="optimizer")}
STEPS = 12
PLAIN_LOOP = f"""
import io, sys, torch
from torch import nn
from torch.nn import functional as F
from lightning_imex.ema import EMA
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
optimizer = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.8, 0.9))
configs = {CONFIGS!r}
emas = {{name: EMA(model, **{{**c, "decay": optimizer if c["decay"] == "optimizer" else c["decay"]}})
        for name, c in configs.items()}}
x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
y = x[:, :3].argmax(1)
for step in range({STEPS}):
    i = step % 4 * 16
    optimizer.zero_grad()
    F.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
    optimizer.step()
    for ema in emas.values():
        ema.update()
with emas["fixed"].swapped():
    model.eval()
frameworks = [m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "hydra", "omegaconf")]
assert not frameworks, f"the plain loop imported {{frameworks[:5]}}"
buffer = io.BytesIO()
torch.save({{name: ema.state_dict() for name, ema in emas.items()}}, buffer)
sys.stdout.buffer.write(buffer.getvalue())
"""


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05, betas=(0.8, 0.9))


class Named(ModelEMA):
    """Several in one Trainer (one fit for all schedules): each needs its own state key."""

    def __init__(self, name: str, **kwargs):
        super().__init__(**kwargs)
        self.name = name

    @property
    def state_key(self) -> str:
        return f"ModelEMA[{self.name}]"


def test_plain_loop_without_lightning_equals_the_callback_bit_for_bit():
    run = subprocess.run([sys.executable, "-c", PLAIN_LOOP], capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    plain = torch.load(io.BytesIO(run.stdout), weights_only=True)
    callbacks = {name: Named(name, **config, end_with="raw") for name, config in CONFIGS.items()}
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks.values())).fit(
        Net(), DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=16))
    for name, callback in callbacks.items():
        ours = callback.ema.state_dict()
        assert {k: v for k, v in ours.items() if k != "average"} == \
            {k: v for k, v in plain[name].items() if k != "average"}, name
        assert all(torch.equal(a, b) for a, b in zip(ours["average"], plain[name]["average"], strict=True)), name
    assert plain["optimizer"]["schedule"] == "zero_start" and plain["warmup"]["updates"] == STEPS // 2

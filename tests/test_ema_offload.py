"""OffloadedEMA: the asynchronous host-side EMA (its CPU fallback: the same staging buffers and
host thread, blocking copies) equals the synchronous ``EMA(device="cpu")`` bit for bit over
50 steps, across a checkpoint save / resume and an evaluation swap; what builds it."""

from __future__ import annotations

import copy
import io
import time

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_imex.ema import EMA
from lightning_imex.ema_offload import OffloadedEMA, build_ema


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
    return x, x[:, :3].argmax(1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def save(model, optimizer, ema) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}, buffer)
    return buffer.getvalue()


class SlowHost(OffloadedEMA):
    """A host thread that lags: what is not waited for is read before it is written."""

    def _average(self, average, current, weight):
        def lerp(staging):
            time.sleep(0.005)
            torch._foreach_lerp_(average, staging, weight)

        self._enqueue(current, lerp)


def test_offloaded_updates_equal_the_synchronous_ones_bit_for_bit():
    model, offloaded_model = network(), network()
    options = dict(decay=0.9, schedule="warmup", update_every=2, device="cpu")
    ema, offloaded = EMA(model, **options), SlowHost(offloaded_model, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    offloaded_optimizer = torch.optim.Adam(offloaded_model.parameters(), lr=0.05)
    for step in range(1, 51):
        train_step(model, optimizer, step)
        train_step(offloaded_model, offloaded_optimizer, step)
        ema.update()
        offloaded.update()
        if step % 2 == 0:
            assert offloaded._pending is not None  # averaged on the host thread, not waited for
        if step == 20:  # an evaluation on the EMA weights
            x, _ = batch(0)
            model.eval(), offloaded_model.eval()
            with ema.swapped(), offloaded.swapped():
                assert torch.equal(model(x), offloaded_model(x))
            model.train(), offloaded_model.train()
        if step == 30:  # a checkpoint, and a fresh process's objects resumed from it
            checkpoint = torch.load(io.BytesIO(save(offloaded_model, offloaded_optimizer, offloaded)),
                                    weights_only=True)
            offloaded_model = network()
            offloaded_model.load_state_dict(checkpoint["model"])
            offloaded_optimizer = torch.optim.Adam(offloaded_model.parameters(), lr=0.05)
            offloaded_optimizer.load_state_dict(checkpoint["optimizer"])
            offloaded = SlowHost(offloaded_model, **options)
            offloaded.load_state_dict(checkpoint["ema"])
    assert ema.updates == offloaded.updates == 25
    for a, b in zip(ema.average(), offloaded.average(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.state_dict().values(), offloaded_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    clone = copy.deepcopy(offloaded)  # picklable: the pending update is waited for, the thread is not copied
    assert all(torch.equal(a, b) for a, b in zip(clone.average(), offloaded.average()))


def test_build_ema_offloads_only_a_cuda_model_to_the_cpu():
    assert type(build_ema(network(), 0.9, device="cpu")) is EMA  # nothing to take off the accelerator
    assert type(build_ema(network(), 0.9)) is EMA
    with pytest.raises(ValueError, match="OffloadedEMA keeps the average on the CPU: device must be 'cpu'"):
        OffloadedEMA(network(), 0.9, device="meta")


def test_an_error_on_the_host_thread_reaches_the_caller():
    model = network()
    offloaded = OffloadedEMA(model, 0.9, device="cpu")
    offloaded.shadow[0] = torch.zeros(1)  # a shape the lerp refuses
    offloaded.update()
    with pytest.raises(RuntimeError):
        offloaded.average()


def lightning_fit(tmp_path, monkeypatch, offloaded: bool, ckpt_path=None):
    """ModelEMA(device="cpu") on a 50-step fit validating (on the EMA) every 10 steps;
    ``offloaded``: its EMA is an OffloadedEMA, as it is for a CUDA model."""
    from test_ema import Net, loader, trainer

    from lightning_imex.callbacks import ModelEMA
    from lightning_imex.callbacks import ema as callback_module

    if offloaded:
        monkeypatch.setattr(callback_module, "build_ema", lambda model, *args, **kwargs: SlowHost(model, *args,
                                                                                                    **kwargs))
    ema = ModelEMA(decay=0.9, schedule="warmup", device="cpu", end_with="raw")
    module = Net(batch_norm=True)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(every_n_epochs=10, save_top_k=-1)
    run = trainer(tmp_path, max_steps=50, enable_checkpointing=True, check_val_every_n_epoch=10,
                  callbacks=[ema, checkpoints])
    # full batch: one step an epoch (a resumed epoch-end checkpoint starts a fresh epoch)
    run.fit(module, loader(batch_size=64), loader(n=32, seed=2), ckpt_path=ckpt_path,
            weights_only=True if ckpt_path else None)
    if offloaded:
        assert isinstance(ema.ema, OffloadedEMA)
    return module, ema


@pytest.mark.filterwarnings("ignore:The dirpath has changed from")  # resumed in another folder on purpose
def test_model_ema_offloaded_fit_and_resume_equal_the_synchronous_fit(tmp_path, monkeypatch):
    straight, straight_ema = lightning_fit(tmp_path / "straight", monkeypatch, offloaded=False)
    checkpoint = tmp_path / "straight" / "checkpoints" / "epoch=29-step=30.ckpt"
    resumed, resumed_ema = lightning_fit(tmp_path / "resumed", monkeypatch, offloaded=True, ckpt_path=checkpoint)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # raw weights and buffers
    ours, theirs = straight_ema.ema.averaged_state_dict(), resumed_ema.ema.averaged_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    after = [(s, w) for s, w in straight.seen["val"] if s > 30]  # validation (swapped in) saw the same EMA weights
    assert [s for s, _ in resumed.seen["val"]] == [s for s, _ in after] == [40, 40, 50, 50]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after, resumed.seen["val"]))


def test_the_next_optimizer_step_waits_for_the_copies_once():
    """The CUDA path's one-shot pre-hook, with a stand-in stream: any optimizer's next step
    makes the stream wait for the copies' event, once; synchronize() removes the hook."""
    class Stream:
        def __init__(self):
            self.waited = []

        def wait_event(self, event):
            self.waited.append(event)

    model = network()
    offloaded, stream, copied = OffloadedEMA(model, 0.9), Stream(), object()
    offloaded._wait_before_next_step(copied, stream)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (1, 2):
        train_step(model, optimizer, step)
    assert stream.waited == [copied]
    offloaded.synchronize()
    assert offloaded._step_hook is None


def first_halves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """As FSDP2 on two ranks hands rank 0 its shards (``to_local()``): views of the first
    half of each tensor along dim 0, a scalar whole."""
    return [t[:(len(t) + 1) // 2] if t.dim() else t for t in tensors]


class ShardedEMA(EMA):
    def current(self):
        return first_halves(super().current())


class ShardedOffloadedEMA(OffloadedEMA):
    def current(self):
        return first_halves(super().current())


def test_offloaded_staging_is_sized_from_the_local_shards_it_receives():
    # the tracked tensors are the full ones; the staging buffers must be the shards' shape
    model, offloaded_model = network(), network()
    options = dict(decay=0.9, device="cpu")
    ema, offloaded = ShardedEMA(model, **options), ShardedOffloadedEMA(offloaded_model, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    offloaded_optimizer = torch.optim.Adam(offloaded_model.parameters(), lr=0.05)
    for step in range(3):
        train_step(model, optimizer, step)
        ema.update()
        train_step(offloaded_model, offloaded_optimizer, step)
        offloaded.update()
    shards = [t.shape for t in offloaded.current()]
    assert [t.shape for t in offloaded.average()] == shards != [t.shape for t in offloaded.tracked]
    assert [t.shape for staging in offloaded._staging.values() for t in staging] == shards
    assert all(torch.equal(a, b) for a, b in zip(offloaded.average(), ema.average()))

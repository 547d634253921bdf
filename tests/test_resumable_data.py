"""Exact resume of the training data: every epoch's order is a function of (seed, epoch)
only, a loader's state resumes an epoch at its next batch (in worker processes too),
DDP ranks take disjoint equal shares, and a Lightning fit resumed from a checkpoint sees
the very batches the uninterrupted fit saw, mid-epoch and at an epoch's end."""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import subprocess
import sys
import warnings
import weakref

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_imex.data import DATAMODULES, EpochSampler, ResumableDataLoader, epoch_order

N, BATCH = 50, 8  # 7 batches an epoch, the last one of 2 samples (6 with drop_last)


def loader(n=N, batch_size=BATCH, seed=0, drop_last=False, num_workers=0, num_replicas=None, rank=None):
    """Batches of the indices themselves."""
    data = TensorDataset(torch.arange(n))
    return ResumableDataLoader(data, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
                               sampler=EpochSampler(data, seed=seed, num_replicas=num_replicas, rank=rank))


def epoch(dl, e=None, stop=None):
    """The index batches of one iteration (after ``set_epoch(e)``, as Lightning calls it)."""
    if e is not None:
        dl.sampler.set_epoch(e)
    return [b.tolist() for (b,) in itertools.islice(dl, stop)]


def batches(order, batch_size=BATCH, drop_last=False):
    cut = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return cut[:-1] if drop_last and len(cut[-1]) < batch_size else cut


def epoch_inputs(dl, e):
    """A datamodule loader's inputs in epoch ``e``."""
    dl.sampler.set_epoch(e)
    return torch.cat([x for x, _ in dl])


# --- the order of an epoch ------------------------------------------------------------

def test_epoch_orders_are_a_function_of_seed_and_epoch_only():
    a, b = DATAMODULES["spirals"](n_samples=300), DATAMODULES["spirals"](n_samples=300)
    a.setup(), b.setup()
    played, fresh = a.train_dataloader(), b.train_dataloader()
    for e in range(3):  # one of them plays epochs 0-2 first, the other jumps to epoch 3
        assert len(epoch_inputs(played, e)) == len(a.splits["train"])
    third = epoch_inputs(fresh, 3)
    assert torch.equal(epoch_inputs(played, 3), third)
    order = epoch_order(len(b.splits["train"]), b.seed, 3)
    assert torch.equal(third, b.splits["train"][order][0])  # the documented permutation, nothing else


def test_orders_differ_between_epochs_and_seeds_and_are_permutations():
    orders = {(seed, e): epoch_order(N, seed, e) for seed in (0, 1) for e in range(5)}
    assert all(sorted(o) == list(range(N)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) == len(orders)
    assert epoch_order(N, 0, 2) == epoch_order(N, 0, 2)
    dl = loader()
    assert epoch(dl) != epoch(dl)  # a plain loop over the loader: a new epoch, a new order
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        epoch_order(N, 0, -1)


def test_plain_loops_and_set_epoch_give_the_same_epochs():
    plain, lightning = loader(), loader()
    assert [epoch(plain) for _ in range(3)] == [epoch(lightning, e) for e in range(3)]
    assert epoch(plain) == batches(epoch_order(N, 0, 3))


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
def test_validation_and_test_loaders_keep_the_data_order():
    dm = DATAMODULES["spirals"](n_samples=300, batch_size=16)
    dm.setup()
    for split, dl in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        assert not isinstance(dl, ResumableDataLoader)
        assert all(torch.equal(torch.cat([x for x, _ in dl]), dm.splits[split][:][0]) for _ in range(2))
    assert isinstance(dm.train_dataloader(), ResumableDataLoader)


# --- resuming a loader ---------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_a_loaded_state_yields_exactly_the_remaining_batches(num_workers, drop_last):
    straight = loader(drop_last=drop_last)
    expected = [epoch(straight, e) for e in range(3)]
    assert expected[1] == batches(epoch_order(N, 0, 1), drop_last=drop_last)
    steps = len(expected[0])
    assert steps == (6 if drop_last else 7)
    for k in (0, 1, 4, steps - 1):
        first = loader(drop_last=drop_last, num_workers=num_workers)
        epoch(first, 0)
        assert epoch(first, 1, stop=k) == expected[1][:k]  # workers have prefetched more by now
        state = first.state_dict()
        # before epoch 1's first batch the state says that epoch 0 is complete: the same place
        assert (state["epoch"], state["batches"]) == ((1, k) if k else (0, steps)) and state["num_batches"] == steps
        second = loader(drop_last=drop_last, num_workers=num_workers)
        second.load_state_dict(state)
        assert second.state_dict() == state  # a checkpoint before the first batch keeps it
        assert len(second) == steps  # the whole epoch's length, as Lightning expects
        assert epoch(second, 1) == expected[1][k:]
        assert epoch(second, 2) == expected[2]
        third = loader(drop_last=drop_last)  # without set_epoch: the same
        third.load_state_dict(state)
        assert epoch(third) == expected[1][k:] and epoch(third) == expected[2]


def test_a_state_at_an_epochs_end_continues_with_the_next_epoch():
    straight = loader()
    expected = [epoch(straight, e) for e in range(4)]
    first = loader()
    epoch(first, 0), epoch(first, 1)
    state = first.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 7)
    # set_epoch(2) as Lightning calls it; none (a plain loop); or Lightning 2.6 resuming
    # an epoch-end checkpoint of a max_steps fit: set_epoch(2) for the epoch it closes,
    # then set_epoch(3), (4), ... for the epochs it numbers 2, 3, ...
    for calls in ([2], [], [2, 3]):
        second = loader()
        second.load_state_dict(state)
        for e in calls:
            second.sampler.set_epoch(e)
        assert epoch(second) == expected[2]
        assert epoch(second, calls[-1] + 1 if calls else None) == expected[3]
    # Lightning closing the interrupted epoch itself: set_epoch(1) after a state of epoch 1, part-way
    part = loader()
    assert epoch(part, 1, stop=3) == expected[1][:3]
    resumed = loader()
    resumed.load_state_dict(part.state_dict())
    assert epoch(resumed, 1) == expected[1][3:] and epoch(resumed, 2) == expected[2]


def test_an_epoch_limited_to_fewer_batches_is_complete_at_its_limit():
    """Lightning's limit_train_batches: the datamodule passes it on as batches_per_epoch."""
    expected = [epoch(loader(), e) for e in range(3)]
    first = loader()
    first.batches_per_epoch = 3
    assert epoch(first, 0, stop=3) == expected[0][:3]
    second = loader()
    second.batches_per_epoch = 3
    second.load_state_dict(first.state_dict())
    assert epoch(second) == expected[1] and epoch(second, 2) == expected[2]
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage
    dm = DATAMODULES["spirals"](n_samples=300, batch_size=16)  # 14 batches
    for limit in (0.5, 0.33, 4, 100, 1.0):
        dm.trainer = L.Trainer(limit_train_batches=limit, logger=False, enable_progress_bar=False)
        dl = dm.train_dataloader()
        assert (dl.batches_per_epoch or len(dl)) == _parse_num_batches(RunningStage.TRAINING, len(dl), limit)
    dm.trainer = None
    assert dm.train_dataloader().batches_per_epoch is None


def test_only_batches_returned_count_and_iterators_start_at_their_first_batch():
    dl = loader()
    iterator = iter(dl)  # Lightning makes the iterator before it calls set_epoch
    dl.sampler.set_epoch(2)
    assert [b.tolist() for (b,) in iterator] == batches(epoch_order(N, 0, 2))
    iter(dl)  # never advanced: changes nothing
    assert dl.state_dict()["batches"] == 7 and dl.state_dict()["epoch"] == 2


def test_an_abandoned_iterator_is_freed_at_once():
    """No reference cycle between the loader and its iterator: one would leave the worker
    processes of an abandoned iterator to the garbage collector, which finds their queues
    torn down and waits seconds for each."""
    dl = loader()
    iterator = iter(dl)
    next(iterator)
    inner = weakref.ref(iterator.iterator)
    gc.disable()
    try:
        del iterator
        assert inner() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("change,message", [
    (dict(n=N + 1), r"dataset_size 50 \(here 51\)"),
    (dict(seed=1), r"seed 0 \(here 1\)"),
    (dict(batch_size=BATCH + 1), r"batch_size 8 \(here 9\)"),
    (dict(drop_last=True), r"drop_last False \(here True\)"),
    (dict(num_replicas=2, rank=0), r"num_replicas 1 \(here 2\)"),
])
def test_a_state_from_another_loader_is_refused_in_one_line(change, message):
    saved = loader()
    epoch(saved, 0, stop=2)
    with pytest.raises(ValueError, match=message) as error:
        loader(**change).load_state_dict(saved.state_dict())
    assert "\n" not in str(error.value) and str(error.value).startswith("cannot resume the training loader")


def test_malformed_states_are_refused_in_one_line():
    state = loader().state_dict()
    for bad, message in (({**state, "batches": 8}, "batch 8, but an epoch here has 7 batches"),
                         ({**state, "epoch": -1}, "epoch -1"),
                         ({"epoch": 0}, "lacks batches, seed")):
        with pytest.raises(ValueError, match=message) as error:
            loader().load_state_dict(bad)
        assert "\n" not in str(error.value)
    plain = ResumableDataLoader(TensorDataset(torch.arange(N)), batch_size=BATCH)  # not our sampler
    assert plain.state_dict() == {}
    plain.load_state_dict({})
    with pytest.raises(ValueError, match="not an EpochSampler"):
        plain.load_state_dict(state)


# --- DDP ---------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_each_epoch_disjointly_and_equally(world):
    n = 47  # not a multiple of the world size: padded like DistributedSampler
    ranks = [loader(n=n, num_replicas=world, rank=r) for r in range(world)]
    for e in (0, 3):
        shares = [sum(epoch(dl, e), []) for dl in ranks]
        size = -(-n // world)
        assert all(len(s) == size for s in shares)
        assert len({len(epoch(dl, e)) for dl in ranks}) == 1  # every rank steps as often
        order = epoch_order(n, 0, e)
        padded = order + order[:size * world - n]
        assert [padded[i::world] for i in range(world)] == shares  # rank r: positions r, r + world, ...
        assert sorted(sum(shares, [])) == sorted(padded) and set(sum(shares, [])) == set(range(n))
        reference = [list(DistributedSampler(range(n), world, r, shuffle=False)) for r in range(world)]
        assert [[order[i] for i in ref] for ref in reference] == shares  # DistributedSampler's split of our order


def test_each_rank_resumes_its_own_share_from_rank_zeros_state():
    world, k = 2, 2
    straight = [loader(num_replicas=world, rank=r) for r in range(world)]
    expected = [[epoch(dl, e) for e in range(2)] for dl in straight]
    first = [loader(num_replicas=world, rank=r) for r in range(world)]
    for dl in first:
        epoch(dl, 0, stop=k)
    assert first[0].state_dict() == first[1].state_dict()  # what a checkpoint holds is rank 0's
    for r in range(world):
        second = loader(num_replicas=world, rank=r)
        second.load_state_dict(first[0].state_dict())
        assert epoch(second, 0) == expected[r][0][k:] and epoch(second, 1) == expected[r][1]


def test_lightning_keeps_the_sampler_under_ddp():
    """Lightning replaces a training sampler under DDP unless it is a DistributedSampler."""
    from lightning.pytorch.trainer.states import RunningStage
    dl = loader()
    assert isinstance(dl.sampler, DistributedSampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert trainer._accelerator_connector.use_distributed_sampler and trainer._accelerator_connector.is_distributed
    assert trainer._data_connector._prepare_dataloader(dl, shuffle=True, mode=RunningStage.TRAINING) is dl
    assert trainer._data_connector._prepare_dataloader(DataLoader(range(4)), True, RunningStage.TRAINING) is not None


# --- a Lightning fit killed and resumed ----------------------------------------------------

STEPS = 12  # 144 training samples of spirals(200), batches of 32: 5 steps an epoch, the last of 16


class Recorder(L.LightningModule):
    """A linear classifier that records a hash of every batch its training step sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(2, 2)
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:12])
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def fit(root, ckpt_path=None, callbacks=(), num_workers=0, **stop):
    dm = DATAMODULES["spirals"](n_samples=200, batch_size=32, num_workers=num_workers)
    module = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's tips about workers and logging intervals
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                            default_root_dir=root, callbacks=list(callbacks), **stop)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return module, trainer


# max_epochs: a resume from an epoch's end is no restart for Lightning, which loads no
# loader state then; max_steps: it always restarts (and loads it); limited: 3 batches an epoch
STOPS = {"max_steps": dict(max_steps=STEPS, max_epochs=-1), "max_epochs": dict(max_epochs=3),
         "limited": dict(max_steps=STEPS, max_epochs=-1, limit_train_batches=3)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Per way of stopping, an uninterrupted fit that leaves a checkpoint after every step,
    at every epoch's end (on_train_epoch_end) and after every validation (the app's
    ModelCheckpoint monitors val/loss: it saves there)."""
    runs = {}
    for name, stop in STOPS.items():
        root = tmp_path_factory.mktemp(name)
        callbacks = [ModelCheckpoint(root / "step", every_n_train_steps=1, save_top_k=-1, filename="{step}"),
                     ModelCheckpoint(root / "train_epoch_end", every_n_epochs=1, save_top_k=-1, filename="{epoch}",
                                     save_on_train_epoch_end=True),
                     ModelCheckpoint(root / "validation_end", monitor="val/loss", save_top_k=-1, filename="{epoch}")]
        module, _ = fit(root / "logs", callbacks=callbacks, **stop)
        runs[name] = root, module
    return runs


RESUMES = [(stop, checkpoint, k) for stop in ("max_steps", "max_epochs") for checkpoint, k in (
    ("step/step=3", 3), ("step/step=7", 7),  # mid-epoch
    ("step/step=5", 5), ("step/step=10", 10),  # after an epoch's last batch
    ("train_epoch_end/epoch=0", 5), ("validation_end/epoch=1", 10))  # at an epoch's end
] + [("limited", "step/step=4", 4), ("limited", "step/step=6", 6), ("limited", "validation_end/epoch=0", 3)]


@pytest.mark.parametrize("stop,checkpoint,k", RESUMES)
def test_a_resumed_fit_sees_the_batches_of_the_uninterrupted_one(straight, tmp_path, stop, checkpoint, k):
    root, uninterrupted = straight[stop]
    assert len(uninterrupted.seen) == {"max_epochs": 15}.get(stop, STEPS)
    resumed, trainer = fit(tmp_path, ckpt_path=root / f"{checkpoint}.ckpt", **STOPS[stop])
    assert resumed.seen == uninterrupted.seen[k:]
    assert torch.equal(resumed.net.weight, uninterrupted.net.weight)
    assert trainer.global_step == len(uninterrupted.seen)


@pytest.mark.parametrize("k", [5, 7])  # max_steps reached at an epoch's end, and mid-epoch
def test_a_longer_fit_resumed_from_a_finished_one_continues_its_order(straight, tmp_path, k):
    _, uninterrupted = straight["max_steps"]
    _, first = fit(tmp_path / "first", max_steps=k, max_epochs=-1)
    first.save_checkpoint(tmp_path / "first.ckpt")
    resumed, _ = fit(tmp_path / "second", ckpt_path=tmp_path / "first.ckpt", max_steps=STEPS, max_epochs=-1)
    assert resumed.seen == uninterrupted.seen[k:]


@pytest.mark.parametrize("k", [8, 10])  # mid-epoch, after an epoch's last batch
def test_a_fit_resumed_twice_sees_the_batches_of_the_uninterrupted_one(straight, tmp_path, k):
    """The first resume, from an epoch's end of a max_steps fit, leaves Lightning's epoch
    counters one ahead (its set_epoch too) in the checkpoints it writes; the second resume
    still continues the order."""
    root, uninterrupted = straight["max_steps"]
    every_step = ModelCheckpoint(tmp_path / "first", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    once, _ = fit(tmp_path / "a", ckpt_path=root / "validation_end/epoch=0.ckpt", callbacks=[every_step],
                  **STOPS["max_steps"])
    assert once.seen == uninterrupted.seen[5:]
    twice, _ = fit(tmp_path / "b", ckpt_path=tmp_path / "first" / f"step={k}.ckpt", **STOPS["max_steps"])
    assert twice.seen == uninterrupted.seen[k:]


def test_a_resumed_fit_with_worker_processes(straight, tmp_path):
    _, uninterrupted = straight["max_steps"]
    resumed, _ = fit(tmp_path, ckpt_path=straight["max_steps"][0] / "step/step=7.ckpt", num_workers=2,
                     **STOPS["max_steps"])
    assert resumed.seen == uninterrupted.seen[7:]


DDP_FIT = '''
import hashlib, json, sys, warnings
import lightning as L, torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_imex.data import DATAMODULES, EpochSampler
warnings.filterwarnings("ignore")

class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__(); torch.manual_seed(0); self.net = torch.nn.Linear(2, 2); self.seen = []
    def training_step(self, batch, batch_idx):
        self.seen.append(hashlib.sha1(batch[0].numpy().tobytes()).hexdigest()[:12])
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
    def on_train_end(self):
        sampler = self.trainer.train_dataloader.sampler
        assert isinstance(sampler, EpochSampler) and (sampler.num_replicas, sampler.rank) == (2, self.global_rank)
        with open(f"{out}/rank{self.global_rank}.json", "w") as f:
            json.dump({"seen": self.seen, "weight": self.net.weight.tolist()}, f)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

# the straight fit, then in the same 2 ranks (one start of them) the fit resumed from its step 6
root = sys.argv[1]
for out, every, ckpt in ((f"{root}/straight", 6, None), (f"{root}/resumed", 0, f"{root}/straight/step=6.ckpt")):
    callbacks = [ModelCheckpoint(out, every_n_train_steps=every, save_top_k=-1, filename="{step}")] if every else []
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=12, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(Recorder(), datamodule=DATAMODULES["spirals"](n_samples=200, batch_size=16), ckpt_path=ckpt,
                weights_only=True if ckpt else None)
'''


@pytest.mark.slow  # two 2-process DDP fits on CPU (about 10 s)
def test_a_resumed_ddp_fit_sees_the_batches_of_the_uninterrupted_one(tmp_path):
    """With Lightning's default use_distributed_sampler=True: it keeps our sampler."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_FIT)
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {name: [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in range(2)]
            for name in ("straight", "resumed")}
    for r in range(2):  # 72 samples a rank, batches of 16: step 6 is mid-epoch
        assert runs["resumed"][r]["seen"] == runs["straight"][r]["seen"][6:]
        assert runs["resumed"][r]["weight"] == runs["straight"][r]["weight"]
    assert not set(runs["straight"][0]["seen"]) & set(runs["straight"][1]["seen"])  # different batches per rank

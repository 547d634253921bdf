"""ModelEMA under Lightning's FSDPStrategy (FSDP1: flat parameters), 2 gloo processes on CPU
against 1 process on the same global batch (issue 21).

One run of this file as a script (``python tests/test_ema_fsdp1.py OUT_DIR``) forks, after
importing everything once: the one-process reference fit; the sharded fits in 2 ranks (a
straight fit with ``state_dict_type="sharded"``, then in the same ranks a ``"full"`` one
saved at its first checkpoint and restored from it); a sharded fit SIGKILLed after its
first checkpoint; and in 2 new ranks its resume, then a fit with ``use_orig_params=False``.
Each writes what it ended with to ``OUT_DIR``; the test compares. The root unit holds a
weight of its own (``scale``), which a forward without backward leaves gathered (the swap
must free it).

Lightning refuses ``FSDPStrategy`` without CUDA (``type(strategy) is FSDPStrategy``), and
torch's FSDP1 picks the accelerator unless given ``device_id``: :class:`CPUFSDPStrategy`
changes only that, wrapping the module as FSDPStrategy does with ``device_id=cpu``. Its
full state dicts offload to the CPU, which torch 2.13's FSDP1 crashes doing to CPU
tensors (SIGSEGV): the ranks replace Lightning's context for them by one without the
offload; with it, FSDP1 saves Adam's state wrong in a full checkpoint (a fit without
ModelEMA too), so a "full" fit is compared up to its restored weights, not continued."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lightning_imex.callbacks import ModelEMA  # noqa: E402
from collectives import count_collectives  # noqa: E402
from fork_runner import forked  # noqa: E402

WORLD, GLOBAL_BATCH = 2, 16
STEPS, EVERY, KILL = 6, 3, 5  # validation and checkpoints at steps 3 and 6 (an epoch each); the kill at 5
TOLERANCE = 1e-6


def full_state_dict_context_without_offload(module, world_size, rank0_only=True):
    """Lightning's context for ``state_dict_type="full"`` without the offload to the CPU
    (see the module docstring)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=rank0_only),
                                FullOptimStateDictConfig(rank0_only=rank0_only))


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with FSDP1's ``device_id`` set to the CPU (see the module
    docstring): the module wrapped here, which FSDPStrategy then takes as wrapped."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(model, FullyShardedDataParallel):
            model = FullyShardedDataParallel(model, device_id=torch.device("cpu"),
                                             sharding_strategy=self.sharding_strategy, **self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied
        return super()._setup_model(model)


class Net(L.LightningModule):
    """Two Linear layers (an FSDP unit each: uneven, padded flat shards) and a weight of the
    root unit's own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.net(x) * self.scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.trainer.model.parameters(), lr=0.05)  # FSDP's, with use_orig_params=False


class ValidationLog(L.Callback):
    """The validation metrics of every validation, as logged (the EMA's, then ``_raw``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.rows.append({k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


class AtTrainStart(L.Callback):
    """The whole EMA and raw weights as the fit's training starts (the EMA resumed by then)."""

    def __init__(self, ema: ModelEMA) -> None:
        self.ema, self.weights = ema, {}

    def on_train_start(self, trainer, pl_module) -> None:
        if self.ema.ema is not None:  # a fit from the start builds it at its first batch
            self.weights = {copy: self.ema.ema.full_state_dict(copy) for copy in ("ema", "raw")}


def data(sharded: bool):
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(EVERY * GLOBAL_BATCH + GLOBAL_BATCH, 4, generator=generator)
    y = torch.sin(x[:, :3] * 2)
    split = len(x) - GLOBAL_BATCH  # the last global batch validates
    train, val = TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])
    if not sharded:
        return DataLoader(train, GLOBAL_BATCH), DataLoader(val, GLOBAL_BATCH)
    rank = int(os.environ["RANK"])
    return [DataLoader(d, GLOBAL_BATCH // WORLD, sampler=DistributedSampler(d, WORLD, rank, shuffle=False))
            for d in (train, val)]


def fit(folder: Path, sharded: bool, *, steps: int = STEPS, state_dict_type: str = "sharded",
        resume_from: Path | None = None, kill: bool = False, export: bool = False,
        use_orig_params: bool = True) -> dict:
    """A fit with ModelEMA (evaluate="both"); what it ended with: the validations' metrics,
    the whole EMA and raw weights (rank 0's), and this rank's own pieces of them."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    ema, log = ModelEMA(decay=0.7, schedule="fixed", evaluate="both",
                        export_path=folder / "ema.pt" if export else None), ValidationLog()
    start = AtTrainStart(ema)
    callbacks = [ema, log, start, L.pytorch.callbacks.ModelCheckpoint(folder, "{step}", every_n_train_steps=EVERY,
                                                                      save_top_k=-1)]
    if kill:
        from crash_callbacks import KillAt

        callbacks.append(KillAt(KILL))
    strategy = CPUFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), state_dict_type=state_dict_type,
                               use_orig_params=use_orig_params) if sharded else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=WORLD if sharded else 1, strategy=strategy, max_steps=steps,
                        val_check_interval=EVERY, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    train, val = data(sharded)
    trainer.fit(Net(), train, val, ckpt_path=resume_from)
    return {"val": log.rows, "updates": ema.updates, "at_start": start.weights, "ema": ema.ema.full_state_dict("ema"),
            "raw": ema.ema.full_state_dict("raw"), "local_ema": [t.clone() for t in ema.ema.average()],
            "local_raw": [t.clone() for t in ema.ema.current()]}


def weights_after_test(checkpoint: Path) -> dict:
    """``test`` of a sharded checkpoint with ``swap_test=False``: the weights the module
    holds then (whole; the raw ones, which ModelEMA reads back from the folder)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    trainer = L.Trainer(accelerator="cpu", devices=WORLD, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ModelEMA(swap_test=False)],
                        strategy=CPUFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
                                                 state_dict_type="sharded"))
    trainer.test(Net(), data(True)[1], ckpt_path=checkpoint, verbose=False)
    return get_model_state_dict(trainer.strategy.model, options=StateDictOptions(full_state_dict=True))


def run_rank(rank: int, port: int, out: Path, phase: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    counts = count_collectives()
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    lightning_fsdp._get_full_state_dict_context = full_state_dict_context_without_offload  # see the module docstring
    results = {}
    if phase == "fits":
        results["straight"] = fit(out / "straight", True, export=True)
        # state_dict_type="full": saved, and restored (what the fit does next is not compared)
        fit(out / "full", True, steps=EVERY, state_dict_type="full")
        results["full"] = fit(out / "full_restored", True, steps=EVERY + 1, state_dict_type="full",
                              resume_from=out / "full" / f"step={EVERY}.ckpt")
    elif phase == "kill":
        fit(out / "chain", True, kill=True)
    else:
        results["resumed"] = fit(out / "chain_resumed", True, resume_from=out / "chain" / f"step={EVERY}.ckpt")
        results["flat"] = fit(out / "flat", True, use_orig_params=False)  # the FlatParameters themselves
        results["tested"] = weights_after_test(out / "straight" / f"step={STEPS}.ckpt")
    torch.save({**results, "collectives": counts}, out / f"{phase}_{rank}.pt")


def run_reference(out: Path) -> None:
    torch.save({"plain": fit(out / "plain", False)}, out / "plain.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: Path) -> None:
    import logging
    import warnings

    import torch.distributed.fsdp  # noqa: F401  (imported once, before the forks)

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    exits = {"plain": forked(run_reference, (out,))}
    for phase in ("fits", "kill", "resume"):
        port = free_port()
        exits[phase] = forked(run_rank, *[(rank, port, out, phase) for rank in range(WORLD)])
    torch.save(exits, out / "exits.pt")


# ------------------------------------------------------------------ the test


def consolidated(folder: Path, scratch: Path) -> dict:
    """A sharded checkpoint folder's shards as one dict (torch's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, scratch)
    return torch.load(scratch, weights_only=True)


def max_difference(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[k] - theirs[k]).abs().max().item() for k in theirs)


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_model_ema_under_fsdp1_equals_one_process_resumes_exactly_and_exports(tmp_path):
    """Each rank averages its pieces of the flat shards (no collective inside an update):
    the EMA and raw weights equal the one-process fit's (1e-6), with use_orig_params True
    (Lightning's default) and False; validation on the EMA and on the raw weights
    (evaluate="both") logs the one-process metrics; a fit SIGKILLed after its first sharded
    checkpoint, resumed, ends bit-identical to the straight one (every rank's pieces of
    the EMA and the weights); a state_dict_type="full" checkpoint holds the whole EMA and
    raw weights, those of the sharded checkpoint, and restores them exactly; testing a
    sharded checkpoint with swap_test=False runs on its raw weights; the export loads into
    the plain module."""
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0 and (tmp_path / "exits.pt").exists(), f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    exits = torch.load(tmp_path / "exits.pt")
    assert exits == {"plain": [0], "fits": [0, 0], "kill": [-9, -9], "resume": [0, 0]}, \
        f"{exits}\n{done.stderr[-6000:]}"
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)["plain"]
    fits = [torch.load(tmp_path / f"fits_{rank}.pt", weights_only=True) for rank in range(WORLD)]
    resumes = [torch.load(tmp_path / f"resume_{rank}.pt", weights_only=True) for rank in range(WORLD)]
    straight = fits[0]["straight"]
    for name, fitted in (("use_orig_params=True", straight), ("use_orig_params=False", resumes[0]["flat"])):
        assert fitted["updates"] == plain["updates"] == STEPS
        for kind in ("ema", "raw"):
            assert fitted[kind].keys() == Net().state_dict().keys()
            difference = max_difference(fitted[kind], plain[kind])
            assert difference <= TOLERANCE, f"{name}, {kind}: differs from the one-process fit's by {difference}"
        assert len(fitted["val"]) == len(plain["val"]) == STEPS // EVERY
        for row, reference in zip(fitted["val"], plain["val"]):
            assert row.keys() == reference.keys() == {"val/loss", "val/loss_raw"}
            for key, value in reference.items():
                assert row[key] == pytest.approx(value, rel=1e-5, abs=TOLERANCE), f"{name}: {key}"
    assert max_difference(plain["ema"], plain["raw"]) > 1e-3, "the EMA is the raw weights: the test would be vacuous"
    assert plain["val"][-1]["val/loss"] != pytest.approx(plain["val"][-1]["val/loss_raw"], abs=1e-4)
    for rank in range(WORLD):  # the SIGKILLed fit, resumed: bit-identical to the straight fit
        ours, resumed = fits[rank]["straight"], resumes[rank]["resumed"]
        assert resumed["updates"] == STEPS and resumed["val"][-1] == ours["val"][-1]
        for kind in ("local_ema", "local_raw"):
            assert all(torch.equal(a, b) for a, b in zip(ours[kind], resumed[kind], strict=True)), (rank, kind)
        for kind in ("ema", "raw") if rank == 0 else ():
            assert all(torch.equal(straight[kind][k], resumed[kind][k]) for k in straight[kind]), kind
    sizes = [sum(t.numel() for t in fits[rank]["straight"]["local_ema"]) for rank in range(WORLD)]
    assert sum(sizes) == sum(t.numel() for t in plain["ema"].values()) and min(sizes) > 0  # each rank its pieces
    # state_dict_type="full": the file holds what the sharded folder holds, and restores it
    sharded = consolidated(tmp_path / "straight" / f"step={EVERY}.ckpt", tmp_path / "sharded.pt")["model"]
    full = torch.load(tmp_path / "full" / f"step={EVERY}.ckpt", weights_only=True)
    raw_in_state_dict = {k.rpartition("/")[2]: v for k, v in sharded.items() if "/" in k}
    assert max_difference(full["state_dict"], {k: v for k, v in sharded.items() if "/" not in k}) == 0
    assert max_difference(full["current_model_state"], raw_in_state_dict) == 0
    restored = fits[0]["full"]["at_start"]
    assert max_difference(full["state_dict"], full["current_model_state"]) > 1e-3
    assert max_difference(restored["ema"], full["state_dict"]) == 0
    assert max_difference(restored["raw"], full["current_model_state"]) == 0
    tested = resumes[0]["tested"]  # test(ckpt_path=..., swap_test=False) on the checkpoint's raw weights
    assert max_difference(tested, straight["raw"]) == 0
    for phase in (fits, resumes):
        for counts in (p["collectives"] for p in phase):
            assert counts["updates"] > 0 and counts["all"] > 0, counts
            assert counts["in_updates"] == 0, f"{counts['in_updates']} collectives inside EMA updates"
    exported = torch.load(tmp_path / "straight" / "ema.pt", weights_only=True)
    Net().load_state_dict(exported)  # strict: the plain module's names and shapes
    assert all(torch.equal(exported[k], straight["ema"][k]) for k in exported)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

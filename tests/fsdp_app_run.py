"""The app under ``strategy=fsdp_cpu`` (2 gloo processes, FSDP2) against ``strategy=auto``
on the same global batch, for several optimizers with norm clipping active; a SIGKILLed
sharded fit resumed from its checkpoint folder; a consolidated checkpoint tested in the
plain model; the app's ModelEMA on in one configuration (the one killed and resumed),
which exports its EMA. ``python tests/fsdp_app_run.py OUT_DIR`` writes
``OUT_DIR/results.json``; run by test_fsdp_app.py.

Everything is imported once here and every fit runs in a forked process: the reference
fits in one, each sharded phase in two ranks started as torchrun would (``LOCAL_RANK``
and friends in the environment, so Lightning launches nothing), the consolidated
checkpoint's test in one more. results.json holds, per configuration, both fits' final
metrics (``train(cfg)``'s); ``consolidated`` per configuration ``param``: max |FSDP -
auto| over the final weights (the sharded checkpoint consolidated against the plain
one), ``moved``: how far the first auto fit's weights moved, ``tested``: the plain
model's test metrics from the first consolidated checkpoint; ``ema_export``: max |FSDP -
auto| over the exported EMA weights, which loaded into the plain model; ``ema_ranks`` per
sharded phase and rank: ``collectives``, those called inside ``EMA.update`` (``in_updates``),
the updates and whether they averaged shards, and (fits) ``root_swap``, the swap of a
root unit that holds weights (:func:`swap_a_gathered_root`); the exit codes of every
phase (the killed ranks': -9). And ``lightning-imex-compare`` on the tiny recipe
:data:`COMPARE` under ``strategy=fsdp_cpu`` and ``strategy=auto`` on the same global batch,
into ``OUT_DIR/compare/STRATEGY`` (:func:`run_compare`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import lightning as L
import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from collectives import count_collectives  # noqa: E402  (tests/, this script's folder)
from fork_runner import forked, run_app  # noqa: E402
from lightning_imex.ema import EMA  # noqa: E402
from lightning_imex import train as app  # noqa: E402
from lightning_imex.sharding import consolidate, shard_blocks  # noqa: E402

WORLD = 2
GLOBAL_BATCH = 72  # spirals with 1000 samples: 720 to train (10 batches an epoch), 100 to validate, 180 to test
STEPS, EVERY, KILL = 8, 4, 6  # validation and checkpoints at steps 4 and 8; the kill at 6 resumes from 4
COMMON = ("dataset=spirals", "+dataset.n_samples=1000", "model.hidden=[33,17]", "logger=csv",
          "~callbacks.rich_progress_bar", "callbacks.checkpoint.monitor=null",
          "callbacks.checkpoint.save_top_k=0", f"+callbacks.checkpoint.every_n_train_steps={EVERY}",
          f"trainer.max_steps={STEPS}", "trainer.max_epochs=-1", f"trainer.val_check_interval={EVERY}",
          "trainer.num_sanity_val_steps=0", "scheduler=constant",
          "clipping.algorithm=norm", "clipping.threshold=0.05", "trainer.log_every_n_steps=1")
CONFIGS = {
    "imex_euler": ("optimizer=imex_euler", "optimizer.lr=0.01"),
    "imex_trapezoidal": ("optimizer=imex_trapezoidal", "optimizer.lr=0.01"),
    "imex_ssp3_433": ("optimizer=imex_ssp3_433", "optimizer.lr=0.01"),
    "adamomentum": ("optimizer=adamomentum", "optimizer.lr=0.01"),
    "clipped_adam_global": ("optimizer=clipped_adam", "optimizer.lr=0.01", "optimizer.clip=global",
                            "optimizer.max_update=0.02"),
    # a torch optimizer: the clipping hook's own sharded norm, and value clipping
    "adam_norm": ("optimizer=adam", "optimizer.lr=0.01"),
    "adam_value": ("optimizer=adam", "optimizer.lr=0.01", "clipping.algorithm=value", "clipping.threshold=0.02"),
}
RESUMED = "imex_trapezoidal"  # the configuration killed and resumed
WITH_EMA = RESUMED  # the configuration with the app's ModelEMA on (validation on the EMA), exported here:
EMA_EXPORT = "ema.pt"
MP_STEPS, MP_EVERY, MP_BATCH = 6, 3, 16  # ModelEMA under Lightning's plain ModelParallelStrategy
# lightning-imex-compare's recipe (JSON is YAML): the fits' data and network, 8 gradient evaluations a
# run (Adam: 8 steps, trapezoidal: 4), validated twice
COMPARE = {"claim": "a claim", "paper": "a paper", "scale": "tiny", "budget": 8, "seeds": 1, "validations": 2,
           "overrides": [*COMMON[:3], "~callbacks.ema", "scheduler=constant"],
           "optimizers": {"adam": {"overrides": ["optimizer=adam"], "lr": 0.01},
                          "imex_trapezoidal": {"overrides": ["optimizer=imex_trapezoidal"], "lr": 0.01}}}
COMPARED_STRATEGIES = ("auto", "fsdp_cpu")
RUN = subprocess.run  # the compare runner's, replaced in the sharded compare's process (command_in_ranks)


def config(name: str, folder: Path, sharded: bool, *extra: str):
    batch = GLOBAL_BATCH // WORLD if sharded else GLOBAL_BATCH
    ema = f"+callbacks.ema.export_path='{folder / EMA_EXPORT}'" if name == WITH_EMA else "~callbacks.ema"
    overrides = [*COMMON, ema, *CONFIGS[name], f"dataset.batch_size={batch}",
                 f"strategy={'fsdp_cpu' if sharded else 'auto'}", f"paths.output_dir='{folder}'", *extra]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_imex.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def last(folder: Path) -> Path:
    return folder / "checkpoints" / "last.ckpt"


def run_reference(out: Path) -> None:
    results = {}
    for name in CONFIGS:
        folder = out / "auto" / name
        metrics = app.train(config(name, folder, sharded=False), print_summary=False)
        results[name] = {"metrics": metrics}
    (out / "auto.json").write_text(json.dumps(results))
    plain_model_parallel_ema(out / "mp_auto", sharded=False)


class Shardable(L.LightningModule):
    """A small regression network that shards itself in ``configure_model`` when the
    strategy gives it a device mesh (Lightning's ``ModelParallelStrategy``), as issue 21's
    user module does; the seed fixes its initial weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def configure_model(self) -> None:
        if self.device_mesh is not None:
            shard_blocks(self.net, self.device_mesh["data_parallel"], block_types=(nn.Linear,))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def plain_model_parallel_ema(folder: Path, sharded: bool, resume_from: Path | None = None) -> None:
    """ModelEMA on :class:`Shardable` for MP_STEPS steps of the global batch MP_BATCH, a
    checkpoint folder every MP_EVERY steps: under Lightning's own ``ModelParallelStrategy``
    (data parallel over the WORLD ranks, each its half of the batch) if ``sharded``, else
    in this one process; resumed from ``resume_from`` if given. Writes the
    final EMA and raw weights, gathered, to ``folder/weights.pt`` (rank 0); a sharded fit not
    resumed also tests its last checkpoint on the raw weights (``swap_test=False``: those the
    callback reads back from the shards), and writes the weights the module held there."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lightning_imex.callbacks import ModelEMA

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(MP_EVERY * MP_BATCH, 4, generator=generator)  # an epoch between checkpoints: resumable
    dataset = TensorDataset(x, torch.sin(x[:, :2] * 3))
    data = DataLoader(dataset, batch_size=MP_BATCH // WORLD, sampler=DistributedSampler(
        dataset, WORLD, int(os.environ["RANK"]), shuffle=False)) if sharded else DataLoader(dataset, MP_BATCH)
    ema = ModelEMA(decay=0.7, schedule="fixed")
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1) if sharded else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=WORLD if sharded else 1, strategy=strategy, max_steps=MP_STEPS,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ema, ModelCheckpoint(folder, "{step}", every_n_train_steps=MP_EVERY,
                                                        save_top_k=-1)])
    trainer.fit(Shardable(), data, ckpt_path=resume_from)
    states = [("ema", ema.ema.averaged_state_dict()), ("raw", ema.ema.raw_state_dict())]
    if sharded and resume_from is None:
        tested = Shardable()
        L.Trainer(accelerator="cpu", devices=WORLD, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[ModelEMA(swap_test=False)],
                  strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)).test(
            tested, data, ckpt_path=folder / f"step={MP_STEPS}.ckpt", verbose=False)
        states.append(("tested", tested.state_dict()))
    weights = {f"{kind}.{name}": (t.full_tensor() if sharded else t).detach().clone()
               for kind, state in states for name, t in state.items()}
    if trainer.is_global_zero:
        torch.save({**weights, "updates": ema.updates}, folder / "weights.pt")


def swap_a_gathered_root() -> dict:
    """EMA swaps on an FSDP2 module whose root unit holds weights (the app's networks leave
    the root none), which a forward without backward leaves gathered: the outputs on the
    EMA against the plain network with the EMA's gathered weights, and on the raw weights
    after the swap back against before; max |difference| of each."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(net[0], mesh=mesh)
    fully_shard(net, mesh=mesh)  # the root: net[2]'s weights
    ema, x = EMA(net, decay=0.5, schedule="fixed"), torch.randn(5, 4)
    with torch.no_grad():
        for p in net.parameters():
            p.to_local().mul_(2)  # the "training" step: the EMA is now 1.5 x the initial weights
        ema.update()
        raw = net(x)  # leaves the root gathered
        with ema.swapped():
            on_ema = net(x)
        after = net(x)
        plain.load_state_dict({k: v.full_tensor() for k, v in ema.averaged_state_dict().items()})
        return {"ema": (on_ema - plain(x)).abs().max().item(), "raw": (after - raw).abs().max().item()}


def rank_environment(rank: int, port: int) -> dict[str, str]:
    """A rank's environment as torchrun sets it: Lightning then launches no process."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "NODE_RANK": "0"}


def run_rank(rank: int, port: int, out: Path, phase: str) -> None:
    os.environ.update(rank_environment(rank, port))
    collectives = count_collectives()
    results = {}
    if phase == "fits":
        for name in CONFIGS:
            try:
                results[name] = {"metrics": app.train(config(name, out / "fsdp" / name, sharded=True),
                                                      print_summary=False)}
            except Exception:  # noqa: BLE001  (recorded: one broken configuration does not hide the others)
                results[name] = {"error": f"rank {rank}: {traceback.format_exc()[-4000:]}"}
    elif phase == "kill":  # both ranks SIGKILL themselves at the end of step KILL
        app.train(config(RESUMED, out / "chain", True, "+callbacks.kill._target_=crash_callbacks.KillAt",
                         f"+callbacks.kill.step={KILL}"), print_summary=False)
    else:
        chain = out / "chain"
        results[RESUMED] = {"metrics": app.train(config(RESUMED, chain, True, f"ckpt_path='{last(chain)}'"),
                                                 print_summary=False)}
    if phase == "fits":  # Lightning's own ModelParallelStrategy: a fit, and one resumed from its first checkpoint
        plain_model_parallel_ema(out / "mp", sharded=True)
        plain_model_parallel_ema(out / "mp_resumed", True, out / "mp" / f"step={MP_EVERY}.ckpt")
    ema = {"collectives": collectives, **({"root_swap": swap_a_gathered_root()} if phase == "fits" else {})}
    (out / f"{phase}_ema_{rank}.json").write_text(json.dumps(ema))
    if rank == 0:
        (out / f"{phase}.json").write_text(json.dumps(results))


def run_consolidated(out: Path) -> None:
    """The consolidated checkpoint of every sharded fit against the plain one's weights;
    the first one's weights tested in the plain (unsharded) model."""
    results = {}
    for name in CONFIGS:
        sharded = consolidate(last(out / "fsdp" / name), out / "fsdp" / f"{name}.pt")
        plain = torch.load(last(out / "auto" / name), map_location="cpu", weights_only=True)
        results[name] = {"param": max((sharded[k] - plain["state_dict"][k]).abs().max().item() for k in sharded),
                         "keys": sorted(sharded) == sorted(plain["state_dict"])}
    name = next(iter(CONFIGS))
    cfg = config(name, out / "consolidated", False, "~callbacks.checkpoint", "~callbacks.cost")
    L.seed_everything(cfg.seed, verbose=False)  # as train() seeds: the fits' initial weights
    datamodule, module, trainer = app.build(cfg)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    plain = torch.load(last(out / "auto" / name), map_location="cpu", weights_only=True)["state_dict"]
    results["moved"] = max((plain[k] - initial[k]).abs().max().item() for k in initial)
    module.load_state_dict(torch.load(out / "fsdp" / f"{name}.pt", weights_only=True))
    trainer.test(module, datamodule=datamodule, verbose=False)
    results["tested"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    sharded_ema = torch.load(out / "fsdp" / WITH_EMA / EMA_EXPORT, weights_only=True)
    plain_ema = torch.load(out / "auto" / WITH_EMA / EMA_EXPORT, weights_only=True)
    module.load_state_dict(sharded_ema)  # strict: the plain model's keys and shapes
    results["ema_export"] = max((sharded_ema[k] - plain_ema[k]).abs().max().item() for k in plain_ema)
    mp = consolidate(out / "mp" / f"step={MP_STEPS}.ckpt")  # its raw copy inside state_dict left out
    Shardable().load_state_dict(mp)  # strict
    saved = torch.load(out / "mp" / "weights.pt", weights_only=True)
    results["mp_consolidated"] = max((mp[k] - saved[f"ema.{k}"]).abs().max().item() for k in mp)
    (out / "consolidated.json").write_text(json.dumps(results))


def run_compare(out: Path, strategy: str) -> None:
    """``lightning-imex-compare RECIPE strategy=STRATEGY`` (its entry point, ``main``) on
    :data:`COMPARE` with the fits' global batch, into ``out/compare/STRATEGY``. A sharded
    run is the app's command, which the runner starts with ``subprocess.run``: here its
    ranks are forked from this process (:func:`command_in_ranks`) instead of each
    interpreter importing everything again, as torchrun would start them."""
    from lightning_imex.compare import main as compare_command

    recipe = out / "compare.yaml"
    recipe.write_text(json.dumps(COMPARE))
    batch = GLOBAL_BATCH // WORLD if strategy != "auto" else GLOBAL_BATCH
    if strategy != "auto":
        subprocess.run = command_in_ranks  # this forked process's own
    compare_command([str(recipe), f"strategy={strategy}", f"dataset.batch_size={batch}", "--jobs", "1",
                     "--threads", "1", "--out", str(out / "compare" / strategy)])


def command_in_ranks(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` for the compare runner: its ``python -m lightning_imex.train
    ARGS`` as the console script in WORLD forked ranks (``fork_runner.run_app``), their
    output into the runner's log (``stdout``); the first non-zero exit code. Any other
    command runs as ``subprocess.run`` runs it."""
    if list(command[:3]) != [sys.executable, "-m", "lightning_imex.train"]:
        return RUN(command, **kwargs)
    port, context = free_port(), mp.get_context("fork")
    with tempfile.TemporaryDirectory() as scratch:
        outputs = [Path(scratch) / f"rank{rank}.{stream}" for rank in range(WORLD) for stream in ("out", "err")]
        processes = [context.Process(target=run_app, args=({
            "cwd": os.getcwd(), "argv": ["lightning-imex-train", *command[3:]], "stdout": str(outputs[2 * rank]),
            "stderr": str(outputs[2 * rank + 1]), "env": {**os.environ, **rank_environment(rank, port)}},))
            for rank in range(WORLD)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        kwargs["stdout"].write("".join(path.read_text(errors="replace") for path in outputs if path.exists()))
    kwargs["stdout"].flush()
    return subprocess.CompletedProcess(command, next((p.exitcode for p in processes if p.exitcode), 0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(target, *args) -> int:
    """``target(*args)`` in a forked process; its exit code (-9: SIGKILLed)."""
    process = mp.get_context("fork").Process(target=target, args=args)
    process.start()
    process.join()
    return process.exitcode


def in_ranks(out: Path, phase: str) -> list[int]:
    port = free_port()
    return forked(run_rank, *[(rank, port, out, phase) for rank in range(WORLD)])


def main(out: Path) -> None:
    import matplotlib.pyplot  # noqa: F401  (imported once, before the forks; the compare's plots)
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    from lightning_imex.compare import report, runner  # noqa: F401

    app.quiet()
    torch.set_num_threads(1)
    results: dict = {}
    results["auto_exit"] = in_process(run_reference, out)
    results["fits_exit"] = in_ranks(out, "fits")
    results["kill_exit"] = in_ranks(out, "kill")
    results["resume_exit"] = in_ranks(out, "resume")
    results["consolidated_exit"] = in_process(run_consolidated, out)
    results["compare_exit"] = {strategy: in_process(run_compare, out, strategy) for strategy in COMPARED_STRATEGIES}
    for phase in ("auto", "fits", "resume", "consolidated"):
        path = out / f"{phase}.json"
        results[phase] = json.loads(path.read_text()) if path.exists() else None
    results["ema_ranks"] = {phase: [json.loads(path.read_text()) if path.exists() else None
                                    for path in (out / f"{phase}_ema_{rank}.json" for rank in range(WORLD))]
                            for phase in ("fits", "resume")}
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

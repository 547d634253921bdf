"""The app SIGKILLed at seeded random steps and resumed from ``last.ckpt`` ends bit for bit
where an uninterrupted run ends: weights, EMA, optimizer state (reuse_gradient's pending
sums included; moments in bfloat16, rounded stochastically), LR schedule, random
generators, the loader's place in the data, and Lightning's counters (global step, epoch,
batches, the loops' progress). And a kill while a checkpoint is being written leaves the
previous ``last.ckpt`` loadable.

Every run is the app's entry point in a process of its own, forked from a server that
has imported it already (``fork_runner``: a run takes about 2 s instead of 8)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fork_runner import AppRunners

STEPS, STEPS_PER_EPOCH, EVERY = 40, 10, 5
# spirals: 1000 samples -> 720 for training, 10 batches of 72 an epoch; dropout: the
# random generators' states matter
COMMON = ("dataset=spirals", "+dataset.n_samples=1000", "dataset.batch_size=72", "model.hidden=[32,32]",
          "model.dropout=0.1", "logger=none", "test=false", "~callbacks.rich_progress_bar",
          "callbacks.checkpoint.monitor=null", "callbacks.checkpoint.save_top_k=1")
BY_STEPS = (f"trainer.max_steps={STEPS}", "trainer.max_epochs=-1")
BY_EPOCHS = ("trainer.max_steps=-1", f"trainer.max_epochs={STEPS // STEPS_PER_EPOCH}")
# a checkpoint every 5 steps (on_train_batch_end): mid-epoch, and after an epoch's last
# batch (before its validation and on_train_epoch_end); without it, ModelCheckpoint's
# default: one at every epoch's end (on_train_epoch_end)
EVERY_STEPS = (f"+callbacks.checkpoint.every_n_train_steps={EVERY}",)
BF16_STATE = "trapezoidal_bf16_state"
CONFIGS = {
    # the moments in bfloat16, every store rounded stochastically with bits keyed by the seed and
    # the step: a resume repeats the rounding only if both come back with the state (float32
    # state: the other configurations)
    BF16_STATE: ("optimizer=imex_trapezoidal", "optimizer.state_dtype=bfloat16", *BY_STEPS, *EVERY_STEPS),
    "trapezoidal_reuse": ("optimizer=imex_trapezoidal_reuse", *BY_STEPS, *EVERY_STEPS),
    "adamomentum": ("optimizer=adamomentum", *BY_STEPS, *EVERY_STEPS),
    "clipped_adam_ema_optimizer": ("optimizer=clipped_adam", "callbacks.ema.decay=optimizer", *BY_STEPS,
                                   *EVERY_STEPS),
    "mid_warmup": ("optimizer=imex_trapezoidal", "scheduler=warmup_cosine", "scheduler.warmup_steps=30", *BY_STEPS,
                   *EVERY_STEPS),
    # the app's default bound; its schedule asks for the fit's length, which sets up the
    # training loader before Lightning restores the loops
    "by_epochs": ("optimizer=imex_trapezoidal", *BY_EPOCHS, *EVERY_STEPS),
    # every resume from an epoch's end, which a fit bounded by max_steps counts apart
    "epoch_end_checkpoints": ("optimizer=imex_trapezoidal_reuse", *BY_STEPS),
}


@pytest.fixture(scope="module")
def app():
    with AppRunners(2) as runners:  # two runs at a time: 2 cores
        yield runners


def run(app: AppRunners, folder: Path, *overrides: str, status: int) -> None:
    """The app with ``overrides``, writing in ``folder``; it must end with exit ``status``
    (-9: SIGKILLed)."""
    result = app.run(folder.parent, [*COMMON, *overrides, f"hydra.run.dir={folder}"])
    assert result.returncode == status, (f"lightning-imex-train {' '.join(overrides)} ended with {result.returncode}, "
                                         f"not {status}; its stderr ends:\n{result.stderr[-3000:]}")


def kill_steps(name: str) -> list[int]:
    """Three seeded kill steps, one of each kind: at an epoch's last step (killed before
    the checkpoints after it: the next run trains across the epoch boundary), just after
    an epoch boundary (the next run resumes from the checkpoint after the epoch's last
    batch, or at its end) and late in an epoch (the next run resumes from the checkpoint
    part-way through it, or at the previous epoch's end)."""
    rng = random.Random(name)
    epochs = range(1, STEPS // STEPS_PER_EPOCH)  # from the second: checkpoints at epochs' ends start at its start
    boundary = STEPS_PER_EPOCH * rng.choice(epochs[1:])
    after_boundary = STEPS_PER_EPOCH * rng.choice(epochs) + rng.randint(1, EVERY - 1)
    late = STEPS_PER_EPOCH * rng.choice(epochs) + rng.randint(EVERY + 1, STEPS_PER_EPOCH - 1)
    return sorted([boundary, after_boundary, late])


def final(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same(a, b, where="checkpoint"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        equal = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert equal, where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def compared(checkpoint: dict) -> dict:
    """What must be bit-identical: the whole checkpoint but the checkpoint callback's own
    bookkeeping (paths), a time measured (TrainingCost's seconds) and the validation
    loop's counters (a resumed fit does not repeat the validation that followed the batch
    its checkpoint was saved after)."""
    callbacks = {name: {key: value for key, value in state.items() if key != "train_seconds"}
                 for name, state in checkpoint["callbacks"].items() if not name.startswith("ModelCheckpoint")}
    fit_loop = {key: value for key, value in checkpoint["loops"]["fit_loop"].items()
                if not key.startswith("epoch_loop.val_loop.")}
    return {**checkpoint, "callbacks": callbacks, "loops": {**checkpoint["loops"], "fit_loop": fit_loop}}


def straight_run(app: AppRunners, folder: Path, name: str) -> dict:
    folder.mkdir(parents=True)
    run(app, folder, *CONFIGS[name], status=0)
    return compared(final(folder))


def crash_and_resume(app: AppRunners, folder: Path, name: str) -> dict:
    folder.mkdir(parents=True)
    last = folder / "checkpoints" / "last.ckpt"
    for i, step in enumerate(kill_steps(name)):
        resume = [f"ckpt_path={last}"] if i else []
        run(app, folder, *CONFIGS[name], *resume, "+callbacks.kill._target_=crash_callbacks.KillAt",
            f"+callbacks.kill.step={step}", status=-9)
        assert final(folder)["global_step"] < step
    run(app, folder, *CONFIGS[name], f"ckpt_path={last}", status=0)
    return compared(final(folder))


@pytest.mark.slow
def test_killed_and_resumed_runs_end_bit_identical(app, tmp_path):
    with ThreadPoolExecutor(2) as pool:  # the chains first: they take longest
        chains = {name: pool.submit(crash_and_resume, app, tmp_path / name / "chain", name) for name in CONFIGS}
        straights = {name: pool.submit(straight_run, app, tmp_path / name / "straight", name) for name in CONFIGS}
    for name in CONFIGS:
        straight = straights[name].result()
        assert straight["global_step"] == STEPS and straight["epoch"] == STEPS // STEPS_PER_EPOCH - 1
    moments = straights[BF16_STATE].result()["optimizer_states"][0]["state"].values()
    assert {state[key].dtype for state in moments for key in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    assert_all_same({f"{name} killed at {kill_steps(name)}": (straights[name].result(), chains[name].result())
                     for name in CONFIGS})


def assert_all_same(pairs: dict[str, tuple[dict, dict]]) -> None:
    """Every (uninterrupted, resumed) pair equal; fails listing every difference."""
    differences = []
    for where, (straight, resumed) in pairs.items():
        try:
            assert_same(straight, resumed, f"{where}: checkpoint")
        except AssertionError as difference:
            differences.append(str(difference).splitlines()[0])
    if differences:
        pytest.fail("\n".join(differences))


@pytest.mark.slow
def test_a_kill_while_saving_leaves_the_last_checkpoint_loadable(app, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    config = ("optimizer=imex_trapezoidal", *BY_STEPS, *EVERY_STEPS)
    run(app, folder, *config, "+callbacks.kill._target_=crash_callbacks.KillDuringSave", "+callbacks.kill.save=4",
        status=-9)
    checkpoint = final(folder)  # the one before the interrupted write, whole
    assert checkpoint["global_step"] == EVERY  # writes: step 5 (top-k file, last), step 10 (top-k, LAST)
    run(app, folder, *config, f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}", status=0)
    assert final(folder)["global_step"] == STEPS


OPTIMIZERS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "optimizer").glob("*.yaml"))
SHORT = ("trainer.max_steps=20", "trainer.max_epochs=-1", *EVERY_STEPS)


@pytest.mark.slow
def test_every_optimizer_resumes_bit_identical_after_a_kill(app, tmp_path):
    """Every optimizer config of the app, with the EMA: killed mid-epoch (step 13, after
    the checkpoint at step 10) and resumed, it ends where the uninterrupted run ends."""
    def pair(name: str) -> tuple[dict, dict]:
        config = (f"optimizer={name}", *SHORT)
        straight, chain = tmp_path / name / "straight", tmp_path / name / "chain"
        straight.mkdir(parents=True), chain.mkdir(parents=True)
        run(app, straight, *config, status=0)
        run(app, chain, *config, "+callbacks.kill._target_=crash_callbacks.KillAt", "+callbacks.kill.step=13",
            status=-9)
        run(app, chain, *config, f"ckpt_path={chain / 'checkpoints' / 'last.ckpt'}", status=0)
        return compared(final(straight)), compared(final(chain))

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(OPTIMIZERS, pool.map(pair, OPTIMIZERS)))
    assert all(straight["global_step"] == 20 for straight, _ in results.values())
    assert_all_same({f"optimizer={name} killed at 13": pair for name, pair in results.items()})

"""Sharded training from the app (``strategy=fsdp_cpu``: FSDP2 on 2 gloo processes).

The slow tests share one run of ``fsdp_app_run.py`` (about 25 s on 2 cores): five
optimizers (IMEX euler, trapezoidal, ssp3_433, AdaMomentum, ClippedAdam global) with
norm clipping active, each fitted sharded and in one process on the same global batch;
a sharded fit SIGKILLed and resumed from its checkpoint folder, with the app's ModelEMA
on (each rank averaging its shards); the consolidated checkpoint tested in the plain
model; ``lightning-imex-compare`` on a tiny recipe under ``strategy=fsdp_cpu`` and
``strategy=auto`` (its sharded runs forked as ranks: about 10 s more). The fast ones
check the one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_crash_resume import assert_same, compared
from test_fsdp2 import fsdp2_unavailable

from fsdp_app_run import COMPARE, COMPARED_STRATEGIES, CONFIGS, MP_STEPS, RESUMED, STEPS, WITH_EMA

SCRIPT = Path(__file__).with_name("fsdp_app_run.py")
TOLERANCE = 1e-6
# what differs by design: the training loss of a step is each process's own (no collective per step), and time
UNCOMPARED = ("train/loss_step", "cost/train_seconds")
pytestmark = pytest.mark.skipif(fsdp2_unavailable() is not None, reason=str(fsdp2_unavailable()))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fsdp_app")
    done = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=600,
                          check=False, cwd=SCRIPT.parent)
    assert done.returncode == 0 and (out / "results.json").exists(), \
        f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    results = json.loads((out / "results.json").read_text())
    assert results["auto_exit"] == 0 and results["fits_exit"] == [0, 0], results
    return out, results


def logged(folder: Path) -> list[dict[str, float]]:
    with open(folder / "csv" / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != "" and k not in UNCOMPARED} for row in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_fit_equals_one_process_on_the_global_batch(run, name):
    out, results = run
    fit = results["fits"][name]
    assert "error" not in fit, fit.get("error")
    consolidated = results["consolidated"][name]
    assert consolidated["keys"], "the consolidated state_dict's keys are not the plain model's"
    assert consolidated["param"] <= TOLERANCE, f"{name}: final weights differ by {consolidated['param']:.3g}"
    assert results["consolidated"]["moved"] > 1e-2, "the weights barely moved: the comparison would be vacuous"
    sharded, plain = logged(out / "fsdp" / name), logged(out / "auto" / name)
    assert [sorted(row) for row in sharded] == [sorted(row) for row in plain]
    assert any(row.get("grad_clipped") == 1.0 for row in plain), "the norm clipping never clipped"
    assert any("val/loss" in row for row in plain) and any("test/acc" in row for row in plain)
    for row, reference in zip(sharded, plain):
        for key, value in reference.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=TOLERANCE), f"{name}: {key} at step {row['step']}"


def full_checkpoint(folder: Path, scratch: Path) -> dict:
    """A sharded checkpoint folder as one dict: the shards (weights, optimizer state)
    gathered by torch's own converter, and Lightning's meta.pt."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(folder, scratch)
    shards = torch.load(scratch, weights_only=True)
    return {**torch.load(folder / "meta.pt", weights_only=True), **shards}


@pytest.mark.slow
def test_killed_sharded_fit_resumes_bit_identical(run, tmp_path):
    out, results = run
    assert results["kill_exit"] == [-9, -9] and results["resume_exit"] == [0, 0], results
    straight = full_checkpoint(out / "fsdp" / RESUMED / "checkpoints" / "last.ckpt", tmp_path / "straight.pt")
    resumed = full_checkpoint(out / "chain" / "checkpoints" / "last.ckpt", tmp_path / "resumed.pt")
    assert straight["global_step"] == STEPS
    assert RESUMED == WITH_EMA and straight["callbacks"]["ModelEMA"]["ema"]["updates"] == STEPS  # the EMA resumed too
    assert_same(compared(straight), compared(resumed))


@pytest.mark.slow
def test_sharded_model_ema_equals_the_one_process_ema_without_gathering(run, tmp_path):
    """Each rank averages its own shards: the sharded checkpoint's EMA (``state_dict``) and
    raw weights (``current_model_state``, saved with the shards) are the one-process fit's;
    its export is gathered into a plain state_dict that loads into the plain model; no
    collective runs inside an EMA update. (Validation on the EMA logging the one-process
    metrics: test_sharded_fit_equals_one_process_on_the_global_batch[WITH_EMA].)"""
    out, results = run
    sharded = full_checkpoint(out / "fsdp" / WITH_EMA / "checkpoints" / "last.ckpt", tmp_path / "sharded.pt")
    plain = torch.load(out / "auto" / WITH_EMA / "checkpoints" / "last.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert sharded[key].keys() == plain[key].keys()
        difference = max((sharded[key][k] - plain[key][k]).abs().max().item() for k in plain[key])
        assert difference <= TOLERANCE, f"{key}: the sharded fit's differs from the one-process fit's by {difference}"
    ema, raw = plain["state_dict"], plain["current_model_state"]
    apart = max((ema[k] - raw[k]).abs().max().item() for k in ema)
    assert apart > 1e-3, "the EMA is the raw weights: the comparison would be vacuous"
    assert results["consolidated_exit"] == 0 and results["consolidated"]["ema_export"] <= TOLERANCE, results
    for phase in ("fits", "resume"):
        for rank, ema in enumerate(results["ema_ranks"][phase]):
            counts = ema["collectives"]
            assert counts["updates"] > 0 and counts["sharded"], f"{phase}, rank {rank}: {counts}"
            assert counts["in_updates"] == 0, f"{phase}, rank {rank}: {counts['in_updates']} collectives inside EMA updates"
    for rank, ema in enumerate(results["ema_ranks"]["fits"]):  # a root unit with weights, gathered by a forward
        assert ema["root_swap"] == {"ema": 0.0, "raw": 0.0}, f"rank {rank}: {ema['root_swap']}"


@pytest.mark.slow
def test_model_ema_under_lightnings_own_model_parallel_strategy(run):
    """Issue 21: ModelEMA under Lightning's plain ``ModelParallelStrategy`` (a module that
    calls ``fully_shard`` in ``configure_model``; not our FSDP2Strategy): the EMA and raw
    weights equal the one-process fit's; a fit resumed from the first checkpoint folder
    ends bit-identical to the straight one (its raw shards, kept inside ``state_dict``,
    restored on every rank); testing the last checkpoint with ``swap_test=False`` runs on
    those raw shards; that folder's ``meta.pt`` holds no weights, and it
    consolidates into the module's keys alone."""
    out, results = run
    straight, resumed, plain = (torch.load(out / folder / "weights.pt", weights_only=True)
                                for folder in ("mp", "mp_resumed", "mp_auto"))
    assert straight["updates"] == resumed["updates"] == plain["updates"] == MP_STEPS
    weights = [k for k in plain if k != "updates"]
    difference = max((straight[k] - plain[k]).abs().max().item() for k in weights)
    assert difference <= TOLERANCE, f"the sharded EMA differs from the one-process EMA by {difference}"
    apart = max((plain[f"ema.{k[4:]}"] - plain[k]).abs().max().item() for k in weights if k.startswith("raw."))
    assert apart > 1e-3, "the EMA is the raw weights: the comparison would be vacuous"
    assert all(torch.equal(straight[k], resumed[k]) for k in weights), "the resumed fit is not bit-identical"
    tested = [k for k in straight if k.startswith("tested.")]
    assert tested and all(torch.equal(straight[k], straight[f"raw.{k[7:]}"]) for k in tested), \
        "test(ckpt_path=...) with swap_test=False did not run on the checkpoint's raw weights"
    meta = torch.load(out / "mp" / f"step={MP_STEPS}.ckpt" / "meta.pt", weights_only=False)
    assert "current_model_state" not in meta and "state_dict" not in meta
    assert results["consolidated"]["mp_consolidated"] <= TOLERANCE, results["consolidated"]


@pytest.mark.slow
def test_consolidated_checkpoint_tests_in_the_plain_model_as_the_sharded_fit(run):
    out, results = run
    assert results["consolidated_exit"] == 0, results
    name = next(iter(CONFIGS))
    tested, sharded = results["consolidated"]["tested"], logged(out / "fsdp" / name)[-1]
    assert tested.keys() == {"test/loss", "test/acc"}
    for key, value in tested.items():
        assert value == pytest.approx(sharded[key], abs=TOLERANCE), key


@pytest.mark.slow
def test_fsdp_fit_keeps_the_initial_weights_digest(run):
    """The comparison's fairness check: a sharded fit's TrainingCost digests the whole
    initial weights (gathered), the same digest as the one-process fit's."""
    out, _ = run
    name = next(iter(CONFIGS))
    sharded = torch.load(out / "fsdp" / name / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)
    plain = torch.load(out / "auto" / name / "checkpoints" / "last.ckpt", weights_only=True)
    assert sharded["callbacks"]["TrainingCost"]["initial_weights"] == plain["callbacks"]["TrainingCost"][
        "initial_weights"]


@pytest.mark.slow
def test_a_compare_recipe_runs_sharded_and_its_fairness_checks_pass(run):
    """``lightning-imex-compare RECIPE strategy=fsdp_cpu``: each run a sharded fit (its
    checkpoint a folder) whose cost and digests the runner reads back from it; the
    fairness check passes (same initial weights, same batches for both optimizers), the
    initial weights' digest is the one-process compare's (the whole weights, gathered),
    and every number but time and the per-rank training loss is the one-process
    compare's on the same global batch: what each run logged and the results table."""
    out, results = run
    assert results["compare_exit"] == dict.fromkeys(COMPARED_STRATEGIES, 0), results["compare_exit"]
    sharded, plain = (out / "compare" / strategy for strategy in ("fsdp_cpu", "auto"))

    def run_folder(compare: Path, label: str) -> Path:  # the recipe's one learning rate and seed
        return compare / "runs" / label / f"lr_{COMPARE['optimizers'][label]['lr']:g}" / "seed_0"

    records = {}
    for compare in (sharded, plain):
        assert json.loads((compare / "compare.json").read_text())["fairness"].startswith("Fairness (checked)")
        records[compare] = {label: json.loads((run_folder(compare, label) / "run.json").read_text())
                            for label in COMPARE["optimizers"]}
    digests = [record["batch_digests"] for record in records[sharded].values()]
    common = min(map(len, digests))
    assert common > 0 and len({tuple(batches[:common]) for batches in digests}) == 1
    assert len({record["initial_weights"] for record in records[sharded].values()}) == 1
    for label, record in records[sharded].items():
        reference = records[plain][label]
        assert (run_folder(sharded, label) / "command.log").is_file(), f"{label}: not run as the app's command"
        assert (run_folder(sharded, label) / "checkpoints" / "last.ckpt").is_dir(), f"{label}: not a sharded fit"
        assert record["initial_weights"] == reference["initial_weights"], f"{label}: other initial weights"
        for key in ("steps", "gradient_evaluations"):
            assert record[key] == reference[key] and record[key] > 0, f"{label}: {key}"
        rows, reference_rows = logged(run_folder(sharded, label)), logged(run_folder(plain, label))
        assert [sorted(row) for row in rows] == [sorted(row) for row in reference_rows]
        assert any("val/acc" in row for row in rows) and any("test/acc" in row for row in rows)
        for row, expected in zip(rows, reference_rows):
            for key, value in expected.items():
                assert row[key] == pytest.approx(value, rel=1e-5, abs=TOLERANCE), f"{label}: {key} at {row['step']}"
    table, reference_table = (list(csv.DictReader((compare / "results.csv").read_text().splitlines()))
                              for compare in (sharded, plain))
    same = ("optimizer", "lr", "selected", "seed", "steps", "gradient_evaluations", "metric", "diverged")
    assert [[row[k] for k in same] for row in table] == [[row[k] for k in same] for row in reference_table]
    for row, expected in zip(table, reference_table):
        assert float(row["metric_value"]) == pytest.approx(float(expected["metric_value"]), abs=TOLERANCE)


# ------------------------------------------------------------------ fast: one-line errors, no process started


def test_shard_blocks_refuses_tied_weights():
    from torch import nn

    from lightning_imex.models import build_model
    from lightning_imex.sharding import shard_blocks

    net = build_model({"name": "lstm", "embedding": 8, "hidden": 8, "tie_weights": True}, (5,), 11)
    with pytest.raises(ValueError, match=r"parameter '(decoder|embedding)\.weight' is shared with block"):
        shard_blocks(net, None, block_types=(nn.Embedding, nn.Linear))


def test_mixed_precision_policy_follows_the_trainer_precision():
    from lightning_imex.sharding import mixed_precision_policy

    policy = mixed_precision_policy("bf16-mixed")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy("32-true") is None


@pytest.mark.parametrize("overrides, fragment", [
    (("strategy=fsdp_cpu", "clipping.algorithm=agc", "clipping.threshold=0.01"),
     "clipping.algorithm='agc' is not available under a sharding strategy"),
    (("strategy=fsdp_cpu", "clipping.algorithm=norm", "clipping.threshold=1", "clipping.norm_type=inf"),
     "clipping.norm_type=inf is not available under a sharding strategy"),
])
def test_sharded_fit_refuses_what_it_cannot_do_in_one_line(tmp_path, overrides, fragment):
    from test_bad_inputs import compose

    from lightning_imex.train import ConfigError, build

    with pytest.raises(ConfigError, match=fragment) as error:
        build(compose(tmp_path, *overrides))
    assert "\n" not in str(error.value)


def test_checkpoint_folders_are_for_sharded_fits(tmp_path):
    from test_bad_inputs import compose

    from lightning_imex.checkpoint import CheckpointError, load_checkpoint
    from lightning_imex.train import ConfigError, build

    with pytest.raises(CheckpointError, match="a folder that is not a sharded checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="a folder, not a checkpoint file .only a sharded fit"):
        build(compose(tmp_path, "strategy=auto", f"ckpt_path={tmp_path}"))


def test_sharded_fit_keeps_the_model_ema_and_refuses_checkpoints_without_its_shards(tmp_path):
    from test_bad_inputs import compose

    from lightning_imex.callbacks import ModelEMA
    from lightning_imex.train import ConfigError, build

    _, _, trainer = build(compose(tmp_path, "strategy=fsdp_cpu"))
    assert any(isinstance(c, ModelEMA) for c in trainer.callbacks)
    with pytest.raises(ConfigError, match=r"callbacks\.ema: ModelEMA under FSDP2Strategy needs .*"
                                          "save_distributed_checkpoint=True") as error:
        build(compose(tmp_path, "strategy=fsdp_cpu", "+trainer.strategy.save_distributed_checkpoint=false"))
    assert "\n" not in str(error.value)


def test_consolidate_command_refuses_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    from lightning_imex.sharding import main

    with pytest.raises(SystemExit) as exit_:
        main(["consolidate", str(tmp_path), str(tmp_path / "out.pt")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "not a sharded checkpoint folder" in err and err.count("\n") == 1


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process writes it: intended
def test_a_sharded_checkpoint_folder_is_checked_and_consolidated(tmp_path):
    """A folder as a sharded fit saves it (torch.distributed.checkpoint's shards and
    index, Lightning's meta.pt), written here by one process: read for its keys and
    shapes, consolidated into one file, refused when its pickled index is writable by
    others."""
    import os

    import torch.distributed.checkpoint as dcp

    from lightning_imex.checkpoint import CheckpointError, load_checkpoint
    from lightning_imex.sharding import consolidate

    folder = tmp_path / "last.ckpt"
    weights = {"net.0.weight": torch.randn(3, 2), "net.0.bias": torch.randn(3)}
    dcp.save({"state_dict": weights, "optimizer_0": {"state": {"net.0.bias": {"exp_avg": torch.ones(3)}}}},
             checkpoint_id=folder)
    torch.save({"global_step": 4, "loops": {}, "pytorch-lightning_version": "2.6.0"}, folder / "meta.pt")
    os.chmod(folder / ".metadata", 0o644)
    checkpoint = load_checkpoint(folder)
    assert {k: v.shape for k, v in checkpoint["state_dict"].items()} == {k: v.shape for k, v in weights.items()}
    assert checkpoint["optimizer_states"] == [None] and checkpoint["global_step"] == 4
    merged = consolidate(folder, tmp_path / "plain.pt")
    loaded = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert all(torch.equal(merged[k], weights[k]) and torch.equal(loaded[k], weights[k]) for k in weights)
    os.chmod(folder / ".metadata", 0o666)
    with pytest.raises(CheckpointError, match=r"its shard index \.metadata is writable by group or others"):
        load_checkpoint(folder)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process writes it: intended
def test_a_save_that_dies_leaves_the_previous_sharded_checkpoint(tmp_path, monkeypatch):
    """FSDP2Strategy writes the folder beside it and swaps it in: a save interrupted
    while writing the shards leaves the previous checkpoint whole (in one process here:
    the strategy's barriers and broadcast pass through without a process group)."""
    import torch.distributed.checkpoint as dcp

    from lightning_imex.checkpoint import load_checkpoint
    from lightning_imex.sharding import FSDP2Strategy

    strategy, folder = FSDP2Strategy(), tmp_path / "last.ckpt"

    def save(step: int) -> None:
        strategy.save_checkpoint({"state_dict": {"w": torch.full((3,), float(step))}, "optimizer_states": [],
                                  "global_step": step, "loops": {}, "pytorch-lightning_version": "2.6.0"}, folder)

    save(1)
    save(2)
    assert load_checkpoint(folder)["global_step"] == 2

    def dies(state_dict, checkpoint_id):  # a kill halfway through writing the shards
        (Path(checkpoint_id) / ".metadata").write_bytes(b"half an index")
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save(3)
    assert load_checkpoint(folder)["global_step"] == 2
    monkeypatch.undo()
    save(4)
    assert load_checkpoint(folder)["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

"""Resuming with a fit that ends later than the checkpoint planned: ``warmup_cosine``
stops before training with one line naming both choices, keeps the saved plan when asked,
or re-plans its rest continuously to the new end; the app resumes in the run's own
folder. And a checkpoint file that is garbage is always "not a PyTorch checkpoint"."""

from __future__ import annotations

import csv
import random
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from fork_runner import AppRunners
from lit import Classifier, loader, trainer

from lightning_imex.checkpoint import CheckpointError, load_checkpoint
from lightning_imex.schedules import WarmupCosine

BASE = 0.1


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)


def stepped(total: int, steps: int, **kwargs) -> WarmupCosine:
    """A schedule of ``total`` steps after ``steps`` of them (what a checkpoint holds)."""
    opt = optimizer()
    schedule = WarmupCosine(opt, total_steps=total, **kwargs)
    for _ in range(steps):
        opt.step()
        schedule.step()
    return schedule


def resumed_lrs(saved: WarmupCosine, total: int, **kwargs) -> tuple[WarmupCosine, dict[int, float]]:
    """A ``total``-step schedule loaded from ``saved``, run to ``total + 5``: the LR of
    every step from the resumed one."""
    opt = optimizer()
    schedule = WarmupCosine(opt, total_steps=total, **kwargs)
    schedule.load_state_dict(saved.state_dict())
    opt.param_groups[0]["lr"] = saved.get_last_lr()[0]  # as the checkpoint's optimizer state restores it
    lrs = {}
    for step in range(schedule.last_epoch, total + 5):
        lrs[step] = opt.param_groups[0]["lr"]
        opt.step()
        schedule.step()
    return schedule, lrs


def test_a_longer_resumed_fit_is_an_error_naming_both_choices():
    saved = stepped(10, 6, warmup_steps=2)
    with pytest.raises(ValueError) as error:
        WarmupCosine(optimizer(), total_steps=40, warmup_steps=2).load_state_dict(saved.state_dict())
    message = str(error.value)
    assert "\n" not in message and message.startswith("scheduler: the checkpoint's warmup_cosine plan ends at "
                                                      "scheduler step 10, this fit's at 40 (resuming at 6, LR 0.05)")
    assert "the LR would hold eta_min=0 for the last 30 steps" in message
    assert "scheduler.on_resume=keep" in message and "scheduler.on_resume=replan" in message


@pytest.mark.parametrize("resume_at,warmup,eta_min", [(6, 2, 0.0), (1, 3, 0.001), (3, 3, 0.0)],
                         ids=["mid-cosine", "mid-warmup", "warmup-end"])
def test_replan_is_continuous_at_the_resume_step_and_reaches_eta_min_at_the_new_end(resume_at, warmup, eta_min):
    saved = stepped(10, resume_at, warmup_steps=warmup, eta_min=eta_min)
    planned = {step: saved.lr_at(step, BASE) for step in range(15)}
    schedule, lrs = resumed_lrs(saved, 40, warmup_steps=warmup, eta_min=eta_min, on_resume="replan")
    assert lrs[resume_at] == planned[resume_at]  # the checkpoint's LR at the resume step, exactly
    assert [lrs[s] for s in range(resume_at, warmup)] == [planned[s] for s in range(resume_at, warmup)]  # warm-up
    cosine = [lrs[s] for s in range(max(resume_at, warmup), 40)]
    assert all(a > b for a, b in zip(cosine, cosine[1:])) and cosine[-1] > eta_min
    assert [lrs[s] for s in range(40, 45)] == [eta_min] * 5
    # no jump: the steps around the resume move as much as the plan's did
    if resume_at > warmup:
        assert lrs[resume_at] - lrs[resume_at + 1] <= planned[resume_at - 1] - planned[resume_at]
    # a second resume of the re-planned fit, as long: the same plan, exactly
    again, relrs = resumed_lrs(stepped_copy(schedule, 20), 40, warmup_steps=warmup, eta_min=eta_min)
    assert relrs == {s: lrs[s] for s in range(20, 45)}


def stepped_copy(schedule: WarmupCosine, step: int) -> WarmupCosine:
    """``schedule``'s plan at ``step`` (a checkpoint of the re-planned fit)."""
    copy = WarmupCosine(optimizer(), total_steps=schedule.total_steps, on_resume="keep")
    state = {**schedule.state_dict(), "last_epoch": step, "_last_lr": [schedule.lr_at(step, BASE)]}
    copy.load_state_dict(state)
    return copy


def test_keep_and_other_choices():
    saved = stepped(10, 10, warmup_steps=2)  # a plan that has ended: nothing to re-plan
    with pytest.raises(ValueError, match=r"the plan has ended, its LR is eta_min=0, and a re-plan from there stays "
                                         r"at eta_min; .* or set scheduler.on_resume=keep"):
        WarmupCosine(optimizer(), total_steps=40, warmup_steps=2, on_resume="replan").load_state_dict(
            saved.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = WarmupCosine(optimizer(), total_steps=40, warmup_steps=2, on_resume="keep")
        kept.load_state_dict(saved.state_dict())
    assert kept.total_steps == 10
    shorter = stepped(40, 6, warmup_steps=2)
    with pytest.warns(UserWarning, match="keeping the checkpoint's plan .*scheduler.on_resume=replan"):
        WarmupCosine(optimizer(), total_steps=20, warmup_steps=2).load_state_dict(shorter.state_dict())
    _, lrs = resumed_lrs(shorter, 20, warmup_steps=2, on_resume="replan")  # compressed to the shorter end
    assert lrs[6] == shorter.get_last_lr()[0] and lrs[19] > 0 and lrs[20] == 0
    with pytest.raises(ValueError, match=r"scheduler.on_resume must be one of keep, replan or null"):
        WarmupCosine(optimizer(), total_steps=10, on_resume="extend")


class Steps(L.Callback):
    def __init__(self):
        self.lrs, self.started = [], False

    def on_fit_start(self, trainer, pl_module):  # after configure_optimizers, where the plan is checked
        self.started = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_a_longer_fit_of_an_imex_module_stops_before_training(tmp_path):
    def module(**scheduler):
        return Classifier(optimizer={"name": "adam", "lr": BASE},
                          scheduler={"name": "warmup_cosine", "warmup_steps": 2, **scheduler})

    first = trainer(tmp_path, max_steps=8)
    first.fit(module(), train_dataloaders=loader())  # 4 batches an epoch: a plan of 8 steps
    checkpoint = tmp_path / "eight.ckpt"
    first.save_checkpoint(checkpoint)
    steps = Steps()
    with pytest.raises(ValueError, match=r"plan ends at scheduler step 8, this fit's at 16 .*on_resume=keep"):
        trainer(max_steps=16, callbacks=[steps]).fit(module(), train_dataloaders=loader(), ckpt_path=checkpoint)
    assert steps.lrs == [] and not steps.started  # before the model summary (on_fit_start) too
    trainer(max_steps=16, callbacks=[steps]).fit(module(on_resume="keep"), train_dataloaders=loader(),
                                                 ckpt_path=checkpoint)
    assert steps.lrs == [0.0] * 8  # what keep means: the plan ended at step 8


# ------------------------------------------------------------------ the app


@pytest.fixture(scope="module")
def app():
    with AppRunners(1) as runners:
        yield runners


def lr_column(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {int(row["step"]): float(row["lr-Adam"]) for row in csv.DictReader(f) if row.get("lr-Adam")}


@pytest.mark.slow  # CLI processes: the full tier runs it
def test_the_app_resumes_a_longer_fit_in_the_runs_folder(app, tmp_path):
    """Killed at step 13 of 24 (last checkpoint at 12), resumed to 36: an error naming both
    choices, then ``scheduler.on_resume=replan`` continues in the run's folder from the
    checkpoint's LR to ``eta_min`` at step 36; then to 40 with ``keep``."""
    common = ["optimizer=adam", "dataset=spirals", "+dataset.n_samples=400", "dataset.batch_size=24",
              "model.hidden=[16]", "~callbacks.rich_progress_bar", "~callbacks.ema", "test=false",
              "trainer.max_epochs=-1", "trainer.log_every_n_steps=1", "scheduler.warmup_steps=4",
              "callbacks.checkpoint.monitor=null", "+callbacks.checkpoint.every_n_train_steps=4"]
    killed = app.run(tmp_path, [*common, "trainer.max_steps=24", "+callbacks.kill._target_=crash_callbacks.KillAt",
                                "+callbacks.kill.step=13"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    (run,) = (tmp_path / "outputs").glob("*/*")
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 12
    longer = app.run(tmp_path, [*common, "trainer.max_steps=36", f"ckpt_path={last}"])
    assert longer.returncode == 1 and len(longer.stderr.splitlines()) == 1, longer.stderr[-3000:]
    assert ("error: scheduler: the checkpoint's warmup_cosine plan ends at scheduler step 24, this fit's at 36 "
            "(resuming at 12" in longer.stderr and "on_resume=keep" in longer.stderr and "on_resume=replan" in
            longer.stderr)
    replanned = app.run(tmp_path, [*common, "trainer.max_steps=36", f"ckpt_path={last}", "scheduler.on_resume=replan"])
    assert replanned.returncode == 0, replanned.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs").glob("*/*")] == [run.name]  # one run, one folder
    # the killed run's logs stay (Lightning's CSVLogger would delete them), the resumed run's go beside them
    assert f"  logs           {run / 'csv' / 'resumed_1'}" in replanned.stdout.splitlines()
    first, lrs = lr_column(run / "csv" / "metrics.csv"), lr_column(run / "csv" / "resumed_1" / "metrics.csv")
    planned = WarmupCosine(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), total_steps=24,
                           warmup_steps=4)
    assert first and all(lr == pytest.approx(planned.lr_at(step, 1e-3), rel=1e-6) for step, lr in first.items())
    assert min(lrs) == 12 and lrs[12] == pytest.approx(planned.lr_at(12, 1e-3), rel=1e-6)  # continuous
    assert all(a > b for a, b in zip(list(lrs.values()), list(lrs.values())[1:])) and lrs[35] > 0
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 36 and saved["lr_schedulers"][0]["_last_lr"] == [0.0]  # eta_min at the end
    # longer again, keeping the plan: eta_min on, logged beside the earlier parts
    again = app.run(tmp_path, [*common, "trainer.max_steps=40", f"ckpt_path={last}", "scheduler.on_resume=keep"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"  logs           {run / 'csv' / 'resumed_2'}" in again.stdout.splitlines()
    assert lr_column(run / "csv" / "resumed_2" / "metrics.csv") == {s: 0.0 for s in range(36, 40)}
    assert (lr_column(run / "csv" / "metrics.csv"), lr_column(run / "csv" / "resumed_1" / "metrics.csv")) == (first,
                                                                                                             lrs)
    assert (run / ".hydra" / "config.yaml").is_file() and len(list((run / ".hydra").glob("resumed_*"))) >= 2
    assert "exists and is not empty" not in replanned.stderr + again.stderr


# ------------------------------------------------------------------ garbage checkpoints


def test_garbage_files_are_never_taken_for_checkpoints(tmp_path):
    """Random bytes can pass for pickle opcodes that torch.load's weights-only unpickler
    refuses; every such file is "not a PyTorch checkpoint"."""
    path = tmp_path / "garbage.ckpt"
    for seed in range(200):
        rng = random.Random(seed)
        path.write_bytes(rng.randbytes(rng.choice([16, 4096])))
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path)
        assert f"ckpt_path={path}: not a PyTorch checkpoint" in str(error.value), (seed, str(error.value))
    # a legacy-format file (torch.save's before the zip archive) is still read as one
    torch.save({"state_dict": {"w": torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(2))

"""The private Lightning and torchmetrics APIs in ``lightning_imex/_lightning.py`` still
behave as that module assumes (a new Lightning release fails here first)."""

import functools
import re
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from lit import PlainClassifier, loader, trainer

from lightning_imex import _lightning

ROOT = Path(__file__).resolve().parents[1]


class Recording(torch.optim.SGD):
    """SGD that keeps what Lightning's closure looked like, and the trainer's view of logging."""

    def __init__(self, params, module):
        super().__init__(params, lr=0.1)
        self.module, self.seen = module, []

    def step(self, closure=None):
        found = _lightning.training_closure(closure)
        closure()
        inner = found[1] if found else None
        self.seen.append((found is not None and found[0] is self.module, _lightning.step_output(inner),
                          _lightning.current_hook(self.module),
                          _lightning.logs_this_step(_lightning.attached_trainer(self.module))))
        return super().step()


class Module(PlainClassifier):
    def configure_optimizers(self):
        self.recording = Recording(self.parameters(), self)
        return self.recording


def test_the_training_closure_and_the_trainer_look_as_assumed(tmp_path):
    module = Module(optimizer={})
    fit = trainer(tmp_path, max_steps=4, log_every_n_steps=2)
    fit.fit(module, loader())
    found, outputs, hooks, logs = zip(*module.recording.seen)
    assert all(found)  # partial(Precision._wrap_closure, module, optimizer, inner)
    assert all(o is not None and torch.is_tensor(o.loss) for o in outputs)  # Closure._result: a ClosureResult
    assert set(hooks) == {"optimizer_step"}  # what self.log in optimizer_step records under
    assert list(logs) == [False, True, False, True]  # log_every_n_steps=2
    assert _lightning.training_closure(lambda: None) is None
    assert _lightning.training_closure(functools.partial(print, 1, 2, 3)) is None
    assert _lightning.attached_trainer(torch.nn.Linear(1, 1)) is None


def test_metric_state_round_trip():
    metric = torchmetrics.MeanMetric()
    metric.update(torch.tensor([1.0, 2.0]))
    saved = _lightning.metric_state(metric)
    metric.update(torch.tensor([10.0]))
    _lightning.restore_metric_state(metric, saved)
    assert metric.compute().item() == 1.5 and metric._update_count == 1
    metric.update(torch.tensor([3.0]))
    assert metric.compute().item() == 2.0


def test_installed_lightning_is_in_the_pinned_range():
    pinned = re.search(r'"lightning>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    version = tuple(int(x) for x in L.__version__.split(".")[:2])
    low, high = (tuple(int(x) for x in v.split(".")[:2]) for v in pinned.groups())
    assert low <= version < high
    assert f"lightning {pinned.group(1)}" in (ROOT / "lightning_imex" / "_lightning.py").read_text()


def test_the_fit_loop_has_what_resume_fit_loop_uses():
    """``resume_fit_loop``'s private names (its behaviour is what tests/test_crash_resume.py proves)."""
    from lightning.pytorch.loops import _FitLoop, _TrainingEpochLoop
    from lightning.pytorch.loops.progress import _Progress

    for name in ("_load_combined_loader_states", "reset_restart_stage", "restarted_mid_epoch",
                 "restarted_on_epoch_end"):
        assert hasattr(_FitLoop, name), name
    fit_loop = _FitLoop(L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                  enable_model_summary=False))
    assert isinstance(fit_loop.epoch_progress, _Progress) and hasattr(fit_loop.epoch_progress, "increment_completed")
    assert isinstance(fit_loop.epoch_loop, _TrainingEpochLoop) and hasattr(fit_loop.epoch_loop, "restarting")
    assert not fit_loop.restarted_mid_epoch and not fit_loop.restarted_on_epoch_end  # a fresh fit: nothing to fix

"""Global-norm clipping inside the step (docs/optimizer-core.md, "Clipping in the step"):
``max_grad_norm=`` and the clipping hook's fused path equal ``clip_grad_norm_`` followed by
the step, for every optimizer on the eager and C paths, every gradient evaluation of a
multi-gradient step clipped; nothing waits on the device; bad settings fail clearly."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from catalogue import configs, every_tableau
from conftest import flat
from torch import nn
from torch.nn import functional as F

from lightning_imex.clipping import clip_gradients
from lightning_imex.optim import TABLEAUX, AdaMax, IMEXAdam
from lightning_imex.optim.cpu_backend import BACKEND as C_BACKEND

THRESHOLD = 0.05  # below every gradient norm these tests see: clipping is active on every evaluation

# ClippedAdam's bounds on the update loose enough that clipping the gradient still changes the step
LOOSE_BOUNDS = {"clipped_coordinate": 2e-2, "clipped_global": 0.1}
CONFIGS = {**every_tableau(), **configs("adamax", "adamomentum"),
           **{name: (cls, {**kwargs, "max_update": LOOSE_BOUNDS[name]})
              for name, (cls, kwargs) in configs(*LOOSE_BOUNDS).items()}}
PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(C_BACKEND.compiler() is None, reason="no C compiler"))]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return 10 * torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator)


def build(name: str, net: nn.Module, fused: bool, **extra) -> torch.optim.Optimizer:
    cls, kwargs = CONFIGS[name]
    first, last = net[0], net[2]
    groups = [{"params": list(first.parameters()), "lr": 3e-2},  # the norm spans both groups
              {"params": list(last.parameters()), "lr": 1e-2}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ars222/ars343 are not positivity-preserving
        return cls(groups, fused=fused, **kwargs, **extra)


def train(name: str, fused: bool, clip_in_closure: bool, steps: int = 2, **extra) -> tuple[nn.Module, list[float]]:
    """``steps`` steps; ``clip_in_closure``: torch's clip_grad_norm_ after every backward.
    Each evaluation's loss has its own scale, so clipping changes the step even of
    optimizers that are invariant to one scale of all gradients (Adam's, nearly).
    Returns the model and the pre-clip norm of every gradient evaluation."""
    net, (x, y) = model(), data()
    optimizer = build(name, net, fused, **extra)
    norms = []

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y) * (1 + len(norms))
        loss.backward()
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]).item())
        if clip_in_closure:
            torch.nn.utils.clip_grad_norm_(net.parameters(), THRESHOLD)
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return net, norms


@pytest.mark.parametrize("fused", PATHS, ids=["eager", "c"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_max_grad_norm_equals_clip_grad_norm_then_step(name, fused):
    ours, seen = train(name, fused, clip_in_closure=False, max_grad_norm=THRESHOLD)
    reference, reference_seen = train(name, fused, clip_in_closure=True)
    assert len(seen) == len(reference_seen) and min(seen) > THRESHOLD  # every evaluation clipped
    # ars222/ars343 drive v negative, where u = m / (0 + eps) magnifies a last-bit difference
    # in the clip factor (our norm is summed in float64, torch's in float32)
    positive = CONFIGS[name][0] is not IMEXAdam or TABLEAUX[CONFIGS[name][1]["tableau"]].positivity_preserving
    torch.testing.assert_close(flat(ours), flat(reference), **(dict(rtol=1e-5, atol=1e-6) if positive else
                                                                dict(rtol=1e-4, atol=1e-3)))
    unclipped, _ = train(name, fused, clip_in_closure=False)
    assert (flat(unclipped) - flat(reference)).abs().max() > 1e-4  # the clipping mattered


def with_gradients(net: nn.Module) -> None:
    x, y = data()
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()


@pytest.mark.parametrize("fused", PATHS, ids=["eager", "c"])
def test_the_hook_clips_inside_our_step_and_leaves_grad_alone(fused):
    ours, reference = model(), model()
    optimizer = build("imex_euler", ours, fused)
    reference_optimizer = build("imex_euler", reference, fused)
    for _ in range(2):
        with_gradients(ours)
        with_gradients(reference)
        before = [p.grad.clone() for p in ours.parameters()]
        clip_gradients(ours, optimizer, {"algorithm": "norm", "threshold": THRESHOLD, "log": False})
        assert all(torch.equal(a, p.grad) for a, p in zip(before, ours.parameters()))  # no pass over .grad
        optimizer.step()
        clip_gradients(reference, torch.optim.SGD(reference.parameters()),
                       {"algorithm": "norm", "threshold": THRESHOLD, "log": False})  # torch's path: in place
        reference_optimizer.step()
        torch.testing.assert_close(flat(ours), flat(reference), rtol=1e-5, atol=1e-6)


HOOK_THRESHOLDS = {"norm": THRESHOLD, "value": 0.02}


def train_with_hook(name: str, fused: bool, algorithm: str, ours: bool) -> tuple[nn.Module, list[bool]]:
    """Two steps, the hook called after every backward (as Lightning calls it), on our
    optimizer (``ours``) or with torch's in-place clipping (the hook given an SGD).
    Returns the model and, per evaluation, whether the hook left .grad as it was."""
    net, (x, y) = model(), data()
    optimizer = build(name, net, fused)
    torch_path = torch.optim.SGD(net.parameters())
    config = {"algorithm": algorithm, "threshold": HOOK_THRESHOLDS[algorithm], "log": False}
    untouched = []

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y) * (1 + len(untouched))
        loss.backward()
        before = [p.grad.clone() for p in net.parameters()]
        assert max(g.abs().max() for g in before) > HOOK_THRESHOLDS["value"]  # value clipping bites
        clip_gradients(net, optimizer if ours else torch_path, config)
        untouched.append(all(torch.equal(a, p.grad) for a, p in zip(before, net.parameters())))
        return loss

    for _ in range(2):
        optimizer.step(closure)
    return net, untouched


@pytest.mark.parametrize("fused", PATHS, ids=["eager", "c"])
@pytest.mark.parametrize("name", ["imex_trapezoidal", "imex_ssp3_433", "adamax", "clipped_global"])
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_the_hook_clips_every_evaluation_inside_our_step(algorithm, name, fused):
    """norm and value clipping through the hook, every gradient evaluation: our step reads
    the clipped gradient (and .grad stays as it was) with the result of torch's in-place
    clipping followed by the step."""
    ours, untouched = train_with_hook(name, fused, algorithm, ours=True)
    reference, rewritten = train_with_hook(name, fused, algorithm, ours=False)
    assert all(untouched) and not any(rewritten)
    torch.testing.assert_close(flat(ours), flat(reference), rtol=1e-5, atol=1e-6)


def test_a_clip_factor_does_not_outlive_its_gradients():
    """zero_grad drops a factor the hook set: the next step's gradients are not scaled by it."""
    ours, reference = model(), model()
    optimizer, reference_optimizer = build("adamax", ours, False), build("adamax", reference, False)
    with_gradients(ours)
    clip_gradients(ours, optimizer, {"algorithm": "norm", "threshold": THRESHOLD, "log": False})
    optimizer.zero_grad()  # e.g. a step skipped by a GradScaler
    with_gradients(ours)
    with_gradients(reference)
    optimizer.step()
    reference_optimizer.step()
    assert torch.equal(flat(ours), flat(reference))


class SyncError(RuntimeError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    """A CPU stand-in for torch.cuda.set_sync_debug_mode("error"): reading a tensor's value
    on the host raises while the fixture's flag is set."""
    active = [False]

    def patch(name: str) -> None:
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if active[0]:
                raise SyncError(f"Tensor.{name} during the step: a host sync on an accelerator")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        patch(name)
    return active


@pytest.mark.parametrize("fused", PATHS, ids=["eager", "c"])
@pytest.mark.parametrize("name", ["imex_ssp3_433", "imex_trapezoidal_reuse", "clipped_global"])
def test_no_host_sync(no_host_sync, name, fused):
    net, (x, y) = model(), data()
    optimizer = build(name, net, fused, max_grad_norm=THRESHOLD)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)  # state allocated, kernels compiled
    no_host_sync[0] = True
    optimizer.step(closure)
    no_host_sync[0] = False
    # the hook's path, under nonfinite="ignore" (raise and skip read the norm back on a CPU by design)
    hooked = build(name, net, fused)
    hooked.step(closure)
    no_host_sync[0] = True
    for algorithm in ("norm", "value"):
        def clipping_closure(algorithm=algorithm):
            loss = closure()
            clip_gradients(net, hooked, {"algorithm": algorithm, "threshold": THRESHOLD, "log": False,
                                         "nonfinite": "ignore"})
            return loss

        if isinstance(hooked, IMEXAdam) and hooked.requires_closure:
            hooked.step(clipping_closure)
        else:
            clipping_closure()
            hooked.step()
    no_host_sync[0] = False
    assert torch.isfinite(flat(net)).all()


def test_the_sync_guard_catches_a_read_back(no_host_sync):
    no_host_sync[0] = True
    with pytest.raises(SyncError):
        bool(torch.tensor(1.0) > 0)


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), "1"])
def test_bad_max_grad_norm_is_refused(value):
    error = TypeError if isinstance(value, str) else ValueError
    with pytest.raises(error, match="max_grad_norm must be"):
        IMEXAdam(model().parameters(), max_grad_norm=value)


def test_max_grad_norm_is_optimizer_wide():
    net = model()
    optimizer = AdaMax(net[0].parameters(), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm clips the norm over every group's gradients"):
        optimizer.add_param_group({"params": list(net[2].parameters()), "max_grad_norm": 2.0})


def test_clipping_twice_is_an_error():
    net = model()
    optimizer = IMEXAdam(net.parameters(), tableau="euler", max_grad_norm=1.0)
    with_gradients(net)
    with pytest.raises(ValueError, match="gradient clipping is configured twice: clipping.algorithm='norm' and "
                                         "the optimizer's max_grad_norm=1.0"):
        clip_gradients(net, optimizer, {"algorithm": "norm", "threshold": 1.0})


@pytest.mark.parametrize("copy_with", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
def test_copies_keep_the_setting_and_drop_a_pending_factor(copy_with):
    net = model()
    optimizer = AdaMax(net.parameters(), max_grad_norm=0.5)
    with_gradients(net)
    optimizer.clip_gradients_in_step(torch.tensor(10.0), 1.0)
    copied = copy_with(optimizer)
    assert copied.defaults["max_grad_norm"] == 0.5 and copied._pending_clip is None


def triton_interpreted() -> None:
    """Clipping inside the Triton kernels' step gives what clipping in the closure gives, in
    Triton's interpreter (run by test_triton_backend.py's Triton check, in its subprocess)."""
    from triton_interpret_run import triton_for_cpu_tensors
    for name in ("imex_trapezoidal", "clipped_global", "adamax"):
        with triton_for_cpu_tensors() as launches:
            ours, _ = train(name, True, clip_in_closure=False, steps=2, max_grad_norm=THRESHOLD)
        assert launches[0] > 0
        reference, _ = train(name, False, clip_in_closure=True, steps=2)
        torch.testing.assert_close(flat(ours), flat(reference), rtol=1e-5, atol=1e-6)
    with triton_for_cpu_tensors() as launches:
        ours, untouched = train_with_hook("adamax", True, "value", ours=True)
    assert launches[0] > 0 and all(untouched)
    reference, _ = train_with_hook("adamax", False, "value", ours=False)
    torch.testing.assert_close(flat(ours), flat(reference), rtol=1e-5, atol=1e-6)

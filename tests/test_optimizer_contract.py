"""What any torch.optim.Optimizer promises, checked on every optimizer of the package
(the defects PyTorch's generic optimizer tests found, one test each)."""

import copy
import pickle

import pytest
import torch
from catalogue import catalogue_params
from torch import nn

from lightning_imex.optim import AdaMax, IMEXAdam

PATHS = [False, True]


def quadratic_steps(opt, params, steps=3):
    def closure():
        opt.zero_grad()
        loss = sum((p.abs() ** 2).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("cls, kwargs", catalogue_params())
def test_zero_learning_rate_leaves_parameters_unchanged(cls, kwargs, fused):
    # a schedule that starts at or reaches 0: ClippedAdam(clip="global") used to give 0/0 = NaN
    p = nn.Parameter(torch.randn(10))
    before = p.detach().clone()
    quadratic_steps(cls([p], lr=0.0, fused=fused, **kwargs), [p])
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls, kwargs", catalogue_params())
def test_copied_optimizer_steps_like_the_original(cls, kwargs, copy_with):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6))
    opt = cls([p], lr=0.1, **kwargs)
    quadratic_steps(opt, [p], 2)
    both = copy.deepcopy((p, opt)) if copy_with == "deepcopy" else pickle.loads(pickle.dumps((p, opt)))
    quadratic_steps(opt, [p], 2)
    quadratic_steps(both[1], [both[0]], 2)
    assert torch.equal(both[0].detach(), p.detach())
    assert both[1].fused == opt.fused
    if cls is IMEXAdam:
        assert both[1].tableau == opt.tableau and both[1].reuse_gradient == opt.reuse_gradient


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("cls, kwargs, reference", [
    (IMEXAdam, {"tableau": "euler"}, lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=False)),
    (AdaMax, {}, lambda ps: torch.optim.Adamax(ps, lr=0.1, foreach=False)),
])
def test_complex_parameters_step_as_their_real_view(cls, kwargs, reference, fused):
    # torch's Adam and Adamax update a complex parameter as its real view; so do we
    torch.manual_seed(0)
    start = torch.randn(70_000, dtype=torch.complex64)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    quadratic_steps(cls([ours], lr=0.1, fused=fused, **kwargs), [ours], 4)
    quadratic_steps(reference([theirs]), [theirs], 4)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("cls, kwargs", catalogue_params())
def test_complex_parameters_every_optimizer(cls, kwargs, fused):
    p = nn.Parameter(torch.randn(5, dtype=torch.complex64))
    quadratic_steps(cls([p], lr=0.1, fused=fused, **kwargs), [p])
    assert torch.isfinite(torch.view_as_real(p)).all() and p.dtype == torch.complex64


@pytest.mark.parametrize("cls, kwargs", catalogue_params())
def test_state_dict_without_a_newer_flag_loads_with_its_default(cls, kwargs):
    p = nn.Parameter(torch.randn(4))
    opt = cls([p], lr=0.1, **kwargs)
    quadratic_steps(opt, [p], 1)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["maximize"], group["fused"]
    again = cls([p], lr=0.1, **{**kwargs, "maximize": True})
    again.load_state_dict(saved)
    assert again.param_groups[0]["maximize"] is False  # the documented default, as torch fills it
    assert again.param_groups[0]["fused"] is None
    quadratic_steps(again, [p], 1)


@pytest.mark.parametrize("cls, kwargs", catalogue_params())
def test_bad_settings_fail_before_params_are_read(cls, kwargs):
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -1"):
        cls(None, lr=-1, **kwargs)  # torch's contract: the settings are checked first
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls([nn.Parameter(torch.zeros(2))], lr=torch.tensor([1e-3, 1e-3]), **kwargs)


@pytest.mark.parametrize("cls, kwargs", catalogue_params())
def test_loaded_state_dict_is_the_saved_one(cls, kwargs):
    p = nn.Parameter(torch.randn(4))
    opt = cls([p], lr=0.1, **kwargs)
    quadratic_steps(opt, [p], 1)
    again = cls([p], lr=0.1, **kwargs)
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["param_groups"] == opt.state_dict()["param_groups"]

"""The plans as text: docs/plans.md is every built-in tableau's current plan, stage
identity is decided exactly, and the multi-stage tableaux keep the scratch they promise."""

import warnings
from pathlib import Path

import pytest
import torch

from lightning_imex.optim import TABLEAUX, IMEXAdam, IMEXTableau
from lightning_imex.optim.plan import build_plan, dump

ROOT = Path(__file__).resolve().parents[1]


def test_docs_plans_md_is_the_current_dump():
    assert (ROOT / "docs" / "plans.md").read_text() == dump(), (
        "a plan changed: regenerate with `python -m lightning_imex.optim.plan --dump docs/plans.md`, review the diff")


def test_stage_identity_is_exact():
    # stages 1 and 2 differ by 1e-13 in one coefficient: rounding to 10 digits merged them
    near = 0.5 + 1e-13
    tableau = IMEXTableau(
        a_explicit=[[0, 0, 0, 0], [0.5, 0, 0, 0], [near, 0, 0, 0], [0, 0.5, 0.5, 0]], b_explicit=[0, 0.5, 0.5, 0],
        a_implicit=[[0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0.5, 0], [0, 0.25, 0.25, 0.5]],
        b_implicit=[0, 0.25, 0.25, 0.5], order=1, name="near")
    assert tableau.geometry.points == (1, 2, 3)
    assert TABLEAUX["ssp3_433"].geometry.points == (0, 2, 3)  # stages 0 and 1: identical moments


@pytest.mark.parametrize("name,scratch,per_param", [("ssp3_433", ("g0", "theta_sum"), 16),
                                                    ("ars343", ("g0", "g1", "theta_sum"), 20)])
def test_multi_stage_state_and_scratch_bytes(name, scratch, per_param):
    assert build_plan(TABLEAUX[name]).scratch == scratch
    p = torch.nn.Parameter(torch.ones(1000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ars343 is not positivity-preserving
        opt = IMEXAdam([p], tableau=name, fused=False)

    def closure():
        p.grad = torch.sin(p.detach())
        return torch.tensor(0.0)

    opt.step(closure)
    assert opt.state_bytes() == per_param * p.numel()


def test_user_tableau_that_returns_to_theta_n_follows_the_stage_loop():
    # the first gradient is taken at theta_n + h/2 u_n, the second back at theta_n: the
    # plan must write theta_n back (it once left p at the first stage's point)
    from reference import imex_step, scheme_masses

    tableau = IMEXTableau([[0, 0], [0, 0]], [0.25, 0.75], [[0.5, 0], [0, 0]], [0.625, 0.375], order=1, name="back")
    torch.manual_seed(0)
    a, b = torch.eye(4, dtype=torch.float64) * 2, torch.randn(4, dtype=torch.float64)

    def grad(theta):
        return [a @ theta[0] + torch.sin(theta[0]) - b]

    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = IMEXAdam([p], lr=0.05, betas=(0.9, 0.99), tableau=tableau, fused=False)

    def closure():
        p.grad = grad([p.detach()])[0]
        return 0.0

    theta, m, v = [p.detach().clone()], [torch.zeros_like(p)], [torch.zeros_like(p)]
    masses_m, masses_v = scheme_masses(tableau, 0.9, 5), scheme_masses(tableau, 0.99, 5)
    for k in range(5):
        opt.step(closure)
        theta, m, v, _ = imex_step(theta, m, v, grad, tableau, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8,
                                   masses_m=masses_m[k], masses_v=masses_v[k])
        torch.testing.assert_close(p.detach(), theta[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m[0], atol=1e-12, rtol=1e-10)

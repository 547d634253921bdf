"""The order test of ALGORITHMS.md: IMEXAdam as an ODE solver converges with its order."""

import math

import numpy as np
import pytest
import torch

from lightning_imex.optim import TABLEAUX, IMEXAdam, IMEXTableau, PositivityWarning

C1, C2, EPS = 5.0, 2.0, 1e-8
A = np.array([[2.0, 0.5], [0.5, 1.0]])
THETA0, M0, V0 = np.array([1.0, -0.5]), np.array([0.3, -0.2]), np.array([0.5, 0.8])
STEPS = [20, 40, 80, 160]


def grad(theta):  # of 0.5 theta^T A theta - cos(3 theta)/3: smooth, non-quadratic
    return A @ theta + np.sin(3 * theta)


def rhs(y):
    theta, m, v = y[:2], y[2:4], y[4:]
    g = grad(theta)
    return np.concatenate([-m / (np.sqrt(v) + EPS), C1 * (g - m), C2 * (g * g - v)])


@pytest.fixture(scope="module")
def reference():
    """RK4 with 1e5 steps on the full ODE (theta, m, v)."""
    n = 100_000
    y, h = np.concatenate([THETA0, M0, V0]), 1.0 / n
    for _ in range(n):
        k1 = rhs(y)
        k2 = rhs(y + h / 2 * k1)
        k3 = rhs(y + h / 2 * k2)
        k4 = rhs(y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


def solve(tableau, n: int) -> np.ndarray:
    h = 1.0 / n
    p = torch.nn.Parameter(torch.tensor(THETA0, dtype=torch.float64))
    opt = IMEXAdam([p], lr=h, betas=(1 - C1 * h, 1 - C2 * h), eps=EPS, tableau=tableau,
                   bias_correction=False, fused=False)
    opt.state[p].update(step=0, exp_avg=torch.tensor(M0), exp_avg_sq=torch.tensor(V0))

    def closure():
        p.grad = torch.tensor(grad(p.detach().numpy()))
        return 0.0

    for _ in range(n):
        opt.step(closure)
    state = opt.state[p]
    return np.concatenate([p.detach().numpy(), state["exp_avg"].numpy(), state["exp_avg_sq"].numpy()])


def observed_order(tableau, reference) -> float:
    errors = [np.abs(solve(tableau, n) - reference).max() for n in STEPS]
    return -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]


@pytest.mark.filterwarnings("ignore::lightning_imex.optim.PositivityWarning")
@pytest.mark.parametrize("name,order", [
    ("euler", 1), ("trapezoidal", 2), ("trapezoidal_pc", 2), ("ars222", 2), ("ars343", 3), ("ssp3_433", 3),
])
def test_builtin_order(name, order, reference):
    assert observed_order(name, reference) == pytest.approx(order, abs=0.15)


def test_user_tableau_whose_first_gradient_is_not_at_theta_n(reference):
    # Pareschi-Russo IMEX-SSP2(2,2,2): the first stage is implicit, so the first gradient
    # is taken at theta_n + h*gamma*G(m_n): the step has work before any gradient.
    g = 1 - 1 / math.sqrt(2)
    ssp2 = IMEXTableau([[0, 0], [1, 0]], [0.5, 0.5], [[g, 0], [1 - 2 * g, g]], [0.5, 0.5], order=2, name="ssp2_222")
    assert not ssp2.first_gradient_at_start and not ssp2.allows_gradient_reuse
    assert observed_order(ssp2, reference) == pytest.approx(2, abs=0.15)


def test_user_tableau_equal_to_builtin_gives_same_trajectory():
    t = TABLEAUX["trapezoidal"]
    mine = IMEXTableau(t.a_explicit, t.b_explicit, t.a_implicit, t.b_implicit, order=2, name="my_trapezoidal")
    assert np.array_equal(solve(mine, 20), solve("trapezoidal", 20))


def test_non_preserving_tableau_warns():
    with pytest.warns(PositivityWarning, match="ars222"):
        IMEXAdam([torch.nn.Parameter(torch.zeros(1))], tableau="ars222")

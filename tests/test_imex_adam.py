import io

import pytest
import torch
from conftest import flat, loss_closure, make_data, make_net, train
from reference import imex_step, paper_adam, scheme_masses, trapezoidal_mass, trapezoidal_written_out
from torch import nn

from lightning_imex.optim import TABLEAUX, IMEXAdam, PositivityWarning
from lightning_imex.optim.plan import Correction, build_plan

ATOL = 1e-6


# ---- euler is Adam -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,torch_cls,torch_kwargs", [
    ({}, torch.optim.Adam, {}),
    ({"weight_decay": 0.05}, torch.optim.Adam, {"weight_decay": 0.05}),
    ({"weight_decay": 0.05, "decoupled_weight_decay": True}, torch.optim.AdamW, {"weight_decay": 0.05}),
    ({"maximize": True}, torch.optim.Adam, {"maximize": True}),
    ({"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6}, torch.optim.Adam, {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6}),
])
@pytest.mark.parametrize("use_closure", [True, False])
def test_euler_equals_torch_adam(net, kwargs, torch_cls, torch_kwargs, use_closure):
    ours, _, _ = train(net, lambda p: IMEXAdam(p, tableau="euler", **kwargs), 100, use_closure=use_closure)
    theirs, _, _ = train(net, lambda p: torch_cls(p, **torch_kwargs), 100)
    torch.testing.assert_close(flat(ours), flat(theirs), atol=ATOL, rtol=0)


def test_euler_equals_torch_adam_with_two_groups(net):
    def groups(model_params):
        first, *rest = list(model_params)
        return [{"params": [first], "lr": 3e-3, "weight_decay": 0.1}, {"params": rest, "betas": (0.8, 0.95)}]

    ours, _, _ = train(net, lambda p: IMEXAdam(groups(p), tableau="euler"), 100)
    theirs, _, _ = train(net, lambda p: torch.optim.Adam(groups(p)), 100)
    torch.testing.assert_close(flat(ours), flat(theirs), atol=ATOL, rtol=0)


def test_euler_without_bias_correction_is_the_papers_algorithm(net):
    x, y = make_data()
    model = make_net()

    def grads(theta):
        with torch.enable_grad():
            theta = [t.detach().requires_grad_() for t in theta]
            out = torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), theta)), (x,))
            return list(torch.autograd.grad(nn.functional.cross_entropy(out, y), theta))

    expected = paper_adam([p.detach().clone() for p in model.parameters()], grads, 100, 1e-3, 0.9, 0.999, 1e-8)
    ours, _, _ = train(net, lambda p: IMEXAdam(p, lr=1e-3, tableau="euler", bias_correction=False), 100)
    torch.testing.assert_close(flat(ours), torch.cat([t.flatten() for t in expected]), atol=ATOL, rtol=0)


# ---- every tableau against the ALGORITHMS.md stage loop --------------------------------

def quadratic_problem():
    torch.manual_seed(3)
    q = torch.randn(5, 5, dtype=torch.float64)
    a = q @ q.T / 5 + torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)

    def grad(theta):
        return [a @ theta[0] + torch.sin(theta[0]) - b, 2 * theta[1] ** 3]

    return grad, [torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]


@pytest.mark.filterwarnings("ignore::lightning_imex.optim.PositivityWarning")
@pytest.mark.parametrize("name", list(TABLEAUX))
@pytest.mark.parametrize("bias_correction,weight_decay,decoupled", [
    (True, 0.0, False), (False, 0.0, False), (True, 0.1, False), (True, 0.1, True),
])
def test_matches_stage_loop_reference(name, bias_correction, weight_decay, decoupled):
    grad, theta0 = quadratic_problem()
    tableau, steps, lr, b1, b2, eps = TABLEAUX[name], 30, 0.05, 0.9, 0.99, 1e-8
    params = [nn.Parameter(t.clone()) for t in theta0]
    opt = IMEXAdam(params, lr=lr, betas=(b1, b2), eps=eps, tableau=name, bias_correction=bias_correction,
                   weight_decay=weight_decay, decoupled_weight_decay=decoupled, fused=False)

    def closure():
        for p, g in zip(params, grad([p.detach() for p in params])):
            p.grad = g
        return 0.0

    theta, m, v = [t.clone() for t in theta0], [torch.zeros_like(t) for t in theta0], [torch.zeros_like(t) for t in theta0]
    masses_m, masses_v = scheme_masses(tableau, b1, steps), scheme_masses(tableau, b2, steps)
    for k in range(steps):
        opt.step(closure)
        theta, m, v, calls = imex_step(
            theta, m, v, grad, tableau, lr=lr, beta1=b1, beta2=b2, eps=eps,
            masses_m=masses_m[k] if bias_correction else None, masses_v=masses_v[k] if bias_correction else None,
            weight_decay=weight_decay, decoupled=decoupled)
        for p, t in zip(params, theta):
            torch.testing.assert_close(p.detach(), t, atol=1e-12, rtol=1e-10)
    assert calls == tableau.num_gradients
    for p, mk, vk in zip(params, m, v):
        torch.testing.assert_close(opt.state[p]["exp_avg"], mk, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], vk, atol=1e-12, rtol=1e-10)


def test_trapezoidal_matches_written_out_step():
    grad, theta0 = quadratic_problem()
    params = [nn.Parameter(t.clone()) for t in theta0]
    opt = IMEXAdam(params, lr=0.05, betas=(0.9, 0.99), tableau="trapezoidal", bias_correction=False)

    def closure():
        for p, g in zip(params, grad([p.detach() for p in params])):
            p.grad = g
        return 0.0

    theta, m, v = [t.clone() for t in theta0], [torch.zeros_like(t) for t in theta0], [torch.zeros_like(t) for t in theta0]
    for _ in range(20):
        opt.step(closure)
        theta, m, v = trapezoidal_written_out(theta, m, v, grad, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8)
    for p, t, mk in zip(params, theta, m):
        torch.testing.assert_close(p.detach(), t, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(opt.state[p]["exp_avg"], mk, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("beta", [0.9, 0.999])
def test_bias_correction_masses(beta):
    plan = build_plan(TABLEAUX["trapezoidal"])
    for k in (1, 2, 10, 100):
        values = plan.scalars(lr=1.0, beta1=beta, beta2=beta, eps=0.0, weight_decay=0.0,
                              step=k, pending=False, bias_correction=True)
        # the start-point moment of step k+1 has the mass of k completed steps
        assert 1 / values[Correction("scale_m", 0)] == pytest.approx(trapezoidal_mass(beta, k), rel=1e-12)
        assert 1 / values[Correction("scale_m", 0)] == pytest.approx(
            scheme_masses(TABLEAUX["trapezoidal"], beta, k + 1)[-1][0])
    euler = build_plan(TABLEAUX["euler"])
    values = euler.scalars(lr=1.0, beta1=beta, beta2=0.999, eps=0.0, weight_decay=0.0, step=4, pending=False,
                           bias_correction=True)
    assert 1 / values[Correction("scale_m", 1)] == pytest.approx(1 - beta ** 5, rel=1e-12)
    assert 1 / values[Correction("scale_v", 1)] ** 2 == pytest.approx(1 - 0.999 ** 5, rel=1e-12)


def test_first_step_start_point_has_zero_mass_and_contributes_nothing():
    p = nn.Parameter(torch.ones(3))
    opt = IMEXAdam([p], lr=0.1, tableau="trapezoidal", eps=0.0)

    def closure():
        p.grad = torch.full_like(p, 2.0)
        return 0.0

    opt.step(closure)
    # u at the start point (zero moments, zero mass) is 0; the Adam point gives u = 1.
    assert torch.equal(p.detach(), torch.full((3,), 1.0 - 0.1 / 2))


# ---- closures, gradient counts, reuse --------------------------------------------------

@pytest.mark.filterwarnings("ignore::lightning_imex.optim.PositivityWarning")
@pytest.mark.parametrize("name", list(TABLEAUX))
def test_closure_calls_equal_gradient_count(net, name):
    _, _, calls = train(net, lambda p: IMEXAdam(p, tableau=name), 5)
    assert calls == 5 * TABLEAUX[name].num_gradients


def test_reuse_gradient_one_call_per_step_and_same_trajectory(net):
    two, opt_two, calls_two = train(net, lambda p: IMEXAdam(p, lr=1e-2), 1)
    one, opt_one, calls_one = train(net, lambda p: IMEXAdam(p, lr=1e-2, reuse_gradient=True), 1)
    assert (calls_two, calls_one) == (2, 1)
    for steps in (2, 5, 30):
        two, opt_two, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2), steps)
        one, opt_one, calls = train(net, lambda p: IMEXAdam(p, lr=1e-2, reuse_gradient=True), steps)
        assert calls == steps
        assert torch.equal(flat(two), flat(one))


def test_reuse_gradient_finishes_pending_moments_exactly(net):
    # After step n the reused state holds partial sums; the next gradient completes them.
    two, opt_two, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2), 10)
    one, opt_one, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2, reuse_gradient=True), 11)
    # one more two-gradient step moves both to step 11 parameters
    opt_two.step(loss_closure(two, opt_two, *make_data()))
    assert torch.equal(flat(two), flat(one))
    assert all(s["pending"] for s in opt_one.state.values())


def test_multi_gradient_without_closure_explains_the_fix(net):
    opt = IMEXAdam(net.parameters())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    before = flat(net)
    with pytest.raises(RuntimeError, match=r"(?s)2 gradients per step.*needs a closure.*reuse_gradient=True"):
        opt.step()
    assert torch.equal(before, flat(net)) and not opt.state


def test_closure_returning_none_is_an_error_before_any_change(net):
    opt = IMEXAdam(net.parameters(), tableau="ssp3_433")
    x, y = make_data()

    def closure():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()

    before = flat(net)
    with pytest.raises(RuntimeError, match="closure returned None"):
        opt.step(closure)
    assert torch.equal(before, flat(net))


def test_reuse_gradient_refused_where_tableau_disallows():
    for name in ("euler", "trapezoidal_pc", "ssp3_433"):
        with pytest.raises(ValueError, match=f"reuse_gradient=True.*{name}.*trapezoidal"):
            IMEXAdam([nn.Parameter(torch.zeros(1))], tableau=name, reuse_gradient=True)


def test_step_returns_first_loss_and_closure_runs_with_grad(net):
    opt = IMEXAdam(net.parameters())
    x, y = make_data()
    losses = []

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        losses.append(loss.item())
        return loss

    with torch.no_grad():
        returned = opt.step(closure)
    assert returned.item() == losses[0] and len(losses) == 2


def test_later_evaluations_do_not_accumulate_onto_earlier_gradients(net):
    # A closure that forgets zero_grad still gets a fresh gradient at each stage.
    ours, _, _ = train(net, lambda p: IMEXAdam(p), 3)
    model = make_net()
    x, y = make_data()
    opt = IMEXAdam(model.parameters())

    def forgetful():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.zero_grad()
        opt.step(forgetful)
    assert torch.equal(flat(model), flat(ours))


def test_parameters_without_gradient_are_left_alone(net):
    frozen = nn.Parameter(torch.ones(4))
    opt = IMEXAdam([*net.parameters(), frozen])
    opt.step(loss_closure(net, opt, *make_data()))
    assert torch.equal(frozen.detach(), torch.ones(4)) and frozen not in opt.state


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = IMEXAdam(emb.parameters(), tableau="euler")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


# ---- state -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"tableau": "ssp3_433"}, {"reuse_gradient": True}, {"tableau": "euler"}])
def test_state_dict_round_trip_continues_bit_identically(net, kwargs, tmp_path):
    x, y = make_data()
    model, opt, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2, **kwargs), 7)
    path = tmp_path / "opt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

    def run(m, o, steps):
        for _ in range(steps):
            o.step(loss_closure(m, o, x, y))
        return flat(m)

    expected = run(model, opt, 5)
    saved = torch.load(path, weights_only=True)
    resumed = make_net(seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = IMEXAdam(resumed.parameters(), lr=1e-2, **kwargs)
    opt2.load_state_dict(saved["opt"])
    assert torch.equal(run(resumed, opt2, 5), expected)


def test_loading_state_of_another_tableau_is_refused(net):
    model, opt, _ = train(net, lambda p: IMEXAdam(p, tableau="ssp3_433"), 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other = IMEXAdam(model.parameters(), tableau="trapezoidal")
    with pytest.raises(ValueError, match="tableau='ssp3_433'"):
        other.load_state_dict(torch.load(buffer, weights_only=True))


# ---- validation ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,message", [
    ({"lr": -1e-3}, ValueError, "lr must be a finite number >= 0"),
    ({"eps": -1.0}, ValueError, "eps must be"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay must be"),
    ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\)"),
    ({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\] must be in \[0, 1\)"),
    ({"betas": (0.9,)}, ValueError, "betas must be a pair"),
    ({"lr": "fast"}, TypeError, "lr must be a number"),
    ({"tableau": "rk4"}, ValueError, "known tableaux: euler, trapezoidal"),
    ({"tableau": 4}, TypeError, "tableau must be a name"),
    ({"maximize": 1}, TypeError, "maximize must be a bool"),
    ({"reuse_gradient": "yes"}, TypeError, "reuse_gradient must be a bool"),
])
def test_invalid_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        IMEXAdam([nn.Parameter(torch.zeros(2))], **kwargs)


def test_groups_must_share_one_tableau():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="share one tableau.*'trapezoidal'.*'ssp3_433'"):
        IMEXAdam([{"params": [a]}, {"params": [b], "tableau": "ssp3_433"}])
    opt = IMEXAdam([{"params": [a], "tableau": "trapezoidal"}])
    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0, got -1"):
        opt.add_param_group({"params": [b], "lr": -1})


# ---- positivity ------------------------------------------------------------------------

def spirals(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * torch.pi
    label = torch.randint(0, 2, (n,), generator=g)
    r = t / (3 * torch.pi)
    angle = t + torch.pi * label
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1) + 0.02 * torch.randn(n, 2, generator=g)
    return x, label


@pytest.mark.parametrize("name", [n for n, t in TABLEAUX.items() if t.positivity_preserving])
def test_positivity_preserving_tableaux_stay_positive_at_large_steps(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
    x, y = spirals()
    opt = IMEXAdam(model.parameters(), lr=0.1, tableau=name, betas=(0.0, 0.0))  # c1 h = c2 h = 1: the edge
    seen = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        seen.extend(s["exp_avg_sq"].min().item() for s in opt.state.values())
        return loss

    for _ in range(100):
        opt.step(closure)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert all((s["exp_avg_sq"] >= 0).all() for s in opt.state.values())
    assert seen and min(seen) >= 0


def test_non_preserving_tableau_can_go_negative_but_never_takes_sqrt_of_negative():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    x, y = spirals()
    with pytest.warns(PositivityWarning):
        opt = IMEXAdam(model.parameters(), lr=0.05, tableau="ars222", betas=(0.5, 0.5))
    negative = False
    for _ in range(50):
        opt.step(loss_closure(model, opt, x, y))
        negative |= any((s["exp_avg_sq"] < 0).any().item() for s in opt.state.values())
        assert not any(torch.isnan(p).any() for p in model.parameters())
    assert negative  # the trap ALGORITHMS.md describes is real, and it is survived without NaN

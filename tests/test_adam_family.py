"""AdaMax, AdaMomentum and ClippedAdam against torch and hand-written references."""

import math

import pytest
import torch
from conftest import DEVICES, flat, loss_closure, make_data, make_net, train
from reference import paper_adam
from torch import nn

from lightning_imex.optim import OPTIMIZERS, AdaMax, AdaMomentum, ClippedAdam, IMEXAdam

FAMILY = [AdaMax, AdaMomentum, ClippedAdam]


def test_registry():
    assert OPTIMIZERS == {"imex_adam": IMEXAdam, "adamax": AdaMax, "adamomentum": AdaMomentum,
                          "clipped_adam": ClippedAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                          "sgd": torch.optim.SGD}


def test_defaults_match_the_papers():
    p = [nn.Parameter(torch.zeros(1))]
    assert AdaMax(p).defaults["lr"] == 2e-3 and AdaMax(p).defaults["betas"] == (0.9, 0.999)
    assert AdaMomentum(p).defaults["decoupled_weight_decay"] is True
    clipped = ClippedAdam(p).defaults
    assert (clipped["max_update"], clipped["clip"], clipped["bias_correction"]) == (None, "coordinate", False)


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.05}, {"maximize": True}, {"betas": (0.8, 0.99), "eps": 1e-6}])
def test_adamax_equals_torch_adamax(net, kwargs):
    ours, _, _ = train(net, lambda p: AdaMax(p, **kwargs), 100)
    theirs, _, _ = train(net, lambda p: torch.optim.Adamax(p, **kwargs), 100)
    torch.testing.assert_close(flat(ours), flat(theirs), atol=1e-6, rtol=0)


def test_adamax_decoupled_weight_decay_is_a_shrink_before_the_update(net):
    ours, _, _ = train(net, lambda p: AdaMax(p, weight_decay=0.1, decoupled_weight_decay=True), 1)
    plain, _, _ = train(net, lambda p: AdaMax(p), 1)
    # one step from the same point: theta (1 - lr wd) - step == (theta - step) - lr wd theta
    torch.testing.assert_close(flat(ours), flat(plain) - 2e-3 * 0.1 * flat(net), atol=1e-7, rtol=0)


def adamomentum_reference(theta, grads_fn, steps, lr, b1, b2, eps, wd, decoupled):
    """ALGORITHMS.md section 3, line by line."""
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    for k in range(1, steps + 1):
        g = grads_fn(theta)
        if wd and not decoupled:
            g = [gi + wd * t for gi, t in zip(g, theta)]
        if wd and decoupled:
            theta = [t * (1 - lr * wd) for t in theta]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * mi * mi + eps for vi, mi in zip(v, m)]
        theta = [t - lr * (mi / (1 - b1 ** k)) / torch.sqrt(vi / (1 - b2 ** k)) for t, mi, vi in zip(theta, m, v)]
    return theta, v


def model_gradients(model, x, y):
    def grads(theta):
        with torch.enable_grad():
            theta = [t.detach().requires_grad_() for t in theta]
            out = torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), theta)), (x,))
            return list(torch.autograd.grad(nn.functional.cross_entropy(out, y), theta))
    return grads


@pytest.mark.parametrize("wd,decoupled", [(0.0, True), (0.1, True), (0.1, False)])
def test_adamomentum_equals_reference(net, wd, decoupled):
    x, y = make_data()
    model = make_net()
    expected, _ = adamomentum_reference([p.detach().clone() for p in model.parameters()], model_gradients(model, x, y),
                                        100, 1e-3, 0.9, 0.999, 1e-8, wd, decoupled)
    ours, _, _ = train(net, lambda p: AdaMomentum(p, weight_decay=wd, decoupled_weight_decay=decoupled), 100)
    torch.testing.assert_close(flat(ours), torch.cat([t.flatten() for t in expected]), atol=1e-6, rtol=0)


def test_adamomentum_second_moment_floor():
    # eps accumulates inside v: with bias correction v never falls below eps / (1 - b2);
    # with zero gradients it sits exactly there (Adam's v would be 0).
    eps, b2 = 1e-8, 0.99
    p = nn.Parameter(torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64))
    opt = AdaMomentum([p], eps=eps, betas=(0.9, b2))
    for k in range(1, 51):
        p.grad = torch.tensor([0.0, 1e-6 * k, 3.0], dtype=torch.float64)
        opt.step()
        v_hat = opt.state[p]["exp_avg_sq"] / (1 - b2 ** k)
        assert (v_hat >= eps / (1 - b2) * (1 - 1e-12)).all()
        assert v_hat[0].item() == pytest.approx(eps / (1 - b2), rel=1e-12)
    assert opt.state[p]["exp_avg_sq"][2] > eps / (1 - b2)


def test_clipped_adam_with_huge_radius_is_adam_without_bias_correction(net):
    x, y = make_data()
    model = make_net()
    expected = paper_adam([p.detach().clone() for p in model.parameters()], model_gradients(model, x, y),
                          100, 1e-3, 0.9, 0.999, 1e-8)
    for clip in ("coordinate", "global"):
        ours, _, _ = train(net, lambda p: ClippedAdam(p, max_update=1e9, clip=clip), 100)
        torch.testing.assert_close(flat(ours), torch.cat([t.flatten() for t in expected]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("clip", ["coordinate", "global"])
def test_clipped_adam_never_exceeds_the_radius(net, clip):
    radius = 2e-3
    model = make_net()
    opt = ClippedAdam([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}],
                      lr=0.1, max_update=radius, clip=clip)
    closure = loss_closure(model, opt, *make_data())
    clipped_somewhere = False
    for _ in range(30):
        before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
        opt.step(closure)
        for group, old in zip(opt.param_groups, before):
            deltas = torch.cat([(p.detach() - o).flatten() for p, o in zip(group["params"], old)])
            if clip == "coordinate":
                assert deltas.abs().max().item() <= radius * (1 + 1e-5)
                clipped_somewhere |= bool((deltas.abs() > radius * 0.999).any())
            else:
                assert deltas.norm().item() <= radius * (1 + 1e-5)
                clipped_somewhere |= deltas.norm().item() > radius * 0.999
    assert clipped_somewhere  # at lr 0.1 the radius binds


def test_clipped_adam_default_radius_is_lr(net):
    default, _, _ = train(net, lambda p: ClippedAdam(p, lr=0.05), 5)
    explicit, _, _ = train(net, lambda p: ClippedAdam(p, lr=0.05, max_update=0.05), 5)
    assert torch.equal(flat(default), flat(explicit))


def test_ahn_cutkosky_preset():
    opt = ClippedAdam.ahn_cutkosky([nn.Parameter(torch.zeros(2))], lr=1e-3, beta=0.95)
    group = opt.param_groups[0]
    assert group["betas"] == (0.95, pytest.approx(0.95 ** 2)) and group["betas"][1] == group["betas"][0] ** 2
    assert group["bias_correction"] is False and group["ema_schedule"] == "zero_start"


@pytest.mark.parametrize("cls", FAMILY)
def test_state_dict_round_trip_continues_bit_identically(net, cls, tmp_path):
    x, y = make_data()
    kwargs = {"clip": "global", "lr": 0.05, "max_update": 1e-2} if cls is ClippedAdam else {}
    model, opt, _ = train(net, lambda p: cls(p, **kwargs), 7)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")

    def run(m, o):
        for _ in range(5):
            o.step(loss_closure(m, o, x, y))
        return flat(m)

    expected = run(model, opt)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = make_net(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = cls(resumed.parameters(), **kwargs)
    opt2.load_state_dict(saved["opt"])
    assert torch.equal(run(resumed, opt2), expected)


@pytest.mark.parametrize("cls", FAMILY)
@pytest.mark.parametrize("kwargs,error,message", [
    ({"lr": -1.0}, ValueError, "lr must be a finite number >= 0"),
    ({"eps": -1e-8}, ValueError, "eps must be"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0, 1\)"),
    ({"betas": (-0.1, 0.9)}, ValueError, r"betas\[0\] must be in \[0, 1\)"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay must be"),
    ({"maximize": "no"}, TypeError, "maximize must be a bool"),
])
def test_invalid_arguments(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls([nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"max_update": -1e-3}, "max_update must be a finite number >= 0 or None"),
    ({"max_update": float("inf")}, "max_update must be a finite number >= 0 or None"),
    ({"clip": "norm"}, "clip must be one of 'coordinate', 'global', got 'norm'"),
])
def test_clipped_adam_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClippedAdam([nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("cls", FAMILY)
def test_sparse_gradients_are_refused(cls):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        opt.step()
    assert not opt.state


@pytest.mark.slow
@pytest.mark.parametrize("cls,kwargs", [
    (AdaMax, {"weight_decay": 0.01, "maximize": True}),
    (AdaMomentum, {"weight_decay": 0.01}),
    (AdaMomentum, {"weight_decay": 0.01, "decoupled_weight_decay": False}),
    (ClippedAdam, {"lr": 0.05, "max_update": 1e-2}),
    (ClippedAdam, {"lr": 0.05, "max_update": 1e-2, "clip": "global", "bias_correction": True}),
])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_agrees_with_eager(net, cls, kwargs, device):
    eager, _, _ = train(net, lambda p: cls(p, fused=False, **kwargs), 20, device=device)
    fused, _, _ = train(net, lambda p: cls(p, fused=True, **kwargs), 20, device=device)
    torch.testing.assert_close(flat(fused), flat(eager), atol=1e-6, rtol=1e-6)


def test_global_norm_spans_the_whole_group_not_one_tensor():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    opt = ClippedAdam([a, b], lr=1.0, max_update=1.0, clip="global", eps=0.0)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    # the unclipped update is 1 per coordinate (norm sqrt(8)); clipped to norm 1 overall
    delta = torch.cat([a.detach(), b.detach()])
    torch.testing.assert_close(delta, torch.full((8,), -1 / math.sqrt(8)))

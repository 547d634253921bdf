"""The fused (compiled) path runs the same event program as the eager reference path."""

import pytest
import torch
from conftest import DEVICES, flat, loss_closure, make_net, train
from torch import nn

from lightning_imex.optim import IMEXAdam
from lightning_imex.optim.kernel import FUSED_BUCKETS, FUSED_CPU_MIN_NUMEL, select_fused

pytestmark = pytest.mark.slow


def wide_net() -> nn.Module:
    # More tensors than one bucket, with odd shapes: a (1, 8) weight and a size-1 bias.
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), nn.Tanh()]
    for _ in range(FUSED_BUCKETS[1] // 2 + 1):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(8, 1), nn.Flatten(0), nn.Linear(64, 3))


def wide_train(make_optimizer, steps, device="cpu"):
    model = wide_net().to(device)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g).to(device), torch.randint(0, 3, (1,), generator=g).to(device)
    opt = make_optimizer(model.parameters())
    closure = loss_closure(lambda inputs: model(inputs).unsqueeze(0), opt, x, y)
    for _ in range(steps):
        opt.step(closure)
    return model, opt


@pytest.mark.parametrize("kwargs", [
    {"tableau": "euler"},
    {"tableau": "trapezoidal"},
    {"tableau": "trapezoidal", "reuse_gradient": True, "weight_decay": 0.01},
    {"tableau": "ssp3_433", "weight_decay": 0.01, "decoupled_weight_decay": True, "maximize": True},
    {"tableau": "trapezoidal_pc", "bias_correction": False},
])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_agrees_with_eager(kwargs, device):
    assert sum(1 for _ in wide_net().parameters()) > FUSED_BUCKETS[1]
    eager, opt_e = wide_train(lambda p: IMEXAdam(p, lr=1e-2, fused=False, **kwargs), 20, device)
    fused, opt_f = wide_train(lambda p: IMEXAdam(p, lr=1e-2, fused=True, **kwargs), 20, device)
    torch.testing.assert_close(flat(fused), flat(eager), atol=1e-5, rtol=1e-5)
    for pe, pf in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(opt_f.state[pf]["exp_avg_sq"], opt_e.state[pe]["exp_avg_sq"], atol=1e-7, rtol=1e-4)


def test_fused_float64_matches_eager_to_roundoff(net):
    net = net.double()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    eager, _, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2, tableau="ssp3_433", fused=False), 10, data=(x, y))
    fused, _, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2, tableau="ssp3_433", fused=True), 10, data=(x, y))
    torch.testing.assert_close(flat(fused), flat(eager), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_reuse_equals_fused_two_gradient(net, device):
    two, _, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2, fused=True), 10, device=device)
    one, _, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2, fused=True, reuse_gradient=True), 10, device=device)
    torch.testing.assert_close(flat(one), flat(two), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_euler_equals_torch_adam(net, device):
    # fused=None: the default path for the device (fused on CUDA, eager on CPU)
    ours, opt, _ = train(net, lambda p: IMEXAdam(p, tableau="euler"), 100, device=device)
    theirs, _, _ = train(net, lambda p: torch.optim.Adam(p), 100, device=device)
    torch.testing.assert_close(flat(ours), flat(theirs), atol=1e-6, rtol=0)


def test_path_selection():
    cpu = [torch.zeros(1)]
    assert select_fused(None, cpu) is False and select_fused(True, cpu) is True
    assert select_fused(None, [torch.zeros(FUSED_CPU_MIN_NUMEL // 2)] * 2) is True
    assert select_fused(False, [torch.zeros(FUSED_CPU_MIN_NUMEL)]) is False
    assert select_fused(None, [torch.zeros(FUSED_CPU_MIN_NUMEL, device="meta")]) is False
    with pytest.raises(TypeError, match="fused must be a bool or None"):
        IMEXAdam([nn.Parameter(torch.zeros(1))], fused="yes")


def test_fused_state_dict_loads_into_eager(net, tmp_path):
    model, opt, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2, fused=True), 3)
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    again = IMEXAdam(make_net().parameters(), lr=1e-2, fused=False)
    again.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert all(s["step"] == 3 for s in again.state.values())


@pytest.mark.parametrize("fused", [False, True])
def test_bfloat16_and_channels_last_parameters(fused):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    reference = [p.detach().clone() for p in conv.parameters()]
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    for dtype in (torch.float32, torch.bfloat16):
        model = nn.Conv2d(3, 4, 3).to(dtype=dtype, memory_format=torch.channels_last)
        with torch.no_grad():
            for p, r in zip(model.parameters(), reference):
                p.copy_(r)
        opt = IMEXAdam(model.parameters(), lr=1e-2, fused=fused, tableau="ssp3_433")
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = model(x.to(dtype)).float().square().mean()
                loss.backward()
                return loss
            opt.step(closure)
        out = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        if dtype == torch.float32:
            expected = out
        else:  # bf16 follows fp32 to bf16 precision
            torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
        assert model.weight.stride() == conv.weight.stride()  # layout kept, state too
        assert opt.state[model.weight]["exp_avg"].stride() == conv.weight.stride()

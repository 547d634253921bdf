"""The compiled CPU path (generated C, one call per event over every tensor) runs the same
program as the eager reference path, on any shapes, layouts, dtypes and groups, without
recompiling."""

import copy

import pytest
import torch
from catalogue import catalogue_params
from conftest import flat, loss_closure, make_data, make_net, train
from torch import nn

from lightning_imex.optim import AdaMax, AdaMomentum, IMEXAdam
from lightning_imex.optim import kernel
from lightning_imex.optim.cpu_backend import BACKEND, c_source
from lightning_imex.optim.program import lower



class Assorted(nn.Module):
    """Parameters of every kind the compiled path must address: a channels_last conv
    weight, a transposed (column-major) matrix, sizes 1, 3 and 65,537."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3).to(dtype=dtype, memory_format=torch.channels_last)
        self.transposed = nn.Parameter(torch.randn(5, 7, dtype=dtype).t())  # strides (1, 7)
        self.one = nn.Parameter(torch.randn(1, dtype=dtype))
        self.three = nn.Parameter(torch.randn(3, dtype=dtype))
        self.big = nn.Parameter(torch.randn(65_537, dtype=dtype) * 0.01)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))  # (n, 4)
        return (h.sum(1, keepdim=True) * self.one + self.transposed[:1, :3].sum() * self.three.sum()
                + self.big[::997].sum()).square().mean()


def assorted_run(cls, kwargs, fused, steps=6, dtype=torch.float32):
    model = Assorted(dtype)
    assert not model.conv.weight.is_contiguous() and not model.transposed.is_contiguous()
    groups = [{"params": [model.conv.weight, model.transposed, model.big]},
              {"params": [model.conv.bias, model.one, model.three], "lr": 3e-3}]
    opt = cls(groups, lr=1e-2, fused=fused, **kwargs)
    x = torch.randn(4, 3, 6, 6, dtype=dtype).to(memory_format=torch.channels_last)

    def closure():
        opt.zero_grad()
        loss = model(x)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return model, opt


@pytest.mark.parametrize("cls, kwargs", catalogue_params())
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow),
                                   pytest.param(torch.float64, marks=pytest.mark.slow)], ids=str)
def test_compiled_agrees_with_eager(cls, kwargs, dtype):
    eager, opt_e = assorted_run(cls, kwargs, False, dtype=dtype)
    compiled, opt_c = assorted_run(cls, kwargs, True, dtype=dtype)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-13}[dtype]
    for pe, pc in zip(eager.parameters(), compiled.parameters()):
        assert pc.stride() == pe.stride()  # layout kept
        torch.testing.assert_close(pc, pe, atol=tolerance, rtol=tolerance)
        for name, value in opt_e.state[pe].items():
            if isinstance(value, torch.Tensor):
                assert opt_c.state[pc][name].stride() == value.stride()
                torch.testing.assert_close(opt_c.state[pc][name], value, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("kwargs, reference", [
    ({}, {}),
    ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    ({"weight_decay": 0.1, "decoupled_weight_decay": True}, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ({"maximize": True}, {"maximize": True}),
])
@pytest.mark.parametrize("fused", [False, True])
def test_euler_on_our_paths_equals_torch_adam(kwargs, reference, fused):
    # our programs (eager and compiled), against torch's single-tensor Adam: never torch vs torch
    calls = []
    real = torch._fused_adam_
    torch._fused_adam_ = lambda *a, **k: (calls.append(1), real(*a, **k))
    try:
        ours, _ = assorted_run(IMEXAdam, {"tableau": "euler", **kwargs}, fused, steps=20)
    finally:
        torch._fused_adam_ = real
    theirs, _ = assorted_run(torch.optim.Adam, {"foreach": False, **reference}, None, steps=20)
    assert calls == []
    torch.testing.assert_close(flat(ours), flat(theirs), atol=2e-6, rtol=1e-5)


def test_non_dense_parameters_and_foreign_gradient_layouts_take_a_correct_path():
    def run(fused):
        torch.manual_seed(0)
        base = torch.randn(6, 8)
        sliced = nn.Parameter(base[:, ::2])  # not dense: the eager path, in the same step
        plain = nn.Parameter(torch.randn(100_000))
        opt = AdaMomentum([sliced, plain], lr=1e-2, fused=fused)
        for step in range(4):
            sliced.grad = torch.randn(6, 4)
            plain.grad = torch.randn(100_000, 1).t().t()[:, 0] if step % 2 else torch.randn(100_000)
            opt.step()
        return torch.cat([sliced.detach().flatten(), plain.detach()])

    torch.testing.assert_close(run(True), run(False), atol=1e-6, rtol=1e-6)


def test_gradient_table_follows_new_gradient_tensors():
    # zero_grad(set_to_none=True) gives new gradient tensors every step: the pointer row
    # must be rebuilt, never reuse the old addresses
    p = nn.Parameter(torch.zeros(70_000))
    opt = AdaMax([p], lr=1.0, fused=True)
    for value in (1.0, -1.0, 2.0):
        p.grad = torch.full_like(p, value)
        before = p.detach().clone()
        opt.step()
        assert torch.sign(before - p.detach()).unique().tolist() == [1.0 if value > 0 else -1.0]
        p.grad = None


def test_many_models_one_process_bounded_kernels():
    # shapes, ranks, layouts and group structures of a dozen models: one kernel per
    # (event, dtype), never a recompile
    models = [nn.Conv2d(c, 2 * c, k).to(memory_format=torch.channels_last) for c, k in ((3, 3), (8, 1), (5, 5))]
    models += [nn.Linear(i, o) for i, o in ((1, 1), (300, 7), (7, 1000))]
    models += [nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), nn.LSTM(9, 17, 2), nn.Embedding(500, 33)]
    models += [nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)), nn.GRU(5, 11), nn.LayerNorm([4, 6])]
    kernels_before = len(BACKEND._functions)
    for model in models:
        for cls, kwargs in ((AdaMomentum, {}), (IMEXAdam, {"tableau": "trapezoidal"})):
            params = list(model.parameters())
            opt = cls([{"params": params[::2]}, {"params": params[1::2], "lr": 1e-4}], fused=True, **kwargs)
            for _ in range(2):
                def closure():
                    for p in params:
                        p.grad = torch.ones_like(p)
                    return 0.0
                opt.step(closure)
    new = len(BACKEND._functions) - kernels_before
    assert new <= 3  # AdaMomentum's event and trapezoidal's two, at most, for fp32


def test_lr_schedule_changes_no_kernel(net):
    def run(fused):
        model = copy.deepcopy(net)
        opt = IMEXAdam(model.parameters(), lr=1e-2, fused=fused)
        schedule = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        x, y = make_data()
        counts = []
        for _ in range(6):
            opt.step(loss_closure(model, opt, x, y))
            schedule.step()
            counts.append(len(BACKEND._functions))
        return flat(model), counts

    eager, _ = run(False)
    compiled, counts = run(True)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    assert counts[-1] == counts[0]  # lr is a runtime coefficient, not part of the code


def test_generated_source_has_no_hyperparameters():
    event = IMEXAdam([nn.Parameter(torch.zeros(1))], lr=0.123, betas=(0.8, 0.77))._plan(
        {"maximize": False, "weight_decay": 0.0})
    source = c_source(lower(event.events[0]), torch.float32)
    assert "0.123" not in source and "0.8" not in source and "coef[" in source


def test_path_selection():
    small, large = [torch.zeros(1)], [torch.zeros(kernel.COMPILED_MIN_NUMEL)]
    assert kernel.select_backend(None, small) is None
    assert kernel.select_backend(True, small) is BACKEND
    assert kernel.select_backend(None, large) is BACKEND
    assert kernel.select_backend(False, large) is None
    assert kernel.select_backend(None, [torch.zeros(kernel.COMPILED_MIN_NUMEL, device="meta")]) is None
    with pytest.raises(RuntimeError, match="fused=True: no compiled backend for torch.float32 parameters on meta"):
        kernel.select_backend(True, [torch.zeros(1, device="meta")])
    with pytest.raises(TypeError, match="fused must be a bool or None"):
        IMEXAdam([nn.Parameter(torch.zeros(1))], fused="yes")


def test_state_dict_moves_between_paths(tmp_path):
    model, opt, _ = train(make_net(), lambda p: IMEXAdam(p, lr=1e-2, fused=True), 3)
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    again = IMEXAdam(make_net().parameters(), lr=1e-2, fused=False)
    again.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert all(s["step"] == 3 for s in again.state.values())


@pytest.mark.parametrize("fused", [False, True])
def test_kept_batches_follow_replaced_storage_and_loaded_state(fused):
    p = nn.Parameter(torch.zeros(10_000))
    opt = AdaMax([p], lr=1.0, fused=fused)
    p.grad = torch.ones_like(p)
    opt.step()
    p.data = torch.zeros(10_000)  # new storage, same Parameter (what module.to(...) does)
    p.grad = torch.ones_like(p)
    opt.step()
    assert (p.detach() < 0).all()  # the new storage moved, not the old one
    saved = copy.deepcopy(opt.state_dict())
    opt.step()
    opt.load_state_dict(copy.deepcopy(saved))  # new state tensors
    fresh = AdaMax([nn.Parameter(p.detach().clone())], lr=1.0, fused=fused)
    fresh.load_state_dict(saved)
    fresh.param_groups[0]["params"][0].grad = p.grad.clone()
    before = p.detach().clone()
    opt.step()
    fresh.step()
    torch.testing.assert_close(p.detach(), fresh.param_groups[0]["params"][0].detach())
    assert not torch.equal(p.detach(), before)


def test_compiled_reuse_equals_compiled_two_gradient(net):
    # full batch: the next step's first gradient is the one the last stage would take
    two, _, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2, fused=True), 10)
    one, _, _ = train(net, lambda p: IMEXAdam(p, lr=1e-2, fused=True, reuse_gradient=True), 10)
    torch.testing.assert_close(flat(one), flat(two), atol=1e-6, rtol=0)

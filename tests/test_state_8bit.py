"""``state_dtype="8bit"``: moments as uint8 codes with a float32 scale per 256 elements
(program.quantize), the same bits on the eager, C and Triton paths for every optimizer
and tableau, within the maps' bounds, per tensor, and resumed exactly."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lightning_imex.optim import IMEXAdam
from lightning_imex.optim.program import QUANT_BLOCK, dequantize, element_offsets, quant_blocks, quantize
from bitwise import assert_same_bits
import test_state_dtype as state_dtype_test
from test_state_dtype import CASES, CONFIGS  # noqa: F401 (CASES: test_triton_backend.py checks them on Triton)


def model() -> nn.Module:
    # weights of 1280 elements (a full Triton block and a tail, 5 scales) and 560 (3 scales,
    # the last partial); biases below one block keep float32 moments
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 80), nn.Tanh(), nn.Linear(80, 7))


def train(name: str, fused: bool | None, steps: int = 5, state: dict | None = None, state_dtype="8bit"):
    """(model, optimizer) after ``steps`` full-batch steps, from ``state`` when given."""
    return state_dtype_test.train(name, fused, steps, state=state, state_dtype=state_dtype, net=model())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_and_c_agree_bit_for_bit(name):
    eager = train(name, fused=False)
    assert_same_bits(eager, train(name, fused=True))
    net, opt = eager
    first, second = opt.state_buffers
    weight, bias = opt.state[net[0].weight], opt.state[net[0].bias]
    assert weight[first].dtype == weight[second].dtype == torch.uint8
    assert weight[f"{first}_scales"].shape == (5,) and weight[f"{first}_scales"].dtype == torch.float32
    assert bias[first].dtype == torch.float32 and f"{first}_scales" not in bias  # below one block


def test_dequantized_values_are_within_the_maps_bounds():
    g = torch.Generator().manual_seed(0)
    # magnitudes over ten decades, so most of a block sits far below its largest value
    x = torch.randn(10 * QUANT_BLOCK + 37, generator=g) * 10.0 ** (-10 * torch.rand(10 * QUANT_BLOCK + 37, generator=g))
    offsets = element_offsets(x)
    for kind, values in (("signed", x), ("unsigned", x.square())):
        codes, scales = quantize(values, offsets, quant_blocks(x.numel()), kind)
        assert codes.dtype == torch.uint8 and scales.shape == (11,)
        block = offsets // QUANT_BLOCK
        assert torch.equal(scales, torch.zeros(11).scatter_reduce(0, block, values.abs(), "amax"))
        restored = dequantize(codes, scales, offsets, kind)
        assert torch.equal(restored.sign(), values.sign() * (restored != 0))  # never the wrong sign
        ours, exact = restored.abs().double() / scales[block], values.abs().double() / scales[block]
        # 3 mantissa bits rounded: within 2^-4 of the value, from the smallest code up
        smallest = 1.25 * 2.0 ** (-16 if kind == "signed" else -32)
        kept = exact >= smallest
        assert ((ours - exact).abs() <= 2.0**-4 * exact * (1 + 1e-6))[kept].all()
        assert (ours[~kept] <= smallest * (1 + 1e-6)).all()  # below: 0, or the smallest code
        assert 0.1 < (~kept).float().mean() < 0.6  # the test reaches below the map's range
        assert torch.equal(restored.abs().amax(), values.abs().amax())  # the largest is exact
    zeros, scales = quantize(torch.zeros(5), element_offsets(torch.zeros(5)), 1, "unsigned")
    assert torch.equal(dequantize(zeros, scales, element_offsets(zeros), "unsigned"), torch.zeros(5))



def test_a_checkpoint_of_the_earlier_power_maps_loads_through_float32():
    """8-bit moments saved before the maps were small floats (scales under
    "<name>_absmax", codes round(127 sqrt|x|) and round(255 x^(1/4))) are decoded with
    those maps, not read as codes of the new ones."""
    p = nn.Parameter(torch.zeros(2 * QUANT_BLOCK))
    m = torch.linspace(-1, 1, p.numel()) * 1e-2
    v = torch.linspace(0, 1, p.numel()) * 1e-4
    old = {}
    for name, value, kind in (("exp_avg", m, "signed"), ("exp_avg_sq", v, "unsigned")):
        scale = value.abs().reshape(2, -1).amax(dim=1)
        x = value / scale.repeat_interleave(QUANT_BLOCK)
        r = x.abs().sqrt() * 127 if kind == "signed" else x.sqrt().sqrt() * 255
        k = torch.floor(r + 0.5).to(torch.uint8)
        old[name], old[f"{name}_absmax"] = (k | (x < 0).to(torch.uint8) << 7) if kind == "signed" else k, scale
    opt = IMEXAdam([p], tableau="euler", state_dtype="8bit")
    opt.load_state_dict({"state": {0: {"step": 3, **old}}, "param_groups": [{**opt.param_groups[0], "params": [0]}]})
    state = opt.state[p]
    assert "exp_avg_absmax" not in state and "exp_avg_sq_absmax" not in state
    for name, value, kind in (("exp_avg", m, "signed"), ("exp_avg_sq", v, "unsigned")):
        restored = dequantize(state[name], state[f"{name}_scales"], element_offsets(state[name]), kind)
        assert torch.allclose(restored, value, rtol=0.1, atol=2e-3 * value.abs().max())

def test_blocks_never_straddle_tensors():
    """A parameter's codes and scales are the same whatever tensors share its batch."""
    def moments(count: int) -> dict:
        params = [nn.Parameter(torch.ones(300)) for _ in range(count)]
        opt = IMEXAdam(params, tableau="euler", state_dtype="8bit", fused=True)
        for p in params[:-1]:  # neighbours of wildly larger magnitudes
            p.grad = torch.full_like(p, 1e6)
        params[-1].grad = torch.linspace(-1, 1, 300)
        opt.step()
        return opt.state[params[-1]]

    alone, shared = moments(1), moments(3)
    assert alone["exp_avg_scales"].shape == (2,) and alone["exp_avg_scales"][0] == 0.1  # (1 - beta1) * 1
    for key, value in alone.items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(shared[key])), key


def test_state_bytes_and_a_weights_only_round_trip_that_resumes_exactly():
    whole = train("imex_trapezoidal", fused=None, steps=6)
    net, opt = train("imex_trapezoidal", fused=None, steps=3)
    large = [p.numel() for p in net.parameters() if p.numel() >= QUANT_BLOCK]
    small = [p.numel() for p in net.parameters() if p.numel() < QUANT_BLOCK]
    assert opt.state_bytes() == sum(2 * (n + 4 * quant_blocks(n)) for n in large) + 8 * sum(small)
    assert (opt.state_bytes() - 8 * sum(small)) / sum(large) < 2.1  # bytes per 8-bit parameter
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)

    def saved() -> dict:
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    assert saved()["opt"]["param_groups"][0]["state_dtype"] == "8bit"
    assert_same_bits(train("imex_trapezoidal", fused=None, steps=3, state=saved()), whole)
    # other storages load it through float32: dequantized exactly, and quantized again
    wide = train("imex_trapezoidal", fused=False, steps=0, state=saved(), state_dtype=torch.float32)[1]
    for p, q in zip(net.parameters(), wide.param_groups[0]["params"]):
        moment = opt.state[p]["exp_avg"]
        if moment.dtype == torch.uint8:
            expected = dequantize(moment, opt.state[p]["exp_avg_scales"], element_offsets(moment), "signed")
            assert torch.equal(wide.state[q]["exp_avg"], expected) and "exp_avg_scales" not in wide.state[q]
    narrow = train("imex_trapezoidal", fused=False, steps=0, state={"model": net.state_dict(),
                                                               "opt": wide.state_dict()})[1]
    for p, q in zip(net.parameters(), narrow.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(narrow.state[q][key], value), key  # a fixed point of the maps


def test_8bit_by_name_only():
    with pytest.raises(ValueError, match=r"state_dtype must be None .* got 'int8' \(by name: 'float32', "
                                         r"'bfloat16'; 8-bit blockwise: '8bit'\)"):
        IMEXAdam([nn.Parameter(torch.zeros(2))], state_dtype="int8")
    with pytest.raises(ValueError, match="state_dtype=8bit needs float32, bfloat16 or float16 parameters"):
        IMEXAdam([nn.Parameter(torch.zeros(2, dtype=torch.float64))], state_dtype="8bit")


@pytest.mark.slow  # about 5 s of compiling
def test_8bit_kahan_kernel_compiles_for_cuda(tmp_path, monkeypatch):
    """Compiled ahead of time for an H100 (sm_90), no GPU needed: the block maxima over a
    reshaped block, the maps and the integer bfloat16 rounding compile, with no FMA."""
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lightning_imex.optim.base import KAHAN, QUANTIZED_MOMENTS
    from lightning_imex.optim.toolkit import kernel_buffers
    from lightning_imex.optim.plan import build_plan
    from lightning_imex.optim.program import Storage, lower, with_compensation
    from lightning_imex.optim.tableau import get_tableau
    from lightning_imex.optim.triton_backend import BLOCK, NUM_WARPS, _import_kernel, triton_source

    monkeypatch.setenv("LIGHTNING_IMEX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = lower(with_compensation(build_plan(get_tableau("euler")).events[0], "p", KAHAN))
    storage = Storage.of(kernel, {"p": torch.bfloat16, "g": torch.bfloat16, "m": torch.uint8, "v": torch.uint8,
                                  KAHAN: torch.bfloat16}, quantized=QUANTIZED_MOMENTS)
    signature = {f"row{k}": "*i64" for k in range(len(kernel_buffers(kernel)))}
    signature.update({f"scales{kernel_buffers(kernel).index(name)}": "*i64" for name in QUANTIZED_MOMENTS})
    signature.update(numels="*i64", block_tensor="*i32", block_start="*i64", coefficients="*fp64", BLOCK="constexpr")
    source = ASTSource(fn=_import_kernel(triton_source(kernel, storage)), signature=signature,
                       constexprs={"BLOCK": BLOCK})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": NUM_WARPS, "enable_fp_fusion": False}).asm["ptx"]
    assert "fma" not in ptx and "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_nan_and_inf_quantize_alike_on_every_path(kind):
    """NaN is left out of a block's scale and stored as code 0; an infinite value makes its
    block's scale infinite: the eager and C paths agree on both (C's block maxima are
    vectorized)."""
    from lightning_imex.optim.cpu_backend import BACKEND
    from lightning_imex.optim.kernel import Batch
    from lightning_imex.optim.program import Event, tensor

    values = torch.linspace(-2, 3, 3 * QUANT_BLOCK)
    values[5], values[QUANT_BLOCK + 7], values[-1] = float("nan"), float("inf"), -float("nan")
    results = []
    for backend in (None, BACKEND):
        codes, scales = torch.full_like(values, 7, dtype=torch.uint8), torch.full((3,), -1.0)
        batch = Batch([values], {"p": [values], "m": [codes], "m_scales": [scales]}, backend, quantized={"m": kind})
        batch.run(Event(gradient=0, writes={"m": tensor("p")}), [None])
        results.append((codes, scales))
    (codes, scales), (c_codes, c_scales) = results
    assert torch.equal(codes, c_codes) and torch.equal(scales, c_scales)
    assert codes[5] == 0 and codes[-1] == 0 and scales[0] == 2 and scales[1] == float("inf") and scales[2] == values[-2]

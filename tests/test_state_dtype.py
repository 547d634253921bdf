"""``state_dtype=torch.bfloat16``: every optimizer and tableau stores its moments in
bfloat16 with stochastic rounding whose bits are the same on the eager, C and Triton
paths (bit for bit), unbiased, fixed by the seed, and repeated by a resumed run."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from lightning_imex.optim import AdaMax, AdaMomentum, ClippedAdam, IMEXAdam
from lightning_imex.optim.cpu_backend import BACKEND
from lightning_imex.optim.imex_adam import PositivityWarning
from lightning_imex.optim.kernel import Batch
from lightning_imex.optim.program import Event, tensor, tensor_key
from bitwise import assert_same_bits
from catalogue import configs

CONFIGS = configs("imex_euler", "imex_trapezoidal", "imex_trapezoidal_reuse", "imex_ssp3_433", "imex_trapezoidal_pc",
                  "imex_ars222", "imex_ars343_reuse", "adamax", "adamomentum", "clipped_coordinate", "clipped_global")
CASES = [(name,) for name in CONFIGS]  # test_triton_backend.py checks them on Triton


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3))


def train(name: str, fused: bool | None, steps: int = 5, seed: int = 0, state: dict | None = None,
          state_dtype=torch.bfloat16, net: nn.Sequential | None = None):
    """(model, optimizer) after ``steps`` full-batch classification steps of ``net`` (else
    :func:`model`) with ``state_dtype`` state, from ``state`` ({"model", "opt"}) when given."""
    cls, kwargs = CONFIGS[name]
    net = model() if net is None else net
    with warnings.catch_warnings():  # ars222 and ars343 warn that they are not positivity-preserving
        warnings.simplefilter("ignore", PositivityWarning)
        opt = cls(net.parameters(), lr=1e-2, fused=fused, state_dtype=state_dtype, seed=seed, **kwargs)
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, net[0].in_features, generator=g)
    y = torch.randint(0, net[-1].out_features, (32,), generator=g)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return net, opt


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_and_c_agree_bit_for_bit(name):
    assert_same_bits(train(name, fused=False), train(name, fused=True), torch.bfloat16)


@pytest.mark.slow  # about 5 s of compiling
def test_stochastic_kernel_compiles_for_cuda(tmp_path, monkeypatch):
    """Compiled ahead of time for an H100 (sm_90), no GPU needed: the 32-bit hash and the
    bfloat16 stores compile, with no FMA (the eager path rounds each operation)."""
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lightning_imex.optim.toolkit import kernel_buffers
    from lightning_imex.optim.plan import build_plan
    from lightning_imex.optim.program import Storage, lower
    from lightning_imex.optim.tableau import get_tableau
    from lightning_imex.optim.triton_backend import BLOCK, NUM_WARPS, _import_kernel, triton_source

    monkeypatch.setenv("LIGHTNING_IMEX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = lower(build_plan(get_tableau("euler")).events[0])
    storage = Storage.of(kernel, {"p": torch.float32, "g": torch.float32, "m": torch.bfloat16, "v": torch.bfloat16},
                         stochastic=("m", "v"))
    signature = {f"row{k}": "*i64" for k in range(len(kernel_buffers(kernel)))}
    signature.update(numels="*i64", block_tensor="*i32", block_start="*i64", keys="*i64", shard_offsets="*i64",
                     coefficients="*fp64", BLOCK="constexpr")
    source = ASTSource(fn=_import_kernel(triton_source(kernel, storage)), signature=signature,
                       constexprs={"BLOCK": BLOCK})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": NUM_WARPS, "enable_fp_fusion": False}).asm["ptx"]
    assert "fma" not in ptx and "mul.lo" in ptx


def test_state_is_bfloat16_and_survives_a_weights_only_round_trip_and_resume():
    whole = train("imex_trapezoidal", fused=None, steps=6)
    net, opt = train("imex_trapezoidal", fused=None, steps=3)
    assert opt.state_bytes() == 2 * 2 * sum(p.numel() for p in net.parameters())  # 4 bytes per parameter
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["param_groups"][0]["state_dtype"] == torch.bfloat16
    resumed = train("imex_trapezoidal", fused=None, steps=3, seed=5, state=saved)  # the checkpoint's seed wins
    assert resumed[1].param_groups[0]["seed"] == 0
    assert_same_bits(resumed, whole)


def test_loaded_state_takes_the_constructors_state_dtype():
    net, opt = train("imex_euler", fused=False, steps=2)
    wide = IMEXAdam(model().parameters(), tableau="euler", state_dtype=torch.float32)
    wide.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(net.parameters(), wide.param_groups[0]["params"]):
        assert wide.state[q]["exp_avg"].dtype == torch.float32
        assert torch.equal(wide.state[q]["exp_avg"], opt.state[p]["exp_avg"].float())  # exactly, widened


def test_seed_fixes_the_rounding():
    first, again, other = (train("adamax", fused=False, steps=2, seed=s) for s in (7, 7, 8))
    assert_same_bits(first, again)
    moments = [[s["exp_avg"] for s in opt.state.values()] for _, opt in (first, other)]
    assert any(not torch.equal(a, b) for a, b in zip(*moments))


def rounded_copies(value: float, n: int, backend) -> torch.Tensor:
    """``n`` stochastic roundings of ``value`` to bfloat16 (one per element, as float32)."""
    source, target = torch.full((n,), value), torch.zeros(n, dtype=torch.bfloat16)
    batch = Batch([source], {"p": [source], "m": [target]}, backend, stochastic=("m",), keys=[tensor_key(3, 0)])
    batch.run(Event(gradient=0, writes={"m": tensor("p")}), [None])
    return target.float()


@pytest.mark.parametrize("value", [1.0 + 0.3 * 2**-7, -3.7e-5, 1.0])
def test_stochastic_rounding_is_unbiased(value):
    n = 1 << 18
    eager, compiled = rounded_copies(value, n, None), rounded_copies(value, n, BACKEND)
    assert torch.equal(eager, compiled)
    exact = torch.tensor(value)
    # the bfloat16 neighbours of the float32 value: its bits truncated, and one step further out
    low = exact.view(torch.int32) >> 16 << 16
    down, up = low.view(torch.float32).item(), (low + (1 << 16)).view(torch.float32).item()
    assert set(eager.unique().tolist()) <= {down, up}
    # the mean within 5 standard errors of a Bernoulli between the neighbours
    assert abs(eager.double().mean().item() - exact.item()) <= 5 * 0.5 * abs(up - down) / n**0.5
    if value == 1.0:
        assert torch.equal(eager, torch.ones(n))  # representable values are never moved


def test_nan_and_inf_survive_stochastic_rounding():
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    results = []
    for backend in (None, BACKEND):
        target = torch.ones(4, dtype=torch.bfloat16)
        batch = Batch([special], {"p": [special], "m": [target]}, backend, stochastic=("m",), keys=[1])
        batch.run(Event(gradient=0, writes={"m": tensor("p")}), [None])
        results.append(target.view(torch.int16))
    assert torch.equal(*results)
    rounded = results[0].view(torch.bfloat16)
    assert rounded[0].isnan() and rounded[1] == float("inf") and rounded[2] == -float("inf")
    assert rounded[3] == 0 and torch.tensor(1.0).copysign(rounded[3].float()) == -1  # -0.0 stays -0.0


@pytest.mark.parametrize("bad, match", [
    ({"state_dtype": torch.float16}, r"state_dtype must be None \(the parameter's dtype\), torch.float32 or "
                                     r"torch.bfloat16, got torch.float16"),
    ({"state_dtype": "bf16"}, "state_dtype must be None"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\)"),
    ({"seed": 1.5}, r"seed must be an integer"),
])
def test_bad_state_settings_name_the_field(bad, match):
    for cls in (IMEXAdam, AdaMax, AdaMomentum, ClippedAdam):
        with pytest.raises(ValueError, match=match):
            cls([nn.Parameter(torch.zeros(2))], **bad)


def test_narrow_state_needs_a_parameter_it_can_round_from():
    with pytest.raises(ValueError, match="state_dtype=torch.bfloat16 needs float32, bfloat16 or float16 "
                                         r"parameters, got a torch.float64 parameter of shape \(2,\)"):
        IMEXAdam([nn.Parameter(torch.zeros(2, dtype=torch.float64))], state_dtype=torch.bfloat16)

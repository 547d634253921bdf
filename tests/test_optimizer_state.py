"""A loaded optimizer state is path-independent: it resumes on whatever path this machine
and this constructor pick (``fused``), and a state from torch's Adam (``step`` as a
tensor) batches as a fresh state does."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import torch
from conftest import flat, loss_closure, make_data, make_net
from torch import nn

from lightning_imex.optim import IMEXAdam

# a group above the compiled path's threshold, so fused=None would pick C where it can
WIDE = 4096


def wide_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, WIDE // 6 + 1), nn.Tanh(), nn.Linear(WIDE // 6 + 1, 3))


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    closure = loss_closure(model, opt, *make_data())
    for _ in range(steps):
        opt.step(closure)


# The resumed half, in a process where no C compiler can be found: $CC names a missing
# one and PATH holds no other (the C backend looks its compiler up once per process).
RESUME_WITHOUT_COMPILER = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from test_optimizer_state import run, wide_net
from lightning_imex.optim import IMEXAdam
from lightning_imex.optim.cpu_backend import BACKEND
assert BACKEND.compiler() is None
saved = torch.load(sys.argv[1], weights_only=True)
model = wide_net()
model.load_state_dict(saved["model"])
opt = IMEXAdam(model.parameters(), lr=1e-2, fused=None)
opt.load_state_dict(saved["opt"])
assert opt.param_groups[0]["fused"] is None
run(model, opt, 3)
torch.save(model.state_dict(), sys.argv[2])
"""


def test_fused_state_resumes_where_no_compiler_exists_and_on_the_eager_path(tmp_path):
    model = wide_net()
    opt = IMEXAdam(model.parameters(), lr=1e-2, fused=True)
    run(model, opt, 3)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    torch.save(saved, tmp_path / "half.pt")
    run(model, opt, 3)  # uninterrupted

    eager_model = wide_net()
    eager_model.load_state_dict(saved["model"])
    eager = IMEXAdam(eager_model.parameters(), lr=1e-2, fused=False)
    eager.load_state_dict(saved["opt"])
    assert eager.param_groups[0]["fused"] is False
    run(eager_model, eager, 3)
    torch.testing.assert_close(flat(eager_model), flat(model), rtol=1e-6, atol=1e-7)

    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "PATH": str(tmp_path / "empty")}
    subprocess.run([sys.executable, "-c", RESUME_WITHOUT_COMPILER, str(tmp_path / "half.pt"),
                    str(tmp_path / "resumed.pt"), os.path.dirname(__file__)],
                   env=env, check=True, timeout=120, capture_output=True)
    resumed = wide_net()
    resumed.load_state_dict(torch.load(tmp_path / "resumed.pt", weights_only=True))
    torch.testing.assert_close(flat(resumed), flat(model), rtol=1e-6, atol=1e-7)


def test_torch_adam_state_batches_as_a_fresh_state():
    net = make_net()
    theirs = torch.optim.Adam(net.parameters(), lr=1e-2)
    run(net, theirs, 2)
    assert all(isinstance(s["step"], torch.Tensor) for s in theirs.state.values())

    fresh_net = make_net()
    fresh = IMEXAdam(fresh_net.parameters(), lr=1e-2, tableau="euler")
    run(fresh_net, fresh, 1)

    loaded_net = make_net()
    loaded_net.load_state_dict(net.state_dict())
    loaded = IMEXAdam(loaded_net.parameters(), lr=1e-2, tableau="euler")
    loaded.load_state_dict(copy.deepcopy(theirs.state_dict()))
    run(loaded_net, loaded, 3)
    run(net, theirs, 3)
    assert len(loaded._batch_cache) == len(fresh._batch_cache) == 1  # one batch, not one per parameter
    assert all(s["step"] == 5 for s in loaded.state.values())
    torch.testing.assert_close(flat(loaded_net), flat(net), rtol=1e-5, atol=1e-6)


def test_loaded_groups_show_the_constructors_max_grad_norm():
    # max_grad_norm is the constructor's, as fused is (the step reads the optimizer's):
    # a checkpoint saved with another threshold, or none, does not show it
    for saved, constructed in ((1.0, 0.05), (None, 0.05), (0.05, None)):
        net = make_net()
        source = IMEXAdam(net.parameters(), lr=1e-2, max_grad_norm=saved)
        run(net, source, 1)
        resumed = IMEXAdam(copy.deepcopy(net).parameters(), lr=1e-2, max_grad_norm=constructed)
        resumed.load_state_dict(source.state_dict())
        assert [g["max_grad_norm"] for g in resumed.param_groups] == [constructed]
        assert resumed.state_dict()["param_groups"][0]["max_grad_norm"] == constructed


def test_a_steady_step_looks_up_no_scratch_and_a_replaced_parameter_is_seen():
    # a multi-stage step's scratch buffers are found with its batch: none per parameter
    # per step; p.data = ... (as module.to does) makes a new batch, equal to one built afresh
    net, reference_net = wide_net(), wide_net()
    opt = IMEXAdam(net.parameters(), lr=1e-2, tableau="ssp3_433", fused=False)
    reference = IMEXAdam(reference_net.parameters(), lr=1e-2, tableau="ssp3_433", fused=False)
    lookups = []
    scratch_buffer = opt._scratch_buffer
    opt._scratch_buffer = lambda *args: lookups.append(args[1]) or scratch_buffer(*args)
    for step in range(4):
        if step == 3:
            for p, q in zip(net.parameters(), reference_net.parameters()):
                p.data, q.data = p.data.clone(), q.data.clone()
        lookups.clear()
        reference._batch_cache.clear()  # every batch built afresh
        run(net, opt, 1)
        run(reference_net, reference, 1)
        assert len(lookups) == (0 if step in (1, 2) else 2 * len(list(net.parameters())))
        assert torch.equal(flat(net), flat(reference_net))

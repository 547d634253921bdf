"""Two training runs compared bit for bit (the model's parameters and the optimizer's
state), and the same comparison with Triton's interpreter standing in for the C backend.

A test module that :func:`triton_check` checks defines ``train(*case, fused=...)`` returning
``(model, optimizer)`` and ``CASES``, the argument tuples to check, or ``triton_interpreted()``,
a check of its own to run with Triton's interpreter there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

__all__ = ["assert_same_bits", "triton_check"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def assert_same_bits(ours, theirs, state_dtype: torch.dtype | None = None) -> None:
    """``ours`` and ``theirs`` ((model, optimizer) pairs) hold the same bits: parameters,
    state keys, state tensors' dtypes and contents, state numbers; ``state_dtype``: every
    state tensor of ours has it."""
    (net_a, opt_a), (net_b, opt_b) = ours, theirs
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b))
        assert opt_a.state[a].keys() == opt_b.state[b].keys()
        for key, value in opt_a.state[a].items():
            other = opt_b.state[b][key]
            if isinstance(value, torch.Tensor):
                assert state_dtype is None or value.dtype == state_dtype, key
                assert value.dtype == other.dtype and torch.equal(_bytes(value), _bytes(other)), key
            else:
                assert value == other, key


# In a subprocess: TRITON_INTERPRET must be set before any kernel is defined. One for all
# the modules: each start imports torch, Triton's interpreter and the package again.
_TRITON_CHECK = """
import importlib, json, sys, traceback, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from bitwise import assert_same_bits
from lightning_imex.optim import kernel
from lightning_imex.optim.triton_backend import BACKEND
failures = {}
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    if hasattr(module, "triton_interpreted"):
        try:
            module.triton_interpreted()
        except Exception:
            failures[f"{name}.triton_interpreted()"] = traceback.format_exc()
    for case in getattr(module, "CASES", ()):
        try:
            eager = module.train(*case, fused=False)
            kernel._BACKENDS = {"cpu": BACKEND}  # the Triton backend stands in for the C one
            try:
                assert_same_bits(eager, module.train(*case, fused=True))
            finally:
                kernel._BACKENDS = None
        except Exception:
            failures[f"{name}.train{case}"] = traceback.format_exc()
print(json.dumps(failures))
"""


def triton_check(modules: list[str], tmp_path) -> None:
    """Every case of each test module in ``modules`` gives the same bits on the eager path
    and on the Triton backend in Triton's interpreter (on CPU tensors), and the module's
    ``triton_interpreted()`` passes, in one subprocess."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "LIGHTNING_IMEX_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _TRITON_CHECK, os.path.dirname(__file__), *modules], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    failures = json.loads(run.stdout.splitlines()[-1])
    assert not failures, "\n".join(f"{case}:\n{failure[-3000:]}" for case, failure in failures.items())

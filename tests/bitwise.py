"""Two training runs compared bit for bit (the model's parameters and the optimizer's
state), and the same comparison with Triton's interpreter standing in for the C backend.

A test module that uses :func:`triton_check` defines ``train(*case, fused=...)`` returning
``(model, optimizer)`` and ``CASES``, the argument tuples to check."""

from __future__ import annotations

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


# In a subprocess: TRITON_INTERPRET must be set before any kernel is defined.
_TRITON_CHECK = """
import importlib, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from bitwise import assert_same_bits
from lightning_imex.optim import kernel
from lightning_imex.optim.triton_backend import BACKEND
module = importlib.import_module(sys.argv[2])
for case in module.CASES:
    eager = module.train(*case, fused=False)
    kernel._BACKENDS = {"cpu": BACKEND}  # the Triton backend stands in for the C one
    try:
        assert_same_bits(eager, module.train(*case, fused=True))
    finally:
        kernel._BACKENDS = None
"""


def triton_check(module: str, tmp_path) -> None:
    """Every case of test module ``module`` gives the same bits on the eager path and on
    the Triton backend in Triton's interpreter (on CPU tensors)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "LIGHTNING_IMEX_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _TRITON_CHECK, os.path.dirname(__file__), module], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]

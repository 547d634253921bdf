"""The Triton backend: its kernels agree with the eager path (run in Triton's interpreter
on CPU tensors, in a subprocess: see ``triton_interpret_run.py``), compile for a CUDA GPU
with vectorized memory accesses (no GPU needed to compile), and the package imports
without Triton."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bitwise import triton_check
from triton_interpret_run import CHECKS, adam_event, every_operator_event

from lightning_imex.optim.toolkit import kernel_buffers
from lightning_imex.optim.program import Kernel, lower
from lightning_imex.optim.triton_backend import BACKEND, BLOCK, NUM_WARPS, _import_kernel, triton_source

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_interpret_run.py")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, str]:
    """Every check of ``triton_interpret_run.py``, run once: name -> "ok" or the failure."""
    work = tmp_path_factory.mktemp("triton_interpret")
    results = work / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LIGHTNING_IMEX_CACHE_DIR": str(work / "cache")}
    run = subprocess.run([sys.executable, str(SCRIPT), str(results)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(results.read_text())


@pytest.mark.parametrize("check", list(CHECKS))
def test_interpreted_kernel_agrees_with_eager(interpreted, check):
    assert interpreted[check] == "ok", interpreted[check]


@pytest.mark.slow  # about 30 s: Triton's interpreter over every case of the five modules
def test_narrow_state_rounded_writes_and_clipping_in_the_step_on_triton(tmp_path):
    """Every case that those modules compare bit for bit on the eager and C paths (8-bit
    and bfloat16 state, Kahan and stochastic parameter rounding, shard offsets) gives the
    same bits with the Triton backend standing in for the C one, and clipping inside the
    step agrees with clipping in the closure: one subprocess for all."""
    triton_check(["test_state_8bit", "test_state_dtype", "test_param_rounding", "test_sharded_rounding",
                  "test_fused_clipping"], tmp_path)


def cuda_signature(kernel: Kernel) -> dict[str, str]:
    """The argument types of ``kernel``'s Triton kernel, as ``launch`` passes them."""
    signature = {f"row{k}": "*i64" for k in range(len(kernel_buffers(kernel)))}
    signature.update(numels="*i64", block_tensor="*i32", block_start="*i64")
    signature.update({"coefficients": "*fp64"} if kernel.coefficients else {})
    signature.update({f"runtime{k}": "*fp32" for k in range(len(kernel.runtimes))})
    signature.update({"partial": "*fp64"} if kernel.reduce is not None else {})
    return {**signature, "BLOCK": "constexpr"}


@pytest.mark.parametrize("event, dtype", [
    (adam_event(), torch.float32), (adam_event(), torch.bfloat16),
    (every_operator_event(with_pow=True), torch.float32), (every_operator_event(with_pow=True), torch.float64),
], ids=["adam-float32", "adam-bfloat16", "operators-float32", "operators-float64"])
def test_kernel_compiles_for_cuda_with_vector_accesses(event, dtype, tmp_path, monkeypatch):
    """Compiled ahead of time for an H100 (sm_90), no GPU needed: the aligned full-block
    branch moves 16 bytes per access, and no two operations are fused into an FMA (the
    eager path rounds each one)."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("LIGHTNING_IMEX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = lower(event)
    source = ASTSource(fn=_import_kernel(triton_source(kernel, dtype)), signature=cuda_signature(kernel),
                       constexprs={"BLOCK": BLOCK})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": NUM_WARPS, "enable_fp_fusion": False}).asm["ptx"]
    vector = r"\.v(4\.b32|2\.b64) "
    assert re.search(r"ld\.global(\.\w+)*" + vector, ptx) and re.search(r"st\.global(\.\w+)*" + vector, ptx)
    if all(node[0] != "pow" for node in kernel.nodes):  # libdevice's pow uses FMAs inside
        assert "fma" not in ptx


def test_kernel_source_written_once_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_IMEX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    source = triton_source(lower(adam_event()), torch.float32)
    first, second = _import_kernel(source), _import_kernel(source)
    path, digest = sorted((tmp_path / "triton").iterdir())  # the source and its digest (lightning_imex.optim.cache)
    assert digest.name == path.name + ".sha256"
    assert path.read_text() == source and first.src == second.src and "def imex_kernel(" in first.src


def test_available(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not BACKEND.available(cpu, torch.float32) and not BACKEND.available(cuda, torch.int32)
    with warnings.catch_warnings(record=True) as caught:  # the probe kernel decides
        warnings.simplefilter("always")
        assert BACKEND.available(cuda, torch.bfloat16) == torch.cuda.is_available()
    assert torch.cuda.is_available() or "using the eager path" in str(caught[0].message)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKEND.available(cpu, torch.float64) and not BACKEND.available(torch.device("meta"), torch.float32)


def test_package_imports_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # as if not installed
import torch
import lightning_imex.optim
from lightning_imex.optim.triton_backend import BACKEND
assert not BACKEND.available(torch.device("cuda"), torch.float32)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

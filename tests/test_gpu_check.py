"""benchmarks/gpu_check.py, the one command that runs every GPU check: its plumbing on CPU
(``--dry-run``: Triton's interpreter, tiny sizes) writes a JSON and a markdown summary in
which every part passed, and without a GPU the real run refuses in one line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="here the real run would start")
def test_without_a_gpu_the_real_run_refuses(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no CUDA device here: .* pass --dry-run"):
        load_script().main()
    assert not any(tmp_path.iterdir())


def test_the_real_run_has_every_part():
    names = [part.name for part in load_script().parts(dry_run=False, work=Path("/nonexistent"))]
    expected = ["triton", "sync", "first_step_cold", "first_step_warm", "bench_clip_gpt2_float32", "bench_step",
                "bench_fit"]
    expected += [f"bench_optim_{s}_{d}" for d in ("float32", "bfloat16") for s in ("gpt2", "flat", "many")]
    assert set(expected) <= set(names)
    assert ("bench_memory" in names) == (SCRIPT.parent / "bench_memory.py").exists()


@pytest.mark.slow  # ~30 s on 2 busy cores: four processes that each import torch (and Lightning, Triton)
def test_dry_run_writes_a_passing_report(tmp_path):
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path),
                          "--only", "triton|sync|first_step"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = {part["name"]: part for part in report["parts"]}
    assert list(parts) == ["triton", "sync", "first_step_cold", "first_step_warm"]
    assert all(part["returncode"] == 0 for part in parts.values())
    assert parts["triton"]["result"] and set(parts["triton"]["result"].values()) == {"ok"}
    assert parts["sync"]["result"]["ok"] and parts["sync"]["result"]["guard"] == "works"
    cold, warm = parts["first_step_cold"]["result"], parts["first_step_warm"]["result"]
    assert cold["files_cached_before"] == 0 < warm["files_cached_before"]  # cold really started empty
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "| sync | ok |" in summary and "## triton: 2 of 2 checks ok" in summary

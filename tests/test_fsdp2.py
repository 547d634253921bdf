"""Under FSDP2 (``fully_shard``: DTensor parameters, uneven and empty local shards) every
optimizer, on the eager and the compiled path, ends where one process on the whole
model does: 2 gloo processes against 1, within 1e-6, on the full parameters and on every
rank's local shards of parameters and state. ClippedAdam(clip="global") clips by the
norm over the whole group across ranks, with the clipping active. 8-bit state quantizes
each rank's shard in blocks of its own: shards that start on a block boundary of the
whole weight give one process's codes and scales exactly. bfloat16 state rounds
stochastically with bits keyed by each element's offset in the whole weight (the shard's
offset, kernel.shard_offset, plus the element's in the shard), so it rounds as one
process does, uneven and empty shards included; placements that do not keep an
element's offset (a shard of columns) are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("fsdp2_run.py")

CONFIGS = ["imex_euler", "imex_trapezoidal", "imex_trapezoidal_reuse", "imex_ssp3_433", "adamax", "adamomentum",
           "clipped_coordinate", "clipped_global", "clipped_global_mixed", "imex_max_grad_norm",
           "imex_trapezoidal_8bit", "adamomentum_bf16"]  # as fsdp2_run.CONFIGS
KEYS = [f"{name}/fused={fused}" for name in CONFIGS for fused in (False, True)]
TOLERANCE = 1e-6
NARROW_STATE = {"imex_trapezoidal_8bit": "uint8", "adamomentum_bf16": "bfloat16"}  # the moments of the wide weights


def fsdp2_unavailable() -> str | None:
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this torch build"
    if not torch.distributed.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build"
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        return f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available: {error}"
    return None


pytestmark = [pytest.mark.slow,  # about 15 s: 2 processes, 24 trainings
              pytest.mark.skipif(fsdp2_unavailable() is not None, reason=str(fsdp2_unavailable()))]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """One run of the script for every configuration: the processes start once."""
    out = tmp_path_factory.mktemp("fsdp2") / "results.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0 and out.exists(), f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-6000:]}"
    found = json.loads(out.read_text())
    assert sorted(found) == sorted([*KEYS, "shard_offsets"])
    return found


@pytest.mark.parametrize("key", KEYS)
def test_fsdp2_two_processes_equal_one_process(results, key):
    result = results[key]
    if "skipped" in result:
        pytest.skip(f"{key}: {result['skipped']}")
    assert "error" not in result, f"{key} failed under FSDP2:\n{result['error']}"
    assert result["moved"] > 1e-3, f"{key}: the parameters barely moved, the comparison would be vacuous"
    assert result["param"] <= TOLERANCE, f"{key}: full parameters differ by {result['param']:.3g}"
    assert result["local"] <= TOLERANCE, f"{key}: local shards (parameters, state) differ by {result['local']:.3g}"
    narrow = NARROW_STATE.get(key.split("/")[0])
    if narrow:
        assert result["state_dtypes"] == [narrow] * 2, f"{key}: the wide weights' moments: {result['state_dtypes']}"
    if key.startswith(("clipped_global", "imex_max_grad_norm")):
        assert result["clip_active"], f"{key}: nothing is clipped, so the global norm goes untested"


def test_shard_offsets_follow_torch_chunk_and_column_shards_are_refused(results):
    """Each rank's shard offsets (uneven, empty, channels_last, 2-D meshes) are its first
    element's offset in the whole tensor; a Shard(1) parameter with bfloat16 state gets
    one clear error, before it moves."""
    checks = results["shard_offsets"]
    assert checks["offsets_match"], "kernel.shard_offset differs from the offset of a shard's first element"
    assert "Shard(0) or Replicate" in checks["refusal"] and "Shard(dim=1)" in checks["refusal"], checks["refusal"]
    assert checks["unchanged"], "the refused step changed the parameter"

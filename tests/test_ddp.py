"""Under DDP every gradient evaluation of a multi-gradient step is all-reduced: 2 gloo
processes on half batches end where 1 process on the whole batches does."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_fit import fit

SCRIPT = Path(__file__).with_name("ddp_fit.py")


def fit_in_two_processes(batch_size: int, out: Path) -> dict[str, torch.Tensor]:
    result = subprocess.run([sys.executable, str(SCRIPT), "2", str(batch_size), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_on_the_global_batch(tmp_path):
    two = fit_in_two_processes(8, tmp_path / "two.pt")
    one = fit(1, 16)[0].state_dict()  # here: rank r's batches interleave, together they are these
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)
    assert not torch.equal(one["net.0.weight"], two["net.0.weight"] * 0)

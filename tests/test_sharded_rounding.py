"""Stochastic rounding hashes each element's offset in the whole tensor: its local shard's
offset (``kernel.shard_offset``, nonzero under FSDP2) plus its offset in the shard. With
shard offsets standing in for FSDP2's (one per tensor, wrapping past 2**32 inside it),
the eager, C and Triton (interpreter) paths give the same bits, and other bits than
offset 0. tests/test_fsdp2.py checks the offsets of real shards, and a sharded run
against one process."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from torch import nn

from lightning_imex.optim import AdaMomentum, kernel
from bitwise import assert_same_bits

CASES = [(True, False)]  # test_triton_backend.py checks train(shifted=True, wide=False, fused=...) on Triton


def shifted_offset(t: torch.Tensor) -> int:
    return 2**32 - t.numel() // 2  # each tensor's element indices wrap past 2**32 at its middle


@contextmanager
def shard_offsets(shifted: bool) -> Iterator[None]:
    original = kernel.shard_offset
    kernel.shard_offset = shifted_offset if shifted else original
    try:
        yield
    finally:
        kernel.shard_offset = original


def train(shifted: bool, wide: bool, fused: bool):
    """(model, optimizer) after 3 steps with bfloat16 state; ``shifted``: every tensor
    taken for a shard at :func:`shifted_offset` of a larger one; ``wide``: with a weight of
    two C blocks (Triton's interpreter takes the narrow model: its blocks are smaller)."""
    torch.manual_seed(0)
    hidden = 180 if wide else 40
    net = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 100), nn.Tanh(), nn.Linear(100, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    with shard_offsets(shifted):
        opt = AdaMomentum(net.parameters(), lr=1e-2, state_dtype=torch.bfloat16, fused=fused)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return net, opt


def test_shard_offsets_give_the_same_bits_on_eager_and_c():
    eager = train(True, True, fused=False)
    assert_same_bits(eager, train(True, True, fused=True), torch.bfloat16)
    with pytest.raises(AssertionError):  # the offsets change the bits: the comparison is not vacuous
        assert_same_bits(eager, train(False, True, fused=False))

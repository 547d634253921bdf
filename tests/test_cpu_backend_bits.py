"""The generated C kernels' bit tricks against the eager path, on the vectorized loop
(enough elements that the scalar remainder is a small part): stochastic rounding over
every class of float32 bit pattern, and 8-bit codes at and between the maps' rounding
boundaries and where a value's quotient by its scale underflows (the C encoder divides
by multiplying with a reciprocal: cpu_backend's comment says why that is exact)."""

import pytest
import torch

from lightning_imex.optim.cpu_backend import BACKEND
from lightning_imex.optim.kernel import Batch
from lightning_imex.optim.program import QUANT_BLOCK, QUANT_MAPS, Event, quant_map_bias, tensor

pytestmark = pytest.mark.skipif(not BACKEND.available(torch.device("cpu"), torch.float32),
                                reason="no C compiler")


def both_paths(values: torch.Tensor, target: torch.Tensor, **storage) -> list[torch.Tensor]:
    """``target`` (and its scales) after storing ``values`` into it, on the eager then the C path."""
    results = []
    for backend in (None, BACKEND):
        buffers = {"p": [values], "m": [target.clone()]}
        if "quantized" in storage:
            buffers["m_scales"] = [torch.full((values.numel() // QUANT_BLOCK,), -1.0)]
        Batch([values], buffers, backend, **storage).run(Event(gradient=0, writes={"m": tensor("p")}), [None])
        results.append(torch.cat([buffers[name][0].view(torch.uint8).reshape(-1) for name in sorted(buffers)
                                  if name != "p"]))
    return results


def test_stochastic_rounding_matches_eager_on_every_bit_pattern():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    bits[:4096] |= 0x7F800000  # infinities and NaN with every kind of payload, both signs
    bits[4096:4352] = 0x7F7FFF00 + torch.arange(256, dtype=torch.int32)  # rounds up into infinity or not
    bits[4352:4608] = torch.arange(256, dtype=torch.int32)  # subnormals
    values = bits.view(torch.float32)
    eager, compiled = both_paths(values, torch.ones(values.numel(), dtype=torch.bfloat16), stochastic=("m",),
                                 keys=[12345])
    assert torch.equal(eager, compiled)


def ulps_around(x: torch.Tensor, count: int) -> torch.Tensor:
    """Each of ``x`` and its ``count`` float32 neighbours on either side."""
    steps = torch.arange(-count, count + 1, dtype=torch.int32)
    return (x.view(torch.int32)[:, None] + steps).reshape(-1).view(torch.float32)


@pytest.mark.parametrize("kind", list(QUANT_MAPS))
def test_8bit_codes_match_eager_at_the_maps_boundaries(kind):
    """Values within a few ulps of the boundaries between neighbouring codes, both signs,
    under scales that are not powers of two (where C's product with the scale's
    reciprocal must round as the eager path's); and values whose product is at or next
    to -2^-150, below which it rounds to -0 (code 0) rather than to -2^-149 (code 128
    when signed)."""
    # where the rounded 3 leading mantissa bits step: bits 2^19 past a code's
    k = torch.arange(QUANT_MAPS[kind], dtype=torch.int32)
    midpoints = (((k + quant_map_bias(kind)) << 20) + (1 << 19)).view(torch.float32).double()
    blocks = []
    for scale in (1.0, 3.0, 0.7, 12345.678):
        ladder = ulps_around((midpoints * scale).float(), 4)
        ladder = torch.cat([ladder, -ladder]).clamp(-scale, scale)
        for chunk in ladder.split(QUANT_BLOCK - 1):
            blocks.append(torch.cat([chunk, torch.full((QUANT_BLOCK - chunk.numel(),), scale)]))
    for odd in (3, 5, 7, 9, 11, 13):
        tie = torch.tensor([-odd * 2.0**-140])  # over the scale odd * 2^10: exactly -2^-150
        block = torch.zeros(QUANT_BLOCK)
        block[:3], block[-1] = ulps_around(tie, 1), odd * 2.0**10
        blocks.append(block)
    values = torch.cat(blocks)
    eager, compiled = both_paths(values, torch.zeros(values.numel(), dtype=torch.uint8), quantized={"m": kind})
    assert torch.equal(eager, compiled)

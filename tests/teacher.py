"""A small full-batch regression on which low-precision storage shows its cost: an
8-32-32-1 tanh MLP (its 32x32 weight is 4 blocks of 8-bit state) fitted to a random
teacher network, from the same weights and data for every setting."""

from __future__ import annotations

import torch
from torch import nn

from lightning_imex.optim import IMEXAdam

__all__ = ["regression_fit"]


def regression_fit(dtype: torch.dtype = torch.float32, steps: int = 100, lr: float = 3e-4, tableau: str = "euler",
                   **settings) -> float:
    """The float32 mean squared error after ``steps`` full-batch IMEXAdam steps of the
    network in ``dtype`` (about 22.5 at the start)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        y = teacher(x)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)
    opt = IMEXAdam(net.parameters(), lr=lr, tableau=tableau, fused=False, seed=0, **settings)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x.to(dtype)).float(), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        return nn.functional.mse_loss(net.float()(x), y).item()

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

# One thread per test process (pytest-xdist runs one per core, and DDP tests start two
# more): torch's default of a thread per core oversubscribes the cores, and OpenMP's
# spinning threads then make small steps ten times slower. Subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def make_data(seed: int = 1, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def loss_closure(model, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, counter=None):
    """The usual closure: clear gradients, cross-entropy, backward, return the loss."""
    def closure():
        if counter is not None:
            counter[0] += 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


# CUDA where the machine has it (the fused path's default there), CPU always.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def train(net: nn.Module, make_optimizer, steps: int, data=None, use_closure: bool = True, device: str = "cpu"):
    """Trains a copy of ``net`` full-batch; returns (model, optimizer, closure calls)."""
    model = copy.deepcopy(net).to(device)
    x, y = (t.to(device) for t in (data if data is not None else make_data()))
    opt = make_optimizer(model.parameters())
    calls = [0]
    closure = loss_closure(model, opt, x, y, calls)
    for _ in range(steps):
        if use_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
    return model, opt, calls[0]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture
def net() -> nn.Module:
    return make_net()

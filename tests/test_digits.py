"""Every optimizer (IMEX: every positivity-preserving tableau) trains logistic regression
on sklearn's digits to >= 90% training accuracy."""

import pytest
import torch
from conftest import loss_closure
from sklearn.datasets import load_digits
from torch import nn

from lightning_imex.optim import TABLEAUX, AdaMax, AdaMomentum, ClippedAdam, IMEXAdam


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("cls,kwargs", [
    *((IMEXAdam, {"tableau": name}) for name, t in TABLEAUX.items() if t.positivity_preserving),
    (IMEXAdam, {"tableau": "trapezoidal", "reuse_gradient": True}),
    (AdaMax, {}),
    (AdaMomentum, {}),
    (ClippedAdam, {"clip": "coordinate"}),
    (ClippedAdam, {"clip": "global", "max_update": 0.5}),
])
def test_logistic_regression_on_digits(digits, cls, kwargs):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    opt = cls(model.parameters(), lr=0.05, **kwargs)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # epochs of minibatches of 128
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.step(loss_closure(model, opt, x[idx], y[idx]))
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.90

"""A multilayer perceptron."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ..validate import boolean, fraction
from .fields import activation as _activation
from .fields import sizes


class MLP(nn.Sequential):
    """Fully connected layers on the flattened input (the Adam paper's MNIST MLP is
    ``hidden=[1000, 1000]``, ``activation="relu"``, ``dropout=0.5``)."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (256, 256),
                 activation: str = "relu", dropout: float = 0.0, batch_norm: bool = False) -> None:
        hidden, dropout = sizes("hidden", hidden), fraction("model.dropout", dropout, note=" (a drop probability)")
        batch_norm, nonlinearity = boolean("model.batch_norm", batch_norm), _activation(activation)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(nonlinearity())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)

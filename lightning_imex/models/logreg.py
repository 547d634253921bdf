"""Multinomial logistic regression (linear regression for a regression task)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


class LogisticRegression(nn.Sequential):
    """Multinomial logistic (or linear, for regression) model on the flattened input."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))

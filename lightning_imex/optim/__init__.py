"""Optimizers (pure torch): IMEX Runge-Kutta Adam and its tableaux, AdaMax, AdaMomentum,
clipped Adam, and the name -> class registry that configs and factories use."""

from typing import Mapping

import torch

from .adamax import AdaMax
from .adamomentum import AdaMomentum
from .clipped_adam import ClippedAdam
from .imex_adam import IMEXAdam, PositivityWarning
from .tableau import TABLEAUX, IMEXTableau, get_tableau

OPTIMIZERS: Mapping[str, type[torch.optim.Optimizer]] = {
    "imex_adam": IMEXAdam,
    "adamax": AdaMax,
    "adamomentum": AdaMomentum,
    "clipped_adam": ClippedAdam,
    # torch's own, as baselines
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}

__all__ = ["AdaMax", "AdaMomentum", "ClippedAdam", "IMEXAdam", "IMEXTableau", "OPTIMIZERS",
           "PositivityWarning", "TABLEAUX", "get_tableau"]

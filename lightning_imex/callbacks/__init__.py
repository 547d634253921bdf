"""Lightning callbacks: :class:`ModelEMA`, the model EMA; :class:`TrainingCost`, the
gradient evaluations and seconds a fit spends."""

from .cost import TrainingCost
from .ema import ModelEMA

__all__ = ["ModelEMA", "TrainingCost"]

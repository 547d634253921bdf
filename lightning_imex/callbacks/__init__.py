"""Lightning callbacks: :class:`ModelEMA`, the model EMA; :class:`PostHocEMA`, snapshots
of power-function EMAs for a post-hoc EMA of any width; :class:`TrainingCost`, the
gradient evaluations and seconds a fit spends."""

from .cost import TrainingCost
from .ema import ModelEMA
from .posthoc_ema import PostHocEMA

__all__ = ["ModelEMA", "PostHocEMA", "TrainingCost"]

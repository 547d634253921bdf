"""Lightning callbacks: :class:`ModelEMA`, the model EMA."""

from .ema import ModelEMA

__all__ = ["ModelEMA"]

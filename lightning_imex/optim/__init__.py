"""Optimizers (pure torch): IMEX Runge-Kutta Adam and its tableaux."""

from .imex_adam import IMEXAdam, PositivityWarning
from .tableau import TABLEAUX, IMEXTableau, get_tableau

__all__ = ["IMEXAdam", "IMEXTableau", "PositivityWarning", "TABLEAUX", "get_tableau"]

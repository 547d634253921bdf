"""Optimizers (pure torch): IMEX Runge-Kutta Adam and its tableaux, AdaMax, AdaMomentum,
clipped Adam, and the name -> class registry that configs and factories use.

Importing the package loads none of them, nor torch: a name loads its module on first use
(a module ``__getattr__``, PEP 562), so ``import lightning_imex``, which registers
Lightning's closure adapter in :mod:`.closure`, leaves a command line's ``--help`` the
seconds of torch's import."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names as type checkers and editors see them
    from typing import Mapping

    import torch

    from .adamax import AdaMax
    from .adamomentum import AdaMomentum
    from .clipped_adam import ClippedAdam
    from .imex_adam import IMEXAdam, PositivityWarning
    from .tableau import TABLEAUX, IMEXTableau, get_tableau

    OPTIMIZERS: Mapping[str, type[torch.optim.Optimizer]]

_MODULES = {"AdaMax": "adamax", "AdaMomentum": "adamomentum", "ClippedAdam": "clipped_adam", "IMEXAdam": "imex_adam",
            "PositivityWarning": "imex_adam", "IMEXTableau": "tableau", "TABLEAUX": "tableau", "get_tableau": "tableau"}

__all__ = ["AdaMax", "AdaMomentum", "ClippedAdam", "IMEXAdam", "IMEXTableau", "OPTIMIZERS",
           "PositivityWarning", "TABLEAUX", "get_tableau"]


def _registry() -> Mapping[str, type[torch.optim.Optimizer]]:
    import torch

    from .adamax import AdaMax
    from .adamomentum import AdaMomentum
    from .clipped_adam import ClippedAdam
    from .imex_adam import IMEXAdam

    return {
        "imex_adam": IMEXAdam,
        "adamax": AdaMax,
        "adamomentum": AdaMomentum,
        "clipped_adam": ClippedAdam,
        # torch's own, as baselines
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
    }


def __getattr__(name: str) -> Any:
    if name == "OPTIMIZERS":
        value: Any = _registry()
    elif name in _MODULES:
        value = getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # kept: one registry, and the next use is a plain lookup
    return value

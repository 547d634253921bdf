"""lightning_imex: IMEX Runge-Kutta Adam optimizers, model EMA and Lightning glue.

Importing this package (or ``lightning_imex.optim``) pulls in torch only; the Lightning
names below load Lightning on first use.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_LIGHTNING = {
    "IMEXModule": "module",
    "configure_optimizers": "factory",
    "GradientClipping": "clipping",
    "clip_gradients": "clipping",
    "NonFiniteGradientError": "clipping",
}
__all__ = ["__version__", *_LIGHTNING]


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        return getattr(importlib.import_module(f".{_LIGHTNING[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

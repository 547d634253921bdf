"""lightning_imex: IMEX Runge-Kutta Adam optimizers, model EMA and Lightning glue.

Importing this package (or ``lightning_imex.optim``) loads neither torch nor Lightning:
the optimizers load torch on first use (:mod:`lightning_imex.optim`), the names below
Lightning, so a command line's ``--help`` or error answers in a fraction of a second.
"""

import importlib
from typing import Any

from .optim.closure import register_closure_adapter

# An optimizer step handed Lightning's training closure calls it through this adapter
# (imported then, with Lightning already running): right in any LightningModule. The
# registry imports no torch.
register_closure_adapter("lightning", "lightning_imex.multigradient:lightning_closure_calls")

__version__ = "0.1.0"

_LIGHTNING = {
    "IMEXModule": "module",
    "gradient_evaluation": "multigradient",
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

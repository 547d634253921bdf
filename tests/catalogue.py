"""One catalogue of the package's optimizer configurations for the tests: every tableau
family, gradient reuse, coupled and decoupled weight decay, maximize, no bias correction,
AdaMax, AdaMomentum and both clipping modes of ClippedAdam. A test parametrised over
:data:`CATALOGUE` covers an optimizer or option added here; tests that need other
hyper-parameters (a clipping bound that must bite, a learning rate) replace them on top
(``{**kwargs, "max_update": ...}``)."""

from __future__ import annotations

import pytest

from lightning_imex.optim import AdaMax, AdaMomentum, ClippedAdam, IMEXAdam

CATALOGUE = {
    "imex_euler": (IMEXAdam, {"tableau": "euler"}),
    "imex_euler_decoupled": (IMEXAdam, {"tableau": "euler", "weight_decay": 0.1, "decoupled_weight_decay": True}),
    "imex_trapezoidal": (IMEXAdam, {"tableau": "trapezoidal"}),
    "imex_trapezoidal_reuse": (IMEXAdam, {"tableau": "trapezoidal", "reuse_gradient": True, "weight_decay": 0.01}),
    "imex_ssp3_433": (IMEXAdam, {"tableau": "ssp3_433", "weight_decay": 0.01, "decoupled_weight_decay": True,
                                 "maximize": True}),
    "imex_trapezoidal_pc": (IMEXAdam, {"tableau": "trapezoidal_pc", "bias_correction": False}),
    "adamax": (AdaMax, {"weight_decay": 0.01}),
    "adamomentum": (AdaMomentum, {"weight_decay": 0.01}),
    "clipped_coordinate": (ClippedAdam, {"max_update": 1e-3}),
    "clipped_global": (ClippedAdam, {"clip": "global", "max_update": 1e-3, "bias_correction": True}),
}


def catalogue_params(*names: str) -> list:
    """``pytest.param(cls, kwargs, id=name)`` for ``names`` (every entry if none), for
    ``@pytest.mark.parametrize("cls, kwargs", catalogue_params())``."""
    return [pytest.param(*CATALOGUE[name], id=name) for name in names or CATALOGUE]

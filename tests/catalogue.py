"""One catalogue of the package's optimizer configurations for the tests: every tableau
family, gradient reuse, coupled and decoupled weight decay, maximize, no bias correction,
AdaMax, AdaMomentum and both clipping modes of ClippedAdam. A test parametrised over
:data:`CATALOGUE` covers an optimizer or option added here; tests that need other
hyper-parameters (a clipping bound that must bite, a learning rate) replace them on top
(``{**kwargs, "max_update": ...}``).

Tests over every built-in tableau draw :func:`every_tableau` (the catalogue's entry where
it has one by that name); tests over a chosen set draw :func:`configs`."""

from __future__ import annotations

from lightning_imex.optim import TABLEAUX, AdaMax, AdaMomentum, ClippedAdam, IMEXAdam

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
    import pytest  # here: the scripts the tests run (triton_interpret_run.py) import this module without pytest

    return [pytest.param(*CATALOGUE[name], id=name) for name in names or CATALOGUE]


def every_tableau() -> dict[str, tuple[type, dict]]:
    """IMEXAdam on every built-in tableau (``imex_{name}``) and with gradient reuse on each
    that allows it (``imex_{name}_reuse``, with coupled weight decay): the catalogue's
    entry where it has one by that name, else the tableau's alone."""
    family = {f"imex_{name}": (IMEXAdam, {"tableau": name}) for name in TABLEAUX}
    family.update({f"imex_{name}_reuse": (IMEXAdam, {"tableau": name, "reuse_gradient": True, "weight_decay": 0.01})
                   for name, tableau in TABLEAUX.items() if tableau.allows_gradient_reuse})
    return {name: CATALOGUE.get(name, config) for name, config in family.items()}


def configs(*names: str) -> dict[str, tuple[type, dict]]:
    """``name -> (cls, kwargs)`` for ``names``, from :data:`CATALOGUE` and :func:`every_tableau`."""
    known = {**every_tableau(), **CATALOGUE}
    return {name: known[name] for name in names}

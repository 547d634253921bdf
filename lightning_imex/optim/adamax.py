"""AdaMax: Adam's infinity-norm variant (Kingma & Ba, Algorithm 2; ALGORITHMS.md section 1)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Hashable, Iterable

from torch import Tensor

from .base import OnePassOptimizer, Program, gradient_flags, number
from .kernel import Event

__all__ = ["AdaMax"]


@lru_cache(maxsize=None)
def _adamax_event(maximize: bool, l2: bool, decoupled: bool) -> tuple[Event, tuple[Hashable, ...]]:
    prog = Program()
    c = prog.c
    prog.gradient(maximize, l2)
    prog.add("lin", "m_new", ((c("b1"), "m"), (c("1-b1"), "g")))         # m = b1 m + (1-b1) g
    prog.add("abs", "abs_g", "g")
    prog.add("lin", "abs_g", ((None, "abs_g"), (c("eps"), None)))
    prog.add("lin", "u_decayed", ((c("b2"), "v"),))
    prog.add("max", "u_new", "u_decayed", "abs_g")                        # u = max(b2 u, |g| + eps)
    prog.add("div", "step", "m_new", "u_new")
    base = (c("decay"), "p") if decoupled else (None, "p")
    prog.add("lin", "p_new", (base, (c("-lr/(1-b1^k)"), "step")))        # theta -= lr/(1-b1^k) m/u
    return prog.event([("m", "m_new"), ("v", "u_new"), ("p", "p_new")]), tuple(prog.keys)


class AdaMax(OnePassOptimizer):
    """AdaMax (Kingma & Ba 2014, Algorithm 2): ``u = max(b2 u, |g| + eps)``, no bias
    correction on ``u``, ``eps`` placed as ``torch.optim.Adamax`` places it.

    State: ``exp_avg`` and ``exp_inf`` (torch's names). ``weight_decay`` is L2 added to
    the gradient, or decoupled (``theta *= 1 - lr*wd``) with ``decoupled_weight_decay``.
    ``fused``: as :class:`IMEXAdam`.
    """

    buffers = ("exp_avg", "exp_inf")

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 2e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, maximize: bool = False, *, fused: bool | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, fused)

    def _event(self, group: dict[str, Any]):
        return _adamax_event(*gradient_flags(group))

    def _coefficients(self, group: dict[str, Any], step: int) -> dict[Hashable, float]:
        b1 = group["betas"][0]
        return {**self._moment_coefficients(group), "-lr/(1-b1^k)": -number("lr", group["lr"]) / (1 - b1 ** (step + 1))}

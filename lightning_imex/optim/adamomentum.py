"""AdaMomentum / AdaM3 (Wang et al., arXiv 2106.11514; ALGORITHMS.md section 3)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Hashable, Iterable

from torch import Tensor

from .base import OnePassOptimizer, Program, gradient_flags, number
from .kernel import Event

__all__ = ["AdaMomentum"]


@lru_cache(maxsize=None)
def _adamomentum_event(maximize: bool, l2: bool, decoupled: bool) -> tuple[Event, tuple[Hashable, ...]]:
    prog = Program()
    c = prog.c
    prog.gradient(maximize, l2)
    prog.add("lin", "m_new", ((c("b1"), "m"), (c("1-b1"), "g")))                    # m = b1 m + (1-b1) g
    prog.add("mul", "m_sq", "m_new", "m_new")
    prog.add("lin", "v_new", ((c("b2"), "v"), (c("1-b2"), "m_sq"), (c("eps"), None)))  # v = b2 v + (1-b2) m^2 + eps
    prog.add("u", "step", "m_new", "v_new", c("1/(1-b1^k)"), c("1/sqrt(1-b2^k)"), c("zero"))  # no eps outside
    base = (c("decay"), "p") if decoupled else (None, "p")
    prog.add("lin", "p_new", (base, (c("-lr"), "step")))
    return prog.event([("m", "m_new"), ("v", "v_new"), ("p", "p_new")]), tuple(prog.keys)


class AdaMomentum(OnePassOptimizer):
    """AdaMomentum (also AdaM3): the second moment tracks the squared *updated* momentum,
    with ``eps`` added inside it every step (so it accumulates: after bias correction
    ``v`` never falls below ``eps / (1 - b2)``) and none outside the square root.

    Weight decay is decoupled (``theta *= 1 - lr*wd``) by default, plain L2 with
    ``decoupled_weight_decay=False``. The paper uses ``eps=1e-16`` for language and GAN
    tasks. ``fused``: as :class:`IMEXAdam`.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = True, maximize: bool = False, *, fused: bool | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, fused)

    def _event(self, group: dict[str, Any]):
        return _adamomentum_event(*gradient_flags(group))

    def _coefficients(self, group: dict[str, Any], step: int) -> dict[Hashable, float]:
        (b1, b2), k = group["betas"], step + 1
        return {**self._moment_coefficients(group), "-lr": -number("lr", group["lr"]),
                "1/(1-b1^k)": 1 / (1 - b1 ** k), "1/sqrt(1-b2^k)": 1 / math.sqrt(1 - b2 ** k), "zero": 0.0}

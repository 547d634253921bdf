"""AdaMomentum / AdaM3 (Wang et al., arXiv 2106.11514; docs/algorithms.md, section 3)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable

import torch
from torch import Tensor

from .base import B1, B2, EPS, LR, K, OnePassOptimizer, decayed, gradient, gradient_flags
from .program import Event, sqrt, tensor

__all__ = ["AdaMomentum"]


@lru_cache(maxsize=None)
def adamomentum_event(maximize: bool, l2: bool, decoupled: bool) -> Event:
    p, g, m, v = tensor("p"), tensor("g"), tensor("m"), tensor("v")
    g = gradient(g, p, maximize, l2)
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * m * m + EPS  # the updated m; eps accumulates
    p = decayed(p, decoupled) - LR * (m / (1 - B1 ** K)) / sqrt(v / (1 - B2 ** K))  # no eps outside
    return Event(gradient=1, writes={"m": m, "v": v, "p": p})


class AdaMomentum(OnePassOptimizer):
    """AdaMomentum (also AdaM3): the second moment tracks the squared *updated* momentum,
    with ``eps`` added inside it every step (so it accumulates: after bias correction
    ``v`` never falls below ``eps / (1 - b2)``) and none outside the square root.

    Weight decay is decoupled (``theta *= 1 - lr*wd``) by default, plain L2 with
    ``decoupled_weight_decay=False``. The paper uses ``eps=1e-16`` for language and GAN
    tasks. ``fused``, ``max_grad_norm``, ``state_dtype``, ``seed``, ``param_rounding``: as :class:`IMEXAdam`.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = True, maximize: bool = False, *, fused: bool | None = None,
                 max_grad_norm: float | None = None,
                 state_dtype: torch.dtype | str | None = None, seed: int = 0, param_rounding: str = "nearest") -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, fused, state_dtype, seed, param_rounding)

    def _events(self, group: dict[str, Any]) -> tuple[Event, ...]:
        return (adamomentum_event(*gradient_flags(group)),)

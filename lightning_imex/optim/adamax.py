"""AdaMax: Adam's infinity-norm variant (Kingma & Ba, Algorithm 2; docs/algorithms.md, section 1)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable

import torch
from torch import Tensor

from .base import B1, B2, EPS, LR, K, OnePassOptimizer, decayed, gradient, gradient_flags
from .program import Event, maximum, tensor

__all__ = ["AdaMax"]


@lru_cache(maxsize=None)
def adamax_event(maximize: bool, l2: bool, decoupled: bool) -> Event:
    p, g, m, u = tensor("p"), tensor("g"), tensor("m"), tensor("v")
    g = gradient(g, p, maximize, l2)
    m = B1 * m + (1 - B1) * g
    u = maximum(B2 * u, abs(g) + EPS)
    p = decayed(p, decoupled) - LR / (1 - B1 ** K) * m / u
    return Event(gradient=1, writes={"m": m, "v": u, "p": p})


class AdaMax(OnePassOptimizer):
    """AdaMax (Kingma & Ba 2014, Algorithm 2): ``u = max(b2 u, |g| + eps)``, no bias
    correction on ``u``, ``eps`` placed as ``torch.optim.Adamax`` places it.

    State: ``exp_avg`` and ``exp_inf`` (torch's names). ``weight_decay`` is L2 added to
    the gradient, or decoupled (``theta *= 1 - lr*wd``) with ``decoupled_weight_decay``.
    ``fused``, ``max_grad_norm``, ``state_dtype``, ``seed``, ``param_rounding``: as :class:`IMEXAdam`.
    """

    state_buffers = ("exp_avg", "exp_inf")

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 2e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, maximize: bool = False, *, fused: bool | None = None,
                 max_grad_norm: float | None = None,
                 state_dtype: torch.dtype | str | None = None, seed: int = 0, param_rounding: str = "nearest") -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, fused, state_dtype, seed, param_rounding)

    def _events(self, group: dict[str, Any]) -> tuple[Event, ...]:
        return (adamax_event(*gradient_flags(group)),)

"""Adam with its update clipped to a trust radius (Ahn & Cutkosky 2024; docs/algorithms.md, section 4)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Hashable, Iterable

import torch
from torch import Tensor

from ..ema import SCHEDULES as EMA_SCHEDULES  # the EMA core is pure torch, at this layer
from .base import B1, B2, EPS, LR, K, GradientClip, OnePassOptimizer, decayed, gradient, gradient_flags, number
from .kernel import Batch, all_reduce_sum, reduction_key
from .program import Event, Expr, clamp, runtime, scalar, sqrt, tensor

__all__ = ["ClippedAdam", "CLIP_MODES"]

CLIP_MODES = ("coordinate", "global")


RADIUS = scalar("radius")  # the trust radius D


@lru_cache(maxsize=None)
def clipped_events(clip: str, bias_correction: bool, maximize: bool, l2: bool, decoupled: bool) -> tuple[Event, ...]:
    p, g, m, v = tensor("p"), tensor("g"), tensor("m"), tensor("v")

    def update(m: Expr, v: Expr) -> Expr:
        """u = lr m / (sqrt(v) + eps), each moment bias-corrected when asked."""
        if bias_correction:
            return LR * (m / (1 - B1 ** K)) / (sqrt(v / (1 - B2 ** K)) + EPS)
        return LR * m / (sqrt(v) + EPS)

    g = gradient(g, p, maximize, l2)
    m_new = B1 * m + (1 - B1) * g
    v_new = B2 * v + (1 - B2) * g * g
    if clip == "coordinate":
        p_new = decayed(p, decoupled) - clamp(update(m_new, v_new), -RADIUS, RADIUS)
        return (Event(gradient=1, writes={"m": m_new, "v": v_new, "p": p_new}),)
    # global: the moments and ||u||^2 first; the update, scaled into the radius, in a second pass
    moments = Event(gradient=1, writes={"m": m_new, "v": v_new}, reduce=update(m_new, v_new))
    scaled = Event(gradient=1, writes={"p": decayed(p, decoupled) - runtime("scale") * update(m, v)})
    return moments, scaled


class ClippedAdam(OnePassOptimizer):
    """Adam whose *update* ``lr m / (sqrt(v) + eps)`` is clipped to the trust radius
    ``max_update`` (default: the group's lr): per coordinate (``clip="coordinate"``,
    the form with the per-coordinate guarantee) or by the update's L2 norm over the
    parameter group (``clip="global"``, one extra read of the moments). No bias
    correction by default, as analysed. ``fused``, ``max_grad_norm`` (the gradient's
    clipping, before any of this), ``state_dtype``, ``seed``, ``param_rounding``: as :class:`IMEXAdam`.

    :meth:`ahn_cutkosky` gives the paper's coupling: ``betas=(beta, beta**2)`` and a
    model EMA with decay ``beta``, zero start and bias correction, which
    ``ModelEMA(decay="optimizer")`` reads from ``param_groups[0]["betas"][0]`` and
    ``param_groups[0]["ema_schedule"]``.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, max_update: float | None = None,
                 clip: str = "coordinate", bias_correction: bool = False, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, maximize: bool = False, *, fused: bool | None = None,
                 ema_schedule: str | None = None, max_grad_norm: float | None = None,
                 state_dtype: torch.dtype | str | None = None, seed: int = 0, param_rounding: str = "nearest") -> None:
        if ema_schedule is not None and ema_schedule not in EMA_SCHEDULES:
            raise ValueError(f"ema_schedule must be one of {EMA_SCHEDULES} or None, got {ema_schedule!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, max_update=max_update, clip=clip,
                        bias_correction=bias_correction, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, ema_schedule=ema_schedule,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, fused, state_dtype, seed, param_rounding)

    @classmethod
    def ahn_cutkosky(cls, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3, beta: float = 0.99,
                     **kwargs: Any) -> "ClippedAdam":
        """The analysed configuration: ``b2 = b1**2``, no bias correction, and an EMA of the
        model with decay ``beta`` from zero, bias-corrected (``ema_schedule="zero_start"``)."""
        return cls(params, lr=lr, betas=(beta, beta * beta), bias_correction=False,
                   ema_schedule="zero_start", **kwargs)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if group["clip"] not in CLIP_MODES:
            raise ValueError(f"clip must be one of {', '.join(map(repr, CLIP_MODES))}, got {group['clip']!r}")
        radius = group["max_update"]
        if radius is not None and not (number("max_update", radius) >= 0 and math.isfinite(radius)):
            raise ValueError(f"max_update must be a finite number >= 0 or None (the lr), got {radius!r}")

    def _events(self, group: dict[str, Any]) -> tuple[Event, ...]:
        return clipped_events(group["clip"], group["bias_correction"], *gradient_flags(group))

    def _scalars(self, group: dict[str, Any], step: int) -> dict[Hashable, float]:
        return {**super()._scalars(group, step), "radius": self._radius(group)}

    @staticmethod
    def _radius(group: dict[str, Any]) -> float:
        return number("lr", group["lr"]) if group["max_update"] is None else float(group["max_update"])

    def _apply(self, group: dict[str, Any], events: tuple[Event, ...], batches: list[Batch],
               clip: GradientClip | None) -> None:
        if len(events) == 1:
            return super()._apply(group, events, batches, clip)
        moments, scaled = events
        device = batches[0].buffers["p"][0].device
        # ||u||^2 per sharding layout, each summed over the ranks that shard it, then added
        squares: dict[tuple | None, list[Tensor]] = {}
        for batch in batches:
            sums = self._run(batch, moments, self._gradients(batch.params), clip)
            squares.setdefault(reduction_key(batch.params[0]), []).extend(s.to(device, torch.float64) for s in sums)
        norm = sum(all_reduce_sum(torch.stack(s).sum(), key) for key, s in squares.items()).sqrt()
        # min(1, D / ||u||) without 0/0: radius 0 (lr 0) or a zero update leave p unmoved
        radius = self._radius(group)
        scale = torch.where(norm > radius, radius / torch.clamp(norm, min=1e-30), torch.ones_like(norm))
        for batch in batches:
            self._run(batch, scaled, [None] * len(batch.params), None, {"scale": scale})

"""Adam with its update clipped to a trust radius (Ahn & Cutkosky 2024; ALGORITHMS.md section 4)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Hashable, Iterable

import torch
from torch import Tensor

from .base import OnePassOptimizer, Program, gradient_flags, number
from .kernel import Batch, Event

__all__ = ["ClippedAdam", "CLIP_MODES"]

CLIP_MODES = ("coordinate", "global")


@lru_cache(maxsize=None)
def _clipped_events(clip: str, maximize: bool, l2: bool, decoupled: bool) -> tuple[tuple[Event, ...], tuple[Hashable, ...]]:
    prog = Program()
    c = prog.c
    prog.gradient(maximize, l2)
    prog.add("lin", "m_new", ((c("b1"), "m"), (c("1-b1"), "g")))
    prog.add("mul", "g_sq", "g", "g")
    prog.add("lin", "v_new", ((c("b2"), "v"), (c("1-b2"), "g_sq")))
    # u = lr m / (sqrt(v) + eps), each moment divided by its bias correction when enabled
    update = ("u", "update", "m_new", "v_new", c("lr/(1-b1^k)"), c("1/sqrt(1-b2^k)"), c("eps"))
    base = (c("decay"), "p") if decoupled else (None, "p")
    if clip == "coordinate":
        prog.add(*update)
        prog.add("clamp", "update", "update", c("radius"))
        prog.add("lin", "p_new", (base, (c("minus_one"), "update")))
        return (prog.event([("m", "m_new"), ("v", "v_new"), ("p", "p_new")]),), tuple(prog.keys)
    # global: the moments and ||u||^2 first; the update, scaled to the radius, in a second pass
    prog.add(*update)
    first = prog.event([("m", "m_new"), ("v", "v_new")], reduce="update")
    prog.add("u", "update", "m", "v", *update[4:])
    prog.add("lin", "p_new", (base, (c("-scale"), "update")))
    second = prog.event([("p", "p_new")])
    keys = tuple(prog.keys)
    assert keys[-1] == "-scale"  # known only after the first pass: appended at run time
    return (first, second), keys[:-1]


class ClippedAdam(OnePassOptimizer):
    """Adam whose *update* ``lr m / (sqrt(v) + eps)`` is clipped to the trust radius
    ``max_update`` (default: the group's lr): per coordinate (``clip="coordinate"``,
    the form with the per-coordinate guarantee) or by the update's L2 norm over the
    parameter group (``clip="global"``, one extra read of the moments). No bias
    correction by default, as analysed. ``fused``: as :class:`IMEXAdam`.

    :meth:`ahn_cutkosky` gives the paper's coupling: ``betas=(beta, beta**2)`` and a
    model EMA with decay ``beta``, zero start and bias correction, which
    ``ModelEMA(decay="optimizer")`` reads from ``param_groups[0]["betas"][0]`` and
    ``param_groups[0]["ema_schedule"]``.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, max_update: float | None = None,
                 clip: str = "coordinate", bias_correction: bool = False, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, maximize: bool = False, *, fused: bool | None = None,
                 ema_schedule: str | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, max_update=max_update, clip=clip,
                        bias_correction=bias_correction, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, ema_schedule=ema_schedule)
        super().__init__(params, defaults, fused)

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

    def _event(self, group: dict[str, Any]):
        return _clipped_events(group["clip"], *gradient_flags(group))

    def _coefficients(self, group: dict[str, Any], step: int) -> dict[Hashable, float]:
        lr, (b1, b2), k = number("lr", group["lr"]), group["betas"], step + 1
        corrected = group["bias_correction"]
        return {**self._moment_coefficients(group), "minus_one": -1.0,
                "lr/(1-b1^k)": lr / (1 - b1 ** k) if corrected else lr,
                "1/sqrt(1-b2^k)": 1 / math.sqrt(1 - b2 ** k) if corrected else 1.0,
                "radius": self._radius(group)}

    @staticmethod
    def _radius(group: dict[str, Any]) -> float:
        return number("lr", group["lr"]) if group["max_update"] is None else float(group["max_update"])

    def _apply(self, group: dict[str, Any], events: tuple[Event, ...], batches: list[Batch]) -> None:
        if len(events) == 1:
            return super()._apply(group, events[0], batches)
        first, second = events
        sums = [s for batch in batches for s in batch.run(first, self._gradients(batch.params))]
        device = sums[0].device
        norm = torch.stack([s.to(device) for s in sums]).sum().sqrt()
        scale = torch.clamp(self._radius(group) / norm, max=1.0)  # norm 0: no clipping
        for batch in batches:
            batch.run(second, [None] * len(batch.params), extra_coefficient=-scale)

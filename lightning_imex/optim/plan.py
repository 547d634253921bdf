"""Turns an IMEX tableau into the element-wise work of one optimizer step.

One step of the IMEX scheme (``docs/optimizer-core.md``) interleaves element-wise work with
gradient evaluations. In coefficient form (:func:`~.tableau.moment_rows`) every stage
moment is a linear combination of the step's start moment and the gradients seen so
far, so between two gradient evaluations there is one *event*: a single pass over each
tensor that folds the new gradient into running sums, evaluates the update directions
``u(m_i, v_i)`` that became computable, and writes the parameters of the next stage.
Stages with identical moments (``ssp3_433``'s first two) share one direction; stages at
the same point share one parameter write; a stage at theta_{n+1} is written once.
Trapezoidal thus costs one Adam-like pass plus one moment pass per step.

Which stages coincide is the tableau's :class:`~.tableau.Geometry`; this module writes
the events (:class:`~.program.Event`) over named scalars whose values
:meth:`Plan.scalars` gives for a step. Events depend only on structure, never on
lr/betas, so a compiled kernel serves every step and hyper-parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Hashable

from .base import decayed, gradient
from .program import Event, Expr, lower, maximum, scalar, sqrt, tensor
from .tableau import Geometry, IMEXTableau, moment_rows

__all__ = ["Plan", "build_plan"]


@dataclass(frozen=True)
class Plan:
    """A tableau's step as events, with what the optimizer needs to drive them."""

    tableau: IMEXTableau
    events: tuple[Event, ...]
    scratch: tuple[str, ...]  # per-tensor buffers alive during one step
    reuse_gradient: bool

    @property
    def has_pre_gradient_event(self) -> bool:
        return self.tableau.geometry.pre_gradient

    @property
    def num_closure_calls(self) -> int:
        """Gradient evaluations one step makes (the first included)."""
        return self.tableau.num_gradients - (1 if self.reuse_gradient else 0)

    @cached_property
    def scalar_keys(self) -> tuple[Hashable, ...]:
        return tuple(dict.fromkeys(k for e in self.events for k in lower(e).scalar_keys))

    def scalars(self, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                step: int, pending: bool, bias_correction: bool) -> dict[Hashable, float]:
        """The named scalars of a step that starts after ``step`` completed steps."""
        s, q = self.tableau.num_stages, self.tableau.num_gradients
        rows = {"m": moment_rows(self.tableau, 1.0 - beta1), "v": moment_rows(self.tableau, 1.0 - beta2)}
        # Bias-correction masses: the scheme run on gradient 1 from zero moments gives
        # final mass 1 - rho^n with rho = alpha_final, and stage mass 1 - alpha_i rho^n.
        decay = {name: alpha[s] ** step for name, (alpha, _) in rows.items()}

        def mass(name: str, stage: int) -> float:
            return 1.0 - rows[name][0][stage] * decay[name] if bias_correction else 1.0

        def value(key: Hashable) -> float:
            if key == "lr":
                return lr
            if key == "wd":
                return weight_decay
            kind, *rest = key
            if kind == "alpha":
                return rows[rest[0]][0][rest[1]]
            if kind == "gamma":
                return rows[rest[0]][1][rest[1]][rest[2]]
            if kind == "pending":
                return rows[rest[0]][1][s][q - 1] if pending else 0.0
            if kind == "theta":
                return -lr * rest[0]
            usable = mass("m", rest[0]) > 0.0 and mass("v", rest[0]) > 0.0  # no mass: u = 0
            if kind == "scale_m":
                return 1.0 / mass("m", rest[0]) if usable else 0.0
            if kind == "scale_v":
                return 1.0 / math.sqrt(mass("v", rest[0])) if usable else 0.0
            if kind == "eps":
                return eps if usable else eps + 1.0  # keeps 0 / (0 + eps) finite when eps == 0
            raise AssertionError(key)

        return {key: value(key) for key in self.scalar_keys}


def direction(m: Expr, v: Expr, point: int) -> Expr:
    """``u(m_i, v_i)``, each moment divided by the stage's bias-correction mass; ``v``
    clamped at 0 (a tableau that is not positivity-preserving can drive it negative)."""
    return m * scalar(("scale_m", point)) / (sqrt(maximum(v, 0.0)) * scalar(("scale_v", point)) +
                                             scalar(("eps", point)))


def _write_schedule(geometry: Geometry, first: int, last: int) -> tuple[dict[tuple, list[int]], list[tuple]]:
    """The events at which each distinct target must be in ``p``, and the targets written
    after the first event (they keep a running sum from theta_n in scratch)."""
    written_at: dict[tuple, list[int]] = {}
    holds = None
    for e in range(first, last + 1):
        if geometry.targets[e] != holds:
            written_at.setdefault(geometry.targets[e], []).append(e)
            holds = geometry.targets[e]
    return written_at, [t for t, at in written_at.items() if max(at) > first]


class _EventWriter:
    """Writes one event: the values it computes, by name, and the buffers it assigns."""

    def __init__(self) -> None:
        self.values: dict[str, Expr] = {}
        self.writes: dict[str, Expr] = {}

    def get(self, name: str) -> Expr:
        """A value computed in this event, else the buffer of that name."""
        return self.values.get(name, tensor(name))

    def fold(self, dest: str, row: int, deps: frozenset[int], k: int, start: tuple[Expr, Expr] | None = None,
             running: str = "") -> bool:
        """``dest{m,v} = alpha_row start + gamma_row,k g_k`` when ``start`` (the step's
        start moments) is given, else ``running{m,v} + gamma_row,k g_k``; False when
        there is nothing to add."""
        if start is None and k not in deps:
            return False
        gradients = {"m": self.get("g"), "v": self.get("gg")}
        for i, name in enumerate("mv"):
            value = scalar(("alpha", name, row)) * start[i] if start is not None else self.get(f"{running}{name}")
            if k in deps:
                value = value + scalar(("gamma", name, row, k)) * gradients[name]
            self.values[f"{dest}{name}"] = value
        return True


@lru_cache(maxsize=128)
def build_plan(tableau: IMEXTableau, reuse_gradient: bool = False, l2: bool = False,
               decoupled: bool = False, maximize: bool = False) -> Plan:
    geo = tableau.geometry
    s, q = tableau.num_stages, tableau.num_gradients
    if reuse_gradient and not geo.reusable:
        raise ValueError(f"tableau {tableau.name!r} does not allow reuse_gradient=True: its last gradient "
                         "stage is not at theta_{n+1} (or its first is not at theta_n)")
    first = 0 if geo.pre_gradient else 1  # the first event with element-wise work
    last = q - 1 if reuse_gradient else q
    written_at, accumulated = _write_schedule(geo, first, last)
    scratch: list[str] = []
    events = []
    for e in range(first, last + 1):
        w = _EventWriter()
        start = (tensor("m"), tensor("v"))  # the step's start moments
        if e >= 1:
            w.values["g"] = gradient(tensor("g"), tensor("p"), maximize, l2)
            w.values["gg"] = w.get("g") * w.get("g")
        if e == 1 and reuse_gradient:  # finish the previous step's moments with this gradient
            start = (tensor("m") + scalar(("pending", "m")) * w.get("g"),
                     tensor("v") + scalar(("pending", "v")) * w.get("gg"))
        theta0 = decayed(tensor("p"), decoupled) if e == first else tensor("p")

        # Moments: the final ones accumulate in the state buffers, later points' in scratch.
        # (the final moments' running sum lives in the state buffers themselves)
        final_changed = e >= 1 and w.fold("final_", s, geo.final_deps, e - 1, start if e == 1 else None)
        if final_changed:
            w.writes.update(m=w.get("final_m"), v=w.get("final_v"))
        for i, point in enumerate(geo.points):
            if e >= 1 and geo.computed_at(i) > e and not geo.point_is_final[i]:
                name = f"acc{point}_"
                if e == 1:
                    scratch += [f"{name}m", f"{name}v"]
                if w.fold(name, point, geo.point_deps[i], e - 1, start if e == 1 else None, running=name):
                    w.writes.update({f"{name}m": w.get(f"{name}m"), f"{name}v": w.get(f"{name}v")})

        # Directions that became computable.
        directions: dict[int, Expr] = {}
        for i, point in enumerate(geo.points):
            if geo.computed_at(i) != e:
                continue
            if not geo.point_deps[i]:
                m, v = start
            elif geo.point_is_final[i]:
                m, v = (w.get("final_m"), w.get("final_v")) if final_changed else (tensor("m"), tensor("v"))
            else:
                w.fold(f"pt{point}_", point, geo.point_deps[i], e - 1, start if e == 1 else None,
                       running=f"acc{point}_")
                m, v = w.get(f"pt{point}_m"), w.get(f"pt{point}_v")
            directions[i] = direction(m, v, point)

        # Parameters: running sums for later targets, and the next gradient's point.
        for t_index, target in enumerate(written_at):
            step = None
            for i, u in directions.items():
                if target[i]:
                    term = scalar(("theta", target[i])) * u
                    step = term if step is None else step + term
            write_now = e in written_at[target]
            if target in accumulated:
                name = f"theta{t_index}"
                if e == first:
                    scratch.append(name)
                running = theta0 if e == first else tensor(name)
                value = running if step is None else running + step
                if max(written_at[target]) > e and (e == first or step is not None):
                    w.writes[name] = value
                if write_now:
                    w.writes["p"] = value
            elif write_now and (step is not None or e == first and decoupled):
                w.writes["p"] = theta0 if step is None else theta0 + step
        events.append(Event(gradient=e, writes=w.writes))
    return Plan(tableau=tableau, events=tuple(events), scratch=tuple(scratch), reuse_gradient=reuse_gradient)

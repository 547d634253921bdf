"""Turns an IMEX tableau into the element-wise work of one optimizer step.

One step of the IMEX scheme (``docs/optimizer-core.md``) interleaves element-wise work with
gradient evaluations. In coefficient form (:func:`~.tableau.moment_rows`) every stage
moment is a linear combination of the step's start moment and the gradients seen so
far, ``m_i = alpha_i m_n + sum_k gamma_ik g_k`` (``v_i`` the same with ``g_k^2``), so
between two gradient evaluations there is one *event*: a single pass over each tensor
that evaluates the directions ``u(m_i, v_i)`` that became computable and writes the
parameters of the next stage. Stages with identical moments share one direction
(``ssp3_433``'s first two); stages at the same point share one parameter write.

Storage: until event ``fold`` (the last one that computes a direction from a moment
other than the final one) nothing is accumulated: the state buffers keep ``m_n, v_n``,
one scratch buffer keeps ``theta_n``, and each gradient a later event needs is kept
as it was evaluated (one buffer serves ``m`` and ``v``: ``g_k^2`` is recomputed). Every
event up to ``fold`` recomputes its stage moments, directions and parameters from
these; at ``fold`` the final moments replace ``m_n, v_n`` and the parameters still to
be written after it become running sums of ``theta_n``, which later events add to.
``ssp3_433`` thus holds 2 scratch buffers per parameter, ``ars343`` 3. No scratch value
outlives a step. Where the scratch is narrower than the parameters (bfloat16 or 8-bit
state), the optimizer runs :attr:`Plan.relative_events` instead: the parameter sums
held as their difference from ``p``.

Events depend only on structure, never on lr/betas: their scalars are typed keys
(:class:`MomentWeight`, :class:`PendingWeight`, :class:`StepWeight`,
:class:`Correction`) whose values :meth:`Plan.scalars` gives for a step, so a compiled
kernel serves every step and hyper-parameter. :func:`describe` writes a plan as text
(``docs/plans.md``: ``python -m lightning_imex.optim.plan --dump docs/plans.md``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Hashable, Sequence

from .program import Event, Expr, LEAVES, decayed, gradient, lower, maximum, scalar, sqrt, tensor, with_offset
from .tableau import TABLEAUX, IMEXTableau, get_tableau, moment_polynomials, moment_rows

__all__ = ["Plan", "build_plan", "describe", "MomentWeight", "PendingWeight", "StepWeight", "Correction",
           "stored_gradient", "theta_sum"]


# The per-step scalars of a plan, typed: each names the coefficient it stands for.

@dataclass(frozen=True, repr=False)
class MomentWeight:
    """``alpha`` (``gradient=None``: the weight of the step's start moment) or
    ``gamma_{row,gradient}`` of moment ``"m"`` or ``"v"`` (:func:`~.tableau.moment_rows`);
    ``row`` is a stage, ``num_stages`` the final moment."""

    moment: str
    row: int
    gradient: int | None = None

    def __repr__(self) -> str:
        if self.gradient is None:
            return f"alpha_{self.moment}[{self.row}]"
        return f"gamma_{self.moment}[{self.row},{self.gradient}]"


@dataclass(frozen=True, repr=False)
class PendingWeight:
    """With ``reuse_gradient``: the previous step's weight of its last gradient, which
    this step's first gradient stands in for (0 when nothing is pending)."""

    moment: str

    def __repr__(self) -> str:
        return f"pending_{self.moment}"


@dataclass(frozen=True, repr=False)
class StepWeight:
    """``-lr * weight``: an implicit weight of the tableau times the step size."""

    weight: float

    def __repr__(self) -> str:
        return f"(-lr*{self.weight!r})"


@dataclass(frozen=True, repr=False)
class Correction:
    """A bias correction of the direction at ``point``: ``"scale_m"`` (1 / m's mass),
    ``"scale_v"`` (1 / sqrt(v's mass)) or ``"eps"`` (eps; 0 and eps + 1 where the
    stage has no mass yet, so its direction is 0)."""

    kind: str
    point: int

    def __repr__(self) -> str:
        return f"{self.kind}[{self.point}]"


# The scratch buffers of a step, named by what they hold.

def stored_gradient(k: int) -> str:
    """Gradient ``k`` as its event used it (sign and L2 term included), kept for the
    events that recompute a stage moment from it."""
    return f"g{k}"


def theta_sum(j: int) -> str:
    """``theta_n`` plus the updates folded in so far: ``theta_n`` itself until event
    ``fold``, from then on the running sum of the ``j``-th parameter point written after
    it (:func:`build_plan`)."""
    return "theta_sum" if j == 0 else f"theta_sum{j}"


@dataclass(frozen=True)
class Plan:
    """A tableau's step as events, with what the optimizer needs to drive them."""

    tableau: IMEXTableau
    events: tuple[Event, ...]
    # per-tensor buffers alive during one step (none outlives it): no moments are among
    # them (the state buffers hold m_n, later the running sums)
    scratch: tuple[str, ...]
    reuse_gradient: bool
    # per event, the named values it computes (stage moments, directions), for describe()
    definitions: tuple[tuple[tuple[str, Expr], ...], ...] = ()
    # the scratch buffers that hold parameters (theta_n, running sums of theta_n): the
    # others are kept gradients
    parameter_sums: tuple[str, ...] = ()

    @cached_property
    def relative_events(self) -> dict[Event, Event]:
        """Each event with its parameter sums held as their difference from ``p``
        (:func:`~.program.with_offset`): how narrow scratch stores them (the difference is a
        few updates, small beside the parameter; docs/optimizer-core.md, "State precision")."""
        events = list(self.events)
        for buffer in self.parameter_sums:
            events = [with_offset(event, buffer, "p", kept=self._read_next(buffer, i))
                      for i, event in enumerate(events)]
        return dict(zip(self.events, events))

    def _read_next(self, buffer: str, event: int) -> bool:
        """Whether the first event after number ``event`` that touches ``buffer`` reads it."""
        for later in map(lower, self.events[event + 1:]):
            if buffer in later.inputs or buffer in later.outputs:
                return buffer in later.inputs
        return False

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

        def correction(key: Correction) -> float:
            if not (mass("m", key.point) > 0.0 and mass("v", key.point) > 0.0):  # no mass: u = 0
                return eps + 1.0 if key.kind == "eps" else 0.0  # keeps 0 / (0 + eps) finite when eps == 0
            if key.kind == "scale_m":
                return 1.0 / mass("m", key.point)
            if key.kind == "scale_v":
                return 1.0 / math.sqrt(mass("v", key.point))
            return eps

        def value(key: Hashable) -> float:
            if isinstance(key, MomentWeight):
                alpha, gamma = rows[key.moment]
                return alpha[key.row] if key.gradient is None else gamma[key.row][key.gradient]
            if isinstance(key, PendingWeight):
                return rows[key.moment][1][s][q - 1] if pending else 0.0
            if isinstance(key, StepWeight):
                return -lr * key.weight
            if isinstance(key, Correction):
                return correction(key)
            return {"lr": lr, "wd": weight_decay}[key]  # from gradient() and decayed()

        return {key: value(key) for key in self.scalar_keys}


def direction(m: Expr, v: Expr, point: int) -> Expr:
    """``u(m_i, v_i)``, each moment divided by the stage's bias-correction mass; ``v``
    clamped at 0 (a tableau that is not positivity-preserving can drive it negative)."""
    return m * scalar(Correction("scale_m", point)) / (
        sqrt(maximum(v, 0.0)) * scalar(Correction("scale_v", point)) + scalar(Correction("eps", point)))


def _write_schedule(targets: Sequence[tuple[float, ...]], first: int, last: int) -> dict[tuple, list[int]]:
    """The events at which each distinct parameter point must be written to ``p`` (not
    already there)."""
    written_at: dict[tuple, list[int]] = {}
    holds = None
    for e in range(first, last + 1):
        if targets[e] != holds:
            written_at.setdefault(targets[e], []).append(e)
            holds = targets[e]
    return written_at


def _weighted_sum(start: Expr, terms: Sequence[tuple[float, Expr]]) -> Expr:
    """``start + sum_i (-lr w_i) u_i`` over the nonzero weights, in order."""
    for weight, u in terms:
        if weight:
            start = start + scalar(StepWeight(weight)) * u
    return start


@lru_cache(maxsize=128)
def build_plan(tableau: IMEXTableau, reuse_gradient: bool = False, l2: bool = False,
               decoupled: bool = False, maximize: bool = False) -> Plan:
    """The events of one step of ``tableau`` (module docstring), for gradients with an L2
    term (``l2``) or negated (``maximize``), and decoupled weight decay (``decoupled``)."""
    geo = tableau.geometry
    s, q = tableau.num_stages, tableau.num_gradients
    if reuse_gradient and not geo.reusable:
        raise ValueError(f"tableau {tableau.name!r} does not allow reuse_gradient=True: its last gradient "
                         "stage is not at theta_{n+1} (or its first is not at theta_n)")
    first = 0 if geo.pre_gradient else 1  # the first event with element-wise work
    last = q - 1 if reuse_gradient else q
    points = range(len(geo.points))
    # Until `fold` moments are recomputed from m_n, v_n and the kept gradients (module doc).
    fold = min(last, max([1, *(geo.computed_at(i) for i in points if not geo.point_is_final[i])]))
    written_at = _write_schedule(geo.targets, first, last)
    later = [t for t, at in written_at.items() if max(at) > fold]  # points written after `fold`: running sums
    keeps_theta_n = any(first < e <= fold for at in written_at.values() for e in at) or bool(later and fold > first)
    unit = tuple(Fraction(int(d == 0)) for d in range(s + 2))
    polynomials = moment_polynomials(tableau)

    def events(kept: Sequence[int]) -> tuple[list[Event], list[tuple[tuple[str, Expr], ...]]]:
        """The events, keeping the gradients ``kept`` for later events."""
        result, definitions = [], []
        for e in range(first, last + 1):
            writes: dict[str, Expr] = {}
            named: dict[str, Expr] = {}
            g = gradient(tensor("g"), tensor("p"), maximize, l2) if e >= 1 else None
            grads = {k: tensor(stored_gradient(k)) for k in kept if k < e - 1}
            if g is not None:
                grads[e - 1] = named["g"] = g
                if e - 1 in kept:
                    writes[stored_gradient(e - 1)] = g
            # The step's start moments; with reuse_gradient, finished by this gradient first.
            start = {"m": tensor("m"), "v": tensor("v")}
            if e == 1 and reuse_gradient:
                start = {"m": tensor("m") + scalar(PendingWeight("m")) * g,
                         "v": tensor("v") + scalar(PendingWeight("v")) * (g * g)}
                if fold > 1:  # later events read m_n, v_n from the state buffers
                    writes.update(start)

            def moment(row: int, name: str) -> Expr:
                """Stage ``row``'s moment ``name`` from the step's start and the gradients so far."""
                value = start[name]
                if polynomials[row][0] != unit:
                    value = scalar(MomentWeight(name, row)) * value
                for k, g_k in grads.items():
                    if any(polynomials[row][1][k]):
                        value = value + scalar(MomentWeight(name, row, k)) * (g_k if name == "m" else g_k * g_k)
                return value

            # Moments: recomputed up to `fold`; there the final ones replace m_n, v_n, and
            # later events add their gradient to them.
            final = {"m": tensor("m"), "v": tensor("v")}
            if e == fold and any(k < e for k in geo.final_deps):
                final = {name: moment(s, name) for name in "mv"}
                writes.update(final)
            elif e > fold and e - 1 in geo.final_deps:
                final = {name: tensor(name) + scalar(MomentWeight(name, s, e - 1)) * (g if name == "m" else g * g)
                         for name in "mv"}
                writes.update(final)

            # Directions: every one computable at this event, while they can be recomputed.
            directions: dict[int, Expr] = {}
            for i, point in enumerate(geo.points):
                if not (geo.computed_at(i) == e or geo.computed_at(i) < e <= fold):
                    continue
                if e > fold:  # only final points are computed after `fold`
                    m, v = final["m"], final["v"]
                elif geo.point_deps[i]:  # a final point's moment is the final one: shared with its write
                    row = s if geo.point_is_final[i] else point
                    m, v = moment(row, "m"), moment(row, "v")
                else:
                    m, v = start["m"], start["v"]
                named[f"m{point}"], named[f"v{point}"] = m, v
                directions[i] = named[f"u{point}"] = direction(m, v, point)

            # Parameters: from theta_n up to `fold`, from their running sums after it.
            theta_n = decayed(tensor("p"), decoupled) if e == first else tensor(theta_sum(0))
            if e == first and keeps_theta_n:
                writes[theta_sum(0)] = theta_n
            for target, at in written_at.items():
                terms = [(target[i], u) for i, u in directions.items()]
                if target in later:
                    j = later.index(target)
                    value = _weighted_sum(theta_n if e <= fold else tensor(theta_sum(j)), terms)
                    if e >= fold and max(at) > e and value != tensor(theta_sum(j)):
                        writes[theta_sum(j)] = value
                    if e in at:
                        writes["p"] = value
                elif e in at:
                    value = _weighted_sum(theta_n, terms)
                    if value != tensor("p"):
                        writes["p"] = value
            result.append(Event(gradient=e, writes=writes))
            definitions.append(tuple(named.items()))
        return result, definitions

    # Keep exactly the gradients that a later event reads.
    candidates, _ = events(range(fold - 1))
    kept = [k for k in range(fold - 1) if any(stored_gradient(k) in lower(ev).inputs for ev in candidates)]
    built, definitions = events(kept)
    scratch = [stored_gradient(k) for k in kept]
    sums = tuple(theta_sum(j) for j in range(max(len(later), int(keeps_theta_n))))
    return Plan(tableau=tableau, events=tuple(built), scratch=(*scratch, *sums), reuse_gradient=reuse_gradient,
                definitions=tuple(definitions), parameter_sums=sums)


# Plans as text.

def _show(e: Expr, names: dict[Expr, str]) -> str:
    """``e`` in infix notation, sub-expressions with a name shown by it."""
    if e in names:
        return names[e]
    if e.op in LEAVES:
        return str(e.args[0]) if e.op != "const" else f"{e.args[0]:g}"
    args = [_show(a, names) for a in e.args]
    symbol = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}.get(e.op)
    if symbol is None:
        return f"{e.op}({', '.join(args)})"
    return f"({args[0]} {symbol} {args[1]})"


def _subexpressions(e: Expr) -> set[Expr]:
    found = {e}
    if e.op not in LEAVES:
        for a in e.args:
            found |= _subexpressions(a)
    return found


def _polynomial(p: Sequence[Fraction]) -> str:
    terms = [(float(x), d) for d, x in enumerate(p) if x]
    if not terms:
        return "0"
    text = " ".join(f"{'-' if x < 0 else '+'} {abs(x):.12g}{'' if d == 0 else ' c' if d == 1 else f' c^{d}'}"
                    for x, d in terms)
    return text.replace(" 1 c", " c")[2:] if terms[0][0] > 0 else "-" + text.replace(" 1 c", " c")[2:]


def describe(tableau: IMEXTableau | str, reuse_gradient: bool = False) -> str:
    """A plan as Markdown: its buffers, each event's named values and writes, and the
    moment weights it reads as polynomials in ``c = 1 - beta``."""
    tableau = get_tableau(tableau)
    plan = build_plan(tableau, reuse_gradient)
    buffers = 2 + len(plan.scratch)
    title = f"{tableau.name}" + (" (reuse_gradient=True)" if reuse_gradient else "")
    scratch = ", ".join(f"`{b}`" for b in plan.scratch) or "none"
    lines = [f"## {title}", "",
             f"{tableau.num_stages} stages, order {tableau.order}, gradient evaluations per step: "
             f"{plan.num_closure_calls}. Buffers: `m`, `v` (state), scratch {scratch}: "
             f"{4 * buffers} bytes per float32 parameter (Adam: 8).", "", "```"]
    weights: dict[MomentWeight, None] = {}
    for event, named in zip(plan.events, plan.definitions):
        lines.append(f"event {event.gradient} (" + ("before the first gradient" if event.gradient == 0 else
                                                     f"gradient {event.gradient - 1} in g") + ")")
        names: dict[Expr, str] = {}
        used = set().union(*(_subexpressions(value) for _, value in event.writes))
        for name, value in named:
            if value in used and value.op not in LEAVES:  # a buffer read as is keeps its name
                lines.append(f"  {name} = {_show(value, names)}")
                names.setdefault(value, name)
        for buffer, value in event.writes:
            lines.append(f"  {buffer} <- {_show(value, names)}")
        weights.update((k, None) for k in lower(event).scalar_keys if isinstance(k, MomentWeight))
    lines += ["```", "", "Moment weights (c = 1 - beta1 for m, 1 - beta2 for v):", ""]
    polynomials = moment_polynomials(tableau)
    for key in sorted(weights, key=lambda k: (k.moment, k.row, -1 if k.gradient is None else k.gradient)):
        row = polynomials[key.row]
        lines.append(f"- `{key!r} = {_polynomial(row[0] if key.gradient is None else row[1][key.gradient])}`")
    return "\n".join(lines) + "\n"


DUMP_HEADER = """# The built-in tableaux's plans

Generated by `python -m lightning_imex.optim.plan --dump docs/plans.md` from
`lightning_imex/optim/plan.py` (`tests/test_plan_dump.py` fails when a plan changes
without this file). Each event is one pass over every tensor after a gradient
evaluation; `name = ...` are values it computes, `buffer <- ...` what it stores (all
values read the buffers as they were before the event). `g` is the gradient just
evaluated, `gk` gradient k kept from an earlier event, `uI` the direction of stage I,
`u(m, v) = m scale_m / (sqrt(max(v, 0)) scale_v + eps)` with the stage's
bias corrections (docs/optimizer-core.md), `(-lr*w)` an implicit weight times the step
size. The math is docs/algorithms.md, sections 2.3-2.6. Read with `c = 1 - beta1`:
euler's event is `m <- (1 - c) m + c g` (the same for `v`), `p <- p - lr u(m, v)` with the
new moments: Adam (section 1); trapezoidal's first event is section 2.4's
`theta_{n+1} = theta_n - h/2 [u(m_n, v_n) + u(m~, v~)]` with `m~` = `m1`, and its second
finishes `m_{n+1}` with the gradient taken at `theta_{n+1}`.
"""


def dump() -> str:
    """Every built-in tableau's plan, the text of ``docs/plans.md``."""
    sections = [describe(t) for t in TABLEAUX.values()]
    sections += [describe(t, reuse_gradient=True) for t in TABLEAUX.values() if t.allows_gradient_reuse]
    return DUMP_HEADER + "\n" + "\n".join(sections)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write every built-in tableau's plan as Markdown.")
    parser.add_argument("--dump", type=Path, required=True, help="the file to write (docs/plans.md)")
    parser.parse_args().dump.write_text(dump())

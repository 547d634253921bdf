"""Turns an IMEX tableau into the element-wise work of one optimizer step.

One step of ALGORITHMS.md section 2 interleaves element-wise work with gradient
evaluations. Written in "coefficient form", every stage moment is a linear
combination of the step's start moment and the gradients seen so far::

    m_i = alpha_i m_n + sum_k gamma_ik g_k          (v_i the same with g_k^2)

with scalars ``alpha``/``gamma`` that depend only on the tableau and ``1 - beta``.
So between two gradient evaluations there is one *event*: a single fused pass over
each tensor that folds the new gradient into running sums, evaluates the update
directions ``u(m_i, v_i)`` that became computable, and writes the parameters of the
next stage. Stages with identical moments (``ssp3_433``'s first two) share one
direction; stages at the same point share one parameter write; a stage at
theta_{n+1} is written once. Trapezoidal thus costs one Adam-like pass plus one
moment pass per step.

A :class:`Plan` is the tableau's events as a tiny straight-line program over named
tensors (:class:`Event`), plus the keys of the scalar coefficients it reads. The
kernel (``kernel.py``) runs the program; :meth:`Plan.coefficients` fills in the
scalars for a step. Plans depend only on structure, never on lr/betas, so a
compiled kernel is reused across steps and hyper-parameter changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Hashable

from .base import Program
from .kernel import Event
from .tableau import _TOL, IMEXTableau

__all__ = ["Plan", "build_plan", "moment_rows"]

# Generic values of ``c = 1 - beta`` used to decide which coefficients vanish
# identically and which stages share moments (coefficients are polynomials in c).
_PROBES = (0.1234, 0.5678, 0.9012)


@dataclass(frozen=True)
class Plan:
    """A tableau's step as events, with what the optimizer needs to drive them."""

    tableau: IMEXTableau
    events: tuple[Event, ...]
    scratch: tuple[str, ...]  # per-tensor buffers alive during one step
    coefficient_keys: tuple[Hashable, ...]
    has_pre_gradient_event: bool
    allows_gradient_reuse: bool
    reuse_gradient: bool

    @property
    def num_closure_calls(self) -> int:
        """Gradient evaluations one step makes (the first included)."""
        return self.tableau.num_gradients - (1 if self.reuse_gradient else 0)

    def coefficients(
        self, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
        step: int, pending: bool, bias_correction: bool,
    ) -> list[float]:
        """The scalars for a step that starts after ``step`` completed steps."""
        s = self.tableau.num_stages
        (alpha_m, gamma_m), (alpha_v, gamma_v) = moment_rows(self.tableau, 1.0 - beta1), moment_rows(self.tableau, 1.0 - beta2)
        alpha, gamma = {"m": alpha_m, "v": alpha_v}, {"m": gamma_m, "v": gamma_v}
        # Bias-correction masses: the scheme run on gradient 1 from zero moments gives
        # final mass 1 - rho^n with rho = alpha_final, and stage mass 1 - alpha_i rho^n.
        decay_m, decay_v = alpha["m"][s] ** step, alpha["v"][s] ** step
        q = self.tableau.num_gradients

        def value(key: tuple) -> float:
            kind = key[0]
            if kind == "sign":
                return -1.0
            if kind == "wd":
                return weight_decay
            if kind == "decay":
                return 1.0 - lr * weight_decay
            if kind == "alpha":
                return alpha[key[1]][key[2]]
            if kind == "gamma":
                return gamma[key[1]][key[2]][key[3]]
            if kind == "pending":
                return gamma[key[1]][s][q - 1] if pending else 0.0
            if kind == "theta":
                return -lr * key[1]
            stage = key[1]
            mass_m = 1.0 - alpha["m"][stage] * decay_m if bias_correction else 1.0
            mass_v = 1.0 - alpha["v"][stage] * decay_v if bias_correction else 1.0
            usable = mass_m > 0.0 and mass_v > 0.0  # a stage with no mass contributes u = 0
            if kind == "scale_m":
                return 1.0 / mass_m if usable else 0.0
            if kind == "scale_v":
                return 1.0 / math.sqrt(mass_v) if usable else 0.0
            if kind == "eps":
                return eps if usable else eps + 1.0  # keeps 0 / (0 + eps) finite when eps == 0
            raise AssertionError(key)

        return [value(k) for k in self.coefficient_keys]


@lru_cache(maxsize=256)
def moment_rows(tableau: IMEXTableau, c: float) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """``alpha[i]`` and ``gamma[i][k]`` of each stage's moment, with index ``num_stages`` for
    the final one, for ``h * c1 = c`` (``1 - beta``). ``k`` counts gradient stages."""
    s, stages = tableau.num_stages, tableau.gradient_stages
    alpha: list[float] = []
    gamma: list[list[float]] = []
    for i in range(s + 1):
        weights = tableau.b_explicit if i == s else tableau.a_explicit[i]
        a, g = 1.0, [0.0] * len(stages)
        # m_i = m_n + c * sum_j w_j (g_j - m_j), over gradient stages j < i
        for col, j in enumerate(stages):
            w = weights[j]
            if j >= i and i < s or w == 0.0:
                continue
            a -= c * w * alpha[j]
            for k in range(len(stages)):
                g[k] -= c * w * gamma[j][k]
            g[col] += c * w
        alpha.append(a)
        gamma.append(g)
    return tuple(alpha), tuple(tuple(row) for row in gamma)


def _structure(tableau: IMEXTableau, stage: int) -> tuple[tuple[float, ...], frozenset[int]]:
    """A stage's moment as a comparable key, and the gradients it depends on."""
    key, deps = [], set()
    for c in _PROBES:
        alpha, gamma = moment_rows(tableau, c)
        key.append(round(alpha[stage], 10))
        key.extend(round(x, 10) for x in gamma[stage])
        deps.update(k for k, x in enumerate(gamma[stage]) if abs(x) > _TOL)
    return tuple(key), frozenset(deps)


@lru_cache(maxsize=128)
def build_plan(
    tableau: IMEXTableau, reuse_gradient: bool = False, l2: bool = False,
    decoupled: bool = False, maximize: bool = False,
) -> Plan:
    s, stages = tableau.num_stages, tableau.gradient_stages
    q = len(stages)
    final_key, final_deps = _structure(tableau, s)

    # Points: distinct stage moments whose direction u enters some parameter update.
    used = [k for k in range(s)
            if abs(tableau.b_implicit[k]) > _TOL or any(abs(tableau.a_implicit[j][k]) > _TOL for j in stages)]
    members: dict[tuple, list[int]] = {}
    for k in used:
        members.setdefault(_structure(tableau, k)[0], []).append(k)
    points = [group[0] for group in members.values()]  # a representative stage each
    point_members = list(members.values())
    point_key = {p: key for p, key in zip(points, members)}
    point_deps = {p: _structure(tableau, p)[1] for p in points}

    # Targets: distinct parameter positions (gradient stages, then theta_{n+1}).
    def target_row(stage: int) -> tuple[float, ...]:
        row = tableau.implicit_row(stage)
        return tuple(0.0 if abs(x := sum(row[k] for k in group)) <= _TOL else x for group in point_members)

    wanted = [target_row(j) for j in stages] + [target_row(s)]  # wanted[e]: p after event e
    pre_gradient = any(wanted[0])
    first = 0 if pre_gradient else 1  # the first event with element-wise work
    last = q - 1 if reuse_gradient else q
    # The next step's first gradient (at theta_n) can stand in for this step's last.
    reusable = not pre_gradient and wanted[q - 1] == wanted[q]
    if reuse_gradient and not reusable:
        raise ValueError(f"tableau {tableau.name!r} does not allow reuse_gradient=True: its last gradient "
                         "stage is not at theta_{n+1} (or its first is not at theta_n)")

    def computed_at(p: int) -> int:
        needed = 1 + max(point_deps[p]) if point_deps[p] else 0
        return needed if pre_gradient else max(needed, 1)

    uses_final = {p: point_key[p] == final_key for p in points}
    # Events at which each distinct target must be written into p.
    written_at: dict[tuple, list[int]] = {}
    holds = None
    for e in range(first, last + 1):
        if wanted[e] != holds:
            written_at.setdefault(wanted[e], []).append(e)
            holds = wanted[e]
    # A target written after the first event keeps a running sum from theta_n.
    accumulated = [t for t, at in written_at.items() if max(at) > first]

    program = Program()
    coef = program.c

    scratch: list[str] = []
    events = []
    for e in range(first, last + 1):
        st = program.statements
        writes: list[tuple[str, str]] = []
        m0, v0 = "m", "v"
        if e >= 1:
            program.gradient(maximize, l2)
            st.append(("mul", "gg", "g", "g"))
        if e == 1 and reuse_gradient:
            # Finish the previous step's moments with this gradient (its last stage's).
            st.append(("lin", "m0", ((None, "m"), (coef(("pending", "m")), "g"))))
            st.append(("lin", "v0", ((None, "v"), (coef(("pending", "v")), "gg"))))
            m0, v0 = "m0", "v0"
        theta0 = "p"
        if e == first and decoupled:
            st.append(("lin", "theta0", ((coef(("decay",)), "p"),)))
            theta0 = "theta0"

        # Moments: the final ones accumulate in the state buffers, later points' in scratch.
        def fold(dest: str, row: int, old: str | None, deps) -> bool:
            """dest_{m,v} = alpha m0 + gamma g (old is None) or old + gamma g; False: nothing to add."""
            k = e - 1
            if old is not None and k not in deps:
                return False
            for name, grad_src, base in (("m", "g", m0), ("v", "gg", v0)):
                terms = ((coef(("alpha", name, row)), base),) if old is None else ((None, f"{old}{name}"),)
                if k in deps:
                    terms += ((coef(("gamma", name, row, k)), grad_src),)
                st.append(("lin", f"{dest}{name}", terms))
            return True

        final_changed = e >= 1 and fold("final_", s, None if e == 1 else "", final_deps)
        if final_changed:
            writes += [("m", "final_m"), ("v", "final_v")]
        for p in points:
            if e >= 1 and computed_at(p) > e and not uses_final[p]:
                name = f"acc{p}_"
                if e == 1:
                    scratch += [f"{name}m", f"{name}v"]
                if fold(name, p, None if e == 1 else name, point_deps[p]):
                    writes += [(f"{name}m", f"{name}m"), (f"{name}v", f"{name}v")]
        # Directions that became computable.
        for p in points:
            if computed_at(p) != e:
                continue
            if not point_deps[p]:
                pm, pv = m0, v0  # the step's start moments
            elif uses_final[p]:
                pm, pv = ("final_m", "final_v") if final_changed else ("m", "v")
            else:
                fold(f"pt{p}_", p, None if e == 1 else f"acc{p}_", point_deps[p])
                pm, pv = f"pt{p}_m", f"pt{p}_v"
            st.append(("u", f"u{p}", pm, pv, coef(("scale_m", p)), coef(("scale_v", p)), coef(("eps", p))))

        # Parameters: running sums for later targets, and the next gradient's point.
        new_points = [i for i, p in enumerate(points) if computed_at(p) == e]
        for t_index, target in enumerate(written_at):
            contributions = tuple((coef(("theta", target[i])), f"u{points[i]}") for i in new_points if target[i])
            write_now = e in written_at[target]
            if target in accumulated:
                name = f"theta{t_index}"
                if e == first:
                    scratch.append(name)
                if e == first or contributions:
                    st.append(("lin", name, ((None, theta0 if e == first else name),) + contributions))
                    if max(written_at[target]) > e:
                        writes.append((name, name))
                if write_now:
                    writes.append(("p", name))
            elif write_now and (contributions or theta0 != "p"):
                st.append(("lin", "p_next", ((None, theta0),) + contributions))
                writes.append(("p", "p_next"))
        # p last: a value may alias the current parameters
        writes.sort(key=lambda w: w[0] == "p")
        events.append(program.event(writes, gradient=e))

    return Plan(
        tableau=tableau, events=tuple(events), scratch=tuple(scratch),
        coefficient_keys=tuple(program.keys), has_pre_gradient_event=pre_gradient,
        allows_gradient_reuse=reusable, reuse_gradient=reuse_gradient,
    )

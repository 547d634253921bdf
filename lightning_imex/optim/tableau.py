"""IMEX Runge-Kutta tableaux as data (docs/algorithms.md, section 2).

A tableau pairs an explicit Butcher tableau, applied to the moment equations
``m' = c1 (grad - m)``, ``v' = c2 (grad^2 - v)``, with an implicit one applied to
``theta' = -m / (sqrt(v) + eps)``. Since that right-hand side does not depend on
``theta``, the "implicit" stages never need a solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property, lru_cache
from typing import Mapping, Sequence

from ..validate import integer

__all__ = ["IMEXTableau", "Geometry", "TABLEAUX", "get_tableau", "moment_rows", "moment_polynomials"]

# Coefficients are compared with this tolerance: tableaux are written with ~1e-11 digits.
_TOL = 1e-12

Matrix = tuple[tuple[float, ...], ...]
Vector = tuple[float, ...]


def _as_matrix(name: str, value: Sequence[Sequence[float]]) -> Matrix:
    try:
        rows = tuple(tuple(float(x) for x in row) for row in value)
    except TypeError as err:
        raise TypeError(f"IMEXTableau.{name} must be a square matrix of numbers (a sequence of rows)") from err
    if any(len(row) != len(rows) for row in rows) or not rows:
        raise ValueError(f"IMEXTableau.{name} must be a non-empty square matrix, got row lengths "
                         f"{[len(r) for r in rows]} for {len(rows)} rows")
    return rows


def _as_vector(name: str, value: Sequence[float]) -> Vector:
    try:
        return tuple(float(x) for x in value)
    except TypeError as err:
        raise TypeError(f"IMEXTableau.{name} must be a sequence of numbers") from err


@dataclass(frozen=True)
class IMEXTableau:
    """An additive Runge-Kutta pair: explicit ``(a_explicit, b_explicit)`` and implicit
    ``(a_implicit, b_implicit)`` with the same number of stages.

    Accepts any nested sequences (lists, tuples, numpy arrays, tensors) and stores
    tuples of floats, so it is hashable and can be used as a cache key.
    """

    a_explicit: Matrix
    b_explicit: Vector
    a_implicit: Matrix
    b_implicit: Vector
    order: int
    name: str = field(default="custom")

    def __post_init__(self) -> None:
        a_e = _as_matrix("a_explicit", self.a_explicit)
        a_i = _as_matrix("a_implicit", self.a_implicit)
        b_e = _as_vector("b_explicit", self.b_explicit)
        b_i = _as_vector("b_implicit", self.b_implicit)
        s = len(a_e)
        if len(a_i) != s:
            raise ValueError(f"IMEXTableau.a_implicit has {len(a_i)} stages but a_explicit has {s}: "
                             "both tableaux must have the same number of stages")
        for name, b in (("b_explicit", b_e), ("b_implicit", b_i)):
            if len(b) != s:
                raise ValueError(f"IMEXTableau.{name} has {len(b)} entries, expected {s} (one per stage)")
            if abs(sum(b) - 1.0) > 1e-9:
                raise ValueError(f"IMEXTableau.{name} must sum to 1 (consistency), sums to {sum(b)!r}")
        for i in range(s):
            for j in range(s):
                if j >= i and a_e[i][j] != 0.0:
                    raise ValueError(f"IMEXTableau.a_explicit must be strictly lower triangular, "
                                     f"but a_explicit[{i}][{j}] = {a_e[i][j]!r}")
                if j > i and a_i[i][j] != 0.0:
                    raise ValueError(f"IMEXTableau.a_implicit must be lower triangular, "
                                     f"but a_implicit[{i}][{j}] = {a_i[i][j]!r}")
        values = [*b_e, *b_i, *(x for row in a_e + a_i for x in row)]
        if not all(math.isfinite(x) for x in values):
            raise ValueError("IMEXTableau coefficients must be finite numbers")
        integer("IMEXTableau.order", self.order, 1)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"IMEXTableau.name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "a_explicit", a_e)
        object.__setattr__(self, "a_implicit", a_i)
        object.__setattr__(self, "b_explicit", b_e)
        object.__setattr__(self, "b_implicit", b_i)

    @property
    def num_stages(self) -> int:
        return len(self.b_explicit)

    @cached_property
    def gradient_stages(self) -> tuple[int, ...]:
        """Stages whose explicit right-hand side is used later, so need a gradient."""
        s = self.num_stages
        return tuple(
            i for i in range(s)
            if abs(self.b_explicit[i]) > _TOL or any(abs(self.a_explicit[k][i]) > _TOL for k in range(i + 1, s))
        )

    @property
    def num_gradients(self) -> int:
        """Forward+backward passes one optimizer step costs."""
        return len(self.gradient_stages)

    @property
    def positivity_preserving(self) -> bool:
        """No negative explicit coefficient: ``v >= 0`` and bounded ``m`` for any step size."""
        return all(x >= 0.0 for row in self.a_explicit for x in row) and all(x >= 0.0 for x in self.b_explicit)

    def implicit_row(self, stage: int) -> Vector:
        """The implicit weights that place ``theta`` at ``stage`` (``num_stages`` = theta_{n+1})."""
        return self.b_implicit if stage == self.num_stages else self.a_implicit[stage]

    @property
    def first_gradient_at_start(self) -> bool:
        """Whether the first gradient is taken at theta_n (true for every built-in)."""
        return not self.geometry.pre_gradient

    @property
    def allows_gradient_reuse(self) -> bool:
        """Whether the last gradient stage sits at theta_{n+1}, and the first at theta_n,
        so the next step's first gradient can stand in for this step's last."""
        return self.geometry.reusable

    @cached_property
    def geometry(self) -> Geometry:
        return geometry(self)

    def __str__(self) -> str:
        return (f"IMEXTableau({self.name!r}, stages={self.num_stages}, order={self.order}, "
                f"gradients={self.num_gradients}, positivity_preserving={self.positivity_preserving})")


@lru_cache(maxsize=256)
def moment_rows(tableau: IMEXTableau, c: float) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """The moments in coefficient form: every stage moment is a linear combination of the
    step's start moment and the gradients seen so far, ``m_i = alpha_i m_n + sum_k
    gamma_ik g_k`` (``v_i`` the same with ``g_k^2``), for ``h c1 = c`` (``1 - beta``).
    Returns ``alpha[i]`` and ``gamma[i][k]``, with index ``num_stages`` for the final
    moment; ``k`` counts gradient stages."""
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


# A polynomial in c with exact rational coefficients, lowest degree first.
Polynomial = tuple[Fraction, ...]


@lru_cache(maxsize=64)
def moment_polynomials(tableau: IMEXTableau) -> tuple[tuple[Polynomial, tuple[Polynomial, ...]], ...]:
    """:func:`moment_rows` symbolically: per stage (index ``num_stages``: the final
    moment), ``alpha`` and each ``gamma_k`` as a polynomial in ``c`` whose coefficients are
    the exact rationals the float tableau entries denote. Two stages have identical
    moments for every beta exactly when their polynomials are equal: this decides stage
    identity, with no tolerance and no sampling."""
    s, stages = tableau.num_stages, tableau.gradient_stages
    zero: Polynomial = (Fraction(0),) * (s + 2)  # row i has degree <= i: the last entry stays 0

    def minus_c_times(p: Polynomial, w: Fraction) -> list[Fraction]:  # -c w p
        return [Fraction(0), *(-w * x for x in p[:-1])]

    rows: list[tuple[Polynomial, tuple[Polynomial, ...]]] = []
    for i in range(s + 1):
        weights = tableau.b_explicit if i == s else tableau.a_explicit[i]
        alpha, gamma = [Fraction(1), *zero[1:]], [list(zero) for _ in stages]
        # m_i = m_n + c * sum_j w_j (g_j - m_j), over gradient stages j < i
        for col, j in enumerate(stages):
            w = Fraction(weights[j])
            if j >= i and i < s or w == 0:
                continue
            alpha = [a + d for a, d in zip(alpha, minus_c_times(rows[j][0], w))]
            for k in range(len(stages)):
                gamma[k] = [a + d for a, d in zip(gamma[k], minus_c_times(rows[j][1][k], w))]
            gamma[col][1] += w
        rows.append((tuple(alpha), tuple(tuple(g) for g in gamma)))
    return tuple(rows)


def stage_moment(tableau: IMEXTableau, stage: int) -> tuple[tuple, frozenset[int]]:
    """A stage's moment as a comparable key (equal keys: identical moments for every
    beta, decided exactly by :func:`moment_polynomials`), and the gradients it depends on
    (those whose coefficient is not the zero polynomial)."""
    key = moment_polynomials(tableau)[stage]
    return key, frozenset(k for k, g in enumerate(key[1]) if any(g))


@dataclass(frozen=True)
class Geometry:
    """Where a tableau's stages sit, as one optimizer step needs it.

    *Points* are the distinct stage moments whose direction ``u(m_i, v_i)`` enters a
    parameter update (stages with identical moments share one; a representative stage
    each). *Targets* are the parameter positions: ``targets[e]`` is the point of the
    gradient evaluated after event ``e`` (index ``q``: theta_{n+1}), as implicit weights
    per point.
    """

    points: tuple[int, ...]
    point_deps: tuple[frozenset[int], ...]  # the gradients each point's moment depends on
    point_is_final: tuple[bool, ...]  # whether a point's moment equals the step's final one
    final_deps: frozenset[int]
    targets: tuple[tuple[float, ...], ...]
    pre_gradient: bool  # some element-wise work comes before the first gradient
    reusable: bool  # the next step's first gradient (at theta_n) can stand in for the last

    def computed_at(self, point: int) -> int:
        """The event after which a point's direction can be computed."""
        deps = self.point_deps[point]
        needed = 1 + max(deps) if deps else 0
        return needed if self.pre_gradient else max(needed, 1)


def geometry(tableau: IMEXTableau) -> Geometry:
    s, stages = tableau.num_stages, tableau.gradient_stages
    q = len(stages)
    final_key, final_deps = stage_moment(tableau, s)
    used = [k for k in range(s)
            if abs(tableau.b_implicit[k]) > _TOL or any(abs(tableau.a_implicit[j][k]) > _TOL for j in stages)]
    members: dict[tuple, list[int]] = {}
    for k in used:
        members.setdefault(stage_moment(tableau, k)[0], []).append(k)

    def target(stage: int) -> tuple[float, ...]:
        row = tableau.implicit_row(stage)
        return tuple(0.0 if abs(x := sum(row[k] for k in group)) <= _TOL else x for group in members.values())

    targets = tuple(target(j) for j in stages) + (target(s),)
    pre_gradient = any(targets[0])
    return Geometry(
        points=tuple(group[0] for group in members.values()),
        point_deps=tuple(stage_moment(tableau, group[0])[1] for group in members.values()),
        point_is_final=tuple(key == final_key for key in members),
        final_deps=final_deps, targets=targets, pre_gradient=pre_gradient,
        reusable=not pre_gradient and targets[q - 1] == targets[q],
    )


def _ars222() -> IMEXTableau:
    g = 1.0 - 1.0 / math.sqrt(2.0)
    d = 1.0 - 1.0 / (2.0 * g)
    return IMEXTableau(
        a_explicit=[[0, 0, 0], [g, 0, 0], [d, 1 - d, 0]], b_explicit=[d, 1 - d, 0],
        a_implicit=[[0, 0, 0], [0, g, 0], [0, 1 - g, g]], b_implicit=[0, 1 - g, g],
        order=2, name="ars222",
    )


def _ars343() -> IMEXTableau:
    g = 0.4358665215
    b2 = -1.5 * g * g + 4.0 * g - 0.25
    b3 = 1.5 * g * g - 5.0 * g + 1.25
    a42 = a43 = 0.5529291479
    a41 = 1.0 - a42 - a43
    a31, a32 = 0.3212788862, 0.3966543745
    return IMEXTableau(
        a_explicit=[[0, 0, 0, 0], [g, 0, 0, 0], [a31, a32, 0, 0], [a41, a42, a43, 0]],
        b_explicit=[0, b2, b3, g],
        a_implicit=[[0, 0, 0, 0], [0, g, 0, 0], [0, (1 - g) / 2, g, 0], [0, b2, b3, g]],
        b_implicit=[0, b2, b3, g],
        order=3, name="ars343",
    )


def _ssp3_433() -> IMEXTableau:
    # Pareschi & Russo's IMEX-SSP3(4,3,3).
    a, b, e = 0.24169426078821, 0.06042356519705, 0.12915286960590
    weights = [0, 1 / 6, 1 / 6, 2 / 3]
    return IMEXTableau(
        a_explicit=[[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 1 / 4, 1 / 4, 0]], b_explicit=weights,
        a_implicit=[[a, 0, 0, 0], [-a, a, 0, 0], [0, 1 - a, a, 0], [b, e, 0.5 - b - e - a, a]],
        b_implicit=weights,
        order=3, name="ssp3_433",
    )


TABLEAUX: Mapping[str, IMEXTableau] = {
    t.name: t
    for t in (
        IMEXTableau([[0, 0], [1, 0]], [1, 0], [[0, 0], [0, 1]], [0, 1], order=1, name="euler"),
        IMEXTableau([[0, 0], [1, 0]], [0.5, 0.5], [[0, 0], [0.5, 0.5]], [0.5, 0.5], order=2, name="trapezoidal"),
        IMEXTableau(
            [[0, 0, 0], [1, 0, 0], [0.5, 0.5, 0]], [0.5, 0.5, 0],
            [[0, 0, 0], [0, 1, 0], [0.5, 0, 0.5]], [0.5, 0, 0.5],
            order=2, name="trapezoidal_pc",
        ),
        _ars222(),
        _ars343(),
        _ssp3_433(),
    )
}


def get_tableau(tableau: str | IMEXTableau) -> IMEXTableau:
    """Resolve a built-in name or pass an :class:`IMEXTableau` through."""
    if isinstance(tableau, IMEXTableau):
        return tableau
    if isinstance(tableau, str):
        try:
            return TABLEAUX[tableau]
        except KeyError:
            raise ValueError(f"unknown tableau {tableau!r}; known tableaux: {', '.join(TABLEAUX)} "
                             "(or pass an IMEXTableau)") from None
    raise TypeError(f"tableau must be a name ({', '.join(TABLEAUX)}) or an IMEXTableau, "
                    f"got {type(tableau).__name__}")

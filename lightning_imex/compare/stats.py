"""Paired statistics: is one optimizer ahead of another by more than the measurement can
resolve? Runs of the same seed start from the same weights and see the same batches, so
the per-seed difference cancels the seed's luck; its mean and an interval over seeds
say both "ahead on 3/3 seeds by ~3%" and "inside the spread".

For per-seed values ``a_s`` (the first optimizer) and ``b_s`` (the second), oriented so
that ``d_s > 0`` means the first is better (``d_s = b_s - a_s`` for a loss,
``a_s - b_s`` for an accuracy), the difference is **resolved** (a win) when both

1. ``|mean d| > REL_TOL * max(|mean a|, |mean b|)``: a relative difference of 0.1% or
   less is a tie. Mathematically equal methods run by different code (Adam and IMEX
   Euler) differ by float32 rounding, ~1e-6 relative; the differences a paper's claim
   rests on are percents; and an accuracy on a few hundred validation samples moves in
   steps of ~0.3%.
2. the interval of ``d`` excludes 0: with 3 or more seeds the 95% t-interval
   ``mean ± t(0.975, n-1) s / sqrt(n)``; with 2 seeds the range ``[min d, max d]`` (a
   t-interval on one degree of freedom is ``± 12.7 s``, too wide to say anything); with
   one seed there is no spread to measure and only the tolerance applies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CONFIDENCE", "REL_TOL", "Paired", "paired"]

REL_TOL = 1e-3
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Paired:
    """The first optimizer against the second on per-seed values (``d > 0``: first better)."""

    differences: tuple[float, ...]  # d_s, in seed order
    mean: float
    low: float  # the interval of the mean difference
    high: float
    relative: float  # mean / max(|mean a|, |mean b|)
    interval: str  # how [low, high] was made: "95% t-interval", "range over 2 seeds", "one seed"
    seeds_ahead: int  # seeds on which the first is better by more than the tolerance

    @property
    def below_tolerance(self) -> bool:
        return not abs(self.relative) > REL_TOL

    @property
    def inside_spread(self) -> bool:
        return self.low <= 0 <= self.high

    @property
    def ahead(self) -> bool:
        """The first is better, resolved (a win)."""
        return self.mean > 0 and not self.below_tolerance and not self.inside_spread

    @property
    def verdict(self) -> str:
        if self.below_tolerance:
            return f"tie (below the {REL_TOL:.1%} tolerance)"
        if self.inside_spread:
            return "tie (inside the spread over seeds)"
        return "ahead" if self.mean > 0 else "behind"


def paired(first: Sequence[float], second: Sequence[float], lower_is_better: bool) -> Paired:
    """The paired comparison of two optimizers' values on the same seeds (same order)."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape or not len(a) or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"paired values must be finite and of equal, non-zero length, got {list(a)} and {list(b)}")
    d = (b - a) if lower_is_better else (a - b)
    mean = float(d.mean())
    if len(d) >= 3:
        from scipy.stats import t  # scikit-learn's dependency: imported only where a report is made

        half = float(t.ppf(0.5 + CONFIDENCE / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
        low, high, interval = mean - half, mean + half, f"{CONFIDENCE:.0%} t-interval"
    elif len(d) == 2:
        low, high, interval = float(d.min()), float(d.max()), "range over 2 seeds"
    else:
        low, high, interval = mean, mean, "one seed"
    scale = max(abs(float(a.mean())), abs(float(b.mean())))
    relative = mean / scale if scale > 0 else 0.0
    per_seed = np.maximum(np.abs(a), np.abs(b)) * REL_TOL
    return Paired(differences=tuple(float(x) for x in d), mean=mean, low=low, high=high, relative=relative,
                  interval=interval, seeds_ahead=int((d > per_seed).sum()))

r"""Post-hoc EMA (Karras et al. 2024, EDM2, section 3; docs/algorithms.md, section 7): track
power-function EMAs of the weights, save them every N steps, and after training rebuild
the average of any width ``sigma_rel`` as a linear combination of the snapshots.

A power-function EMA of exponent ``gamma`` averages the weights over ``[0, t]`` with the
density ``(gamma + 1) tau^gamma / t^(gamma + 1)``; one step (``theta_t`` the weights after
optimizer step ``t = 1, 2, ...``, held over ``(t - 1, t]``) is

    e_t = beta_t e_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),

exactly that density's average (``beta_1 = 0``: no initial copy is needed). Updating only
at some steps, from ``s`` to ``t``, uses ``beta = (s/t)^(gamma + 1)``: the density of the
skipped steps on their last weights. The width relative to ``t`` is

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),

a cubic in ``gamma`` (:func:`sigma_rel_to_gamma`). The inner product of two such
densities in L2 over time has a closed form (:func:`profile_inner`), so the least-squares
coefficients of a target profile on the snapshots' profiles are one small linear solve
(:func:`solve_coefficients`); the average is that combination of the snapshots' weights
(:func:`reconstruct`, reading one snapshot at a time).

Pure torch: no Lightning here (``lightning_imex.callbacks.PostHocEMA`` is the callback,
``lightning_imex.posthoc_cli`` the command ``lightning-imex-posthoc-ema``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .atomic import torch_save
from .validate import is_real

__all__ = ["FORMAT", "SIGMA_REL_MAX", "PowerEMA", "SnapshotError", "check_sigma_rel", "find_snapshots",
           "gamma_to_sigma_rel", "load_snapshot", "profile_inner", "reconstruct", "save_snapshot",
           "sigma_rel_to_gamma", "snapshot_name", "solve_coefficients"]

FORMAT = "lightning_imex.posthoc_ema/1"
# gamma = 0 (a uniform average over [0, t]) has sigma_rel = 1/sqrt(12); wider profiles
# would need gamma < 0, a density that peaks at the start of training
SIGMA_REL_MAX = 12 ** -0.5
SNAPSHOT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_NAME = re.compile(r"^step=(\d+)\.pt$")


class SnapshotError(ValueError):
    """A snapshot file or folder that cannot be used; the message is one line."""


# ---------------------------------------------------------------------------------- widths
def check_sigma_rel(value: Any, name: str = "sigma_rel") -> float:
    """``value`` as a float, or one line naming ``name`` and the allowed range."""
    if not (is_real(value) and 0 < value < SIGMA_REL_MAX):
        raise ValueError(f"{name} must be a number in (0, {SIGMA_REL_MAX:.4f}) (1/sqrt(12): the uniform average), "
                         f"got {value!r}")
    return float(value)


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The ``gamma > 0`` with ``gamma_to_sigma_rel(gamma) == sigma_rel``: with ``s = sigma_rel^-2``,
    ``(gamma + 2)^2 (gamma + 3) = s (gamma + 1)`` is ``gamma^3 + 7 gamma^2 + (16 - s) gamma +
    (12 - s) = 0``. Its value at ``gamma = 0``, ``12 - s``, is negative (sigma_rel < 1/sqrt(12)) and
    it grows without bound, so there is one root above 0 (the cubic's largest): bisection
    brackets it, Newton's method polishes it to machine precision."""
    sigma_rel = check_sigma_rel(sigma_rel)
    s = sigma_rel ** -2
    cubic = lambda g: ((g + 7) * g + 16 - s) * g + 12 - s  # noqa: E731
    slope = lambda g: (3 * g + 14) * g + 16 - s  # noqa: E731
    low, high = 0.0, 1.0
    while cubic(high) < 0:
        low, high = high, 2 * high
    for _ in range(200):  # the bracket halves each time: far more than float64 needs
        middle = (low + high) / 2
        low, high = (middle, high) if cubic(middle) < 0 else (low, middle)
        if high - low <= 1e-12 * high:
            break
    gamma = (low + high) / 2
    for _ in range(3):
        gamma -= cubic(gamma) / slope(gamma)
    return gamma


# ----------------------------------------------------------------------- least squares
def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """``integral p_a(tau) p_b(tau) dtau`` of the densities ``p(tau) = (gamma + 1) tau^gamma /
    t^(gamma + 1)`` on ``[0, t]``: with ``m = min(t_a, t_b)``,
    ``(gamma_a + 1)(gamma_b + 1) m^(gamma_a + gamma_b + 1) / ((gamma_a + gamma_b + 1) t_a^(gamma_a + 1)
    t_b^(gamma_b + 1))``, computed in logarithms (the powers overflow for long runs)."""
    m = min(t_a, t_b)
    log = (math.log(gamma_a + 1) + math.log(gamma_b + 1) - math.log(gamma_a + gamma_b + 1)
           + (gamma_a + gamma_b + 1) * math.log(m) - (gamma_a + 1) * math.log(t_a) - (gamma_b + 1) * math.log(t_b))
    return math.exp(log)


def solve_coefficients(snapshots: Sequence[tuple[float, float]], targets: Sequence[tuple[float, float]]
                       ) -> tuple[Tensor, Tensor]:
    """Least squares: for each target ``(t, gamma)``, the coefficients ``c`` over the snapshots'
    profiles ``(t_i, gamma_i)`` minimizing ``|| p_target - sum_i c_i p_i ||`` in L2 over time,
    i.e. the solution of ``G c = b`` with ``G_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>``
    (minimum-norm where ``G`` is singular). Returns (coefficients ``[targets, snapshots]``,
    the relative residual ``|| p_target - sum c_i p_i || / || p_target ||`` of each target),
    in float64."""
    gram = torch.tensor([[profile_inner(*a, *b) for b in snapshots] for a in snapshots], dtype=torch.float64)
    rhs = torch.tensor([[profile_inner(*a, *t) for t in targets] for a in snapshots], dtype=torch.float64)
    # the Gram matrix of near-identical profiles is ill-conditioned: an SVD-based solve with
    # a cutoff keeps the coefficients bounded where they are not determined
    coefficients = torch.linalg.lstsq(gram, rhs, rcond=1e-12, driver="gelsd").solution.T
    target_norms = torch.tensor([profile_inner(*t, *t) for t in targets], dtype=torch.float64)
    squared = target_norms - 2 * (coefficients * rhs.T).sum(1) + ((coefficients @ gram) * coefficients).sum(1)
    return coefficients, squared.clamp_min(0).sqrt() / target_norms.sqrt()


# --------------------------------------------------------------------------- tracking
class PowerEMA:
    """Power-function EMAs of a list of tensors, one per ``sigma_rel``: ``update(tensors, t)``
    after optimizer step ``t`` is one ``torch._foreach_lerp_`` per profile with the weight
    ``1 - (s/t)^(gamma + 1)`` (``s``: the step of the previous update, 0 at first, making
    the first update a copy). ``device``: where the averages live (``None``: beside each
    tensor)."""

    def __init__(self, sigma_rels: Iterable[float], device: str | torch.device | None = None) -> None:
        self.sigma_rels = [check_sigma_rel(s, "sigma_rels[]") for s in sigma_rels]
        if not self.sigma_rels:
            raise ValueError("sigma_rels must name at least one width in (0, 0.2887), got none")
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.device = None if device is None else torch.device(device)
        self.step = 0  # the optimizer step of the last update
        self.averages: list[list[Tensor]] | None = None  # [profile][tensor]

    @torch.no_grad()
    def update(self, tensors: Sequence[Tensor], step: int) -> None:
        if step <= self.step:
            raise ValueError(f"PowerEMA.update: step must grow, got {step} after {self.step}")
        sources = [t.detach() if self.device is None else t.detach().to(self.device) for t in tensors]
        if self.averages is None:
            self.averages = [[s.clone() for s in sources] for _ in self.gammas]  # beta = 0: a copy
        else:
            for gamma, average in zip(self.gammas, self.averages):
                torch._foreach_lerp_(average, sources, 1 - (self.step / step) ** (gamma + 1))
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        return {"sigma_rels": list(self.sigma_rels), "step": self.step, "averages": self.averages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"PowerEMA: the saved state tracks sigma_rels={list(state['sigma_rels'])}, this one "
                             f"{self.sigma_rels}")
        self.step, self.averages = int(state["step"]), state["averages"]


# --------------------------------------------------------------------------- snapshots
def snapshot_name(step: int) -> str:
    return f"step={step:09d}.pt"


def save_snapshot(folder: str | os.PathLike, ema: PowerEMA, names: Sequence[str], other: dict[str, Tensor],
                  dtype: str = "float32", aliases: dict[str, str] | None = None) -> Path:
    """Writes ``folder/step=<t>.pt``: every profile's averages (``names``: their
    ``state_dict`` keys; cast to ``dtype``, ``float32`` or ``bfloat16``) and ``other``, the
    rest of the ``state_dict`` (integer buffers and anything not averaged, as it is now),
    ``aliases`` ({key: key in ``names``}: tied tensors). Written to a temporary file in the
    same folder and renamed: a crash leaves the old file or none, never half of one. Plain
    tensors, numbers and strings: loads with ``weights_only=True``."""
    if ema.averages is None:
        raise ValueError("save_snapshot: the EMA has no update yet")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cast = SNAPSHOT_DTYPES[dtype]
    snapshot = {
        "format": FORMAT, "step": ema.step, "sigma_rels": list(ema.sigma_rels), "gammas": list(ema.gammas),
        "names": list(names), "dtypes": [str(t.dtype).removeprefix("torch.") for t in ema.averages[0]],
        "profiles": [[t.detach().to("cpu", cast) for t in average] for average in ema.averages],
        "other": {k: v.detach().cpu() for k, v in other.items()}, "aliases": dict(aliases or {}),
    }
    return torch_save(snapshot, folder / snapshot_name(ema.step))


def load_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    """A snapshot read with ``weights_only=True`` (memory-mapped: its tensors are read when
    used) and checked, or a :class:`SnapshotError`."""
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch.load raises anything the bytes provoke
        raise SnapshotError(f"{path}: not a readable snapshot ({type(error).__name__}: "
                            f"{str(error).strip().splitlines()[0] if str(error).strip() else '-'})") from None
    if not isinstance(snapshot, dict) or snapshot.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a {FORMAT} snapshot")
    profiles, names = snapshot["profiles"], snapshot["names"]
    if len(profiles) != len(snapshot["gammas"]) or any(len(p) != len(names) for p in profiles):
        raise SnapshotError(f"{path}: its profiles do not match its names and gammas (a damaged file)")
    return snapshot


def find_snapshots(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the snapshots in ``folder``, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = ((_NAME.match(p.name), p) for p in folder.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


# ----------------------------------------------------------------------- reconstruction
def reconstruct(paths: Sequence[str | os.PathLike], sigma_rels: Sequence[float], step: int | None = None
                ) -> tuple[list[dict[str, Tensor]], Tensor]:
    """The post-hoc EMA of each ``sigma_rels`` at ``step`` (default: the last snapshot's) as a
    ``state_dict``, from the snapshots at ``paths`` (each profile of each snapshot at or
    before ``step`` is one basis profile). Memory: one accumulator per target in float32
    (``len(sigma_rels)`` copies of the model) plus the snapshot being read, memory-mapped
    and read one at a time. Returns the state_dicts (averages in the dtype they were
    tracked in) and the relative L2 residual of each target profile's fit."""
    targets = [check_sigma_rel(s, "sigma_rels[]") for s in sigma_rels]
    headers = [(Path(p), load_snapshot(p)) for p in paths]
    if not headers:
        raise SnapshotError("reconstruct: no snapshots")
    step = max(h["step"] for _, h in headers) if step is None else step
    headers = [(p, h) for p, h in headers if h["step"] <= step]
    if not headers:
        raise SnapshotError(f"reconstruct: no snapshot at or before step {step}")
    names = headers[-1][1]["names"]
    for path, header in headers:
        if header["names"] != names:
            raise SnapshotError(f"{path}: its tensors differ from those of {headers[-1][0]} (another model)")
    basis = [(float(h["step"]), float(g)) for _, h in headers for g in h["gammas"]]
    coefficients, residuals = solve_coefficients(basis, [(float(step), sigma_rel_to_gamma(s)) for s in targets])
    sums: list[list[Tensor]] | None = None
    column = 0
    for path, _ in headers:
        snapshot = load_snapshot(path)  # again, one at a time: the headers' mappings are not read
        for profile in snapshot["profiles"]:
            weights = coefficients[:, column].tolist()
            column += 1
            if sums is None:
                sums = [[w * t.float() for t in profile] for w in weights]
            else:
                for total, w in zip(sums, weights):
                    torch._foreach_add_(total, [t.float() for t in profile], alpha=w)
    last = headers[-1][1]
    dtypes = [getattr(torch, d) for d in last["dtypes"]]
    results = []
    for total in sums:
        state = {name: t.to(dtype) for name, t, dtype in zip(names, total, dtypes)}
        state.update({k: v.clone() for k, v in last["other"].items()})
        state.update({alias: state[name] for alias, name in last["aliases"].items()})
        results.append(state)
    return results, residuals

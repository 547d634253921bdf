"""Hand-written references, line by line from ALGORITHMS.md, independent of the package's
coefficient-form kernel: they store every stage and compute bias-correction masses by
running the scheme on the constant gradient 1."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def scheme_masses(tableau, beta: float, steps: int) -> list[list[float]]:
    """Stage masses of each step 1..steps: the scheme on gradient 1 from a zero moment."""
    s, c = tableau.num_stages, 1.0 - beta
    a, b = tableau.a_explicit, tableau.b_explicit
    mass, out = 0.0, []
    for _ in range(steps):
        stages, f = [], []
        for i in range(s):
            stages.append(mass + sum(a[i][j] * f[j] for j in range(i)))
            f.append(c * (1.0 - stages[i]))
        out.append(stages)
        mass = mass + sum(b[i] * f[i] for i in range(s))
    return out


def imex_step(
    theta: list[Tensor], m: list[Tensor], v: list[Tensor], grad: Callable[[list[Tensor]], list[Tensor]],
    tableau, *, lr: float, beta1: float, beta2: float, eps: float, masses_m=None, masses_v=None,
    weight_decay: float = 0.0, decoupled: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], int]:
    """One step of the ALGORITHMS.md stage loop; returns new (theta, m, v) and gradient count."""
    s = tableau.num_stages
    a_e, b_e, a_i, b_i = tableau.a_explicit, tableau.b_explicit, tableau.a_implicit, tableau.b_implicit
    used = set(tableau.gradient_stages)
    c1, c2 = 1.0 - beta1, 1.0 - beta2  # h*c1, h*c2
    fm, fv, big_g, calls = [None] * s, [None] * s, [None] * s, 0
    base = theta
    for i in range(s):
        m_i = [mn + sum(a_e[i][j] * fm[j][k] for j in range(i) if j in used) for k, mn in enumerate(m)]
        v_i = [vn + sum(a_e[i][j] * fv[j][k] for j in range(i) if j in used) for k, vn in enumerate(v)]
        mass_m = masses_m[i] if masses_m else 1.0
        mass_v = masses_v[i] if masses_v else 1.0
        if mass_m <= 0 or mass_v <= 0:
            big_g[i] = [torch.zeros_like(x) for x in m_i]
        else:
            big_g[i] = [-(mk / mass_m) / ((vk / mass_v).clamp(min=0).sqrt() + eps) for mk, vk in zip(m_i, v_i)]
        theta_i = [tn + lr * sum(a_i[i][j] * big_g[j][k] for j in range(i + 1)) for k, tn in enumerate(base)]
        if i in used:
            g = grad(theta_i)
            calls += 1
            if weight_decay and not decoupled:
                g = [gk + weight_decay * tk for gk, tk in zip(g, theta_i)]
            if calls == 1 and weight_decay and decoupled:
                base = [t * (1.0 - lr * weight_decay) for t in theta]  # AdamW: after the first gradient
            fm[i] = [c1 * (gk - mk) for gk, mk in zip(g, m_i)]
            fv[i] = [c2 * (gk * gk - vk) for gk, vk in zip(g, v_i)]
    m_new = [mn + sum(b_e[i] * fm[i][k] for i in used) for k, mn in enumerate(m)]
    v_new = [vn + sum(b_e[i] * fv[i][k] for i in used) for k, vn in enumerate(v)]
    theta_new = [tn + lr * sum(b_i[i] * big_g[i][k] for i in range(s)) for k, tn in enumerate(base)]
    return theta_new, m_new, v_new, calls


def paper_adam(theta: list[Tensor], grads_fn, steps: int, lr: float, beta1: float, beta2: float, eps: float):
    """The IMEX paper's Adam: Algorithm 1 without bias correction."""
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    for _ in range(steps):
        g = grads_fn(theta)
        m = [beta1 * mk + (1 - beta1) * gk for mk, gk in zip(m, g)]
        v = [beta2 * vk + (1 - beta2) * gk * gk for vk, gk in zip(v, g)]
        theta = [t - lr * mk / (vk.sqrt() + eps) for t, mk, vk in zip(theta, m, v)]
    return theta


def trapezoidal_written_out(theta, m, v, grad, *, lr, beta1, beta2, eps):
    """The trapezoidal step exactly as ALGORITHMS.md writes it (no bias correction)."""
    def u(mk, vk):
        return mk / (vk.sqrt() + eps)
    g1 = grad(theta)
    m_t = [beta1 * mk + (1 - beta1) * gk for mk, gk in zip(m, g1)]
    v_t = [beta2 * vk + (1 - beta2) * gk * gk for vk, gk in zip(v, g1)]
    theta_new = [t - lr / 2 * (u(mk, vk) + u(mt, vt)) for t, mk, vk, mt, vt in zip(theta, m, v, m_t, v_t)]
    g2 = grad(theta_new)
    m_new = [mk + (1 - beta1) / 2 * ((a - mk) + (b - mt)) for mk, a, b, mt in zip(m, g1, g2, m_t)]
    v_new = [vk + (1 - beta2) / 2 * ((a * a - vk) + (b * b - vt)) for vk, a, b, vt in zip(v, g1, g2, v_t)]
    return theta_new, m_new, v_new


def trapezoidal_mass(beta: float, k: int) -> float:
    """ALGORITHMS.md: the trapezoidal moment mass decays like ((1+b^2)/2)^k."""
    return 1.0 - ((1.0 + beta * beta) / 2.0) ** k


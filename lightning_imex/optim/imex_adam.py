"""IMEXAdam: Adam as an implicit-explicit Runge-Kutta step (docs/optimizer-core.md)."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Hashable, Iterable

import torch
from torch import Tensor

from ..validate import boolean
from .base import ElementwiseOptimizer, check_adam_hyperparameters, gradient_flags, number
from .closure import closure_calls
from .plan import Plan, build_plan
from .tableau import TABLEAUX, IMEXTableau, get_tableau

__all__ = ["IMEXAdam", "PositivityWarning", "check_adam_hyperparameters"]


class PositivityWarning(UserWarning):
    """A tableau with negative explicit coefficients can drive ``v`` negative."""


class IMEXAdam(ElementwiseOptimizer):
    r"""Adam as one step of an IMEX Runge-Kutta method for Adam's ODE.

    ``tableau="euler"`` is Adam exactly; ``"trapezoidal"`` (the default) is second order
    and costs two gradient evaluations per step on the same minibatch, so ``step``
    needs a closure (or ``reuse_gradient=True``: one evaluation, the next step's first
    gradient standing in for this step's last). ``"ssp3_433"`` is the third-order
    tableau to use; ``"ars222"``/``"ars343"`` are not positivity-preserving and warn.

    Args:
        params: parameters or parameter groups (lr, betas, eps, weight decay may differ).
        lr: step size ``h``.
        betas: ``(beta1, beta2)``; ``h c1 = 1 - beta1`` and ``h c2 = 1 - beta2``.
        eps: added to ``sqrt(v)``.
        weight_decay: L2 penalty added to every gradient evaluation, or with
            ``decoupled_weight_decay=True`` applied once per step as in AdamW.
        tableau: a name in :data:`TABLEAUX` or an :class:`IMEXTableau`, shared by all groups.
        bias_correction: divide every stage's moments by the scheme's own masses (the
            scheme run on gradient 1 from zero moments); ``False`` is the paper's algorithm.
        reuse_gradient: one gradient per step (only where the tableau allows it).
        maximize: ascend instead of descend.
        fused: run each gradient's element-wise work as one generated kernel over
            every tensor (Triton on CUDA, C on CPU; compiled once per machine and cached
            on disk). ``None`` picks it on CUDA and for CPU groups of 4k+ elements
            (:func:`~lightning_imex.optim.kernel.select_backend`); ``False`` is the eager
            reference path. Both run the same program (:mod:`~lightning_imex.optim.plan`).
        max_grad_norm: clip every gradient evaluation to this global L2 norm, as
            ``torch.nn.utils.clip_grad_norm_`` before the step would, inside the step: one
            pass computes the norm, the step's own pass applies the factor (the gradients
            are read twice instead of three times; ``.grad`` is left as it was).
        state_dtype: how the moments (and the step's moment working buffers) are stored:
            ``None``, the parameter's dtype (as torch's Adam); ``torch.float32``; or
            ``torch.bfloat16``, half the bytes, every store rounded stochastically
            (unbiased; the same bits on every path, so a resumed run is exact). The
            arithmetic is float32 either way (docs/optimizer-core.md, "State precision").
            Also by name: ``"float32"``, ``"bfloat16"`` (as a config file gives it); or
            ``"8bit"``: uint8 codes with a float32 scale per 256 elements, about 2 bytes
            per parameter, bit-identical on every path (tensors under 256 elements keep
            float32 moments; docs/optimizer-core.md, "8-bit state").
        seed: of the stochastic rounding's random bits (held in the param groups, so in
            ``state_dict``).
        param_rounding: how stores to bfloat16 parameters round (pure-bf16 training;
            docs/optimizer-core.md, "Parameter precision"): ``"nearest"`` (as torch's
            Adam); ``"stochastic"``, unbiased, with the seed's bits; ``"kahan"``, to nearest
            with the rounding error kept in a bfloat16 compensation buffer (state
            ``kahan_compensation``, 2 bytes per parameter) that the next step adds back.
            Both let updates below the parameters' bfloat16 resolution accumulate.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        tableau: str | IMEXTableau = "trapezoidal",
        bias_correction: bool = True,
        reuse_gradient: bool = False,
        maximize: bool = False,
        *,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | str | None = None,
        seed: int = 0,
        param_rounding: str = "nearest",
    ) -> None:
        tableau = get_tableau(tableau)
        boolean("reuse_gradient", reuse_gradient)
        if reuse_gradient and not tableau.allows_gradient_reuse:
            allowed = [name for name, t in TABLEAUX.items() if t.allows_gradient_reuse]
            raise ValueError(
                f"reuse_gradient=True needs a tableau whose last gradient stage sits at theta_{{n+1}}; "
                f"{tableau.name!r} does not (built-ins that do: {', '.join(allowed)})")
        if not tableau.positivity_preserving:
            warnings.warn(
                f"tableau {tableau.name!r} is not positivity-preserving (it has negative explicit "
                "coefficients): v can turn negative and training can diverge at practical step sizes; "
                "prefer 'trapezoidal' or 'ssp3_433'", PositivityWarning, stacklevel=2)
        # The tableau object lives in defaults (pickled and deep-copied with the optimizer);
        # param groups, and so state dicts, carry its name.
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, bias_correction=bias_correction,
            maximize=maximize, tableau=tableau, reuse_gradient=reuse_gradient, max_grad_norm=max_grad_norm,
        )
        super().__init__(params, defaults, fused, state_dtype, seed, param_rounding)

    @property
    def tableau(self) -> IMEXTableau:
        return self.defaults["tableau"]

    @property
    def reuse_gradient(self) -> bool:
        return self.defaults["reuse_gradient"]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # optimizer-wide: never a documented default
            group.update(tableau=self.tableau.name, reuse_gradient=self.reuse_gradient)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in (("tableau", self.tableau), ("reuse_gradient", self.reuse_gradient)):
            if key in param_group:
                given = get_tableau(param_group[key]) if key == "tableau" else param_group[key]
                if given != value:
                    raise ValueError(f"all parameter groups share one {key}: the optimizer has "
                                     f"{getattr(value, 'name', value)!r}, a group asks for "
                                     f"{getattr(given, 'name', given)!r}")
        super().add_param_group({**param_group, "tableau": self.tableau.name, "reuse_gradient": self.reuse_gradient})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for group in state_dict["param_groups"]:
            for key, value in (("tableau", self.tableau.name), ("reuse_gradient", self.reuse_gradient)):
                if group.get(key, value) != value:
                    raise ValueError(f"this state was saved with {key}={group[key]!r}; this optimizer "
                                     f"has {key}={value!r}: loading it would corrupt the trajectory")
        super().load_state_dict(state_dict)

    def _plan(self, group: dict[str, Any]) -> Plan:
        maximize, l2, decoupled = gradient_flags(group)
        return build_plan(self.tableau, self.reuse_gradient, l2=l2, decoupled=decoupled, maximize=maximize)

    @property
    def requires_closure(self) -> bool:
        """Whether ``step`` must call the closure (more than once, or away from the current
        parameters): false for ``euler`` and with ``reuse_gradient=True``."""
        return self._closure_needed([self._plan(self.param_groups[0])]) is not None

    @property
    def gradient_evaluations_per_step(self) -> int:
        """Closure calls one step makes: the tableau's explicit stages, 1 with
        ``reuse_gradient=True`` (the next step's gradient stands in for the last stage's)."""
        return self._plan(self.param_groups[0]).num_closure_calls

    def _closure_needed(self, plans: list[Plan]) -> str | None:
        plan = plans[0]
        if plan.has_pre_gradient_event:
            return f"tableau {self.tableau.name!r} takes its first gradient away from the current parameters"
        if plan.num_closure_calls > 1:
            return (f"tableau {self.tableau.name!r} evaluates {plan.num_closure_calls} gradients per step "
                    "on the same minibatch")
        return None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One IMEX step. ``closure`` must clear the gradients, compute the loss, call
        ``backward`` and return the loss; it is called once per gradient stage, after the
        parameters hold that stage's point. Returns the first evaluation's loss."""
        groups = [g for g in self.param_groups if g["params"]]
        if not groups:
            return self._evaluate(closure) if closure is not None else None
        plans = [self._plan(g) for g in groups]
        self._check_closure(closure, plans[0])
        if closure is None or not (plans[0].num_closure_calls > 1 or plans[0].has_pre_gradient_event):
            return self._step(groups, plans, closure)
        with closure_calls(self, closure) as calls:  # a framework's closure, made safe to call again
            return self._step(groups, plans, calls)

    def _step(self, groups: list[dict[str, Any]], plans: list[Plan], closure: Callable[[], Any] | None) -> Any:
        pre_gradient = plans[0].has_pre_gradient_event
        loss = None
        if closure is not None and not pre_gradient:
            loss = self._evaluate(closure, plans[0])
        batches = [self._batches(group, plan.scratch, self._scalars(group, plan), without_grad=pre_gradient,
                                 relative_events=plan.relative_events) for group, plan in zip(groups, plans)]
        for index, event in enumerate(plans[0].events):
            if event.gradient >= 2 or (event.gradient == 1 and pre_gradient):  # the parameters moved
                for group in groups:
                    for p in group["params"]:
                        p.grad = None
                value = self._evaluate(closure, plans[0])
                loss = value if event.gradient == 1 else loss
            clip = self._gradient_clip() if event.gradient >= 1 else None  # this evaluation's, over every group
            for plan, group_batches in zip(plans, batches):
                for batch in group_batches:
                    self._run(batch, plan.events[index], self._gradients(batch.params, event.gradient >= 1), clip)
        for group_batches in batches:
            self._count_step(group_batches)
            if self.reuse_gradient:
                for batch in group_batches:
                    for p in batch.params:
                        self.state[p]["pending"] = True
        return loss

    def _check_closure(self, closure: Callable[[], Any] | None, plan: Plan) -> None:
        why = self._closure_needed([plan])
        if why is not None and closure is None:
            raise RuntimeError(
                f"{why}, so step() needs a closure that clears the gradients, computes the loss, calls "
                "backward and returns the loss (optimizer.step(closure)); it got none, as under a GradScaler "
                "(Lightning precision='16-mixed'), DeepSpeed, or `opt.step()` in Lightning manual optimization: "
                "pass a closure, use precision='bf16-mixed' or '32-true', or tableau='euler' (Adam) or "
                "reuse_gradient=True (one gradient per step)")

    def _evaluate(self, closure: Callable[[], Any], plan: Plan | None = None) -> Any:
        with torch.enable_grad():
            loss = closure()
        if loss is None and plan is not None and (why := self._closure_needed([plan])) is not None:
            raise RuntimeError(
                f"{why}, but the closure returned None: it must return the loss (and call backward) on "
                "every call. In Lightning manual optimization, `opt.step()` without a closure passes one "
                "that returns None: call `opt.step(closure=closure)` with a closure that computes the loss, "
                "calls `self.manual_backward(loss)` and returns it")
        return loss

    def _init_state(self, state: dict[str, Any], p: Tensor, dtype: torch.dtype) -> None:
        super()._init_state(state, p, dtype)
        if self.reuse_gradient:
            state["pending"] = False  # exp_avg/exp_avg_sq await the next gradient

    def _state_key(self, state: dict[str, Any]) -> tuple:
        return state["step"], state.get("pending", False)

    def _scalars(self, group: dict[str, Any], plan: Plan) -> Callable[[tuple], dict[Hashable, float]]:
        def scalars(key: tuple) -> dict[Hashable, float]:
            step, pending = key
            return plan.scalars(
                lr=number("lr", group["lr"]), beta1=group["betas"][0], beta2=group["betas"][1],
                eps=group["eps"], weight_decay=group["weight_decay"], step=step, pending=pending,
                bias_correction=group["bias_correction"])
        return scalars

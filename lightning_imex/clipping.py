"""Gradient clipping for Lightning's ``configure_gradient_clipping`` hook (docs/algorithms.md,
section 6): global norm, element-wise value, or unit-wise adaptive (AGC); the pre-clip
gradient norm logged; and a policy for non-finite gradients.

Lightning calls the hook after every closure evaluation, so an optimizer that evaluates
two or three gradients per step has each of them clipped. With this package's optimizers,
``norm`` (L2) and ``value`` clipping happen inside their step: the hook measures (one
pass over the gradients for the norm) and the step reads the clipped gradient, so
``.grad`` is not rewritten (sharded ``value`` clipping excepted; docs/optimizer-core.md,
"Clipping in the step")."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import typing
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from . import _lightning
from .multigradient import gradient_evaluation
from .optim.base import ElementwiseOptimizer
from .optim.kernel import all_reduce_sum, local_tensor, reduction_key
from .plain import to_plain
from .validate import allowed_keywords, boolean, choice, real

__all__ = ["CLIP_ALGORITHMS", "NONFINITE_POLICIES", "GradientClipping", "NonFiniteGradientError",
           "SkipsSteps", "adaptive_clip_", "check_sharded", "clip_gradients", "step_skipped"]

CLIP_ALGORITHMS = ("off", "norm", "value", "agc")
NONFINITE_POLICIES = ("raise", "skip", "ignore")


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or inf and the policy is ``raise``."""


class SkipStep(Exception):
    """Raised by the hook under ``nonfinite="skip"``; :class:`~lightning_imex.IMEXModule`
    catches it and leaves parameters and optimizer state as they were."""


@typing.runtime_checkable
class SkipsSteps(typing.Protocol):
    """The protocol of a module whose ``optimizer_step`` can undo a step (``nonfinite="skip"``;
    :class:`~lightning_imex.IMEXModule` implements it): ``can_skip_steps`` is true, and
    ``last_step_skipped`` says after each optimizer step whether it was skipped. What
    advances once per step (the LR schedule, ``ModelEMA``) asks :func:`step_skipped`."""

    can_skip_steps: bool
    last_step_skipped: bool


def step_skipped(module: Any) -> bool:
    """Whether ``module``'s latest optimizer step was skipped (:class:`SkipsSteps`)."""
    return isinstance(module, SkipsSteps) and module.can_skip_steps and module.last_step_skipped


@dataclasses.dataclass(frozen=True)
class GradientClipping:
    """How to clip: the clipping spec, checked when made and frozen (as the optimizer's
    and the schedule's specs: :meth:`from_config` resolves a config once and returns a
    spec as it is).

    Args:
        algorithm: ``off``, ``norm`` (global ``norm_type`` norm over all parameters),
            ``value`` (element-wise) or ``agc`` (unit-wise adaptive clipping).
        threshold: the largest norm (``norm``), the largest ``|g|`` (``value``), or the
            clip factor ``lambda`` (``agc``: a unit's gradient norm is held to
            ``lambda * max(||w||, agc_eps)``).
        norm_type: the norm of ``norm`` clipping (``inf`` allowed); the logged norm is
            always this norm.
        agc_eps: the smallest weight norm ``agc`` scales by.
        agc_exclude_output: leave the output layer (the last module that holds
            parameters) unclipped under ``agc``, as the NFNet paper recommends.
        agc_exclude: more parameter-name patterns (``fnmatch``) that ``agc`` leaves alone.
        nonfinite: ``raise`` (the error names the parameter and the global step), ``skip``
            (the optimizer step is skipped: parameters and optimizer state stay exactly as
            they were; needs :class:`~lightning_imex.IMEXModule`) or ``ignore``. Under
            ``16-mixed`` the gradient scaler owns overflow steps and this is not applied.
        log: log ``grad_norm`` (pre-clip) and ``grad_clipped`` (1.0 when clipping
            changed the gradient) of the step's first gradient evaluation, on the steps
            the Trainer's loggers record (``log_every_n_steps``).
    """

    algorithm: str = "off"
    threshold: float | None = None
    norm_type: float = 2.0
    agc_eps: float = 1e-3
    agc_exclude_output: bool = True
    agc_exclude: tuple[str, ...] = ()
    nonfinite: str = "raise"
    log: bool = True

    def __post_init__(self) -> None:
        choice("clipping.algorithm", self.algorithm, CLIP_ALGORITHMS)
        choice("clipping.nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if self.algorithm == "off":
            if self.threshold is not None:
                raise ValueError("clipping.threshold is set but clipping.algorithm is 'off'")
        else:
            real("clipping.threshold", self.threshold, 0, above=True, note=f" for algorithm {self.algorithm!r}")
        real("clipping.norm_type", self.norm_type, 0, above=True, finite=False)
        real("clipping.agc_eps", self.agc_eps, 0, above=True)
        for name in ("agc_exclude_output", "log"):
            boolean(f"clipping.{name}", getattr(self, name))
        if isinstance(self.agc_exclude, str) or not all(isinstance(p, str) for p in self.agc_exclude):
            raise TypeError(f"clipping.agc_exclude must be a list of name patterns, got {self.agc_exclude!r}")
        object.__setattr__(self, "agc_exclude", tuple(self.agc_exclude))

    @classmethod
    def from_config(cls, config: Any) -> GradientClipping:
        """From ``None`` (the defaults), an instance, or a mapping of its fields (dict or
        OmegaConf); unknown fields are errors that list the allowed ones."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        config = to_plain(config, "clipping")
        if not isinstance(config, dict):
            raise TypeError(f"clipping must be a mapping of {[f.name for f in dataclasses.fields(cls)]}, "
                            f"got {config!r}")
        allowed_keywords("clipping", config, [f.name for f in dataclasses.fields(cls)], "GradientClipping")
        return cls(**config)

    def with_trainer(self, gradient_clip_val: float | None, gradient_clip_algorithm: Any) -> GradientClipping:
        """This config, or the Trainer's ``gradient_clip_val``/``_algorithm`` when this
        one is ``off``; both set is an error."""
        if gradient_clip_val is None or gradient_clip_val == 0:
            return self
        if self.algorithm != "off":
            raise ValueError(
                f"gradient clipping is configured twice: clipping.algorithm={self.algorithm!r} on the module and "
                f"Trainer(gradient_clip_val={gradient_clip_val}); set it in one place")
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm")
        return dataclasses.replace(self, algorithm=algorithm, threshold=float(gradient_clip_val))


def clip_gradients(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    clipping: GradientClipping | Mapping[str, Any] | None,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: Any = None,
) -> None:
    """The body of a ``configure_gradient_clipping`` hook; any LightningModule can use it::

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            clip_gradients(self, optimizer, {"algorithm": "agc", "threshold": 0.01},
                           gradient_clip_val, gradient_clip_algorithm)
    """
    config = GradientClipping.from_config(clipping).with_trainer(gradient_clip_val, gradient_clip_algorithm)
    trainer = _lightning.attached_trainer(module) if isinstance(module, L.LightningModule) else None
    if config.nonfinite == "skip" and not getattr(module, "can_skip_steps", False):
        raise ValueError("clipping.nonfinite='skip' needs a module whose optimizer_step can undo a step: "
                         "subclass lightning_imex.IMEXModule, or use nonfinite='raise' or 'ignore'")
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    ours = _clips_in_step(optimizer, config)
    in_step = ours if config.algorithm == "norm" and config.norm_type == 2 else None  # the norm's pass is ours
    # FSDP2's DTensor gradients: every rank holds a shard; norms are reduced over the ranks once, and every
    # rank reaches the same verdict on clipping and non-finite values
    sharded = any(reduction_key(g) is not None for g in grads)
    if in_step is not None:  # one pass over the gradients here; the step applies the factor
        params, squares = in_step.gradient_squares()
        total = squares.sum().sqrt().float()
    elif sharded:
        norms, total = _sharded_norm(grads, config)
    else:
        norms = torch._foreach_norm(grads, config.norm_type)
        total = torch.nn.utils.get_total_norm(norms, config.norm_type)  # == the norm over all of grads
    logging = config.log and _lightning.logs_this_step(trainer)  # a log costs ~0.3 ms
    if logging:
        module.log("grad_norm", total, on_step=True, on_epoch=False)
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if config.nonfinite == "skip" or (config.nonfinite == "raise" and (sharded and in_step is None
                                                                      or not _read_back_later(total.device))):
        if scaler is None and not torch.isfinite(total):
            _non_finite(module, params, config.nonfinite, trainer)
    elif config.nonfinite == "raise" and scaler is None:
        finite = torch.isfinite(squares) if in_step is not None else torch.isfinite(
            torch.stack([n.float().to(total.device) for n in norms]))
        _watch_non_finite(module, params, ~finite, trainer)
    clipped = None
    if in_step is not None:
        in_step.clip_gradients_in_step(total, config.threshold)
        clipped = total > config.threshold
    elif config.algorithm == "norm":
        if sharded:  # clip_grads_with_norm_'s factor, on the local shards
            torch._foreach_mul_([local_tensor(g) for g in grads], (config.threshold / (total + 1e-6)).clamp(max=1.0))
        else:
            torch.nn.utils.clip_grads_with_norm_(params, config.threshold, total)
        clipped = total > config.threshold
    elif config.algorithm == "value" and sharded:
        shards = [local_tensor(g) for g in grads]
        largest = torch.stack([g.abs().max() if g.numel() else g.new_zeros(()) for g in shards]).max()
        for key in {reduction_key(g) for g in grads} - {None}:
            torch.distributed.all_reduce(largest, torch.distributed.ReduceOp.MAX, group=key[0].get_group())
        clipped = largest > config.threshold
        torch._foreach_clamp_min_(shards, -config.threshold)
        torch._foreach_clamp_max_(shards, config.threshold)
    elif config.algorithm == "value" and ours is not None:  # the step reads g clamped
        clipped = torch.stack(torch._foreach_norm(grads, math.inf)).max() > config.threshold if logging else None
        ours.clamp_gradients_in_step(config.threshold, grads[0].device)
    elif config.algorithm == "value":
        clipped = torch.stack(torch._foreach_norm(grads, math.inf)).max() > config.threshold
        torch.nn.utils.clip_grad_value_(params, config.threshold)
    elif config.algorithm == "agc":
        excluded = _agc_excluded(module, config)
        kept = [p for p in params if id(p) not in excluded]
        clipped = adaptive_clip_(kept, config.threshold, config.agc_eps) if kept else torch.tensor(False)
    if logging and clipped is not None:
        module.log("grad_clipped", clipped.float(), on_step=True, on_epoch=False)


def _clips_in_step(optimizer: Any, config: GradientClipping) -> ElementwiseOptimizer | None:
    """The optimizer, when it is ours: under ``norm`` (L2) and ``value`` clipping it applies
    the clipping where its step reads the gradients (docs/optimizer-core.md, "Clipping in
    the step"), so they are never rewritten here."""
    inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
    if not isinstance(inner, ElementwiseOptimizer):
        return None
    if config.algorithm != "off" and inner.defaults.get("max_grad_norm") is not None:
        raise ValueError(f"gradient clipping is configured twice: clipping.algorithm={config.algorithm!r} and the "
                         f"optimizer's max_grad_norm={inner.defaults['max_grad_norm']!r}; set it in one place")
    return inner


def check_sharded(config: GradientClipping) -> None:
    """Raises a one-line ``ValueError`` for a clipping that sharded gradients (FSDP2) do
    not support: ``agc`` (a unit's weights may be split across processes) and the
    ``inf`` norm."""
    if config.algorithm == "agc":
        raise ValueError("clipping.algorithm='agc' is not available under a sharding strategy (FSDP2 splits a "
                         "unit's weights across processes): use clipping.algorithm='norm' or 'value'")
    if math.isinf(config.norm_type):
        raise ValueError("clipping.norm_type=inf is not available under a sharding strategy (FSDP2): use a finite "
                         "norm_type, e.g. 2")


def _sharded_norm(grads: list[Tensor], config: GradientClipping) -> tuple[list[Tensor], Tensor]:
    """Each gradient's norm over this rank's shard, and the norm over all of ``grads``
    over every shard: the local sums of ``|g|^p`` summed over the ranks, one all-reduce
    per device mesh (no gradient is gathered)."""
    check_sharded(config)
    shards = [local_tensor(g) for g in grads]
    norms = torch._foreach_norm(shards, config.norm_type)
    powers: dict[Any, Tensor] = {}
    for g, norm in zip(grads, norms):
        key = reduction_key(g)
        powers[key] = powers.get(key, 0) + norm.double() ** config.norm_type
    total = sum(all_reduce_sum(power, key) for key, power in powers.items())
    return norms, (total ** (1 / config.norm_type)).float()


def _non_finite(module: nn.Module, params: list[Tensor], policy: str, trainer: Any) -> None:
    if policy == "skip":
        raise SkipStep
    bad = [i for i, p in enumerate(params) if not torch.isfinite(local_tensor(p.grad)).all()]
    step = trainer.global_step if trainer is not None else "?"
    _raise_non_finite(module, params, bad, step, gradient_evaluation(module))


def _read_back_later(device: torch.device) -> bool:
    """Whether to check for non-finite gradients without reading them back every step: on
    an accelerator, where the read-back would stall the host."""
    return device.type != "cpu"


def _syncs_now(trainer: Any) -> bool:
    """A logged step, every ``log_every_n_steps``, an epoch's last batch or the fit's last step."""
    return (_lightning.logs_this_step(trainer) or trainer.is_last_batch
            or trainer.global_step % max(1, trainer.log_every_n_steps) == 0
            or 0 < trainer.max_steps <= trainer.global_step + 1)


# module -> (its fit, (global step, gradient evaluation, parameter index) of its first
# non-finite gradient on an accelerator, -1 while none) since the last read-back. A fit
# is its trainer's list of optimizers, which Lightning builds anew at every fit: a record
# left by a fit that crashed between read-backs is dropped, never raised, by the next.
_FIRST_NON_FINITE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, Tensor]] = weakref.WeakKeyDictionary()


def _watch_non_finite(module: nn.Module, params: list[Tensor], bad: Tensor, trainer: Any) -> None:
    """``nonfinite="raise"`` without a host-device round trip per step: the first
    non-finite gradient is recorded on the device and read back on the steps that sync
    anyway (those a logger records), every ``log_every_n_steps`` and at an epoch's last
    batch; the error then names the step and parameter where it happened. ``bad``: whether
    each parameter's gradient is non-finite."""
    fit = trainer.optimizers if trainer is not None else None
    fit_and_record = _FIRST_NON_FINITE.get(module)
    if fit_and_record is None or fit_and_record[0] is not fit:
        fit_and_record = _FIRST_NON_FINITE[module] = (fit, torch.full((3,), -1, dtype=torch.long, device=bad.device))
    record = fit_and_record[1]
    index = bad.long().argmax()  # the first non-finite parameter (0 when none is)
    step = trainer.global_step if trainer is not None else 0
    here = torch.stack([torch.full_like(index, step), torch.full_like(index, gradient_evaluation(module)), index])
    record.copy_(torch.where(bad.any() & (record[0] < 0), here, record))
    if trainer is not None and not _syncs_now(trainer):
        return
    step, evaluation, index = record.tolist()  # the read-back
    del _FIRST_NON_FINITE[module]  # nor does a finished fit keep its optimizers alive here
    if step >= 0:
        _raise_non_finite(module, params, [index], step, evaluation, seen=trainer.global_step if trainer else None)


def _raise_non_finite(module: nn.Module, params: list[Tensor], bad: list[int], step: Any, evaluation: int,
                      seen: int | None = None) -> None:
    names = {id(p): name for name, p in module.named_parameters()}
    if not bad:  # sharded: another rank's shard holds it
        name = "<in a shard held by another process>"
    else:
        name = names.get(id(params[bad[0]]), f"<unnamed {tuple(params[bad[0]].shape)}>")
    where = f" (gradient evaluation {evaluation + 1} of the step)" if evaluation else ""
    if seen is not None and seen != step:
        where += f", found at step {seen}"
    raise NonFiniteGradientError(
        f"non-finite gradient in parameter {name!r} at global step {step}{where}"
        + (f" ({len(bad) - 1} more parameters too)" if len(bad) > 1 else "")
        + "; lower the learning rate, check the data and loss, or set clipping.nonfinite='skip'")


def _agc_excluded(module: nn.Module, config: GradientClipping) -> set[int]:
    excluded = {id(p) for name, p in module.named_parameters()
                if any(fnmatch.fnmatchcase(name.replace("_orig_mod.", ""), pat) for pat in config.agc_exclude)}
    if config.agc_exclude_output:
        owners = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
        if owners:
            excluded |= {id(p) for p in owners[-1].parameters(recurse=False)}
    return excluded


@torch.no_grad()
def adaptive_clip_(params: Sequence[Tensor], clip: float, eps: float = 1e-3) -> Tensor:
    """Unit-wise adaptive gradient clipping in place (docs/algorithms.md, section 6): each output
    unit's gradient (a slice along dim 0; a whole vector or scalar is one unit) is scaled
    to at most ``clip * max(||w_unit||, eps)``. Returns whether any unit was clipped."""
    clipped = []
    for p in params:
        g = p.grad
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        keep, dtype = p.ndim > 1, torch.promote_types(p.dtype, torch.float32)  # bf16 norms in fp32
        w_norm = torch.linalg.vector_norm(p, dim=dims, keepdim=keep, dtype=dtype)
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=keep, dtype=dtype)
        limit = w_norm.clamp(min=eps) * clip
        over = g_norm > limit
        g.mul_(torch.where(over, limit / g_norm.clamp(min=torch.finfo(g_norm.dtype).tiny), 1.0).to(g.dtype))
        clipped.append(over.any())
    return torch.stack(clipped).any()

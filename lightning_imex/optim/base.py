"""What the package's optimizers share: hyper-parameter checks, two state buffers per
parameter, the named per-step scalars their programs read, and steps made of
element-wise programs (:mod:`.program`) that :class:`~.kernel.Batch` runs on the path
:func:`~.kernel.select_backend` picks."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from itertools import chain
from collections.abc import Sequence
from typing import Any, Callable, Hashable, Iterable, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from ..validate import boolean, is_integer
from .kernel import Batch, all_reduce_sum, local_tensor, reduction_key, select_backend
from .program import (QUANT_BLOCK, Event, Expr, clamp, dequantize, element_offsets, lower, quant_blocks, quant_scales,
                      quantize, runtime, tensor, tensor_key, with_compensation, with_gradient)
from .program import B1, B2, EPS, K, LR, WD, decayed, gradient  # re-exported: the optimizers' vocabulary

__all__ = ["ElementwiseOptimizer", "OnePassOptimizer", "check_adam_hyperparameters", "LR", "B1", "B2", "EPS",
           "WD", "K", "gradient", "decayed"]

KAHAN = "kahan"  # the programs' name of the compensation buffer of param_rounding="kahan"


def number(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_adam_hyperparameters(group: dict[str, Any]) -> None:
    """Validates the Adam-family fields of a parameter group; errors name the field."""
    for name in ("lr", "eps", "weight_decay"):
        value = number(name, group[name])
        if not value >= 0.0 or math.isinf(value):
            raise ValueError(f"{name} must be a finite number >= 0, got {group[name]!r}")
    betas = group["betas"]
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= number(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
    group["betas"] = tuple(float(b) for b in betas)
    for name in ("decoupled_weight_decay", "maximize", "bias_correction"):
        if name in group:
            boolean(name, group[name])
    if group.get("fused") is not None and not isinstance(group["fused"], bool):
        raise TypeError(f"fused must be a bool or None, got {group['fused']!r}")
    max_grad_norm = group.get("max_grad_norm")
    if max_grad_norm is not None and not (number("max_grad_norm", max_grad_norm) > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be a finite number > 0 or None (no clipping), got {max_grad_norm!r}")


# How state may be stored besides the parameter's dtype (``state_dtype=None``): float32, or
# bfloat16 with stochastic rounding on every store (program.round_stochastically).
STATE_DTYPES = (torch.float32, torch.bfloat16)
# ... also by name, as a config file gives them
STATE_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# 8-bit blockwise moments (program.quantize): uint8 codes and a float32 scale per
# program.QUANT_BLOCK elements, "m" under the signed map and "v" under the unsigned one;
# tensors smaller than a block (and complex ones) keep float32 moments.
STATE_8BIT = "8bit"
QUANTIZED_MOMENTS = {"m": "signed", "v": "unsigned"}
_NARROW_STATE_PARAMETERS = (torch.float32, torch.bfloat16, torch.float16)
# How a parameter store rounds (docs/optimizer-core.md, "Parameter precision"): to nearest,
# stochastically, or to nearest with the rounding error kept in a bfloat16 compensation
# buffer (state[KAHAN_STATE]) that the next step adds back. The last two: bfloat16 only.
PARAM_ROUNDINGS = ("nearest", "stochastic", "kahan")
KAHAN_STATE = "kahan_compensation"


def state_dtype_of(value: Any) -> Any:
    """``state_dtype`` as a dtype where it names one (``"bfloat16"``), else as given."""
    return STATE_DTYPE_NAMES.get(value, value) if isinstance(value, str) else value


def check_state_storage(group: dict[str, Any]) -> None:
    """Validates a group's ``state_dtype``, ``param_rounding`` and ``seed`` (and its
    parameters' dtypes for them); errors name the field. A ``state_dtype`` name becomes
    its dtype."""
    state_dtype = group["state_dtype"] = state_dtype_of(group.get("state_dtype"))
    if state_dtype is not None and state_dtype not in STATE_DTYPES and state_dtype != STATE_8BIT:
        raise ValueError(f"state_dtype must be None (the parameter's dtype), torch.float32 or torch.bfloat16, "
                         f"got {state_dtype!r} (by name: 'float32', 'bfloat16'; 8-bit blockwise: '8bit')")
    rounding = group.get("param_rounding", "nearest")
    if not isinstance(rounding, str) or rounding not in PARAM_ROUNDINGS:
        raise ValueError(f"param_rounding must be one of {', '.join(map(repr, PARAM_ROUNDINGS))}, got {rounding!r}")
    for p in group.get("params", ()) if rounding != "nearest" else ():
        if p.dtype != torch.bfloat16:
            raise ValueError(f"param_rounding={rounding!r} rounds bfloat16 parameters, got a {p.dtype} parameter "
                             f"of shape {tuple(p.shape)} (stored without loss to speak of); use "
                             "param_rounding='nearest' for it (a group of its own)")
    seed = group.get("seed", 0)
    if not (is_integer(seed) and 0 <= seed < 2**32):
        raise ValueError(f"seed must be an integer in [0, 2**32) (of stochastic rounding), got {seed!r}")
    for p in group.get("params", ()) if state_dtype is not None else ():
        if p.dtype not in _NARROW_STATE_PARAMETERS:
            raise ValueError(f"state_dtype={state_dtype} needs float32, bfloat16 or float16 parameters, got a "
                             f"{p.dtype} parameter of shape {tuple(p.shape)}; use state_dtype=None for it")


# How the scratch of a multi-stage step (kept gradients, parameter sums) is stored, by
# batch (scratch_storage): in the parameter's dtype, as before state_dtype existed; in
# float32 where parameter stores do not round to nearest, so that only the stores to p
# round; and for float32 parameters with narrower state, as narrow as the moments:
# bfloat16 with stochastic stores, or 8-bit codes under the signed map with a scale per
# QUANT_BLOCK. Narrow scratch holds each parameter sum as its difference from p
# (plan.Plan.relative_events): a bfloat16 or 8-bit parameter would lose the updates.
NARROW_SCRATCH = (torch.bfloat16, torch.uint8)


def scratch_storage(group: dict[str, Any], param_dtype: torch.dtype, eight_bit: bool) -> torch.dtype:
    """The dtype of a batch's scratch (uint8: 8-bit codes); ``eight_bit``: its moments are."""
    if group["param_rounding"] != "nearest":
        return torch.float32
    if param_dtype == torch.float32 and eight_bit:
        return torch.uint8
    if param_dtype == torch.float32 and group["state_dtype"] == torch.bfloat16:
        return torch.bfloat16
    return param_dtype


def gradient_flags(group: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(maximize, L2 weight decay, decoupled weight decay): what a group's program does
    with the gradient and the parameters besides its own update."""
    decay = group["weight_decay"] != 0
    decoupled = group.get("decoupled_weight_decay", False)
    return group["maximize"], decay and not decoupled, decay and decoupled


_BATCH_CACHE_SIZE = 64


# 8-bit moments saved before the maps were small floats (program.py, "8-bit blockwise
# state") kept their scales under "<name>_absmax" and coded m as round(127 sqrt(|x|)) and v
# as round(255 x^(1/4)): such a checkpoint loads through float32, never as codes.
LEGACY_SCALES = "{}_absmax"


def legacy_dequantize(codes: Tensor, scales: Tensor, kind: str) -> Tensor:
    k = (codes & 127 if kind == "signed" else codes).to(torch.float32)
    x = (k * k) / (127.0**2 if kind == "signed" else 255.0**2)
    x = torch.where(codes >= 128, -x, x) if kind == "signed" else x * x
    return x * scales.to(codes.device, torch.float32)[element_offsets(codes) // QUANT_BLOCK]


class ElementwiseOptimizer(Optimizer):
    """An optimizer with two state buffers per parameter (named by ``state_buffers``; its
    programs call them ``m`` and ``v``) whose step runs element-wise programs on the path
    ``fused`` asks for (see :func:`~.kernel.select_backend`). Complex parameters are
    updated as their real views, as torch's Adam does. The buffers are stored in
    ``state_dtype`` (None: the parameter's dtype); bfloat16 stores round stochastically
    with bits keyed by the group's ``seed`` (docs/optimizer-core.md, "State precision")."""

    state_buffers: tuple[str, str] = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any],
                 fused: bool | None, state_dtype: torch.dtype | str | None = None, seed: int = 0,
                 param_rounding: str = "nearest") -> None:
        defaults = {**defaults, "fused": fused, "state_dtype": state_dtype_of(state_dtype), "seed": seed,
                    "param_rounding": param_rounding}
        self._check_group(dict(defaults))  # bad settings fail before params are read
        self._init_caches()
        super().__init__(params, defaults)

    def _init_caches(self) -> None:
        # Per-parameter working buffers of multi-stage programs (contents never outlive a
        # step) and the batches of recent steps: kept between steps, never state.
        self._scratch: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._batch_cache: dict[tuple, Batch] = {}
        # the clipping the hook asked for the gradients in .grad (clip_gradients_in_step)
        self._pending_clip: GradientClip | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling, deepcopy and load_state_dict land here: fill flags that an older
        # state lacks with their documented defaults, as torch's optimizers do.
        super().__setstate__(state)
        documented = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()
                      if p.default is not inspect.Parameter.empty}
        for group in self.param_groups:
            for key in documented.keys() & self.defaults.keys():
                group.setdefault(key, documented[key])
        self._init_caches()

    @property
    def fused(self) -> bool | None:
        return self.defaults["fused"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Which path runs and how state and parameters are stored are this machine's and this
        # constructor's choices, not the checkpoint's: the groups keep their own ``fused``,
        # ``state_dtype`` and ``param_rounding`` (the state is path-independent), and
        # ``max_grad_norm``, which the step reads from the optimizer's defaults.
        kept = [{key: group[key] for key in ("fused", "state_dtype", "param_rounding", "max_grad_norm") if key in group}
                for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, settings in zip(self.param_groups, kept):
            group.update(settings)
        # torch casts loaded state to the parameter's dtype; store the saved tensors in the
        # group's state dtype instead (nothing lost on the way)
        saved_indices = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for index, (group, p) in zip(saved_indices, ((g, p) for g in self.param_groups for p in g["params"])):
            saved = state_dict["state"].get(index, {})
            for (name, kind) in zip(self.state_buffers, QUANTIZED_MOMENTS.values()):
                if isinstance(saved.get(name), Tensor):
                    moment, scales = saved[name], saved.get(quant_scales(name))
                    if moment.dtype == torch.uint8 and scales is None and LEGACY_SCALES.format(name) in saved:
                        moment = legacy_dequantize(moment, saved[LEGACY_SCALES.format(name)], kind)
                    self.state[p].pop(LEGACY_SCALES.format(name), None)
                    self._load_moment(self.state[p], p, group, name, kind, moment, scales)

    def _load_moment(self, state: dict[str, Any], p: Tensor, group: dict[str, Any], name: str, kind: str,
                     saved: Tensor, scales: Tensor | None) -> None:
        """Stores a saved moment (8-bit with its ``scales``, or not) as ``group`` stores it:
        8-bit into 8-bit exactly, else through float32."""
        dtype, saved = self._state_dtype(group, p), saved.to(p.device)
        state.pop(quant_scales(name), None)
        if saved.dtype == torch.uint8 and dtype == torch.uint8:  # copies: the saved dict stays as it was
            state[name], state[quant_scales(name)] = saved.clone(), scales.to(p.device, torch.float32, copy=True)
            return
        if saved.dtype == torch.uint8:
            saved = dequantize(saved, scales.to(p.device, torch.float32), element_offsets(saved), kind)
        if dtype != torch.uint8:
            state[name] = saved.to(dtype)
            return
        moment = torch.empty_like(p, dtype=torch.float32).copy_(saved)
        state[name], state[quant_scales(name)] = quantize(moment, element_offsets(moment),
                                                          quant_blocks(moment.numel()), kind)

    def state_bytes(self) -> int:
        """Bytes the optimizer holds per its state (every tensor in ``state``) and the
        working buffers of multi-stage steps (allocated at the first step), as now."""
        tensors = [t for s in self.state.values() for t in s.values() if isinstance(t, Tensor)]
        tensors += [t for buffers in self._scratch.values() for t in buffers.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:
        check_adam_hyperparameters(group)
        check_state_storage(group)
        optimizer_wide = getattr(self, "defaults", group).get("max_grad_norm")
        if group.get("max_grad_norm") != optimizer_wide:
            raise ValueError(f"max_grad_norm clips the norm over every group's gradients: a group cannot set its own "
                             f"(the optimizer has {optimizer_wide!r}, a group asks for {group['max_grad_norm']!r})")

    def _init_state(self, state: dict[str, Any], p: Tensor, dtype: torch.dtype) -> None:
        state["step"] = 0
        for name in self.state_buffers:
            state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if dtype == torch.uint8:  # 8-bit codes, and their scales (of the local shard)
                state[quant_scales(name)] = torch.zeros(quant_blocks(local_tensor(p).numel()), dtype=torch.float32,
                                                        device=p.device)

    @staticmethod
    def _state_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
        """The dtype of ``p``'s moments: uint8 for 8-bit codes."""
        if group["state_dtype"] == STATE_8BIT:
            return torch.uint8 if not p.is_complex() and local_tensor(p).numel() >= QUANT_BLOCK else torch.float32
        return group["state_dtype"] or p.dtype

    def _state_key(self, state: dict[str, Any]) -> tuple:
        """What, besides device and dtype, a parameter's scalars depend on."""
        return (state["step"],)

    def _batches(self, group: dict[str, Any], scratch: Sequence[str], scalars: Callable[[tuple], dict[Hashable, float]],
                 without_grad: bool = False, relative_events: Mapping[Event, Event] | None = None) -> list[Batch]:
        """The group's parameters that take part in this step (those with a gradient, or
        all that require one), split by device, dtype, sharding (:func:`~.kernel.reduction_key`),
        8-bit moments or not, and :meth:`_state_key`. ``scratch``: working buffers, stored as
        :func:`scratch_storage` says; ``relative_events``: the step's events with its
        parameter sums held relative to ``p``, which batches with narrow scratch run instead."""
        split: dict[tuple, list[tuple[Tensor, dict[str, Any]]]] = defaultdict(list)  # key -> (p, its state)
        kahan = group["param_rounding"] == "kahan"
        first_buffer = self.state_buffers[0]
        for p in group["params"]:
            grad = p.grad
            if grad is None and not (without_grad and p.requires_grad):
                continue
            if grad is not None and grad.is_sparse:  # refused before any state exists
                raise sparse_error(type(self).__name__, p)
            state = self.state[p]
            if not state:
                self._init_state(state, p, self._state_dtype(group, p))
            if type(state["step"]) is not int:
                # a loaded state may hold a tensor (torch's Adam keeps ``step`` as one), which
                # would hash by identity and make every parameter a batch of its own
                state["step"] = int(state["step"])
            key = (p.device, p.dtype, reduction_key(p), state[first_buffer].dtype == torch.uint8,
                   *self._state_key(state))
            split[key].append((p, state))
            if kahan:
                state.setdefault(KAHAN_STATE, torch.zeros_like(p, memory_format=torch.preserve_format))
            else:  # a loaded compensation this group does not use: its error is dropped, as a rounded store would
                state.pop(KAHAN_STATE, None)
        # Stores to state narrower than float32 round stochastically, and with
        # param_rounding="stochastic" stores to the parameters, with bits keyed by the
        # group's seed and each parameter's place in the optimizer (the same on every path,
        # rank and resume).
        stochastic = ("m", "v") if group["state_dtype"] == torch.bfloat16 else ()
        stochastic += ("p",) if group["param_rounding"] == "stochastic" else ()
        if stochastic:
            first = sum(len(g["params"]) for g in self.param_groups[:next(
                i for i, g in enumerate(self.param_groups) if g is group)])
            places = {id(p): first + i for i, p in enumerate(group["params"])}
        batches = []
        for key, pairs in split.items():
            params, batch_states = [p for p, _ in pairs], [state for _, state in pairs]
            buffers = {"p": params, "m": [s[first_buffer] for s in batch_states],
                       "v": [s[self.state_buffers[1]] for s in batch_states]}
            if kahan:
                buffers[KAHAN] = [s[KAHAN_STATE] for s in batch_states]
            quantized = QUANTIZED_MOMENTS if key[3] else {}  # key[3]: the moments are 8-bit
            for name, state_name in zip(quantized, self.state_buffers):  # "m", "v" in state_buffers' order
                buffers[quant_scales(name)] = [s[quant_scales(state_name)] for s in batch_states]
            scratch_dtype = scratch_storage(group, key[1], key[3])  # key[1]: p.dtype
            narrow = bool(scratch) and scratch_dtype in NARROW_SCRATCH and scratch_dtype != key[1]
            typed = dict.fromkeys(scratch, scratch_dtype)
            batch_stochastic = stochastic + (tuple(scratch) if narrow and scratch_dtype == torch.bfloat16 else ())
            if narrow and scratch_dtype == torch.uint8:  # codes under the signed map, and their scales
                quantized = {**quantized, **dict.fromkeys(scratch, "signed")}
                typed.update(dict.fromkeys(map(quant_scales, scratch), torch.float32))
            keys = [tensor_key(group["seed"], places[id(p)]) for p in params] if batch_stochastic else []
            batch = self._batch(params, buffers, select_backend(group["fused"], params), batch_stochastic, keys,
                                quantized, scratch=typed)
            batch.values, batch.step, batch.states = scalars(key[4:]), int(key[4]), batch_states
            batch.rewrites = relative_events if narrow and relative_events else {}
            batches.append(batch)
        return batches

    def _batch(self, params: list[Tensor], buffers: dict[str, list[Tensor]], backend,
               stochastic: Sequence[str] = (), keys: Sequence[int] = (),
               quantized: dict[str, str] | None = None, scratch: dict[str, torch.dtype] | None = None) -> Batch:
        """The batch of an earlier step if it still matches: its tables are built and its
        ``scratch`` buffers (name -> dtype, one per parameter) found already, so a steady
        step looks nothing up per parameter here."""
        scratch = scratch or {}
        # the step's batch and the gradient norm's differ in buffers; a scratch dtype that
        # changes (param_rounding) makes another batch
        key = (*buffers, *scratch.items(), *map(id, params))
        batch = self._batch_cache.get(key)
        if batch is None or not batch.matches(buffers, backend, stochastic, keys, quantized, scratch=scratch):
            if len(self._batch_cache) >= _BATCH_CACHE_SIZE:  # parameter sets that come and go
                self._batch_cache.clear()
            scales = set(map(quant_scales, quantized or {}))
            buffers = {**buffers, **{name: [self._scratch_buffer(p, name, dtype, name in scales) for p in params]
                                     for name, dtype in scratch.items()}}
            batch = self._batch_cache[key] = Batch(params, buffers, backend, stochastic, keys, quantized)
        return batch

    def _scratch_buffer(self, p: Tensor, name: str, dtype: torch.dtype, scales: bool = False) -> Tensor:
        """``p``'s working buffer ``name``: like ``p``, or, for ``scales``, one per
        QUANT_BLOCK of its local shard (the scales of an 8-bit buffer)."""
        buffers = self._scratch.setdefault(p, {})
        if name not in buffers or buffers[name].dtype != dtype:
            buffers[name] = torch.zeros(quant_blocks(local_tensor(p).numel()), dtype=dtype, device=p.device) \
                if scales else torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return buffers[name]

    def _gradients(self, params: list[Tensor], required: bool = True) -> list[Tensor | None]:
        """The current gradients; a parameter this evaluation did not reach gets zeros."""
        grads = []
        for p in params:
            g = p.grad
            if g is None and required:
                g = torch.zeros_like(p)
            elif g is not None and g.is_sparse:
                raise sparse_error(type(self).__name__, p)
            grads.append(g)
        return grads

    def _count_step(self, batches: Iterable[Batch]) -> None:
        for batch in batches:
            done = batch.step + 1
            for state in batch.states:
                state["step"] = done

    # Global-norm gradient clipping inside the step (docs/optimizer-core.md, "Clipping in
    # the step"): one reduction over every gradient, then the factor
    # min(1, max_norm / (norm + 1e-6)) of torch's clip_grad_norm_ multiplies g where the
    # step's first pass reads it, as a device tensor: the gradients are read twice, not
    # three times and written never, and the host never waits.

    @torch.no_grad()
    def gradient_squares(self) -> tuple[list[Tensor], Tensor]:
        """Every parameter with a gradient, and the sum of squares of each gradient
        (float64, on the first parameter's device; a sharded gradient's summed over its
        ranks): one pass over all gradients, a launch per device and dtype."""
        split: dict[tuple, list[Tensor]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise sparse_error(type(self).__name__, p)
                    split[(p.device, p.dtype, reduction_key(p), group["fused"])].append(p)
        params: list[Tensor] = []
        sums = []
        for (_, _, key, fused), group_params in split.items():
            batch = self._batch(group_params, {"p": group_params}, select_backend(fused, group_params))
            order, squares = batch.gradient_squares([p.grad for p in group_params])
            params += [group_params[i] for i in order]
            sums.append(all_reduce_sum(squares, key))
        if not sums:
            return [], torch.zeros(0, dtype=torch.float64)
        device = sums[0].device
        return params, torch.cat([s.to(device, non_blocking=True) for s in sums])

    def clip_gradients_in_step(self, total_norm: Tensor, max_norm: float) -> None:
        """Has the step scale the gradients now in ``.grad`` by ``clip_grad_norm_``'s factor
        for ``total_norm`` (their norm, from :meth:`gradient_squares`) where it reads them,
        instead of their being scaled in place. Holds for the next gradient evaluation a
        step consumes; ``zero_grad`` drops it."""
        self._pending_clip = (NORM_CLIPPED_GRADIENT, clip_factor(total_norm, max_norm))

    def clamp_gradients_in_step(self, max_value: float, device: torch.device) -> None:
        """As :meth:`clip_gradients_in_step`, for ``clip_grad_value_``: the step reads each
        gradient element clamped to ``[-max_value, max_value]``."""
        self._pending_clip = (VALUE_CLIPPED_GRADIENT, torch.full((), float(max_value), dtype=torch.float64,
                                                                 device=device))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending_clip = None  # measured on gradients that are gone
        super().zero_grad(set_to_none)

    def _gradient_clip(self) -> GradientClip | None:
        """The clipping of the gradients the step is about to consume: the one the hook set
        (:meth:`clip_gradients_in_step`), else ``max_grad_norm``'s; None: none."""
        pending, self._pending_clip = self._pending_clip, None
        max_norm = self.defaults.get("max_grad_norm")
        if pending is not None or max_norm is None:
            return pending
        params, squares = self.gradient_squares()
        return (NORM_CLIPPED_GRADIENT, clip_factor(squares.sum().sqrt(), max_norm)) if params else None

    def _run(self, batch: Batch, event: Event, grads: Sequence[Tensor | None], clip: GradientClip | None,
             runtimes: dict[str, Tensor] | None = None) -> list[Tensor]:
        """``batch.run``, reading the clipped gradient where the event reads the gradient,
        and the parameter plus its compensation under ``param_rounding="kahan"``."""
        event = batch.rewrites.get(event, event)  # narrow scratch: parameter sums relative to p
        if KAHAN in batch.buffers:
            event = with_compensation(event, "p", KAHAN)
        if clip is not None and "g" in lower(event).inputs:
            gradient, value = clip
            event, runtimes = with_gradient(event, gradient), {**(runtimes or {}), "clip": value}
        return batch.run(event, grads, runtimes)


class OnePassOptimizer(ElementwiseOptimizer):
    """An optimizer whose step is one program over (p, g, state) after the closure (or a
    few, for a norm over the group: :meth:`_apply`)."""

    def _events(self, group: dict[str, Any]) -> tuple[Event, ...]:
        raise NotImplementedError

    def _scalars(self, group: dict[str, Any], step: int) -> dict[Hashable, float]:
        """The named scalars of a step after ``step`` completed ones: those of
        :data:`LR`, :data:`B1`, ... and any a subclass adds."""
        (b1, b2), lr = group["betas"], number("lr", group["lr"])
        return {"lr": lr, "b1": b1, "b2": b2, "eps": group["eps"], "wd": group["weight_decay"], "k": step + 1.0}

    def _apply(self, group: dict[str, Any], events: tuple[Event, ...], batches: list[Batch],
               clip: GradientClip | None) -> None:
        (event,) = events
        for batch in batches:
            self._run(batch, event, self._gradients(batch.params), clip)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = self._gradient_clip()  # one norm over every group's gradients
        # every group's batches (and their checks) before any parameter changes
        work = [(group, self._batches(group, (), lambda key, group=group: self._scalars(group, key[0])))
                for group in self.param_groups]
        for group, batches in work:
            if batches:
                self._apply(group, self._events(group), batches, clip)
                self._count_step(batches)
        return loss


# The gradient a step reads under clipping, and the runtime scalar "clip" it takes: g times
# the clip factor (norm clipping), or g clamped to [-clip, clip] (value clipping).
NORM_CLIPPED_GRADIENT = tensor("g") * runtime("clip")
VALUE_CLIPPED_GRADIENT = clamp(tensor("g"), -runtime("clip"), runtime("clip"))
GradientClip = tuple[Expr, Tensor]


def clip_factor(total_norm: Tensor, max_norm: float) -> Tensor:
    """``min(1, max_norm / (total_norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``
    computes it (NaN for a NaN norm, 0 for an infinite one), on the norm's device."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def sparse_error(name: str, p: Tensor) -> RuntimeError:
    return RuntimeError(f"{name} does not support sparse gradients (a parameter of shape {tuple(p.shape)} "
                        "has one); use dense gradients, e.g. nn.Embedding(sparse=False)")

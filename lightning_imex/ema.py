"""``EMA``: an exponential moving average of a model's weights, in plain PyTorch (docs/algorithms.md,
sections 1, 4 and 5). No Lightning, no Hydra: a training loop uses it in three lines::

    ema = EMA(model, decay=0.999, schedule="warmup")
    ...  # after each optimizer.step():
    ema.update()
    with ema.swapped():  # the EMA weights in the model, the training weights back after
        evaluate(model)

:class:`lightning_imex.callbacks.ModelEMA` is the Lightning callback over this class.

The algorithm, per optimizer step ``k = 1, 2, ...`` since the EMA started (``e_0`` = a copy
of the weights then), every ``update_every = N`` steps::

    d = get_decay(k) ** N                      # the N steps' decay
    P = P * d                                  # prod d, for zero_start's bias correction
    w = (1 - d) / (1 - P) if zero_start else 1 - d
    e = lerp(e, theta, w)                      # e + w (theta - e), one foreach pass

Extension points: :meth:`get_decay` (one schedule per name, from ``DECAYS``),
:meth:`_average` (the one pass that moves the average, given its weight ``w``) and
:meth:`_copy` (the integer buffers' copy); whatever reads the average goes through
:meth:`average`, :meth:`swap`, :meth:`raw_state_dict` or :meth:`load_state_dict`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._torch import free_gathered_flat_parameter
from .validate import boolean, integer, is_real

__all__ = ["DECAYS", "EMA", "SCHEDULES", "decay_from_optimizer", "reshard", "tracked_tensors"]

if torch.distributed.is_available():  # FSDP2's sharded parameters and modules; FSDP1's wrapper
    from torch.distributed.fsdp import FSDPModule as FSDP_MODULE
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1_MODULE
    from torch.distributed.tensor import DTensor as DTENSOR
else:
    FSDP_MODULE = FSDP1_MODULE = DTENSOR = None


def _constant(ema: EMA, k: int) -> float:
    return ema.decay


def _warmup(ema: EMA, k: int) -> float:
    return min(ema.decay, (1 + k) / (10 + k))


def _power(ema: EMA, k: int) -> float:
    return min(ema.decay, max(ema.min_decay, 1 - (1 + k / ema.gamma) ** -ema.power))


# d_k per schedule; zero_start is the constant decay from e_0 = 0, reported bias-corrected
DECAYS: dict[str, Callable[[EMA, int], float]] = {
    "fixed": _constant, "warmup": _warmup, "power": _power, "zero_start": _constant}
SCHEDULES = tuple(DECAYS)  # also what ClippedAdam's ema_schedule group setting may name
HOLDING = ("raw", "ema")


def decay_from_optimizer(optimizer: torch.optim.Optimizer, schedule: str | None = None) -> tuple[float, str]:
    """``(decay, schedule)`` coupled to ``optimizer``: its first group's ``betas[0]``, and
    ``schedule``, else the group's ``ema_schedule`` (``ClippedAdam.ahn_cutkosky`` sets it),
    else ``zero_start`` (Ahn & Cutkosky's bias-corrected average)."""
    group = optimizer.param_groups[0]
    if "betas" not in group:
        raise ValueError(f"decay='optimizer' reads the first parameter group's betas[0]; "
                         f"{type(optimizer).__name__} has no betas")
    return float(group["betas"][0]), schedule or group.get("ema_schedule") or "zero_start"


class EMA:
    r"""Model EMA ``e_k = d_k e_{k-1} + (1 - d_k) theta_k``, one :meth:`update` per optimizer step.

    Args:
        model: the module whose weights are averaged; its tensors are matched by
            registration order and identity (``torch.compile``'s ``_orig_mod.`` names
            change nothing).
        decay: ``d`` in (0, 1), or an optimizer: its first group's ``betas[0]``
            (:func:`decay_from_optimizer`).
        schedule: ``fixed`` (``d_k = d``); ``warmup`` (``min(d, (1 + k) / (10 + k))``,
            the default for a float decay); ``power`` (``clamp(1 - (1 + k / gamma)^-power,
            min_decay, d)``); ``zero_start`` (``e_0 = 0`` and ``d_k = d``, reported
            bias-corrected: ``e_k / (1 - prod d)``).
        gamma, power, min_decay: the ``power`` schedule's constants.
        update_every: average every N calls of :meth:`update`, with ``d_k^N``.
        include_buffers: average floating-point buffers (BatchNorm statistics) and copy
            integer ones; otherwise the EMA model uses the model's buffers.
        device: where the average lives (``"cpu"`` keeps it off the accelerator);
            ``None``: beside each tensor.

    Under FSDP2 (``fully_shard``: DTensor parameters) each rank averages its own shards
    (:meth:`current`): no communication, the average the size of the rank's shards; the
    state dicts give DTensors sharded as the model's (a sharded checkpoint saves each
    rank's; ``full_tensor()`` gathers one). Under FSDP1 (``model`` a
    ``FullyShardedDataParallel``, or holding some) the same holds for the rank's pieces of
    the FlatParameters: with ``use_orig_params=True`` each parameter's piece of the rank's
    flat shard (1-D, possibly empty), else the padded flat shards themselves; the state
    dicts are then FSDP's own sharded ``state_dict`` (ShardedTensors, per parameter), which
    FSDP builds by gathering each unit: checkpoints gather, updates never do.
    :meth:`full_state_dict` gathers the whole weights.

    :meth:`swap` exchanges the model's tensors with the average (on one device their
    storages trade places: nothing is allocated, Parameters and optimizer references stay);
    :meth:`swapped` does it for a ``with`` block. Before the first average nothing is
    swapped. :meth:`state_dict` / :meth:`load_state_dict` hold the average and the counters
    (plain tensors and numbers: ``torch.load(..., weights_only=True)`` reads them).
    """

    def __init__(self, model: nn.Module, decay: float | torch.optim.Optimizer = 0.999, schedule: str | None = None,
                 *, gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0, update_every: int = 1,
                 include_buffers: bool = True, device: str | torch.device | None = None) -> None:
        check_options(decay=decay, schedule=schedule, gamma=gamma, power=power, min_decay=min_decay,
                      update_every=update_every, include_buffers=include_buffers)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if decay == "optimizer":
            raise ValueError("decay='optimizer' needs the optimizer: pass it, EMA(model, decay=optimizer)")
        if isinstance(decay, torch.optim.Optimizer):
            decay, schedule = decay_from_optimizer(decay, schedule)
        self.model, self.decay, self.schedule = model, float(decay), schedule or "warmup"
        self.gamma, self.power, self.min_decay = float(gamma), float(power), float(min_decay)
        self.update_every, self.include_buffers = update_every, include_buffers
        self.device = _device(device)
        self._decay_at = DECAYS[self.schedule]
        self.bias_corrected = self.schedule == "zero_start"
        reshard(model)  # FSDP2 registers its sharded parameters again: those are the ones tracked
        self.tracked, self.n_averaged = tracked_tensors(model, include_buffers)
        # FSDP1 (flat parameters): each rank averages its pieces of them, the parameters' views
        self.flat_sharded = FSDP1_MODULE is not None and any(isinstance(m, FSDP1_MODULE) for m in model.modules())
        # FSDP2 (DTensor parameters): each rank averages its own shards, views of the parameters' storage
        self.sharded = self.flat_sharded or (any(isinstance(t, DTENSOR) for t in self.tracked) if DTENSOR else False)
        self.shadow = [t.to(self.device, copy=True) for t in self.current()]  # what the model does not hold
        self.steps = 0  # update() calls since e_0
        self.updates = 0  # averages taken
        self.decay_product = 1.0  # prod d: zero_start's bias correction
        self.holding = "raw"  # which copy the model holds

    # ---------------------------------------------------------------- the average
    def get_decay(self, step: int) -> float:
        """``d_k`` for optimizer step ``k = step >= 1`` since the EMA started."""
        return self._decay_at(self, step)

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimizer step; averages every ``update_every``-th call. The
        model must hold its training weights (not inside :meth:`swapped`)."""
        if self.holding != "raw":
            raise RuntimeError("EMA.update() while the model holds the EMA weights: update outside ema.swapped()")
        self.steps += 1
        if self.steps % self.update_every:
            return
        decay = self.get_decay(self.steps) ** self.update_every
        self.decay_product *= decay
        # zero_start stays bias-corrected as it goes: this weight turns a_k = d a_{k-1} + (1 - d) theta
        # into a_k / (1 - prod d) exactly, and the first update (w = 1) makes the zero start implicit
        weight = (1 - decay) / (1 - self.decay_product) if self.bias_corrected else 1 - decay
        n, current = self.n_averaged, self.current()
        self._average(self.shadow[:n], current[:n], weight)
        if n < len(current):
            self._copy(self.shadow[n:], current[n:])
        self.updates += 1

    def current(self) -> list[Tensor]:
        """The tensors the average follows, in :attr:`tracked` order: the model's, detached;
        under FSDP2 this rank's shards of them (``to_local()``: views of the parameters'
        storage, nothing gathered)."""
        return [t.to_local().detach() if self.sharded and isinstance(t, DTENSOR) else t.detach()
                for t in self.tracked]

    def _average(self, average: list[Tensor], current: list[Tensor], weight: float) -> None:
        """``average <- average + weight (current - average)``, in one foreach pass; the
        override point for another averaging rule or an offloaded update."""
        sources = current if self.device is None else [t.detach().to(self.device) for t in current]
        torch._foreach_lerp_(average, sources, weight)

    def _copy(self, copies: list[Tensor], current: list[Tensor]) -> None:
        """``copies <- current``: the integer buffers (``num_batches_tracked``), at each average."""
        torch._foreach_copy_(copies, current)

    # ---------------------------------------------------------------- the swap
    @torch.no_grad()
    def swap(self) -> None:
        """Exchanges the model's tensors and the copy it does not hold. On one device the
        storages trade places (``.data``); across devices (``device=``), or under FSDP2 /
        FSDP1 (whose all-gather reads the shards' own storage), the values are copied through
        one shard-sized temporary at a time. FSDP modules are resharded first: a module that
        kept its gathered weights (the root, after a forward without backward) gathers the
        swapped shards at its next forward."""
        if self.sharded:
            reshard(self.model)
        for i, (t, current) in enumerate(zip(self.tracked, self.current())):
            other = self.shadow[i]
            if other.device == t.device and not self.sharded:
                t.data, self.shadow[i] = other, t.data
            else:
                held = current.to(other.device, copy=True)
                current.copy_(other)
                other.copy_(held)
        self.holding = HOLDING[self.holding == "raw"]

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the model for the block, the training weights back after; no
        swap before the first average (the model is evaluated as it is) or when the model
        holds the EMA already."""
        swap = self.updates > 0 and self.holding == "raw"
        if swap:
            self.swap()
        try:
            yield
        finally:
            if swap:
                self.swap()

    # ---------------------------------------------------------------- state
    def average(self) -> list[Tensor]:
        """The EMA's tensors, in the order of :attr:`tracked`, wherever they are held now."""
        return self.shadow if self.holding == "raw" else self.current()

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The model's ``state_dict`` with the EMA in place of the tracked tensors (under
        FSDP2 sharded as the model's: DTensors of this rank's shards, nothing gathered;
        under FSDP1 FSDP's sharded ``state_dict``, which it gathers each unit to build)."""
        if self.flat_sharded:
            return self._flat_state_dict("ema", full=False)
        return self._state_dict_with(self.average())

    def raw_state_dict(self) -> dict[str, Tensor]:
        """The model's ``state_dict`` with the training weights, wherever they are held now."""
        if self.flat_sharded:
            return self._flat_state_dict("raw", full=False)
        return self._state_dict_with(self.shadow if self.holding == "ema" else self.current())

    def full_state_dict(self, copy: str = "ema") -> dict[str, Tensor]:
        """The ``state_dict`` of the EMA (``copy="ema"``) or of the training weights
        (``"raw"``), whole: on a sharded model a collective that every rank calls, which
        gives every rank the whole tensors; under FSDP1 on an accelerator rank 0 alone gets
        them, on the CPU (the other ranks an empty dict)."""
        if copy not in HOLDING:
            raise ValueError(f"copy must be one of {HOLDING}, got {copy!r}")
        if self.flat_sharded:
            return self._flat_state_dict(copy, full=True)
        state = self.averaged_state_dict() if copy == "ema" else self.raw_state_dict()
        return {name: t.full_tensor() if DTENSOR and isinstance(t, DTENSOR) else t for name, t in state.items()}

    def _flat_state_dict(self, copy: str, full: bool) -> dict[str, Tensor]:
        """FSDP1: the names and the per-parameter layout of a ``state_dict`` exist only in
        FSDP's own, built from the flat shards the model holds: ``copy`` goes in for it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        swap = self.holding != copy
        if swap:
            self.swap()
        else:
            reshard(self.model)  # a unit's weights kept gathered since a forward would be read instead
        # offloading to rank 0's CPU saves accelerator memory; torch's FSDP1 crashes doing it to CPU tensors
        offload = full and any(t.device.type != "cpu" for t in self.tracked)
        try:
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=full, cpu_offload=offload))
        finally:
            if swap:
                self.swap()

    def _state_dict_with(self, tensors: list[Tensor]) -> dict[str, Tensor]:
        if self.sharded:
            reshard(self.model)  # the sharded parameters in the module's state_dict
        index = {id(t): i for i, t in enumerate(self.tracked)}
        return {name: _sharded_like(t, tensors[index[id(t)]]) if id(t) in index else t.detach()
                for name, t in self.model.state_dict(keep_vars=True).items()}

    def counters(self) -> dict[str, Any]:
        """Everything but the tensors that makes a resumed EMA continue bit for bit."""
        return {"steps": self.steps, "updates": self.updates, "decay_product": self.decay_product,
                "decay": self.decay, "schedule": self.schedule, "update_every": self.update_every}

    def state_dict(self) -> dict[str, Any]:
        """The average (a list in :attr:`tracked` order) and the counters."""
        return {"average": list(self.average()), **self.counters()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The average (omitted: the shadow keeps what it holds) and the counters; a state
        saved with another decay, schedule or ``update_every`` is an error."""
        for name in ("decay", "schedule", "update_every"):
            if state_dict[name] != getattr(self, name):
                raise ValueError(f"EMA state was saved with {name}={state_dict[name]!r}, this EMA has "
                                 f"{name}={getattr(self, name)!r}")
        if "average" in state_dict:  # under FSDP2 this rank's shards, or DTensors sharded as the model's
            average = [a.to_local() if DTENSOR and isinstance(a, DTENSOR) else a for a in state_dict["average"]]
            current = self.current()
            if len(average) != len(current) or any(a.shape != t.shape for a, t in zip(average, current)):
                raise ValueError(f"EMA state holds {len(average)} tensors that do not match the model's "
                                 f"{len(self.tracked)} tracked tensors (shapes, in registration order)")
            with torch.no_grad():
                torch._foreach_copy_(self.average(), [a.to(self.device) if self.device else a for a in average])
        self.steps, self.updates = int(state_dict["steps"]), int(state_dict["updates"])
        self.decay_product = float(state_dict["decay_product"])


def tracked_tensors(model: nn.Module, include_buffers: bool) -> tuple[list[Tensor], int]:
    """The tensors an EMA of ``model`` tracks, in registration order: the weights and floating
    buffers (averaged), then the integer buffers (copied); and how many are averaged."""
    averaged, copied = [*model.parameters()], []
    for b in model.buffers() if include_buffers else ():
        (averaged if b.is_floating_point() else copied).append(b)
    return averaged + copied, len(averaged)


def reshard(model: nn.Module) -> None:
    """Every FSDP2 or FSDP1 module of ``model`` holds its sharded parameters, its gathered
    weights freed (no communication); nothing for a model without any."""
    if FSDP_MODULE is None:
        return
    for module in model.modules():
        if isinstance(module, FSDP_MODULE):
            module.reshard()
        elif isinstance(module, FSDP1_MODULE):
            free_gathered_flat_parameter(module)


def _sharded_like(model_tensor: Tensor, local: Tensor) -> Tensor:
    """``local`` as the model's tensor holds it: a DTensor with ``model_tensor``'s mesh,
    placements and global shape when that is one (FSDP2), else as it is."""
    if not (DTENSOR and isinstance(model_tensor, DTENSOR)):
        return local
    return DTENSOR.from_local(local, model_tensor.device_mesh, model_tensor.placements, run_check=False,
                              shape=model_tensor.shape, stride=model_tensor.stride())


def check_options(**options: Any) -> None:
    """One line naming the field for each bad EMA argument (the callback's too)."""
    decay = options.get("decay")
    if not (isinstance(decay, torch.optim.Optimizer) or decay == "optimizer"
            or (is_real(decay) and 0 < decay < 1)):
        raise ValueError(f"decay must be a number in (0, 1) or 'optimizer', got {decay!r}")
    schedule = options.get("schedule")
    if schedule not in (*SCHEDULES, None):
        raise ValueError(f"schedule must be one of {(*SCHEDULES, None)}, got {schedule!r}")
    integer("update_every", options.get("update_every"), 1)
    for name, ok, allowed in (("gamma", lambda v: v > 0, "> 0"), ("power", lambda v: v > 0, "> 0"),
                              ("min_decay", lambda v: 0 <= v < 1, "in [0, 1)")):
        value = options.get(name)
        if not (is_real(value) and ok(value)):
            raise ValueError(f"{name} must be a number {allowed}, got {value!r}")
    boolean("include_buffers", options.get("include_buffers"))


def _device(device: Any) -> torch.device | None:
    try:
        return None if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device or None, got {device!r}") from None

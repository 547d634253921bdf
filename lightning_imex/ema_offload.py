r"""``OffloadedEMA``: the model EMA of :class:`lightning_imex.ema.EMA` kept in host memory and
averaged off the training loop's critical path (docs/algorithms.md, section 5). The
values are those of ``EMA(model, ..., device="cpu")`` bit for bit: the same
``torch._foreach_lerp_`` on the same numbers, on another thread.

One :meth:`update` on a CUDA model, in order:

1. the previous host average is waited for (it reads the staging buffers);
2. a side stream waits for the current stream (the optimizer step that wrote the
   weights), then copies the averaged tensors device-to-host, non-blocking, into pinned
   staging buffers: floating buffers first (event ``buffers_copied``), then the
   parameters (event ``copied``); integer buffers go the same way;
3. the current stream waits for ``buffers_copied`` at once: the next forward pass writes
   BatchNorm statistics in place. It waits for ``copied`` only where the parameters are
   next written: a one-shot optimizer step pre-hook (any ``torch.optim.Optimizer``'s
   ``step``), so the copy of the weights overlaps the next forward and backward;
4. a host thread waits for ``copied`` and lerps the host average toward the staging
   buffers while the host goes on queuing the next step.

Ordering rules: between two updates the parameters may be written only by an optimizer
step (or after :meth:`synchronize`); every read or write of the average (:meth:`swap`,
:meth:`average`, :meth:`state_dict`, :meth:`load_state_dict`, pickling) first waits for
the pending update. Off CUDA (a CPU model: the synchronous fallback, which the CPU tests
run) step 2 is a blocking copy into the staging buffers and step 3 is nothing; step 4
still runs on the host thread.

Memory: the host average and one staging copy of the averaged tensors, pinned (2x the
averaged tensors' bytes in host memory), nothing on the device.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .ema import EMA

__all__ = ["OffloadedEMA", "build_ema"]


class OffloadedEMA(EMA):
    """:class:`~lightning_imex.ema.EMA` with ``device="cpu"``, updated asynchronously (module
    docstring); the same arguments, less ``device``."""

    def __init__(self, model: nn.Module, decay: Any = 0.999, schedule: str | None = None, **options: Any) -> None:
        if options.pop("device", "cpu") not in ("cpu", torch.device("cpu")):
            raise ValueError("OffloadedEMA keeps the average on the CPU: device must be 'cpu' (or left out)")
        super().__init__(model, decay, schedule, device="cpu", **options)
        self._reset_pending()

    def _reset_pending(self) -> None:
        # host copies of the model's tensors at the last update: the averaged ones (True), the integer buffers (False)
        self._staging: dict[bool, list[Tensor]] = {}
        self._pending: Future | None = None  # the host average in flight
        self._worker: ThreadPoolExecutor | None = None
        self._stream: Any = None  # the CUDA side stream of the copies
        self._step_hook: Any = None  # the one-shot optimizer pre-hook waiting for the copies

    # ---------------------------------------------------------------- the update
    def _average(self, average: list[Tensor], current: list[Tensor], weight: float) -> None:
        self._enqueue(current, lambda staging: torch._foreach_lerp_(average, staging, weight))

    def _copy(self, copies: list[Tensor], current: list[Tensor]) -> None:
        self._enqueue(current, lambda staging: torch._foreach_copy_(copies, staging), first=False)

    def _enqueue(self, current: list[Tensor], host_work: Any, first: bool = True) -> None:
        """Stages ``current`` in host memory and runs ``host_work(staging)`` on the host thread.
        ``first``: the averaged tensors (a new update: wait for the previous one); else the
        integer buffers of the same update, appended to it."""
        if first:
            self.synchronize()
        staging = self._staging_for(current, first)
        device = current[0].device if current else torch.device("cpu")
        copied = None
        if device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            main = torch.cuda.current_stream(device)
            self._stream.wait_stream(main)  # after the step that wrote the weights
            with torch.cuda.stream(self._stream):
                # ``current`` is detached (plain tensors): which are weights is read off the
                # tracked tensors; the integer buffers (first=False) are all buffers
                weights = [first and isinstance(t, nn.Parameter) for t in self.tracked[:len(current)]]
                for i, t in enumerate(current):  # written in place by the next forward pass: copied first
                    if not weights[i]:
                        staging[i].copy_(t, non_blocking=True)
                buffers_copied = torch.cuda.Event()
                buffers_copied.record(self._stream)
                for i, t in enumerate(current):
                    if weights[i]:
                        staging[i].copy_(t, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._stream)
            main.wait_event(buffers_copied)
            self._wait_before_next_step(copied, main)
        else:
            torch._foreach_copy_(staging, current)
        previous = self._pending

        def work() -> None:
            if previous is not None:
                previous.result()  # the averaged tensors' part of this update
            if copied is not None:
                copied.synchronize()
            host_work(staging)

        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="lightning-imex-ema")
        self._pending = self._worker.submit(work)

    def _staging_for(self, current: list[Tensor], first: bool) -> list[Tensor]:
        """Host buffers shaped like ``current`` (under FSDP2 this rank's shards, not the full
        tensors), pinned when it is on CUDA, kept across updates; ``first``: the averaged
        tensors', else the integer buffers'."""
        staging = self._staging.get(first)
        if staging is None or any(s.shape != t.shape or s.dtype != t.dtype for s, t in zip(staging, current)):
            pin = bool(current) and current[0].device.type == "cuda"
            staging = self._staging[first] = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in current]
        return staging

    def _wait_before_next_step(self, copied: Any, stream: Any) -> None:
        """The next optimizer step's kernels (on ``stream``) wait for the copies of the weights."""
        waited = []

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # once; removed by the next update or synchronize(), not here: torch is
            # iterating over its hooks
            if not waited:
                stream.wait_event(copied)
                waited.append(True)

        self._remove_step_hook()
        self._step_hook = register_optimizer_step_pre_hook(hook)

    def _remove_step_hook(self) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    def synchronize(self) -> None:
        """Waits for the pending update (its copies and its host average); re-raises an
        error the host thread met."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        self._remove_step_hook()  # the copies are done: nothing left to wait for

    # ---------------------------------------------------------------- everything that reads the average
    def swap(self) -> None:
        self.synchronize()
        super().swap()

    def average(self) -> list[Tensor]:
        self.synchronize()
        return super().average()

    def raw_state_dict(self) -> dict[str, Tensor]:
        self.synchronize()
        return super().raw_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.synchronize()
        super().load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        self.synchronize()
        state = dict(self.__dict__)
        for key in ("_pending", "_worker", "_stream", "_step_hook"):
            state[key] = None  # rebuilt on the next update
        state["_staging"] = {}
        return state


def build_ema(model: nn.Module, decay: Any = 0.999, schedule: str | None = None, **options: Any) -> EMA:
    """An :class:`OffloadedEMA` where it helps (``device="cpu"`` and a model with CUDA
    tensors), else an :class:`~lightning_imex.ema.EMA`."""
    device = options.get("device")
    on_cuda = any(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    if device is not None and torch.device(device).type == "cpu" and on_cuda:
        return OffloadedEMA(model, decay, schedule, **options)
    return EMA(model, decay, schedule, **options)

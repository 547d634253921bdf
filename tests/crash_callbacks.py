"""Callbacks the crash tests put into the app (``+callbacks.kill._target_=crash_callbacks.KillAt``;
``tests/fork_runner.py``'s server, in ``tests/``, imports them): they SIGKILL the training
process itself, so nothing is cleaned up, as when a machine is preempted or OOM-killed."""

from __future__ import annotations

import os
import signal

import lightning as L
from fsspec.implementations.local import LocalFileOpener


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    """Dies once ``global_step`` reaches ``step``, at the end of that batch: before the
    checkpoint callbacks, which Lightning runs last, could save it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            die()


class KillDuringSave(L.Callback):
    """Dies halfway through writing the ``save``-th checkpoint file (counting from 1)."""

    def __init__(self, save: int) -> None:
        self.save, self.writes = save, 0
        write = LocalFileOpener.write

        def half_then_die(opener, data):
            self.writes += 1
            if self.writes == self.save:
                write(opener, bytes(data)[: len(data) // 2])
                opener.flush()
                die()
            return write(opener, data)

        LocalFileOpener.write = half_then_die

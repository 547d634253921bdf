"""torch's intra-op threads for a fit, set deliberately: the config's ``threads`` in every
process of the fit; with ``threads=null``, torch's default for one process (a thread per
core, or ``OMP_NUM_THREADS``), and ``cores // processes`` where several CPU processes
share the machine (``strategy=ddp_cpu`` or ``fsdp_cpu``): a thread per core in each
would make them fight over the cores, which slows a fit down many times over."""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback

from ..validate import integer
from .cores import usable_cores

__all__ = ["TorchThreads"]


class TorchThreads(Callback):
    """Sets torch's intra-op threads in each process of the fit at its setup (a
    ``ddp_spawn`` worker's too) and puts back the process's own number at teardown."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = integer("threads", threads, 1, optional=True, note=" (null: torch's default, or cores // "
                                                                          "processes for several CPU processes)")
        self._before: int | None = None

    def resolve(self, trainer: L.Trainer) -> int | None:
        """The number this fit's processes use (None: torch's, left as it is)."""
        if self.threads is not None:
            return self.threads
        processes = trainer.num_devices  # this machine's processes of the fit
        if (isinstance(trainer.accelerator, CPUAccelerator) and processes > 1
                and "OMP_NUM_THREADS" not in os.environ):
            return max(1, usable_cores() // processes)
        return None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        threads = self.resolve(trainer)
        if threads is not None:
            self._before = torch.get_num_threads()
            torch.set_num_threads(threads)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None

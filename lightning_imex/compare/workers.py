"""A compare worker process's set-up (:func:`.runner.run_all`'s pool), in a module that
imports torch but not Lightning: the pool imports it as the worker starts, before the
first run brings in the app, so the worker's GPU is chosen (``CUDA_VISIBLE_DEVICES``)
before anything can have looked at the GPUs (CUDA reads the variable once)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch

__all__ = ["start_worker"]

PARENT_POLL_SECONDS = 0.5  # how often a worker looks whether the compare command still runs


def start_worker(parent: int, threads: int, devices: Any) -> None:
    """The worker's GPU (the next of ``devices``, a queue, if given), its torch threads,
    and its end with the compare command ``parent``: a SIGKILLed command leaves no worker
    training into its folder."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices.get()
    torch.set_num_threads(threads)
    threading.Thread(target=_end_with_parent, args=(parent,), daemon=True).start()


def _end_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)

"""The CPU cores this process may use: what the app's threads (:mod:`.threads`) and the
compare command's runs at a time (:mod:`lightning_imex.compare`) are shared out from.
Imports neither torch nor Lightning: ``lightning-imex-compare --help`` prints it."""

from __future__ import annotations

import os

__all__ = ["usable_cores"]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

"""Counts the collectives a process calls, in all and inside ``EMA.update``: the sharded
EMA's promise that an update gathers nothing (tests/fsdp_app_run.py, tests/test_ema_fsdp1.py)."""

from __future__ import annotations

from lightning_imex.ema import EMA

__all__ = ["count_collectives"]

# c10d's collectives, the old private names FSDP1 still calls among them
COLLECTIVES = ("all_gather_into_tensor", "_all_gather_base", "all_gather", "all_reduce", "broadcast",
               "reduce_scatter_tensor", "_reduce_scatter_base", "barrier")


def count_collectives() -> dict:
    """From now on in this process: ``all`` collectives (c10d's, DTensor's gathers and
    redistributions), those ``in_updates`` of an EMA, the ``updates``, and whether every
    update averaged shards (``sharded``)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    counts = {"all": 0, "in_updates": 0, "updates": 0, "sharded": True}
    inside = [False]

    def counted(function):
        def wrapper(*args, **kwargs):
            counts["all"] += 1
            counts["in_updates"] += inside[0]
            return function(*args, **kwargs)
        return wrapper

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name)))
    DTensor.full_tensor, DTensor.redistribute = counted(DTensor.full_tensor), counted(DTensor.redistribute)
    update = EMA.update

    def counted_update(self):
        counts["updates"] += 1
        counts["sharded"] &= self.sharded
        inside[0] = True
        try:
            update(self)
        finally:
            inside[0] = False

    EMA.update = counted_update
    return counts

"""The private torch APIs the project uses, in one place (the EMA core is pure torch, so
Lightning's private APIs live apart, in :mod:`lightning_imex._lightning`). Each is checked
by tests/test_ema_fsdp1.py, which fails when torch moves it."""

from __future__ import annotations

from torch import nn

__all__ = ["free_gathered_flat_parameter"]


def free_gathered_flat_parameter(module: nn.Module) -> None:
    """FSDP1 has no public reshard, and keeps the root unit's gathered FlatParameter after a
    forward without backward, which its next forward would use instead of gathering the
    shards again; freed here as FSDP's own post-backward does (torch's private API)."""
    from torch.distributed.fsdp._runtime_utils import _reshard  # imported where FSDP1 is in use

    handle = module._handle
    gathered_once = handle is not None and hasattr(handle.flat_param, "_full_param_padded")  # FSDP's lazy init ran
    if gathered_once and handle.uses_sharded_strategy and not handle.needs_unshard():
        _reshard(module, handle, free_unsharded_flat_param=True)

"""A resumed run's folder: the config resolvers ``lightning_imex.run_dir`` and
``lightning_imex.hydra_subdir`` (``conf/hydra/output/lightning_imex.yaml`` and
``conf/train.yaml``) put a resume in the folder of the run that saved its checkpoint,
its Hydra files beside the earlier run's. Importing this module registers them."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

__all__ = ["CKPT_KEYWORDS", "resumed_run_dir"]

CKPT_KEYWORDS = ("last", "best", "hpc")  # ckpt_path values Lightning resolves itself
HYDRA_CONFIG = os.path.join(".hydra", "config.yaml")  # what Hydra writes in every run's folder


def resumed_run_dir(ckpt_path: Any) -> str | None:
    """The folder of the app's run that saved the checkpoint at ``ckpt_path``: the
    checkpoint's folder or the one above it (``RUN/checkpoints/last.ckpt``), whichever
    holds Hydra's ``.hydra/config.yaml``; None if neither does."""
    if not isinstance(ckpt_path, str) or not ckpt_path or ckpt_path in CKPT_KEYWORDS:
        return None
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    return next((f for f in (folder, os.path.dirname(folder)) if os.path.isfile(os.path.join(f, HYDRA_CONFIG))), None)


def _hydra_subdir(output_dir: str, other: str) -> str:
    """Where Hydra writes a run's config: ``.hydra``, or ``other`` in a folder where an
    earlier run (the one resumed) has written its own."""
    return other if os.path.isfile(os.path.join(output_dir, HYDRA_CONFIG)) else ".hydra"


OmegaConf.register_new_resolver("lightning_imex.run_dir", lambda ckpt_path, default: resumed_run_dir(ckpt_path)
                                or default, replace=True)
OmegaConf.register_new_resolver("lightning_imex.hydra_subdir", _hydra_subdir, replace=True)

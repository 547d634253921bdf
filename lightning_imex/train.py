"""``lightning-imex-train`` (also ``python -m lightning_imex.train``): the Hydra app.

Composes ``conf/train.yaml`` with command-line overrides, checks every part by building
it (a bad value stops here with one line naming it), then fits, tests, and prints where
the checkpoint and logs are. Configs are found in the installed package
(``lightning_imex.conf``, the repository's ``conf/``)."""

from __future__ import annotations

import sys
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .config import register
from .data import DATAMODULES
from .factory import build_optimizer
from .task import SupervisedTask

__all__ = ["ConfigError", "build", "main", "train"]

CONFIG_PATH = "pkg://lightning_imex.conf"


class ConfigError(ValueError):
    """A config value that cannot work; the message names it."""


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, SupervisedTask, L.Trainer]:
    """Datamodule, module and Trainer from a composed config, each checked before any
    training starts (data files present, optimizer hyper-parameters valid)."""
    try:
        dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
        name = dataset.pop("name", None)
        if name not in DATAMODULES:
            raise ValueError(f"dataset.name must be one of {sorted(DATAMODULES)}, got {name!r}")
        datamodule = DATAMODULES[name](**dataset)
        datamodule.check_files()
        module = SupervisedTask(model=cfg.model, input_shape=datamodule.input_shape,
                                num_outputs=datamodule.num_outputs, task=datamodule.task, optimizer=cfg.optimizer,
                                scheduler=cfg.scheduler, clipping=cfg.clipping, **cfg.param_groups)
        build_optimizer(module, module.optimizer_config, **module.param_group_config)  # its own checks
        logger = instantiate(cfg.logger) if cfg.logger else False
        callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c]
        if not logger:  # an LR monitor has nowhere to write (and Lightning refuses it)
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        trainer = L.Trainer(**instantiate(cfg.trainer, _convert_="all"), callbacks=callbacks, logger=logger)
    except (ValueError, TypeError, FileNotFoundError, ImportError, InstantiationException) as error:
        raise ConfigError(str(error).splitlines()[0] if str(error) else type(error).__name__) from error
    return datamodule, module, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Seeds, builds, fits and tests; returns the final metrics."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True if cfg.ckpt_path else None)
    if cfg.test and not trainer.fast_dev_run:
        trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    log_dir = trainer.log_dir  # a collective call under DDP: every rank makes it
    if trainer.is_global_zero:
        print(summary(trainer, metrics, log_dir))
    return metrics


def summary(trainer: L.Trainer, metrics: dict[str, float], log_dir: str | None) -> str:
    lines = [f"finished at step {trainer.global_step} (epoch {trainer.current_epoch})"]
    lines += [f"  {name:<14} {value:.4f}" for name, value in sorted(metrics.items())
              if name.startswith(("test/", "val/"))]
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        lines.append(f"  checkpoint     {checkpoint.best_model_path}")
    if log_dir:
        lines.append(f"  logs           {log_dir}")
    return "\n".join(lines)


register()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> Any:
    try:
        return train(cfg)
    except ConfigError as error:
        sys.exit(f"lightning-imex-train: error: {error}")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()

"""``lightning-imex-train`` (also ``python -m lightning_imex.train``): the Hydra app.

Composes ``conf/train.yaml`` with command-line overrides, builds and checks every part
(:mod:`lightning_imex.app.build`: a bad value stops here with one line naming it), then
fits, tests, and prints where the checkpoint and logs are. Configs are found in the
installed package (``lightning_imex.conf``, the repository's ``conf/``).

A run prints Lightning's device lines, the model summary, the progress bar and the
summary; third-party tips and deprecation warnings its user cannot act on are filtered
(:mod:`lightning_imex.app.quiet`).

Every error of the configuration is one line, ``lightning-imex-train: error: ...``, with
a non-zero exit status (:mod:`lightning_imex.app.errors`); nothing is trained and no
summary is printed. An error once training has started keeps its traceback
(``HYDRA_FULL_ERROR=1`` shows one for every error). The command line (:func:`main`) lives
in :mod:`lightning_imex.app.cli`: ``--help`` and a command line that does not compose
answer there without importing Lightning (the console script points there; this module
imports Lightning and registers the whole config schema)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .app.build import build, build_fit
from .app.checks import check_seed
from .app.cli import _hydra_main, main  # noqa: F401  (_hydra_main: the task on a composed config, for tests)
from .app.errors import PROG, ConfigError, compose_error, hint, one_line
from .app.quiet import INFO, FitStart, quiet
from .config import register
from .multigradient import IncompatibleSetupError

__all__ = ["PROG", "ConfigError", "build", "compose_error", "main", "one_line", "quiet", "summary", "train"]

register()  # the whole schema: a composition after importing this module types every key


def train(cfg: DictConfig, *, extra_callbacks: Sequence[Callback] = (), print_summary: bool = True
          ) -> dict[str, float]:
    """Seeds, builds, fits and tests; returns the final metrics. A bad value raises
    :class:`ConfigError` before the fit starts training; Lightning's information lines
    are held until then (and dropped with the error). ``extra_callbacks`` join the
    config's (``lightning-imex-compare`` adds its progress bar)."""
    try:
        check_seed(cfg.seed)
    except OmegaConfBaseException as error:
        raise ConfigError(one_line(error)) from error
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    INFO.hold()
    try:
        datamodule, module, trainer = build_fit(cfg, extra_callbacks)
        start = next(c for c in trainer.callbacks if isinstance(c, FitStart))
        try:
            with warnings.catch_warnings():
                if cfg.ckpt_path is not None:  # a resume writes on in its run's folder (app/run_dir.py)
                    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
                trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path,
                            weights_only=True if cfg.ckpt_path else None)
            INFO.release()  # a fit that ended before training (max_steps=0)
            if cfg.test and not trainer.fast_dev_run:
                trainer.test(module, datamodule=datamodule, verbose=False)
        except (IncompatibleSetupError, MisconfigurationException) as error:
            raise ConfigError(one_line(error)) from error
        except (ValueError, OSError) as error:  # Lightning's checks at the start of the fit
            if not start.configuring:
                raise  # a bug: keep the traceback
            raise ConfigError(hint(cfg, error)) from error
    except BaseException:
        INFO.drop()
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    log_dir = trainer.log_dir  # a collective call under DDP: every rank makes it
    if trainer.is_global_zero and print_summary:
        print(summary(trainer, metrics, log_dir))
    return metrics


def summary(trainer: L.Trainer, metrics: dict[str, float], log_dir: str | None) -> str:
    # the last epoch's index, as the progress bar and a checkpoint's name (epoch=19-step=420)
    # give it; trainer.current_epoch counts the epochs completed
    lines = [f"finished at step {trainer.global_step} (epoch {max(trainer.current_epoch - 1, 0)})"]
    lines += [f"  {name:<14} {value:.4f}" for name, value in sorted(metrics.items())
              if name.startswith(("test/", "val/"))]
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        lines.append(f"  checkpoint     {checkpoint.best_model_path}")
    if log_dir:
        lines.append(f"  logs           {log_dir}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

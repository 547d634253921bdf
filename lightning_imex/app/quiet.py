"""The app's output filters: third-party tips and deprecation warnings its user cannot
act on are dropped (by exact message, in the app's processes only), and Lightning's
information lines are held while a config builds, so that a config that fails prints
its error line alone."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["INFO", "FitStart", "Quiet", "quiet"]

# (message regex, category) of warnings a run of the app would print that its user
# cannot act on
QUIET_WARNINGS = (
    # torch >= 2.10 deprecates LeafSpec, which Lightning 2.6's utilities/_pytree.py builds
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
# the start of Lightning's info messages the app drops: advertisements, and the note that
# the schedule's length (Trainer.estimated_stepping_batches) loads the train dataloader
QUIET_INFO = (
    "💡 Tip: For seamless cloud ",
    "Loading `train_dataloader` to estimate number of stepping batches",
)
# where Lightning's rank_zero_info messages are logged (lightning_utilities' module
# logger, replaced by Lightning's)
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class LightningInfo(logging.Filter):
    """Drops :data:`QUIET_INFO`; while :attr:`held` is a list, keeps the other records
    there instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).lstrip().startswith(QUIET_INFO):
            return False
        if self.held is not None:
            self.held.append(record)
            return False
        return True

    def hold(self) -> None:
        self.held = []

    def release(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            logging.getLogger(record.name).handle(record)

    def drop(self) -> None:
        self.held = None


INFO = LightningInfo()


def quiet() -> None:
    """Installs the app's filters in this process (idempotent): :data:`QUIET_WARNINGS`
    and :data:`QUIET_INFO`. ``main()`` calls it, and so does every process a fit spawns
    (:class:`Quiet`)."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if INFO not in logger.filters:
            logger.addFilter(INFO)


class Quiet(Callback):
    """:func:`quiet` in a process that did not start at ``main()``: a ``ddp_spawn``
    worker, which unpickles the Trainer (and this callback) first."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_quiet": True}  # not empty: pickle calls __setstate__ then

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        quiet()


class FitStart(Callback):
    """Where a fit stands: :attr:`configuring` until the sanity check starts, again
    between its end and the start of training (where Lightning checks the training
    loader), never after. The first start prints Lightning's held information."""

    def __init__(self) -> None:
        self.configuring = True

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.configuring = False
        INFO.release()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.configuring = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.configuring = False
        INFO.release()

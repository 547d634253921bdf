"""Fits the test classifier with IMEX trapezoidal on CPU processes and saves the final
weights: ``python tests/ddp_fit.py DEVICES BATCH_SIZE OUT``. Run by test_ddp.py (which fits
in one process in its own, with :func:`fit`); with DEVICES=2 Lightning starts the second
(gloo) process by running this script again."""

import sys

import lightning as L
import torch
from lit import Classifier, loader, trainer
from torch.utils.data import DataLoader, DistributedSampler


class Shards(L.LightningDataModule):
    """Rank r takes samples r, r + world, ...: in order, so that the ranks' batches
    together are the one-process batches."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        data = loader(n=96).dataset
        shards = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=shards)


def fit(devices: int, batch_size: int) -> tuple[Classifier, L.Trainer]:
    """The classifier after 6 steps on ``devices`` processes, each of ``batch_size`` samples."""
    module = Classifier(optimizer={"name": "imex_adam", "lr": 0.05, "tableau": "trapezoidal"},
                        clipping={"algorithm": "norm", "threshold": 1.0})
    fitted = trainer(max_steps=6, devices=devices, strategy="ddp" if devices > 1 else "auto",
                     use_distributed_sampler=False)
    fitted.fit(module, datamodule=Shards(batch_size))
    assert module.calls == 12, module.calls  # both evaluations of every step ran on this rank
    return module, fitted


if __name__ == "__main__":
    module, fitted = fit(int(sys.argv[1]), int(sys.argv[2]))
    if fitted.global_rank == 0:
        torch.save(module.state_dict(), sys.argv[3])

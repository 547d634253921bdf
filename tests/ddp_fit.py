"""Fits the test classifier with IMEX trapezoidal on CPU processes and saves the final
weights: ``python tests/ddp_fit.py DEVICES BATCH_SIZE OUT``. Run by test_ddp.py; with
DEVICES=2 Lightning starts the second (gloo) process by running this script again."""

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


if __name__ == "__main__":
    devices, batch_size, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    module = Classifier(optimizer={"name": "imex_adam", "lr": 0.05, "tableau": "trapezoidal"},
                        clipping={"algorithm": "norm", "threshold": 1.0})
    fit = trainer(max_steps=6, devices=devices, strategy="ddp" if devices > 1 else "auto",
                  use_distributed_sampler=False)
    fit.fit(module, datamodule=Shards(batch_size))
    assert module.calls == 12, module.calls  # both evaluations of every step ran on this rank
    if fit.global_rank == 0:
        torch.save(module.state_dict(), out)

"""IMEXAdam where users put it: behind an LR scheduler, inside a Lightning fit."""

import lightning as L
import pytest
import torch
from conftest import flat, make_data, make_net
from torch import nn

from lightning_imex.optim import IMEXAdam


class Classifier(L.LightningModule):
    def __init__(self, tableau: str):
        super().__init__()
        self.net, self.tableau, self.calls = make_net(), tableau, 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return IMEXAdam(self.parameters(), lr=1e-2, tableau=self.tableau)


@pytest.mark.parametrize("tableau,evaluations", [("euler", 1), ("trapezoidal", 2), ("ssp3_433", 3)])
def test_lightning_automatic_optimization_runs_every_stage(tableau, evaluations):
    x, y = make_data(n=64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = Classifier(tableau)
    before = flat(module.net)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert trainer.global_step == 8
    assert module.calls == 8 * evaluations  # Lightning's closure is the optimizer's closure
    assert not torch.equal(before, flat(module.net))

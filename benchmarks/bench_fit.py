"""A whole Lightning fit, ours against plain Lightning, in the same run.

Ours: ``IMEXModule`` with IMEXAdam(tableau="euler") (Adam) and norm clipping through the
module's hook (which also checks for non-finite gradients and logs the pre-clip norm).
Baseline: a plain ``LightningModule`` with ``torch.optim.Adam(fused=True)`` and the
Trainer's ``gradient_clip_val``. Same MLP on sklearn's digits, same fixed number of
steps; the two fits alternate and the script prints the ratio of median wall times.

    python benchmarks/bench_fit.py [--steps 300] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from lightning_imex import IMEXModule

LR, CLIP = 1e-3, 1.0


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def digits(batch_size: int) -> torch.utils.data.DataLoader:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    data = torch.utils.data.TensorDataset(x, torch.tensor(y))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def step(module: L.LightningModule, batch) -> torch.Tensor:
    x, y = batch
    loss = F.cross_entropy(module.net(x), y)
    module.log("train_loss", loss)
    return loss


class Ours(IMEXModule):
    def __init__(self):
        super().__init__(optimizer={"name": "imex_adam", "lr": LR, "tableau": "euler"},
                         clipping={"algorithm": "norm", "threshold": CLIP}, decay_norm_and_bias=True)
        self.net = mlp()

    def training_step(self, batch, batch_idx):
        return step(self, batch)


class Baseline(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def training_step(self, batch, batch_idx):
        return step(self, batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=LR, fused=True)


def fit_seconds(module: L.LightningModule, steps: int, batch_size: int, **trainer_kwargs) -> float:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    data = digits(batch_size)
    start = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    fit_seconds(Ours(), 20, args.batch_size)  # warm-up: imports, first-call costs
    fit_seconds(Baseline(), 20, args.batch_size, gradient_clip_val=CLIP)
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for _ in range(args.repeats):  # alternate, so drift hits both alike
        times["baseline"].append(fit_seconds(Baseline(), args.steps, args.batch_size, gradient_clip_val=CLIP))
        times["ours"].append(fit_seconds(Ours(), args.steps, args.batch_size))
    base, ours = (statistics.median(times[k]) for k in ("baseline", "ours"))
    print(f"{args.steps} steps, batch {args.batch_size}, {args.threads} threads, median of {args.repeats} fits")
    print(f"baseline  Lightning + torch.optim.Adam(fused=True) + Trainer clipping: {base * 1e3:8.1f} ms "
          f"({base / args.steps * 1e3:.2f} ms/step)")
    print(f"ours      IMEXModule + IMEXAdam(euler) + clipping hook:            {ours * 1e3:8.1f} ms "
          f"({ours / args.steps * 1e3:.2f} ms/step)")
    print(f"ratio ours / baseline: {ours / base:.3f}x")


if __name__ == "__main__":
    main()

"""Adam against IMEX Adam on sklearn's digits, compared honestly.

Trains the same MLP with each optimizer on the same minibatches and reports the
training loss and test accuracy at equal GRADIENT EVALUATIONS (a two-gradient step
costs two forward+backward passes) and the wall-clock time, not only per step.

    python recipes/quickstart.py                  # about 20 s on 2 CPU cores
    python recipes/quickstart.py --evaluations 6000 --lr 3e-3
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lightning_imex.optim import IMEXAdam

OPTIMIZERS = {
    "adam (torch)": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "imex euler": lambda p, lr: IMEXAdam(p, lr=lr, tableau="euler"),
    "imex trapezoidal": lambda p, lr: IMEXAdam(p, lr=lr, tableau="trapezoidal"),
    "imex trapezoidal reuse": lambda p, lr: IMEXAdam(p, lr=lr, tableau="trapezoidal", reuse_gradient=True),
    "imex ssp3_433": lambda p, lr: IMEXAdam(p, lr=lr, tableau="ssp3_433"),
}


def run(name: str, data, evaluations: int, lr: float, batch: int, seed: int) -> dict[str, float]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = OPTIMIZERS[name](model.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    used, steps = 0, 0
    start = time.perf_counter()
    while used < evaluations:
        for idx in torch.randperm(len(x_train), generator=g).split(batch):
            def closure():
                nonlocal used
                used += 1
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                return loss
            opt.step(closure)
            steps += 1
            if used >= evaluations:
                break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_loss = nn.functional.cross_entropy(model(x_train), y_train).item()
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return dict(steps=steps, evaluations=used, seconds=seconds, train_loss=train_loss, accuracy=accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluations", type=int, default=3000, help="gradient evaluations per optimizer")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=args.seed)
    data = [torch.tensor(a, dtype=torch.float32) for a in (x_train, y_train, x_test, y_test)]
    data[1], data[3] = data[1].long(), data[3].long()
    print(f"MLP 64-128-10 on sklearn digits, lr {args.lr}, batch {args.batch}, "
          f"{args.evaluations} gradient evaluations each")
    print(f"{'optimizer':24s} {'steps':>6s} {'grad evals':>10s} {'seconds':>8s} {'train loss':>10s} {'test acc':>8s}")
    for name in OPTIMIZERS:
        r = run(name, data, args.evaluations, args.lr, args.batch, args.seed)
        print(f"{name:24s} {r['steps']:6d} {r['evaluations']:10d} {r['seconds']:8.2f} "
              f"{r['train_loss']:10.6f} {r['accuracy']:8.3f}")


if __name__ == "__main__":
    main()

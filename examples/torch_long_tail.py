"""GradTail with PyTorch on a long-tailed digits set, end to end, in under a minute on a CPU.

Run: ``.venv/bin/python examples/torch_long_tail.py``. Trains the same MLP with and without
GradTail and prints the test accuracy of the rarest classes for both.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from gradtail_torch import GradTail


def long_tailed_digits(imbalance: float = 10.0, seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x / 16.0, dtype=torch.float32)
    y = torch.as_tensor(y)
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:50] for c in range(10)])
    rest = np.setdiff1d(np.arange(len(y)), test)
    counts = np.floor(120 * imbalance ** (-np.arange(10) / 9)).astype(int)  # class c keeps counts[c]
    train = np.concatenate([rng.permutation(rest[y[rest] == c])[: counts[c]] for c in range(10)])
    return x[train], y[train], x[test], y[test], counts


def fit(x, y, *, use_gradtail: bool, epochs: int = 80, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gt = GradTail(model, warmup_steps=len(y) // 64) if use_gradtail else None  # one-epoch warm-up
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
            if gt is None:
                loss.mean().backward()
            else:
                gt.backward(loss)  # weights + one weighted backward (book-keeping)
            opt.step()
    if gt is not None:
        gt.remove()
    return model


def main() -> None:
    x, y, x_test, y_test, counts = long_tailed_digits()
    few = torch.as_tensor(np.argsort(counts)[:3])
    print(f"training counts per class: {counts.tolist()}; few-shot classes: {few.tolist()}")
    for use in (False, True):
        model = fit(x, y, use_gradtail=use)
        with torch.no_grad():
            pred = model(x_test).argmax(1)
        per_class = torch.stack([(pred[y_test == c] == c).float().mean() for c in range(10)])
        print(
            f"{'GradTail' if use else 'uniform ':8}: balanced accuracy {100 * per_class.mean():.1f}%, "
            f"few-shot classes {100 * per_class[few].mean():.1f}%"
        )


if __name__ == "__main__":
    main()

"""Training loops for the long-tail comparisons: uniform, inverse frequency, GradTail."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradtail_torch import GradTail

from .data import LongTailData

METHODS = ("uniform", "inverse_frequency", "gradtail")


@dataclass
class RunResult:
    """One training run: test metrics, per-class accuracy and a trace of GradTail's scores."""

    method: str
    seed: int
    per_class_accuracy: np.ndarray
    accuracy: float
    balanced_accuracy: float
    group_accuracy: dict[str, float]
    seconds_per_epoch: float
    trace: dict[str, list[Any]] = field(default_factory=dict)


def mlp(d_in: int, n_classes: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, n_classes))
    return nn.Sequential(*layers)


def evaluate(model: nn.Module, data: LongTailData) -> tuple[np.ndarray, float, float, dict[str, float]]:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(data.x_test)).argmax(1).numpy()
    model.train()
    n_classes = len(data.class_names)
    per_class = np.array([np.mean(pred[data.y_test == c] == c) for c in range(n_classes)])
    groups = {
        g: float(np.mean([per_class[c] for c in range(n_classes) if data.groups[c] == g]))
        for g in ("many", "medium", "few")
    }
    return per_class, float(np.mean(pred == data.y_test)), float(per_class.mean()), groups


def train(
    data: LongTailData,
    method: str,
    *,
    seed: int = 0,
    epochs: int = 12,
    batch_size: int = 128,
    lr: float = 1e-3,
    hidden: tuple[int, ...] = (512, 256),
    gradtail_options: dict[str, Any] | None = None,
    warmup_epochs: float = 1.0,
    progress: Any = None,
) -> RunResult:
    """Train an MLP with Adam on ``data`` with one weighting ``method``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; Received: {method!r}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_classes = len(data.class_names)
    model = mlp(data.x_train.shape[1], n_classes, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all, y_all = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    n = len(y_all)
    steps_per_epoch = int(np.ceil(n / batch_size))
    class_weight = torch.as_tensor(n / (n_classes * np.maximum(data.counts, 1)), dtype=torch.float32)
    gt = None
    if method == "gradtail":
        options = {"warmup_steps": round(warmup_epochs * steps_per_epoch)} | dict(gradtail_options or {})
        gt = GradTail(model, **options)
    group_of = np.array([data.groups[c] for c in range(n_classes)])
    trace: dict[str, list[Any]] = {"epoch": [], "alignment": [], "weight": [], "group": []}
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, reduction="none")
            if method == "uniform":
                loss.mean().backward()
            elif method == "inverse_frequency":
                (class_weight[y] * loss).mean().backward()
            else:
                assert gt is not None
                w = gt.backward(loss)
                if step % 10 == 0 and epoch >= warmup_epochs:
                    trace["epoch"] += [epoch] * len(y)
                    trace["alignment"] += gt.last_alignment.tolist()
                    trace["weight"] += w.tolist()
                    trace["group"] += group_of[y.numpy()].tolist()
            opt.step()
            if progress is not None:
                progress.update(1)
    seconds = (time.perf_counter() - start) / epochs
    if gt is not None:
        gt.remove()
    per_class, acc, bal, groups = evaluate(model, data)
    return RunResult(method, seed, per_class, acc, bal, groups, seconds, trace if gt is not None else {})

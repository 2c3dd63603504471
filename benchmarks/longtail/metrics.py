"""Metrics of the long-tail suite, in plain NumPy: AUROC, accuracies, seed aggregates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

GROUPS = ("many", "medium", "few")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, tied values sharing the mean of their ranks."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    # Mean rank of each tie group: (sum of the group's ordinal ranks) / (group size).
    sums = np.bincount(inverse.ravel(), weights=ranks, minlength=len(counts))
    return (sums / counts)[inverse.ravel()]


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (Mann-Whitney U; ties count 1/2).

    Higher score should mean positive. NaN when either class is empty or a score is non-finite.

    >>> auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True]))
    1.0
    >>> auroc(np.array([1.0, 1.0]), np.array([True, False]))
    0.5
    """
    score = np.asarray(score, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    if score.shape != positive.shape:
        raise ValueError(
            f"score and positive must have one shape; Received: {score.shape}, {positive.shape}."
        )
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0 or not np.all(np.isfinite(score)):
        return math.nan
    ranks = average_ranks(score)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def class_accuracies(pred: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Accuracy per class (NaN for a class absent from ``y``)."""
    hits = np.bincount(y, weights=(pred == y).astype(np.float64), minlength=n_classes)
    counts = np.bincount(y, minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / counts


def group_means(per_class: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """Mean of ``per_class`` over the classes of each group ("many", "medium", "few")."""
    return {
        g: float(np.mean([per_class[c] for c in range(len(groups)) if groups[c] == g]))
        for g in GROUPS
        if g in groups
    }


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": len(v)}

"""Metrics of the long-tail suite, in plain NumPy: AUROC, accuracies, seed aggregates."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

GROUPS = ("many", "medium", "few")
#: The late averages cover this share of the final epochs (at least one).
LATE_FRACTION = 0.25


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


def late_epochs(epochs: int) -> int:
    """How many final epochs the late averages cover: the last 25%, at least one.

    Examples
    --------
    >>> late_epochs(12), late_epochs(60), late_epochs(2)
    (3, 15, 1)
    """
    return max(1, round(LATE_FRACTION * epochs))


def selected_epoch(val_curve: Sequence[float]) -> int:
    """The epoch (0-based) of the best validation score; the earliest on ties.

    Selection sees the validation half only; the test half is read at the chosen epoch.

    Examples
    --------
    >>> selected_epoch([70.0, 80.0, 79.0, 80.0])
    1
    """
    return int(np.argmax(np.asarray(val_curve, dtype=np.float64)))


def paired_deltas(
    rows: list[dict[str, Any]],
    keys: Sequence[str],
    metric: Callable[[dict[str, Any], str], float | None],
    *,
    base_method: str = "uniform",
    out: str = "delta_vs_uniform",
) -> None:
    """``row[out][key]``: ``metric(row, key)`` minus that of ``base_method``'s row of the same data
    set and seed (None where either is missing); ``row[out]`` is None without such a row."""
    base = {(r["dataset"], r["seed"]): r for r in rows if r["method"] == base_method}
    for r in rows:
        b = base.get((r["dataset"], r["seed"]))
        if b is None:
            r[out] = None
            continue
        delta: dict[str, float | None] = {}
        for k in keys:
            mine, theirs = metric(r, k), metric(b, k)
            delta[k] = None if mine is None or theirs is None else mine - theirs
        r[out] = delta


def delta_stats(values: Sequence[float | None], *, lower_is_better: bool = False) -> dict[str, Any]:
    """Mean and std of the paired deltas over seeds, and how many seeds improve: ``n_positive`` /
    ``every_seed_positive`` (higher is better) or ``n_better`` / ``every_seed_better`` (lower is
    better, e.g. an error). Missing values are left out.

    Examples
    --------
    >>> s = delta_stats([1.0, 2.0, None])
    >>> s["mean"], s["n_positive"], s["every_seed_positive"]
    (1.5, 2, True)
    """
    finite = [float(v) for v in values if v is not None]
    better = [v < 0 if lower_is_better else v > 0 for v in finite]
    word = "better" if lower_is_better else "positive"
    return mean_std(finite) | {
        f"n_{word}": sum(better),
        f"every_seed_{word}": bool(finite) and all(better),
    }

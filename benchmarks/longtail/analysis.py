"""Tail detection over training: AUROC of a per-example score for few-shot membership.

A run records every training example's loss and (for GradTail) alignment at every step.
At a mark ``f`` of training (0.1 = 10% of the steps) the scores of the steps in the window
``(f - width, f]`` are pooled, and the AUROC says how well the score separates the tail's
examples (positives: group "few", i.e. few-shot classes, or the rare subclasses of a
hidden-stratification set) from the rest: ``-alignment`` for GradTail (low alignment means
tail-like), the loss itself as the label-free baseline.

``groups`` is always per recorded example: the group of each entry of ``scores``, shape (n,)
(``LongTailData.example_groups(scores["index"])``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import GROUPS, auroc, mean_std

MARKS = (0.1, 0.5, 1.0)
HIST_MARKS = (0.1, 1.0)
HIST_BINS = 40


def window_steps(mark: float, total_steps: int, width: float) -> tuple[int, int]:
    """Steps ``[start, end)`` of the window ending at ``mark`` of ``total_steps``; >= 1 step."""
    end = min(total_steps, max(1, round(mark * total_steps)))
    k = max(1, round(width * total_steps))
    return max(0, end - k), end


def tail_detection(
    scores: dict[str, np.ndarray],
    *,
    total_steps: int,
    groups: Sequence[str],
    marks: Sequence[float] = MARKS,
    width: float = 0.05,
) -> dict[str, Any]:
    """AUROC of ``-alignment`` (when recorded) and of ``loss`` for the group "few", per mark."""
    return window_auroc(
        scores,
        np.asarray(groups) == "few",
        positive_label='group "few"',
        total_steps=total_steps,
        marks=marks,
        width=width,
    )


def window_auroc(
    scores: dict[str, np.ndarray],
    positive: np.ndarray,
    *,
    positive_label: str,
    total_steps: int,
    marks: Sequence[float] = MARKS,
    width: float = 0.05,
) -> dict[str, Any]:
    """AUROC of ``loss`` and ``-alignment`` (when recorded) for ``positive``, per mark of training.

    The core of the classification and the regression tail detection (``regression.py``).

    Parameters
    ----------
    scores : dict of str to numpy.ndarray
        Per recorded example, each of shape (n,): ``step``, ``loss`` and optionally ``alignment``.
    positive : numpy.ndarray
        Shape (n,), bool: the tail membership of each recorded example.
    positive_label : str
        What the positives are, stored under ``"positive"``.
    total_steps : int
        Training steps of the run; a mark ``f`` ends its window at step ``round(f * total_steps)``.
    marks, width : sequence of float, float
        Window ends and width, as fractions of training.

    Returns
    -------
    dict
        ``{"positive", "width", "windows": {mark: {"steps", "examples"}},
        "auroc": {detector: {mark: AUROC}}}`` with marks formatted ``f"{mark:g}"``.

    Examples
    --------
    >>> s = {"step": np.array([0, 0, 1, 1]), "loss": np.array([0.1, 2.0, 0.2, 3.0])}
    >>> window_auroc(s, np.array([False, True, False, True]), positive_label="odd", total_steps=2,
    ...              marks=(1.0,), width=1.0)["auroc"]
    {'loss': {'1': 1.0}}
    """
    out: dict[str, Any] = {"positive": positive_label, "width": width, "windows": {}, "auroc": {}}
    detectors = {"loss": scores["loss"]}
    if "alignment" in scores:
        detectors["alignment"] = -scores["alignment"]
    for name in detectors:
        out["auroc"][name] = {}
    for mark in marks:
        start, end = window_steps(mark, total_steps, width)
        sel = (scores["step"] >= start) & (scores["step"] < end)
        out["windows"][f"{mark:g}"] = {"steps": [start, end], "examples": int(sel.sum())}
        for name, score in detectors.items():
            out["auroc"][name][f"{mark:g}"] = auroc(score[sel], positive[sel])
    return out


def aggregate_tail_detection(group: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean and std over seeds of every detector's AUROC at every mark (``row["tail_detection"]``).

    ``group`` holds the result rows of one (data set, method), one per seed; detectors and marks
    are those of the first row. Used by the classification and the regression suite.

    Examples
    --------
    >>> rows = [{"tail_detection": {"auroc": {"loss": {"1": a}}}} for a in (0.5, 1.0)]
    >>> aggregate_tail_detection(rows)["loss"]["1"]["mean"]
    0.75
    """
    first = group[0]["tail_detection"]["auroc"]
    return {
        detector: {
            mark: mean_std([r["tail_detection"]["auroc"][detector][mark] for r in group])
            for mark in first[detector]
        }
        for detector in first
    }


def weight_by_group(
    scores: dict[str, np.ndarray], *, groups: Sequence[str], start_step: int
) -> dict[str, float]:
    """Mean loss weight per group over the steps from ``start_step`` (after warm-up)."""
    group_of = np.asarray(groups)
    late = scores["step"] >= start_step
    return {
        g: float(scores["weight"][late & (group_of == g)].mean())
        if np.any(late & (group_of == g))
        else math.nan
        for g in GROUPS
    }


def alignment_histograms(
    scores: dict[str, np.ndarray],
    *,
    total_steps: int,
    groups: Sequence[str],
    marks: Sequence[float] = HIST_MARKS,
    width: float = 0.05,
    bins: int = HIST_BINS,
) -> dict[str, Any]:
    """Counts of alignments in ``bins`` equal bins over [-1, 1], per group and mark."""
    edges = np.linspace(-1.0, 1.0, bins + 1)
    group_of = np.asarray(groups)
    out: dict[str, Any] = {"edges": edges.tolist(), "marks": {}}
    for mark in marks:
        start, end = window_steps(mark, total_steps, width)
        sel = (scores["step"] >= start) & (scores["step"] < end)
        out["marks"][f"{mark:g}"] = {
            g: np.histogram(np.clip(scores["alignment"][sel & (group_of == g)], -1, 1), edges)[0].tolist()
            for g in GROUPS
        }
    return out


def weight_vs_score(
    scores: dict[str, np.ndarray],
    *,
    groups: Sequence[str],
    start_step: int,
    bins: int = HIST_BINS,
) -> dict[str, Any]:
    """Mean loss weight and count per alignment bin (``bins`` equal bins over [-1, 1]) and group,
    over the steps from ``start_step``: how the curve turned scores into weights."""
    edges = np.linspace(-1.0, 1.0, bins + 1)
    group_of = np.asarray(groups)
    late = scores["step"] >= start_step
    which = np.clip(np.digitize(np.clip(scores["alignment"], -1, 1), edges[1:-1]), 0, bins - 1)
    out: dict[str, Any] = {"edges": edges.tolist(), "groups": {}}
    for g in GROUPS:
        sel = late & (group_of == g)
        count = np.bincount(which[sel], minlength=bins)
        total = np.bincount(which[sel], weights=scores["weight"][sel], minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        out["groups"][g] = {"count": count.tolist(), "mean_weight": mean.tolist()}
    return out

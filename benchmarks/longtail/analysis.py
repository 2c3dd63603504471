"""Tail detection over training: AUROC of a per-example score for few-shot membership.

A run records every training example's loss and (for GradTail) alignment at every step.
At a mark ``f`` of training (0.1 = 10% of the steps) the scores of the steps in the window
``(f - width, f]`` are pooled, and the AUROC says how well the score separates examples of
few-shot classes (positives) from the rest: ``-alignment`` for GradTail (low alignment means
tail-like), the loss itself as the label-free baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import GROUPS, auroc

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
    """AUROC of ``-alignment`` (when recorded) and of ``loss`` for few-shot classes, per mark."""
    few = np.array([g == "few" for g in groups])
    positive = few[scores["label"]]
    out: dict[str, Any] = {"positive": "few-shot classes", "width": width, "windows": {}, "auroc": {}}
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


def weight_by_group(
    scores: dict[str, np.ndarray], *, groups: Sequence[str], start_step: int
) -> dict[str, float]:
    """Mean loss weight per class group over the steps from ``start_step`` (after warm-up)."""
    group_of = np.array(list(groups))[scores["label"]]
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
    """Counts of alignments in ``bins`` equal bins over [-1, 1], per class group and mark."""
    edges = np.linspace(-1.0, 1.0, bins + 1)
    group_of = np.array(list(groups))[scores["label"]]
    out: dict[str, Any] = {"edges": edges.tolist(), "marks": {}}
    for mark in marks:
        start, end = window_steps(mark, total_steps, width)
        sel = (scores["step"] >= start) & (scores["step"] < end)
        out["marks"][f"{mark:g}"] = {
            g: np.histogram(np.clip(scores["alignment"][sel & (group_of == g)], -1, 1), edges)[0].tolist()
            for g in GROUPS
        }
    return out

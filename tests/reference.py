"""Independent float64 NumPy references: materialise everything, loop where it is clearer.

Nothing here imports gradtail_ops: the tests compare the library against these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def per_example_linear_grads(a: np.ndarray, d: np.ndarray, bias: bool) -> list[np.ndarray]:
    """Each example's gradient of z = W a + b, built one example at a time."""
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    weights, biases = [], []
    for i in range(a.shape[0]):
        ai = a[i].reshape(-1, a.shape[-1])  # (T, d_in), T = 1 for 2-D inputs
        di = d[i].reshape(-1, d.shape[-1])
        weights.append(sum(np.outer(di[t], ai[t]) for t in range(ai.shape[0])))
        biases.append(di.sum(axis=0))
    out = [np.stack(weights)]
    if bias:
        out.append(np.stack(biases))
    return out


def flatten_examples(per_example: Sequence[np.ndarray]) -> np.ndarray:
    """(B, P): each example's gradient over all parameters, concatenated."""
    batch = per_example[0].shape[0]
    return np.concatenate([np.asarray(g, np.float64).reshape(batch, -1) for g in per_example], axis=1)


def cosine_rows(flat: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """cos(row_i, ref), 0 when either is zero."""
    out = np.zeros(flat.shape[0])
    ref_norm = math.sqrt(float(ref @ ref))
    for i, row in enumerate(flat):
        norm = math.sqrt(float(row @ row))
        if norm > 0 and ref_norm > 0:
            out[i] = float(row @ ref) / (norm * ref_norm)
    return np.clip(out, -1.0, 1.0)


def alignment(per_example: Sequence[np.ndarray], mean: Sequence[np.ndarray]) -> np.ndarray:
    ref = np.concatenate([np.asarray(m, np.float64).ravel() for m in mean])
    return cosine_rows(flatten_examples(per_example), ref)


def ema(values: Sequence[np.ndarray], decays: Sequence[float]) -> np.ndarray:
    """Bias-corrected EMA from its definition: sum_t w_t g_t / sum_t w_t."""
    weights = []
    for t, d in enumerate(decays):
        w = 1.0 - d
        for later in decays[t + 1 :]:
            w *= later
        weights.append(w)
    total = sum(weights)
    return sum(w * np.asarray(v, np.float64) for w, v in zip(weights, values, strict=True)) / total


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def rank_weights(a: np.ndarray, quantile: float, max_weight: float) -> np.ndarray:
    finite = [v for v in a if math.isfinite(v)]
    out = np.ones(len(a))
    for i, v in enumerate(a):
        if math.isfinite(v) and sum(u < v for u in finite) < quantile * len(finite):
            out[i] = max_weight
    return out

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


EPS64 = float(np.finfo(np.float64).eps)


def memory_scores(n, batches, decay, standardize=True, eps=EPS64):
    """The per-example memory from its definition, one example at a time: standardise the
    batch's finite scores, group duplicates (their mean, one visit), bias-corrected EMA over
    visits. ``batches`` is a list of ``(index, raw_scores)``."""
    score, visits = np.zeros(n), np.zeros(n, dtype=np.int64)
    for index, raw in batches:
        finite = [(int(i), float(s)) for i, s in zip(index, raw, strict=True) if math.isfinite(s)]
        if standardize and finite:
            vals = [s for _, s in finite]
            mu = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals) + eps)
            finite = [(i, (s - mu) / sd) for i, s in finite]
        groups: dict[int, list[float]] = {}
        for i, z in finite:
            groups.setdefault(i, []).append(z)
        for i, zs in groups.items():
            rate = (1 - decay) / (1 - decay ** (visits[i] + 1))
            score[i] += rate * (sum(zs) / len(zs) - score[i])
            visits[i] += 1
    return score, visits


def memory_weights(score, visits, index, eta, cap, normalize=True):
    """``clip(exp(-eta * m_i), 1/cap, cap)`` (1 for an unvisited row), normalised to mean 1."""
    w = np.ones(len(index))
    for k, i in enumerate(index):
        if visits[i] > 0:
            w[k] = min(max(math.exp(-eta * score[i]), 1 / cap), cap)
    return w / w.mean() if normalize else w


def curve_weights(align, *, kind, max_weight, threshold=0.0, temperature=0.1, quantile=0.3, normalize):
    """The rank or sigmoid curve, one example at a time."""
    if kind == "rank":
        w = rank_weights(align, quantile, max_weight)
    elif kind == "sigmoid":
        w = np.array([1 + (max_weight - 1) * sigmoid((threshold - a) / temperature) for a in align])
    else:
        raise AssertionError(kind)
    return w / w.mean() if normalize else w


def gradtail_loop(batches, *, decay, reference, warmup, curve, memory=None):
    """The whole GradTail policy, materialised, in float64: the reference for every adapter.

    ``batches``: a list of ``(flat, index)``, ``flat`` (B, P) the per-example gradients of the
    scored parameters, ``index`` (B,) the memory rows or None. ``decay``: a float or a
    function of the number of steps taken before. ``curve``: keyword options of
    `curve_weights`. ``memory``: None or ``dict(size, decay, eta, max_weight)``.

    Returns ``(steps, final)``: per step ``(weights, alignment)``, and the final state as a
    dict with ``mean`` (P,), ``total``, ``count`` and, with a memory, ``memory_score`` and
    ``memory_visits``. Empty batches change nothing and give empty arrays.
    """
    history, applied, seen, out = [], [], [], []
    steps_taken = 0
    for flat, index in batches:
        flat = np.asarray(flat, np.float64)
        if len(flat) == 0:
            out.append((np.zeros(0), np.zeros(0)))
            continue
        d = decay(steps_taken) if callable(decay) else decay
        align = cosine_rows(flat, ema(history, applied)) if history else np.zeros(len(flat))
        active = len(history) >= max(1, warmup)
        if memory is None:
            w = curve_weights(align, **curve) if active else np.ones(len(flat))
        else:
            if history:
                seen.append((np.asarray(index), align))
            score, visits = memory_scores(memory["size"], seen, memory["decay"])
            if active:
                w = memory_weights(score, visits, index, memory["eta"], memory["max_weight"])
            else:
                w = np.ones(len(flat))
        norms = np.sqrt(np.sum(flat**2, axis=1))
        coef = np.where(norms > 0, 1 / np.where(norms > 0, norms, 1), 0.0) if reference == "direction" else 1
        history.append((np.reshape(coef, (-1, 1)) * flat).mean(axis=0))
        applied.append(float(d))
        steps_taken += 1
        out.append((w, align))
    final = {
        "mean": ema(history, applied) if history else None,
        "total": 1.0 - math.prod(applied),
        "count": len(history),
        "steps": steps_taken,
    }
    if memory is not None:
        final["memory_score"], final["memory_visits"] = memory_scores(memory["size"], seen, memory["decay"])
    return out, final

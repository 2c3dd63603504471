"""gradtail_ops.mining.retraining_weights: the second stage of two-stage GradTail.

The reference ranks by pairwise counting in float64 (rank_i = #lower + (#equal - 1) / 2, NaNs
after every number), independent of the sort the function uses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradtail_ops.mining import retraining_weights
from tests.conftest import Backend


def reference(scores: np.ndarray, gamma: float) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    n = len(s)
    ranks = []
    for i in range(n):
        if math.isnan(s[i]):
            n_nan = int(np.isnan(s).sum())
            ranks.append((n - n_nan) + (n_nan - 1) / 2.0)
            continue
        lower = sum(1 for v in s if not math.isnan(v) and v < s[i])
        equal = sum(1 for v in s if not math.isnan(v) and v == s[i])
        ranks.append(lower + (equal - 1) / 2.0)
    w = np.array([math.exp(-gamma * r / max(n - 1, 1)) for r in ranks])
    return w / w.mean()


def test_matches_the_pairwise_reference_with_ties_and_nans():
    s = np.array([0.2, -0.4, 0.2, np.nan, 0.9, -0.4, np.nan, 0.0, -np.inf])
    np.testing.assert_allclose(retraining_weights(s, gamma=2.5), reference(s, 2.5), rtol=1e-13)


def test_accepts_any_backend_and_returns_float64_numpy(backend: Backend):
    scores = np.array([0.3, -0.2, 0.1, 0.05])
    out = retraining_weights(backend.asarray(scores, "float32"), gamma=1.0)
    assert type(out) is np.ndarray
    assert out.dtype == np.float64
    assert out.shape == (4,)
    np.testing.assert_allclose(out, reference(scores.astype(np.float32), 1.0), rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    scores=hnp.arrays(
        np.float64,
        st.integers(1, 40),
        elements=st.one_of(st.floats(-1.0, 1.0), st.just(float("nan")), st.sampled_from([0.0, 0.5])),
    ),
    gamma=st.floats(0.0, 12.0),
)
def test_properties_mean_one_order_and_spread(scores, gamma):
    w = retraining_weights(scores, gamma=gamma)
    assert w.shape == scores.shape
    assert np.all(np.isfinite(w))
    assert np.all(w > 0)
    assert w.mean() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(w, reference(scores, gamma), rtol=1e-10)
    finite = ~np.isnan(scores)
    # a lower score never weighs less; equal scores weigh the same; a NaN weighs least
    for i in range(len(scores)):
        for j in range(len(scores)):
            if finite[i] and finite[j] and scores[i] < scores[j]:
                assert w[i] >= w[j] * (1 - 1e-12)
            if finite[i] and finite[j] and scores[i] == scores[j]:
                assert w[i] == pytest.approx(w[j], rel=1e-12)
            if finite[i] and not finite[j]:
                assert w[i] >= w[j] * (1 - 1e-12)
    if len(np.unique(scores)) == len(scores) and finite.all():  # distinct: the spread is exp(gamma)
        assert w.max() / w.min() == pytest.approx(math.exp(gamma), rel=1e-9)


def test_large_gamma_stays_finite_from_the_lowest_rank():
    np.testing.assert_array_equal(retraining_weights(np.zeros(4), gamma=2000.0), 1.0)
    w = retraining_weights(np.array([0.0, 0.0, 1.0, np.nan]), gamma=2000.0)
    np.testing.assert_allclose(w, [2.0, 2.0, 0.0, 0.0], atol=1e-300)


def test_gamma_zero_empty_and_single():
    np.testing.assert_array_equal(retraining_weights(np.array([3.0, -1.0, np.nan]), gamma=0.0), 1.0)
    assert retraining_weights(np.zeros(0)).shape == (0,)
    np.testing.assert_array_equal(retraining_weights(np.array([0.4])), [1.0])


@pytest.mark.parametrize(
    ("scores", "gamma", "error", "match"),
    [
        (np.zeros((3, 2)), 1.0, ValueError, r"`scores` must have shape \(N,\).*\(3, 2\)"),
        (np.zeros(3), -1.0, ValueError, "gamma.*Received: gamma=-1.0"),
        (np.zeros(3), float("inf"), ValueError, "gamma.*Received: gamma=inf"),
        (np.zeros(3), True, TypeError, "gamma"),
    ],
)
def test_errors_name_the_argument(scores, gamma, error, match):
    with pytest.raises(error, match=match):
        retraining_weights(scores, gamma=gamma)

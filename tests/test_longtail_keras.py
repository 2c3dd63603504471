"""The Keras long-tail suite (benchmarks/longtail/keras_suite.py): metrics, and a smoke run of the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.longtail.keras_suite import (
    DELTA_METRICS,
    METHODS,
    accuracy_metrics,
    class_weight_inverse_frequency,
    late_epochs,
)

ROOT = Path(__file__).resolve().parents[1]


def test_accuracy_metrics_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, size=200))
    groups = ("many", "medium", "medium", "few")
    m = accuracy_metrics(pred, y, groups)
    per_class = []
    for c in range(4):
        hits = [p == t for p, t in zip(pred, y, strict=True) if t == c]
        per_class.append(100.0 * sum(hits) / len(hits))
    assert m["per_class"] == pytest.approx(per_class)
    assert m["balanced_accuracy"] == pytest.approx(sum(per_class) / 4)
    assert m["accuracy"] == pytest.approx(100.0 * sum(p == t for p, t in zip(pred, y, strict=True)) / 200)
    assert m["many"] == pytest.approx(per_class[0])
    assert m["medium"] == pytest.approx((per_class[1] + per_class[2]) / 2)
    assert m["few"] == pytest.approx(per_class[3])


def test_class_weight_gives_every_class_the_same_total_weight() -> None:
    counts = np.array([600, 60, 6])
    w = class_weight_inverse_frequency(counts)
    totals = [w[c] * counts[c] for c in range(3)]
    assert totals == pytest.approx([counts.sum() / 3] * 3)


def test_cli_smoke_run_writes_consistent_json(tmp_path: Path) -> None:
    if importlib.util.find_spec("keras") is None:  # importing it here would pick a backend
        pytest.skip("keras is not installed")
    pytest.importorskip("jax")
    pytest.importorskip("sklearn")
    out = tmp_path / "keras_lt.json"
    env = os.environ | {
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    }
    epochs = 3
    cmd = [sys.executable, "-m", "benchmarks.longtail.keras_suite", "--quick", "--datasets", "digits_lt10"]
    cmd += ["--epochs", str(epochs), "--seeds", "0", "1", "--no-progress", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "longtail_keras"
    assert doc["quick"] is True
    assert doc["config"]["backend"] == "jax"
    runs = doc["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in METHODS for s in (0, 1))
    k = late_epochs(epochs)
    for r in runs:
        val, test = r["val"]["curve"], r["test"]["curve"]
        assert len(val) == len(test) == epochs
        sel = r["selected_epoch"]
        assert val[sel] == max(val)  # the best epoch on validation ...
        assert all(v < max(val) for v in val[:sel])  # ... the first one on ties
        assert r["test"]["selected"]["balanced_accuracy"] == pytest.approx(test[sel], abs=1e-4)
        assert r["test"]["final"]["balanced_accuracy"] == pytest.approx(test[-1], abs=1e-4)
        assert r["test"]["late_balanced_accuracy"] == pytest.approx(np.mean(test[-k:]), abs=1e-3)
        assert r["seconds_per_epoch"] > 0
        assert ("gradtail_logs" in r) == (r["method"] == "gradtail")
    base = {r["seed"]: r for r in runs if r["method"] == "uniform"}
    for r in runs:
        b = base[r["seed"]]
        d = r["delta_vs_uniform"]
        assert set(d) == set(DELTA_METRICS)
        assert d["balanced"] == pytest.approx(
            r["test"]["selected"]["balanced_accuracy"] - b["test"]["selected"]["balanced_accuracy"], abs=1e-3
        )
        assert d["few"] == pytest.approx(
            r["test"]["selected"]["few"] - b["test"]["selected"]["few"], abs=1e-3
        )
        if r["method"] == "uniform":
            assert all(v == 0 for v in d.values())
    for agg in doc["aggregates"]:
        deltas = [r["delta_vs_uniform"]["late"] for r in runs if r["method"] == agg["method"]]
        if agg["method"] == "uniform":
            assert agg["delta_vs_uniform"] is None
            continue
        stat = agg["delta_vs_uniform"]["late"]
        assert stat["mean"] == pytest.approx(np.mean(deltas), abs=1e-3)
        assert stat["std"] == pytest.approx(np.std(deltas, ddof=1), abs=1e-3)
        assert stat["n_positive"] == sum(v > 0 for v in deltas)

"""`make demo` stays runnable: the main job on digits-LT for one epoch (a smoke run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_reports_every_method(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.longtail.demo",
        "--dataset",
        "digits",
        "--epochs",
        "2",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for label in ("uniform", "inverse class frequency", "GradTail (defaults)", "bal.acc", "few"):
        assert label in out, out[-2000:]
    assert (tmp_path / "demo.png").stat().st_size > 10_000

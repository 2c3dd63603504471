"""The generated sections of docs/benchmarks.md match the committed benchmark JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_tables_are_generated_from_the_json():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "render_tables.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_benchmark_has_a_renderer_beside_it():
    from benchmarks.render_tables import RENDERERS, TITLES, renderer

    assert set(RENDERERS) == set(TITLES)
    for name in RENDERERS:
        assert callable(renderer(name)), name

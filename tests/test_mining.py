"""Tail mining: the ranking, the CLI's files, and the runnable blocks of docs/tail_mining.md."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from benchmarks.longtail import mine

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "tail_mining.md"


def test_rank_examples_against_a_sort():
    rng = np.random.default_rng(0)
    score = rng.normal(size=40).round(1)  # rounding makes ties
    visits = rng.integers(0, 3, size=40)
    tail, head = mine.rank_examples(score, visits, 5)
    seen = [i for i in range(40) if visits[i] > 0]
    expected_tail = sorted(seen, key=lambda i: (score[i], i))[:5]
    expected_head = sorted(seen, key=lambda i: (-score[i], i))[:5]
    assert tail.tolist() == expected_tail
    assert head.tolist() == expected_head
    tail, head = mine.rank_examples(score[:3], np.array([1, 0, 1]), 5)
    assert len(tail) == len(head) == 1  # two visited examples: one per end


def test_cli_writes_csv_png_and_summary(tmp_path):
    out = tmp_path / "mined"
    args = ["--quick", "--epochs", "3", "--top", "6", "--no-progress", "--data-map", "--out-dir", str(out)]
    code = mine.main(args)
    assert code == 0
    rows = list(csv.DictReader((out / "digits_lt10_mined.csv").open()))
    assert [r["group"] for r in rows] == ["tail"] * 6 + ["head"] * 6
    assert set(rows[0]) == {"group", "rank", "index", "label", "class_name", "running_score", "visits"}
    tail_scores = [float(r["running_score"]) for r in rows[:6]]
    head_scores = [float(r["running_score"]) for r in rows[6:]]
    assert tail_scores == sorted(tail_scores)
    assert head_scores == sorted(head_scores, reverse=True)
    assert max(tail_scores) <= min(head_scores)
    assert all(int(r["visits"]) >= 1 for r in rows)
    png = (out / "digits_lt10_mined.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    summary = (out / "digits_lt10_mined.json").read_text()
    assert '"few_share_tail"' in summary
    ranking = list(csv.DictReader((out / "digits_lt10_ranking.csv").open()))
    visited = [r for r in ranking if int(r["visits"]) > 0]
    assert [r["index"] for r in visited[:6]] == [r["index"] for r in rows[:6]]  # the same tail end
    assert [float(r["score"]) for r in visited] == sorted(float(r["score"]) for r in visited)
    assert (out / "digits_lt10_data_map.png").read_bytes().startswith(b"\x89PNG")


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_doc_blocks_run(tmp_path, monkeypatch):
    blocks = _python_blocks(DOC.read_text())
    assert blocks, "docs/tail_mining.md must hold runnable python blocks"
    monkeypatch.chdir(tmp_path)  # the blocks write files relative to the working directory
    for k, block in enumerate(blocks):
        namespace: dict[str, object] = {"__name__": f"tail_mining_block_{k}"}
        exec(compile(block, f"docs/tail_mining.md block {k}", "exec"), namespace)
    assert (tmp_path / "mined" / "digits.csv").exists()
    assert (tmp_path / "mined" / "digits.png").read_bytes().startswith(b"\x89PNG")


def test_doc_tables_are_generated_from_the_json():
    if not mine.MEMORY_JSON.exists():
        pytest.skip("no committed memory benchmark JSON")
    assert mine.update_doc(check=True) == 0, "run python -m benchmarks.longtail.mine --render-docs"


def test_doc_figure_exists():
    figures = re.findall(r"\]\((figures/[^)]+\.png)\)", DOC.read_text())
    assert figures
    for fig in figures:
        assert (ROOT / "docs" / fig).read_bytes().startswith(b"\x89PNG")

"""Every ```python block of the docs (docs/**/*.md) and of README.md runs.

Each page's blocks run in order, in one namespace, in a fresh subprocess (working directory: a
temporary folder; ``KERAS_BACKEND=torch``; one CPU thread). Conventions, for page authors:

- ``<!-- no-test: reason -->`` on the line before a block (blank lines may separate them)
  leaves that block out, for code that genuinely cannot run in CI (a multi-process launch, a
  GPU, a package CI does not install). Each one is reported as a skipped test with its reason.
- ``tests/doc_setup/<page>.py`` (``<page>`` is the page's path below ``docs/`` with ``/``
  replaced by ``_``, no ``.md``, lower case, e.g. ``torch``, ``api_core``; ``readme`` for the
  README),
  when it exists, runs first in the page's namespace: it defines the names that the page's
  snippets take as given (a small ``model``, a ``loader``, ``params``, ...), so that guide
  snippets can stay short and still run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = Path(__file__).resolve().parent / "doc_setup"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
NO_TEST = re.compile(r"^\s*<!--\s*no-test:\s*(?P<reason>.*?)\s*-->\s*$")
LANGUAGES = {"python", "py", "python3"}


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str
    source: str
    skip_reason: str | None  # set by a <!-- no-test: reason --> marker


def extract_blocks(text: str, page: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with their no-test markers.

    Raises ValueError for an unclosed fence or an empty no-test reason.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    k = 0
    while k < len(lines):
        match = FENCE.match(lines[k])
        if not match:
            k += 1
            continue
        indent, fence = match["indent"], match["fence"]
        language = match["info"].strip().split(" ")[0].split("{")[0].lower() if match["info"].strip() else ""
        start = k
        body: list[str] = []
        k += 1
        while k < len(lines):
            closing = lines[k].strip()
            if closing.startswith(fence) and set(closing) == {fence[0]}:
                break
            line = lines[k]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            k += 1
        else:
            raise ValueError(f"{page}:{start + 1}: unclosed code fence {fence!r}.")
        k += 1
        reason = None
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and (marker := NO_TEST.match(lines[j])):
            reason = marker["reason"]
            if not reason:
                raise ValueError(f"{page}:{j + 1}: a no-test marker needs a reason: <!-- no-test: why -->.")
        blocks.append(Block(page, start + 1, language, "\n".join(body) + "\n", reason))
    return blocks


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def setup_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "docs":
        rel = rel.relative_to("docs")
    return rel.with_suffix("").as_posix().replace("/", "_").lower()


def python_blocks(path: Path) -> list[Block]:
    return [
        b for b in extract_blocks(path.read_text(encoding="utf-8"), page_id(path)) if b.language in LANGUAGES
    ]


ALL_PAGES = pages()
SKIPPED = [b for p in ALL_PAGES for b in python_blocks(p) if b.skip_reason is not None]

# The runner: executes the setup file and the blocks in one namespace, compiled with the page's
# path and line numbers, so a traceback points at the page.
RUNNER = r"""
import json, sys, time, traceback
spec = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for item in spec:
    source = "\n" * (item["line"] - 1) + item["source"]
    print(f"--- running {item['page']}:{item['line']}", flush=True)  # the code's first line
    start = time.perf_counter()
    try:
        exec(compile(source, item["page"], "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the block at {item['page']}:{item['line']}", flush=True)
        sys.exit(1)
    print(f"--- {item['page']}:{item['line']} took {time.perf_counter() - start:.1f} s", flush=True)
print(f"ran {len(spec)} blocks", flush=True)
"""


@pytest.mark.parametrize("path", [p for p in ALL_PAGES if python_blocks(p)], ids=page_id)
def test_page_blocks_run(path: Path, tmp_path: Path) -> None:
    blocks = [b for b in python_blocks(path) if b.skip_reason is None]
    if not blocks:
        pytest.skip(f"{page_id(path)}: every python block is marked no-test")
    spec = []
    setup = SETUP / f"{setup_name(path)}.py"
    if setup.exists():
        spec.append({"page": str(setup.relative_to(ROOT)), "line": 1, "source": setup.read_text("utf-8")})
    # A block's code starts on the line after its opening fence.
    spec += [{"page": b.page, "line": b.line + 1, "source": b.source} for b in blocks]
    env = {
        **os.environ,
        "KERAS_BACKEND": "torch",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters"), os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, f"{page_id(path)}:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert f"ran {len(spec)} blocks" in result.stdout


@pytest.mark.parametrize("block", SKIPPED or [None], ids=[f"{b.page}:{b.line}" for b in SKIPPED] or ["none"])
def test_no_test_blocks_are_reported(block: Block | None) -> None:
    """One skipped test per block marked no-test, so the pytest summary lists them with reasons."""
    if block is None:
        return
    compile(block.source, block.page, "exec")  # still valid Python
    pytest.skip(f"no-test block {block.page}:{block.line}: {block.skip_reason}")


def test_the_site_has_tested_python_blocks() -> None:
    tested = [b for p in ALL_PAGES for b in python_blocks(p) if b.skip_reason is None]
    assert len(tested) >= 10, [b.page for b in tested]
    assert any(b.page == "README.md" for b in tested)


def test_extract_blocks_reads_fences_languages_and_markers() -> None:
    text = "\n".join(
        [
            "# Page",
            "```python",
            "x = 1",
            "```",
            "<!-- no-test: needs two processes -->",
            "",
            "```python",
            "launch()",
            "```",
            "- item",
            "",
            "    ```py",
            "    y = 2",
            "    ```",
            "````bash",
            "```python",
            "not python",
            "```",
            "````",
            "```",
            "plain",
            "```",
        ]
    )
    blocks = extract_blocks(text, "page.md")
    assert [(b.line, b.language, b.skip_reason) for b in blocks] == [
        (2, "python", None),
        (7, "python", "needs two processes"),
        (12, "py", None),
        (15, "bash", None),
        (20, "", None),
    ]
    assert blocks[0].source == "x = 1\n"
    assert blocks[2].source == "y = 2\n"
    with pytest.raises(ValueError, match="unclosed"):
        extract_blocks("```python\nx = 1\n", "bad.md")
    with pytest.raises(ValueError, match="needs a reason"):
        extract_blocks("<!-- no-test: -->\n```python\nx\n```\n", "bad.md")

"""Render benchmark JSON results into Markdown tables in ``docs/benchmarks.md``.

Every JSON file carries a top-level ``"benchmark"`` field; ``RENDERERS`` maps that name to a
function that turns the document into Markdown. The output replaces the text between

    <!-- BEGIN GENERATED: <benchmark> -->
    <!-- END GENERATED: <benchmark> -->

in the target document; everything outside the markers (the hand-written intro, notes) is
left alone. A missing document is created with a short intro; a missing marker pair is
appended as a new section. Numbers come only from the JSON: never type them by hand.

To add a benchmark (say ``torch_overhead``), write ``render_torch_overhead(doc) -> str`` and
register it in ``RENDERERS`` (and a title in ``TITLES``).

Usage::

    .venv/bin/python benchmarks/render_tables.py                  # benchmarks/results/*.json
    .venv/bin/python benchmarks/render_tables.py results/core_ops.json --doc /tmp/b.md
    .venv/bin/python benchmarks/render_tables.py --check          # exit 1 if the doc is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIRS = (REPO / "benchmarks" / "results",)
DEFAULT_DOC = REPO / "docs" / "benchmarks.md"

INTRO = """# Benchmarks

Measured speed and memory of `gradtail_ops` on CPU backends. The tables between the
`BEGIN GENERATED` / `END GENERATED` markers are written by `benchmarks/render_tables.py`
from the JSON files in `benchmarks/results/`; do not edit them by hand. To refresh:

```bash
.venv/bin/python benchmarks/core_ops.py --threads 1   # writes benchmarks/results/core_ops.json
.venv/bin/python benchmarks/render_tables.py          # rewrites the generated sections below
```

Numbers depend on the machine and its load; each section states both. Ratios (speedups,
memory ratios) carry over between machines far better than absolute times.
"""

TITLES = {"core_ops": "Core ops: factored vs. materialised"}

Renderer = Callable[[dict[str, Any]], str]


# --------------------------------------------------------------------------- formatting


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{int(b)} B"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "n/a"
    return f"{r:.3g}×" if r < 1000 else f"{r:,.0f}×"


def fmt_target(target: dict[str, Any]) -> str:
    op = {">=": "≥", "<=": "≤"}.get(target["op"], target["op"])
    return f"{op} {target['value']:g}×"


def fmt_check(check: dict[str, Any]) -> str:
    verdict = {True: "pass", False: "**FAIL**", None: "n/a"}[check["passed"]]
    return f"{fmt_ratio(check['value'])} {verdict}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    v = m.get("versions", {})
    libs = ", ".join(
        f"{name} {v[name]}" + (f" ({v['numpy_blas']})" if name == "numpy" and "numpy_blas" in v else "")
        for name in ("numpy", "torch", "jax", "array_api_compat")
        if name in v
    )
    cores = f"{m.get('cpu_count')} cores"
    if m.get("cpu_usable") not in (None, m.get("cpu_count")):
        cores += f" ({m['cpu_usable']} usable)"
    mem = f", {fmt_bytes(m['mem_total_bytes'])} RAM" if m.get("mem_total_bytes") else ""
    threads = m.get("threads", {}).get("requested", "library default")
    git = m.get("git", {})
    commit = (git.get("commit") or "unknown")[:10]
    if git.get("gradtail_ops_dirty"):
        commit += " + uncommitted gradtail_ops changes"
    load = ""
    if "loadavg_1min_before" in m:
        load = f"; 1-min load average {m['loadavg_1min_before']:.2f} before, {m['loadavg_1min_after']:.2f} after"
    return (
        f"**Machine:** {m.get('cpu_model', '?')}, {cores}{mem}, {m.get('platform', '?')}; "
        f"Python {v.get('python', '?')}, {libs}; intra-op threads: {threads}{load}. "
        f"**Run:** {doc.get('date', '?')}, gradtail_ops {v.get('gradtail_ops', '?')} at {commit}, "
        f"`{doc.get('command', '?')}` ({doc.get('dtype', 'float32')}, "
        f"{doc.get('wall_seconds', 0):.0f} s)."
    )


# --------------------------------------------------------------------------- core_ops


def _check(entry: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in entry["checks"] if c["name"] == name)


def _header_target(entries: list[dict[str, Any]], name: str) -> str:
    return fmt_target(_check(entries[0], name)["target"]) if entries else ""


def render_core_ops(doc: dict[str, Any]) -> str:
    results = doc["results"]
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    checks = [c for r in results for c in r["checks"]]
    passed = sum(c["passed"] is True for c in checks)
    out = [machine_line(doc), ""]
    if doc.get("quick"):
        out += ["> **Quick smoke run** (tiny shapes): the targets are meant for the full shapes.", ""]
    out.append(f"**{passed} of {len(checks)} targets pass.**")
    failed = [
        f"{r['backend']} {r['case']} {_shape_text(r)}: {c['name']} {fmt_ratio(c['value'])} "
        f"(target {fmt_target(c['target'])})"
        for r in results
        for c in r["checks"]
        if c["passed"] is False
    ]
    if failed:
        out += ["Failing:", ""] + [f"- {f}" for f in failed]
    skipped = doc.get("skipped_backends") or {}
    if skipped:
        out += ["", "Skipped backends: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())]

    head = by_case.get("head_2d", [])
    if head:
        out += [
            "",
            "### 2-D head: `linear_alignment` vs. materialised per-example gradients + `alignment`",
            "",
            table(
                [
                    "backend",
                    "B",
                    "d_in → d_out",
                    "factored",
                    "materialised",
                    f"speedup (target {_header_target(head, 'speedup')})",
                    "factored peak",
                    "materialised peak",
                    f"memory ratio (target {_header_target(head, 'memory_ratio')})",
                    "RSS peak Δ fact. / mat.",
                    "max abs diff",
                ],
                (
                    [
                        r["backend"],
                        r["shapes"]["B"],
                        f"{r['shapes']['d_in']} → {r['shapes']['d_out']}",
                        fmt_seconds(r["variants"]["factored"]["seconds"]),
                        fmt_seconds(r["variants"]["materialize"]["seconds"]),
                        fmt_check(_check(r, "speedup")),
                        fmt_bytes(r["variants"]["factored"].get("peak_bytes")),
                        fmt_bytes(r["variants"]["materialize"].get("peak_bytes")),
                        fmt_check(_check(r, "memory_ratio")),
                        f"{fmt_bytes(r['variants']['factored'].get('rss_peak_delta_bytes'))} / "
                        f"{fmt_bytes(r['variants']['materialize'].get('rss_peak_delta_bytes'))}",
                        f"{r.get('max_abs_diff', float('nan')):.1e}",
                    ]
                    for r in head
                ),
            ),
        ]

    seq = by_case.get("sequence", [])
    if seq:
        out += [
            "",
            '### Sequence head: `linear_alignment(method="ghost" | "materialize" | "auto")`',
            "",
            table(
                [
                    "backend",
                    "B × T",
                    "d_in → d_out",
                    "ghost",
                    "materialize",
                    "auto (picks)",
                    "faster",
                    f"auto / faster (target {_header_target(seq, 'auto_vs_best')})",
                    "peak ghost / mat.",
                    "max abs diff",
                ],
                (
                    [
                        r["backend"],
                        f"{r['shapes']['B']} × {r['shapes']['T']}",
                        f"{r['shapes']['d_in']} → {r['shapes']['d_out']}",
                        fmt_seconds(r["variants"]["ghost"]["seconds"]),
                        fmt_seconds(r["variants"]["materialize"]["seconds"]),
                        f"{fmt_seconds(r['variants']['auto']['seconds'])} ({r.get('auto_choice') or '?'})",
                        r.get("best", "?"),
                        fmt_check(_check(r, "auto_vs_best")),
                        f"{fmt_bytes(r['variants']['ghost'].get('peak_bytes'))} / "
                        f"{fmt_bytes(r['variants']['materialize'].get('peak_bytes'))}",
                        f"{r.get('max_abs_diff', float('nan')):.1e}",
                    ]
                    for r in seq
                ),
            ),
        ]

    dense = by_case.get("dense", [])
    if dense:
        out += [
            "",
            "### Dense: `alignment(X, v)` vs. the floor `X @ v` + row norms",
            "",
            table(
                [
                    "backend",
                    "B × N",
                    "alignment",
                    "floor",
                    f"alignment / floor (target {_header_target(dense, 'vs_floor')})",
                    "`X @ v` alone",
                    "`xp.vecdot(X, X)` alone",
                    "native row norms alone",
                ],
                (
                    [
                        r["backend"],
                        f"{r['shapes']['B']} × {r['shapes']['N']}",
                        fmt_seconds(r["variants"]["alignment"]["seconds"]),
                        fmt_seconds(r["variants"]["floor"]["seconds"]),
                        fmt_check(_check(r, "vs_floor")),
                        fmt_seconds(r.get("components", {}).get("matvec", {}).get("seconds")),
                        fmt_seconds(r.get("components", {}).get("xp_vecdot_rows", {}).get("seconds")),
                        fmt_seconds(r.get("components", {}).get("native_row_norms", {}).get("seconds")),
                    ]
                    for r in dense
                ),
            ),
        ]

    method = doc.get("method", {})
    out += ["", "<details><summary>How this was measured</summary>", ""]
    if method.get("timing"):
        out += [f"- Timing: {method['timing']}"]
    for backend, text in method.get("memory", {}).items():
        out += [f"- Memory ({backend}): {text}"]
    out += ["", "</details>"]
    return "\n".join(out)


def _shape_text(r: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["shapes"].items())


RENDERERS: dict[str, Renderer] = {"core_ops": render_core_ops}


# --------------------------------------------------------------------------- document


def begin_marker(name: str) -> str:
    return f"<!-- BEGIN GENERATED: {name} -->"


def end_marker(name: str) -> str:
    return f"<!-- END GENERATED: {name} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """Put ``body`` between the markers of ``name``; append a new section if they are missing."""
    begin, end = begin_marker(name), end_marker(name)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    title = TITLES.get(name, name)
    return text.rstrip() + f"\n\n## {title}\n\n{block}\n"


def pick_documents(paths: Iterable[Path], include_quick: bool) -> dict[str, tuple[Path, dict[str, Any]]]:
    """One document per benchmark: full runs before quick ones, then the newest."""
    chosen: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(set(paths)):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skip {path}: {exc}", file=sys.stderr)
            continue
        name = doc.get("benchmark") if isinstance(doc, dict) else None
        if name not in RENDERERS:
            print(f"skip {path}: no renderer for benchmark {name!r}", file=sys.stderr)
            continue
        if doc.get("quick") and not include_quick:
            print(f"skip {path}: quick smoke run (pass --include-quick to render it)", file=sys.stderr)
            continue
        key = (not doc.get("quick", False), str(doc.get("date", "")))
        if name not in chosen or key > (not chosen[name][1].get("quick", False), str(chosen[name][1].get("date", ""))):
            chosen[name] = (path, doc)
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render benchmark JSON results into docs/benchmarks.md.")
    p.add_argument("files", nargs="*", type=Path, help="JSON files (default: *.json in --results-dir)")
    p.add_argument(
        "--results-dir",
        type=Path,
        action="append",
        default=None,
        help=f"directory of result JSON files; repeatable (default: {DEFAULT_RESULTS_DIRS[0].relative_to(REPO)})",
    )
    p.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="Markdown document to update")
    p.add_argument("--include-quick", action="store_true", help="also render --quick smoke runs")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the document is out of date")
    args = p.parse_args(argv)

    paths = list(args.files)
    if not paths:
        for d in args.results_dir or DEFAULT_RESULTS_DIRS:
            paths += sorted(Path(d).glob("*.json"))
    docs = pick_documents(paths, args.include_quick)
    if not docs:
        print("no benchmark results to render", file=sys.stderr)
        return 1
    old = args.doc.read_text() if args.doc.exists() else INTRO
    new = old
    for name, (path, doc) in sorted(docs.items()):
        new = replace_section(new, name, RENDERERS[name](doc))
        print(f"{name}: {path}")
    if args.check:
        if new != old:
            print(f"{args.doc} is out of date; run benchmarks/render_tables.py", file=sys.stderr)
            return 1
        return 0
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(new)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Render benchmark JSON results into Markdown tables in ``docs/benchmarks.md``.

Every JSON file carries a top-level ``"benchmark"`` field; ``RENDERERS`` maps that name to the
``render(doc) -> str`` that lives beside the benchmark writing the file (``benchmarks/core_ops.py``
for ``core_ops``, ``benchmarks/longtail/render.py`` for the long-tail suite, ...), imported only
when its results are rendered. The output replaces the text between

    <!-- BEGIN GENERATED: <benchmark> -->
    <!-- END GENERATED: <benchmark> -->

in the target document; everything outside the markers (the hand-written intro, notes) is
left alone. A missing document is created with a short intro; a missing marker pair is
appended as a new section. Numbers come only from the JSON: never type them by hand.

To add a benchmark, write its ``render(doc) -> str`` beside it (the shared formatting is in
``benchmarks/_render.py``), register it in ``RENDERERS`` and give it a title in ``TITLES``.

Usage::

    .venv/bin/python benchmarks/render_tables.py                  # benchmarks/results/*.json
    .venv/bin/python benchmarks/render_tables.py results/core_ops.json --doc /tmp/b.md
    .venv/bin/python benchmarks/render_tables.py --check          # exit 1 if the doc is stale
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the renderers live in the benchmarks package
    sys.path.insert(0, str(REPO))
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

TITLES = {
    "core_ops": "Core ops: factored vs. materialised",
    "torch_overhead": "PyTorch training step: GradTail overhead",
    "jax_overhead": "JAX/optax training step: GradTail overhead",
    "keras_overhead": "Keras fit: GradTailCallback overhead",
    "longtail": "Long-tailed data",
    "longtail_cnn": "Long-tailed data: a CNN",
    "longtail_vit": "Long-tailed data: a small ViT",
    "longtail_sweep": "Long-tailed data: choosing GradTail's defaults (validation only)",
    "longtail_variants": "Long-tailed data: the sketched reference, deferred weighting, logit adjustment, "
    "last-layer retraining",
    "longtail_regression": "Imbalanced regression",
    "longtail_keras": "Long-tailed data in Keras: GradTailCallback in model.fit",
    "sketch_reference": "The sketched reference (sketch_rank) against the exact one",
}

Renderer = Callable[[dict[str, Any]], str]

# benchmark name -> "module:function" of its renderer.
RENDERERS: dict[str, str] = {
    "core_ops": "benchmarks.core_ops:render",
    "torch_overhead": "benchmarks.torch_overhead:render",
    "jax_overhead": "benchmarks.jax_overhead:render",
    "keras_overhead": "benchmarks.keras_overhead:render",
    "longtail": "benchmarks.longtail.render:render",
    "longtail_cnn": "benchmarks.longtail.render:render",
    "longtail_variants": "benchmarks.longtail.render:render",
    "longtail_vit": "benchmarks.longtail.render:render",
    "longtail_sweep": "benchmarks.longtail.render:render_sweep",
    "longtail_regression": "benchmarks.longtail.regression:render",
    "longtail_keras": "benchmarks.longtail.keras_suite:render",
    "sketch_reference": "benchmarks.sketch_reference:render",
}


def renderer(name: str) -> Renderer:
    """The ``render`` function of benchmark ``name`` (its module is imported here)."""
    module, func = RENDERERS[name].split(":")
    fn: Renderer = getattr(importlib.import_module(module), func)
    return fn


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
        if name not in chosen or key > (
            not chosen[name][1].get("quick", False),
            str(chosen[name][1].get("date", "")),
        ):
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
        help="directory of result JSON files; repeatable (default: benchmarks/results)",
    )
    p.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="Markdown document to update")
    p.add_argument("--include-quick", action="store_true", help="also render --quick smoke runs")
    p.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the document is out of date"
    )
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
        new = replace_section(new, name, renderer(name)(doc))
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

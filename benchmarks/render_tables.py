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

TITLES = {
    "core_ops": "Core ops: factored vs. materialised",
    "torch_overhead": "PyTorch training step: GradTail overhead",
    "jax_overhead": "JAX/optax training step: GradTail overhead",
    "keras_overhead": "Keras fit: GradTailCallback overhead",
    "longtail": "Long-tailed data",
    "longtail_sweep": "Long-tailed data: choosing GradTail's defaults (validation only)",
    "longtail_regression": "Imbalanced regression",
    "longtail_keras": "Long-tailed data in Keras: GradTailCallback in model.fit",
}

Renderer = Callable[[dict[str, Any]], str]
TIMES = "\N{MULTIPLICATION SIGN}"


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
            x = b / size
            return f"{x:.2f} {unit}" if x < 10 else f"{x:.1f} {unit}" if x < 100 else f"{x:.0f} {unit}"
    return f"{int(b)} B"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "n/a"
    return f"{r:.3g}{TIMES}" if r < 1000 else f"{r:,.0f}{TIMES}"


def fmt_target(target: dict[str, Any]) -> str:
    op = {">=": "≥", "<=": "≤"}.get(target["op"], target["op"])
    return f"{op} {target['value']:g}{TIMES}"


def fmt_check(check: dict[str, Any]) -> str:
    """Ratio of medians and its verdict; the noise-robust ratios too where verdicts disagree."""
    verdict = {True: "pass", False: "**FAIL**", None: "n/a"}[check["passed"]]
    text = f"{fmt_ratio(check['value'])} {verdict}"
    if check.get("noise_bound"):
        text += (
            f" (noise-bound: min-based {fmt_ratio(check.get('min_based'))}, "
            f"paired {fmt_ratio(check.get('paired'))})"
        )
    return text


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
        load = (
            f"; 1-min load average {m['loadavg_1min_before']:.2f} before, {m['loadavg_1min_after']:.2f} after"
        )
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
    noisy = sum(bool(c.get("noise_bound")) for c in checks)
    line = f"**{passed} of {len(checks)} targets pass** (verdict on the ratio of medians)."
    if noisy:
        line += (
            f" {noisy} verdict(s) are noise-bound: the ratio of the fastest repeats or the median "
            "of per-round ratios lands on the other side of the target."
        )
    out.append(line)
    failed = [
        f"{r['backend']} {r['case']} {_shape_text(r)}: {c['name']} {fmt_ratio(c['value'])} "
        f"(target {fmt_target(c['target'])}){' (noise-bound)' if c.get('noise_bound') else ''}"
        for r in results
        for c in r["checks"]
        if c["passed"] is False
    ]
    if failed:
        out += ["", "Failing:", ""] + [f"- {f}" for f in failed]
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
                    f"B {TIMES} T",
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
                        f"{r['shapes']['B']} {TIMES} {r['shapes']['T']}",
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
                    f"B {TIMES} N",
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
                        f"{r['shapes']['B']} {TIMES} {r['shapes']['N']}",
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


# --------------------------------------------------------------------------- torch_overhead

_TO_VARIANTS = (
    ("plain", "plain"),
    ("gt_head", "GradTail head"),
    ("gt_all_backward", "GradTail all, `gt.backward`"),
    ("gt_all_weights", "GradTail all, weights + backward"),
    ("func_head", "torch.func head"),
    ("opacus_all", "Opacus all"),
)
_TO_PROTO = (
    ("gt_head_fastema", "GradTail head, fast EMA"),
    ("gt_all_backward_fastema", "GradTail all `gt.backward`, fast EMA"),
)
# Profile spans shown as columns (label in the JSON, column header).
_TO_SPANS = (
    ("forward", "forward"),
    ("autograd.grad (output grads)", "`autograd.grad`"),
    ("dots_and_sq_norms", "dots + norms"),
    ("reference mean grad", "reference mean grad"),
    ("ema_update", "`ema_update`"),
    ("book-keeping grads", "book-keeping grads"),
    ("weighted backward", "weighted backward"),
    ("backward", "backward"),
    ("optimizer", "SGD step"),
)


def _to_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    if entry.get("skipped"):
        return "skipped"
    return f"{fmt_seconds(entry['seconds'])} ({fmt_ratio(entry['ratio_to_plain'])})"


def _to_mem_cell(entry: dict[str, Any] | None, plain: dict[str, Any] | None = None) -> str:
    if entry is None:
        return ""
    if entry.get("skipped"):
        return "skipped"
    mem = entry.get("memory") or {}
    if mem.get("error"):
        return "error"
    if entry.get("peak_bytes") is None:
        return "n/a"
    cell = f"{fmt_bytes(entry['peak_bytes'])} ({fmt_ratio(entry.get('peak_ratio_to_plain'))})"
    state = mem.get("persistent_bytes", 0) - ((plain or {}).get("memory") or {}).get("persistent_bytes", 0)
    if plain is not None and plain is not entry and state > 0:
        cell += f", state {fmt_bytes(state)}"
    if entry.get("rss_peak_ratio_to_plain") is not None:
        cell += f" / RSS {fmt_ratio(entry['rss_peak_ratio_to_plain'])}"
    return cell


def render_torch_overhead(doc: dict[str, Any]) -> str:
    results = doc["results"]
    index = {(r["head"], r["B"], r["variant"]): r for r in results}
    configs = list(dict.fromkeys((r["head"], r["B"]) for r in results))
    present = {r["variant"] for r in results}
    variants = [(k, t) for k, t in _TO_VARIANTS if k in present]
    protos = [(k, t) for k, t in _TO_PROTO if k in present]
    kernels = {(k["head"], k["B"]): k for k in doc.get("kernel", [])}
    checks = [(r, c) for r in results for c in r["checks"]]
    passed = sum(c["passed"] is True for _, c in checks)

    out = [machine_line(doc), ""]
    if doc.get("quick"):
        out += ["> **Quick smoke run** (B=64 only, few repeats): the targets are meant for the full run.", ""]
    source = doc.get("machine", {}).get("source") or {}
    if source.get("consistent") is False:
        out += ["> **Warning:** the memory subprocesses imported other package sources; rerun.", ""]
    elif source.get("measured_is_working_tree_at_end") is False:
        out += [
            "> Note: the package changed in the working tree during this run; it measured the "
            f"sources as they were at its start (hash {source.get('measured_hash')}).",
            "",
        ]
    model = doc.get("model", {})
    heads = ", ".join(f"{h} ({v['params']:,} parameters in all)" for h, v in model.get("heads", {}).items())
    out += [
        f"Model: {model.get('layers', '?')}; heads {heads}. One step = zero_grad, forward, loss, "
        "backward, SGD step. Opacus: " + (doc.get("opacus", {}).get("info") or "n/a") + ".",
        "",
        f"**{passed} of {len(checks)} targets pass.**",
        "",
        table(
            ["target", "where", "measured", "result"],
            (
                [
                    c["target"]["text"],
                    f"{r['head']}, B={r['B']}, {r['variant']}",
                    fmt_ratio(c["value"]),
                    {True: "pass", False: "**FAIL**", None: "n/a"}[c["passed"]],
                ]
                for r, c in checks
            ),
        ),
    ]

    out += [
        "",
        "### Step time (median; ratio to the plain step)",
        "",
        table(
            ["head", "B", *(t for _, t in variants), "head kernel", "GradTail head: extra / kernel"],
            (
                [
                    h,
                    b,
                    *(_to_cell(index.get((h, b, k))) for k, _ in variants),
                    fmt_seconds(kernels.get((h, b), {}).get("seconds")),
                    fmt_ratio(index.get((h, b, "gt_head"), {}).get("extra_over_kernel")),
                ]
                for h, b in configs
            ),
        ),
    ]
    if protos:
        out += [
            "",
            "Prototype fix, measured in the same rounds (benchmark-side patch of `ema_update`, "
            "see the profile below; not a package change):",
            "",
            table(
                ["head", "B", *(t for _, t in protos), "vs. unpatched"],
                (
                    [
                        h,
                        b,
                        *(_to_cell(index.get((h, b, k))) for k, _ in protos),
                        ", ".join(
                            fmt_ratio(
                                index[(h, b, k)]["seconds"] / index[(h, b, k.rsplit("_", 1)[0])]["seconds"]
                            )
                            for k, _ in protos
                            if "seconds" in index.get((h, b, k), {})
                            and "seconds" in index.get((h, b, k.rsplit("_", 1)[0]), {})
                        ),
                    ]
                    for h, b in configs
                ),
            ),
        ]

    if any(r.get("memory") for r in results):
        out += [
            "",
            "### Peak memory of a step",
            "",
            "Peak live tensor bytes (ratio to plain; of which the reference state kept between steps) / "
            "ratio of the RSS cross-check.",
            "",
            table(
                ["head", "B", *(t for _, t in variants), *(t for _, t in protos)],
                (
                    [
                        h,
                        b,
                        *(
                            _to_mem_cell(index.get((h, b, k)), index.get((h, b, "plain")))
                            for k, _ in [*variants, *protos]
                        ),
                    ]
                    for h, b in configs
                ),
            ),
        ]

    for prof in doc.get("profile", []):
        pv = prof["variants"]
        spans = [(k, t) for k, t in _TO_SPANS if any(k in v["spans_ms"] for v in pv.values())]
        out += [
            "",
            f"### Where the time goes: head {prof['head']}, B={prof['B']} (ms per step, mean of "
            f"{prof['steps']} steps)",
            "",
            table(
                ["variant", "step", *(t for _, t in spans), "other GradTail (Python, checks, small ops)"],
                (
                    [
                        v,
                        f"{e['spans_ms'].get('step', float('nan')):.1f}",
                        *(f"{e['spans_ms'][k]:.1f}" if k in e["spans_ms"] else "" for k, _ in spans),
                        _other_gradtail_ms(e),
                    ]
                    for v, e in pv.items()
                ),
            ),
        ]
        ema = prof.get("ema_update_ms")
        if ema:
            out += [
                "",
                "`ema_update` alone on the real reference state (ms): "
                + "; ".join(
                    f"{name} ({r['reference_floats']:,.0f} floats): package {r['package']:.2f}, "
                    f"prototype {r['prototype']:.2f} ({fmt_ratio(r['package'] / r['prototype'])} faster)"
                    for name, r in ema.items()
                )
                + ".",
            ]
        tops = [(v, e["profiler_top_ops"]) for v, e in pv.items() if e.get("profiler_top_ops")]
        if tops:
            out += ["", "Top ops inside GradTail's call (torch.profiler self CPU, ms per step):", ""]
            out += [
                f"- {v}: " + ", ".join(f"`{o['op']}` {o['self_ms_per_step']:.1f}" for o in ops[:6])
                for v, ops in tops
            ]

    sanity = doc.get("sanity") or []
    if sanity:
        out += [""] + [
            f"Check ({s['head']}, B={s['B']}): max |.grad| difference, `gt.backward` book-keeping vs. "
            f"weights + weighted backward: {s['max_abs_grad_diff_bookkeeping_vs_weighted']:.1e}"
            + (
                f"; max reference-state difference, prototype EMA vs. package: "
                f"{s['max_abs_state_diff_fast_ema_vs_package']:.1e}"
                if "max_abs_state_diff_fast_ema_vs_package" in s
                else ""
            )
            + "."
            for s in sanity
        ]

    method = doc.get("method", {})
    out += ["", "<details><summary>How this was measured</summary>", ""]
    if method.get("timing"):
        out += [f"- Timing: {method['timing']}"]
    if method.get("kernel"):
        out += [f"- Head kernel: {method['kernel']}"]
    for key, text in (method.get("memory") or {}).items():
        out += [f"- Memory, `{key}`: {text}"]
    if method.get("profile"):
        out += [f"- Profile: {method['profile']}"]
    for key, text in (doc.get("variants") or {}).items():
        out += [f"- `{key}`: {text}"]
    out += ["", "</details>"]
    return "\n".join(out)


def _other_gradtail_ms(entry: dict[str, Any]) -> str:
    """GradTail's time outside the spans shown as columns: its self times and the small parts."""
    spans, selfs = entry["spans_ms"], entry.get("self_ms", {})
    if "gt.weights" not in spans and "gt.backward" not in spans:
        return ""
    small = ("check_loss", "inspect_graph", "inverse_norms", "cosine", "weight curve")
    total = sum(spans.get(k, 0.0) for k in small)
    total += sum(
        v for k, v in selfs.items() if k in ("gt.weights", "gt.backward", "_step", "linear_score_and_update")
    )
    return f"{total:.2f}"


# --------------------------------------------------------------------------- jax_overhead

_JO_VARIANTS = (("plain", "plain"), ("efficient", "efficient path"), ("transform", "transformation"))


def _jo_cell(entry: dict[str, Any] | None) -> str:
    if not entry or "seconds" not in entry:
        return "n/a"
    return f"{fmt_seconds(entry['seconds'])} ({fmt_ratio(entry['ratio_to_plain'])})"


def render_jax_overhead(doc: dict[str, Any]) -> str:
    results = doc["results"]
    index = {(r["B"], r["variant"]): r for r in results}
    batches = list(dict.fromkeys(r["B"] for r in results))
    present = {r["variant"] for r in results}
    variants = [(k, t) for k, t in _JO_VARIANTS if k in present]
    checks = [(r, c) for r in results for c in r.get("checks", [])]
    passed = sum(c["passed"] is True for _, c in checks)
    noisy = sum(bool(c.get("noise_bound")) for _, c in checks)
    versions = doc.get("machine", {}).get("versions", {})
    model = doc.get("model", {})

    out = [machine_line(doc), ""]
    if doc.get("quick"):
        out += ["> **Quick smoke run** (B=64 only, few repeats): the targets are meant for the full run.", ""]
    out += [
        f"Model: {model.get('layers', '?')}, {model.get('params', 0):,} parameters, "
        f"{model.get('optimizer', '?')}; GradTail: {model.get('gradtail', '?')}. jaxlib "
        f"{versions.get('jaxlib', '?')}, optax {versions.get('optax', '?')}. One step = one call of the "
        "jitted step function (forward, gradient, update).",
        "",
        f"**{passed} of {len(checks)} targets pass** (verdict on the ratio of medians)"
        + (
            f"; {noisy} verdict(s) are noise-bound: the ratio of the fastest calls or the median of "
            "per-round ratios lands on the other side of the target."
            if noisy
            else "."
        ),
        "",
        table(
            ["target", "where", "measured", "paired", "min-based"],
            (
                [
                    c["target"]["text"],
                    f"B={r['B']}, {r['variant']}",
                    fmt_check(c),
                    fmt_ratio(c.get("paired")),
                    fmt_ratio(c.get("min_based")),
                ]
                for r, c in checks
            ),
        ),
        "",
        "### Step time (median; ratio to the plain jitted step)",
        "",
        table(
            ["B", *(t for _, t in variants), "compiled once", "XLA temp memory", "per-example gradients"],
            (
                [
                    b,
                    *(_jo_cell(index.get((b, k))) for k, _ in variants),
                    " / ".join(str(index.get((b, k), {}).get("cache_size", "?")) for k, _ in variants),
                    " / ".join(fmt_bytes(index.get((b, k), {}).get("temp_bytes")) for k, _ in variants),
                    fmt_bytes(index.get((b, "transform"), {}).get("per_example_grad_bytes")),
                ]
                for b in batches
            ),
        ),
        "",
        "*compiled once*: `jax.jit(step)._cache_size()` after timing (1 = no retracing); *XLA temp "
        "memory*: scratch bytes of one call, from the compiled step's memory analysis; both in the "
        "column order " + ", ".join(t for _, t in variants) + ".",
    ]
    sanity = doc.get("sanity") or []
    if sanity:
        out += [""] + [
            f"Check (B={s['B']}): after 3 steps from the same start, efficient path vs. transformation: "
            f"max |parameter difference| {s['max_abs_param_diff_efficient_vs_transform']:.1e}, max |weight "
            f"difference| {s['max_abs_weight_diff']:.1e}."
            for s in sanity
        ]
    method = doc.get("method", {})
    out += ["", "<details><summary>How this was measured</summary>", ""]
    if method.get("timing"):
        out += [f"- Timing: {method['timing']}"]
    if method.get("memory"):
        out += [f"- Memory: {method['memory']}"]
    threads = doc.get("machine", {}).get("threads", {})
    if threads.get("xla_flags"):
        out += [f"- `XLA_FLAGS={threads['xla_flags']}`."]
    for key, text in (doc.get("variants") or {}).items():
        out += [f"- `{key}`: {text}"]
    out += ["", "</details>"]
    return "\n".join(out)


# --------------------------------------------------------------------------- keras_overhead


def render_keras_overhead(doc: dict[str, Any]) -> str:
    results = doc["results"]
    checks = [c for r in results for c in r.get("checks", [])]
    passed = sum(c["passed"] is True for c in checks)
    versions = doc.get("machine", {}).get("versions", {})
    model = doc.get("model", {})
    out = [machine_line(doc), ""]
    if doc.get("quick"):
        out += ["> **Quick smoke run** (fewer examples and rounds): the target is for the full run.", ""]
    out += [
        f"Models: {', '.join(f'`{k}` {v}' for k, v in (model.get('layers') or {}).items())} "
        f"({model.get('activations', '?')}), {model.get('optimizer', '?')}, {model.get('loss', '?')}; "
        f"{doc.get('examples', '?')} examples, batch {doc.get('batch', '?')}; GradTail: "
        f"{model.get('gradtail', '?')}. Keras {versions.get('keras', '?')}. One epoch = one "
        "`model.fit(..., epochs=1, verbose=0)` call.",
        "",
        f"**{passed} of {len(checks)} targets pass** (verdict on the ratio of medians).",
        "",
        table(
            [
                "backend",
                "model",
                "epoch without",
                "epoch with GradTailCallback",
                f"ratio (target {fmt_target(checks[0]['target'])})" if checks else "ratio",
                "paired",
                "min-based",
                "CPU-time ratio / paired",
                "extra per step",
                "first epoch without / with",
            ],
            (
                [
                    f"`{r['backend']}`",
                    f"`{r['model']}`",
                    fmt_seconds(r["seconds"]["plain"]),
                    fmt_seconds(r["seconds"]["gradtail"]),
                    fmt_check(r["checks"][0]),
                    fmt_ratio(r.get("ratio_paired")),
                    fmt_ratio(r.get("ratio_min_based")),
                    f"{fmt_ratio(r.get('ratio_cpu'))} / {fmt_ratio(r.get('ratio_cpu_paired'))}",
                    fmt_seconds((r["seconds"]["gradtail"] - r["seconds"]["plain"]) / r["steps_per_epoch"]),
                    f"{fmt_seconds(r['first_epoch_seconds']['plain'])} / "
                    f"{fmt_seconds(r['first_epoch_seconds']['gradtail'])}",
                ]
                for r in results
            ),
        ),
        "",
        "*extra per step*: (median epoch with - without) / steps per epoch. *first epoch*: the "
        "warm-up epoch, which includes tracing and compiling the train step (JAX). *CPU-time "
        "ratio*: the same ratios from the process CPU time of each epoch (not the checked value; "
        "less moved by other processes' load).",
    ]
    method = doc.get("method", {})
    if method.get("timing"):
        out += ["", f"Timing: {method['timing']}"]
    out += ["", f"Regenerate: `{doc.get('command', 'python benchmarks/keras_overhead.py')}`, then render."]
    return "\n".join(out)


# --------------------------------------------------------------------------- longtail

_LT_MARK_TEXT = {"0.05": "5%", "0.1": "10%", "0.25": "25%", "0.5": "50%", "1": "100%"}


def _pm(stat: dict[str, Any] | None, digits: int = 1, *, signed: bool = False) -> str:
    """``mean ± std`` of a mean_std entry (no ± for a single seed)."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    sign = "+" if signed else ""
    text = f"{stat['mean']:{sign}.{digits}f}"
    if stat.get("n", 0) > 1:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def _every_seed(delta: dict[str, Any] | None, n_seeds: int) -> str:
    if not delta:
        return ""
    word = "**yes**" if delta["every_seed_positive"] else "no"
    return f"{word} ({delta['n_positive']}/{n_seeds})"


def _lt_delta(agg: dict[str, Any], key: str, digits: int = 2) -> tuple[str, str]:
    """The paired Δ of ``key`` (mean ± std) and its every-seed verdict; dashes for uniform."""
    delta = (agg.get("delta_vs_uniform") or {}).get(key)
    if agg["method"] == "uniform" or not delta:
        return "—", ""
    return _pm(delta, digits, signed=True), _every_seed(delta, agg["n_seeds"])


def _lt_mark(mark: str) -> str:
    return _LT_MARK_TEXT.get(mark, f"{100 * float(mark):g}%")


def _lt_run_notes(doc: dict[str, Any]) -> list[str]:
    """The quoted lines under a long-tail suite's machine line: quick run, deviations, note."""
    out: list[str] = []
    if doc.get("quick"):
        out += ["> **Quick smoke run** (one seed, few epochs): not evidence.", ""]
    deviations = doc.get("deviations")
    if deviations:
        out += [
            "> **Deviations from the default protocol:** "
            + "; ".join(f"{k}: used {v['used']}, default {v['default']}" for k, v in deviations.items()),
            "",
        ]
    if doc.get("note"):
        out += [f"> Note: {doc['note']}", ""]
    return out


def _lt_tail_detection_table(
    doc: dict[str, Any], marks: Sequence[str], label: Callable[[str], str], loss_score: str
) -> str:
    """AUROC per data set, GradTail method (and uniform), score and mark; ``loss_score`` names the loss."""
    methods = doc.get("methods", {})
    return table(
        ["data set", "method", "score", *(_lt_mark(m) for m in marks)],
        (
            [
                dataset,
                label(a["method"]),
                score,
                *(_pm(a["tail_detection"][detector].get(m), 2) for m in marks),
            ]
            for dataset in doc.get("datasets", {})
            for a in doc["aggregates"]
            if a["dataset"] == dataset
            and (a["method"] == "uniform" or methods.get(a["method"], {}).get("gradtail"))
            for detector, score in (("alignment", "-alignment"), ("loss", loss_score))
            if detector in a["tail_detection"]
        ),
    )


def _lt_weight_table(weighted: Sequence[dict[str, Any]], label: Callable[[str], str]) -> str:
    """Mean loss weight (± std over seeds) of the many / medium / few group per data set and method."""
    return table(
        ["data set", "method", "many", "medium", "few"],
        (
            [
                a["dataset"],
                label(a["method"]),
                *(_pm(a["weight_by_group"].get(g), 2) for g in ("many", "medium", "few")),
            ]
            for a in weighted
        ),
    )


def _lt_measured_end(doc: dict[str, Any], default_command: str) -> list[str]:
    """The last items of a suite's "How this was measured": GradTail defaults, methods, command."""
    gd = doc.get("config", {}).get("gradtail_defaults")
    out: list[str] = []
    if gd:
        curve = gd.get("curve", {})
        out += [
            f"- GradTail library defaults at run time: reference {gd.get('reference')!r}, decay "
            f"{gd.get('decay')}, curve {curve.get('kind')} (quantile {curve.get('quantile')}, max weight "
            f"{curve.get('max_weight')}, normalise {curve.get('normalize')}), warm-up "
            f"{gd.get('warmup_steps')}."
        ]
    out += [f"- `{name}`: {m.get('description', '')}" for name, m in doc.get("methods", {}).items()]
    out += [
        f"- Regenerate: `{doc.get('command', default_command)}`, then "
        "`.venv/bin/python benchmarks/render_tables.py`."
    ]
    return [*out, "", "</details>"]


def _doc_link(path: str) -> str:
    """A figure path relative to the repository root, as a link from docs/."""
    return path if path.startswith("/") else f"../{path}"


_LT_FIGURE_CAPTIONS = {
    "per_subclass": "Per-subclass test accuracy by method (hidden stratification), selected epoch",
    "per_class": "Per-class test accuracy by method, selected epoch",
    "alignment": "GradTail alignment histograms, head vs tail, early and late in training",
    "weight_vs_score": "GradTail loss weight vs alignment, head vs tail (after warm-up)",
}


def _lt_seeds(seeds: list[int] | dict[str, list[int]], dataset: str | None = None) -> str:
    """``0, 1, 2`` (one list for every data set) or ``fashion_lt100 0-4, digits_lt10 0-2``."""

    def text(values: list[int]) -> str:
        if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
            return f"{values[0]}-{values[-1]}"
        return ", ".join(str(v) for v in values)

    if isinstance(seeds, dict):
        if dataset is not None:
            return text(seeds.get(dataset, []))
        return "; ".join(f"{d} {text(v)}" for d, v in seeds.items())
    return text(list(seeds))


def _lt_label(methods: dict[str, Any], name: str) -> str:
    m = methods.get(name, {})
    return m.get("label", name) + (" †" if m.get("uses_class_counts") else "")


def _lt_paired(doc: dict[str, Any], dataset: str, method: str, base: str, key: str) -> dict[str, Any] | None:
    """Paired Δ of test ``key`` between two methods over their common seeds (mean, std, n > 0)."""
    runs = {(r["method"], r["seed"]): r for r in doc["runs"] if r["dataset"] == dataset}
    seeds = sorted(s for m, s in runs if m == method and (base, s) in runs)
    values = [runs[method, s]["test"].get(key) for s in seeds]
    bases = [runs[base, s]["test"].get(key) for s in seeds]
    pairs = [a - b for a, b in zip(values, bases, strict=True) if a is not None and b is not None]
    if not pairs:
        return None
    mean = sum(pairs) / len(pairs)
    var = sum((x - mean) ** 2 for x in pairs) / (len(pairs) - 1) if len(pairs) > 1 else 0.0
    return {"mean": mean, "std": var**0.5, "n": len(pairs), "n_positive": sum(x > 0 for x in pairs)}


def _lt_verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _lt_targets(doc: dict[str, Any]) -> list[str]:
    """The evidence issue's targets, each checked against this JSON (GradTail = the defaults)."""
    aggs = {(a["dataset"], a["method"]): a for a in doc["aggregates"]}
    lines = []

    def delta(dataset: str, method: str, key: str) -> dict[str, Any] | None:
        agg = aggs.get((dataset, method))
        return ((agg or {}).get("delta_vs_uniform") or {}).get(key)

    def text(d: dict[str, Any] | None) -> str:
        if not d:
            return "not run"
        return f"{d['mean']:+.2f} ± {d['std']:.2f} pp ({d['n_positive']}/{d['n']} seeds > 0)"

    d = delta("fashion_lt100", "gradtail", "selected_balanced_accuracy")
    late = delta("fashion_lt100", "gradtail", "late_balanced_accuracy")
    if d:
        n = aggs["fashion_lt100", "gradtail"]["n_seeds"]
        ok = d["mean"] >= 2.0 and d["every_seed_positive"] and n >= 5
        lines.append(
            f"- Fashion-MNIST-LT r=100, GradTail (defaults) ≥ uniform + 2 pp balanced accuracy, every "
            f"seed, 5 seeds: {_lt_verdict(ok)}: {text(d | {'n': n})} at the selected epoch; late mean "
            f"{text((late or {}) | {'n': n})}."
        )
        inv = delta("fashion_lt100", "inverse_frequency", "selected_balanced_accuracy")
        if inv:
            lines.append(
                f"- Stretch, reach inverse class frequency: {_lt_verdict(d['mean'] >= inv['mean'])}: "
                f"inverse frequency {text(inv | {'n': n})}."
            )
    d = delta("fashion_hidden", "gradtail", "selected_rare_subclass")
    if d:
        n = aggs["fashion_hidden", "gradtail"]["n_seeds"]
        ok = d["mean"] >= 3.0 and d["every_seed_positive"]
        jtt = delta("fashion_hidden", "jtt", "selected_rare_subclass")
        lines.append(
            f"- Hidden stratification, rare-subclass accuracy ≥ uniform + 3 pp, every seed: "
            f"{_lt_verdict(ok)}: {text(d | {'n': n})}" + (f" (JTT: {text(jtt | {'n': n})})." if jtt else ".")
        )
    agg = aggs.get(("fashion_lt100", "gradtail"))
    auc = ((agg or {}).get("tail_detection", {}).get("alignment") or {}).get("0.1")
    if auc and auc.get("mean") is not None:
        lines.append(
            "- Tail detection AUROC ≥ 0.8 at 10% of training on Fashion-MNIST-LT (r=100) with the "
            f"alignment: {_lt_verdict(auc['mean'] >= 0.8)}: {auc['mean']:.2f} ± {auc['std']:.2f}."
        )
    for dataset in doc.get("datasets", {}):
        comp = _lt_paired(
            doc, dataset, "class_balanced_gradtail", "class_balanced", "selected_balanced_accuracy"
        )
        late = _lt_paired(doc, dataset, "class_balanced_gradtail", "class_balanced", "late_balanced_accuracy")
        if comp:
            lines.append(
                f"- Composition on {dataset}: class-balanced x GradTail minus class-balanced alone, "
                f"balanced accuracy at the selected epoch: {text(comp)}; late mean: {text(late)}."
            )
    traps = []
    for dataset in doc.get("datasets", {}):
        key = (
            "selected_rare_subclass"
            if doc["datasets"][dataset].get("hidden")
            else "selected_balanced_accuracy"
        )
        d = delta(dataset, "gradtail", key)
        if d:
            ok = d["mean"] >= -max(0.5, d["std"])
            traps.append(f"{dataset} {d['mean']:+.2f} ± {d['std']:.2f} ({'ok' if ok else 'TRAP'})")
    if traps:
        ok_all = all(t.endswith("(ok)") for t in traps)
        lines.append(
            "- Never a trap (GradTail (defaults) within 0.5 pp or one seed-std of uniform where it "
            f"does not help): {_lt_verdict(ok_all)}: " + "; ".join(traps) + "."
        )
    return lines


def render_longtail(doc: dict[str, Any]) -> str:
    cfg = doc.get("config", {})
    methods = doc.get("methods", {})
    aggs = doc["aggregates"]
    out = [machine_line(doc), "", *_lt_run_notes(doc)]
    out += [
        f"Seeds: {_lt_seeds(cfg.get('seeds', []))}; "
        f"{cfg.get('model', '?')}, "
        f"{cfg.get('optimizer', '?')}, batch {cfg.get('batch_size', '?')}; epochs "
        + ", ".join(f"{d} {e}" for d, e in cfg.get("epochs", {}).items())
        + f"; warm-up {cfg.get('warmup_epochs', '?'):g} epoch(s) for loss rank and the GradTail "
        "variants that do not set their own. Accuracies in percent on the balanced test half at the "
        "**selected epoch** (per run, the epoch of best validation balanced accuracy: the test half is "
        "read only there), the standard protocol; *late mean* = the mean balanced accuracy over the "
        f"last {100 * cfg.get('late_fraction', 0.25):g}% of epochs (a fixed set, no selection); *final* = "
        "after the last epoch. Δ = paired difference to uniform weighting of the same seed, in "
        'percentage points; "every seed" = Δ > 0 for every seed (n positive / n seeds). Methods marked '
        "† use the training class counts.",
        "",
    ]

    for dataset, info in doc.get("datasets", {}).items():
        rows = [a for a in aggs if a["dataset"] == dataset]
        counts = info["counts"]
        out += [f"### {info['name']}: paired Δ vs. uniform", ""]
        if info.get("hidden"):
            sub = info["subclass_counts"]
            rare = info["rare_subclasses"]
            out += [
                f"{info['n_train']:,} training examples in {len(counts)} superclasses ({min(counts)} to "
                f"{max(counts)} each); subclasses {', '.join(info['subclass_names'][r] for r in rare)} "
                f"are the rare ones ({min(sub[r] for r in rare)} to {max(sub[r] for r in rare)} training "
                f"images each); validation {info['n_val']:,} / test {info['n_test']:,}, balanced over "
                f"subclasses; {info['epochs']} epochs. Superclass = balanced accuracy over the "
                "superclasses; rare / worst subclass = accuracy on the rare subclasses' test images / "
                "on the worst subclass.",
                "",
                table(
                    [
                        "method",
                        "superclass acc.",
                        "Δ (pp)",
                        "rare subclass",
                        "Δ rare (pp)",
                        "every seed",
                        "worst subclass",
                        "Δ worst (pp)",
                        "every seed (worst)",
                        "Δ rare, late mean",
                        "Δ rare, final",
                        "s / epoch",
                    ],
                    (
                        [
                            _lt_label(methods, a["method"]),
                            _pm(a["test"]["selected_balanced_accuracy"]),
                            _lt_delta(a, "selected_balanced_accuracy")[0],
                            _pm(a["test"].get("selected_rare_subclass")),
                            *_lt_delta(a, "selected_rare_subclass"),
                            _pm(a["test"].get("selected_worst_subclass")),
                            *_lt_delta(a, "selected_worst_subclass"),
                            _lt_delta(a, "late_rare_subclass")[0],
                            _lt_delta(a, "rare_subclass")[0],
                            _pm(a["seconds_per_epoch"], 2),
                        ]
                        for a in rows
                    ),
                ),
                "",
            ]
            continue
        out += [
            f"{info['n_train']:,} training examples (class counts {min(counts)} to {max(counts)}), "
            f"balanced validation {info['n_val']:,} / test {info['n_test']:,}; {info['epochs']} epochs.",
            "",
            table(
                [
                    "method",
                    "balanced acc.",
                    "Δ balanced (pp)",
                    "every seed",
                    "Δ late mean (pp)",
                    "every seed (late)",
                    "Δ final (pp)",
                    "many",
                    "medium",
                    "few",
                    "Δ few (pp)",
                    "val. balanced acc.",
                    "s / epoch",
                ],
                (
                    [
                        _lt_label(methods, a["method"]),
                        _pm(a["test"]["selected_balanced_accuracy"]),
                        *_lt_delta(a, "selected_balanced_accuracy"),
                        *_lt_delta(a, "late_balanced_accuracy"),
                        _lt_delta(a, "balanced_accuracy")[0],
                        _pm(a["test"]["selected_many"]),
                        _pm(a["test"]["selected_medium"]),
                        _pm(a["test"]["selected_few"]),
                        _lt_delta(a, "selected_few", 1)[0],
                        _pm(a["val_selected_balanced_accuracy"]),
                        _pm(a["seconds_per_epoch"], 2),
                    ]
                    for a in rows
                ),
            ),
            "",
        ]

    targets = _lt_targets(doc)
    if targets:
        out += [
            "### The evidence issue's targets, checked against these runs",
            "",
            "GradTail = the library defaults (every Linear layer, one-epoch warm-up); Δ vs. uniform at "
            "the selected epoch unless stated; a target is met only as the issue states it.",
            "",
            *targets,
            "",
        ]

    td = cfg.get("tail_detection", {})
    marks = [f"{m:g}" for m in td.get("marks", [])]
    out += [
        "### Tail detection: AUROC for the tail's examples",
        "",
        "How well a per-example score separates the training examples of the tail (the few-shot "
        "classes; on the hidden-stratification set, the rare subclasses) from the rest, at a point "
        "of training: all examples of the steps in the last "
        f"{100 * td.get('window', 0):g}% of training before the mark. GradTail's score is -alignment "
        "in its own run; the loss (before the step's update) is the label-free baseline, in the same "
        "run and under uniform training. 0.5 = chance; below 0.5 the score ranks the tail as "
        "*aligned*.",
        "",
        _lt_tail_detection_table(doc, marks, lambda m: methods.get(m, {}).get("label", m), "loss"),
        "",
    ]

    weighted = [a for a in aggs if a["method"] != "uniform" and a.get("weight_by_group")]
    if weighted:
        out += [
            "<details><summary>Mean loss weight by group, after warm-up</summary>",
            "",
            "Mean of the per-example weights over all training steps after the warm-up epoch, by class "
            "group (hidden-stratification set: many = common subclasses, few = rare subclasses) "
            "(class weights and GradTail / loss rank average 1 over a batch or the training set; "
            "focal loss's factor is not normalised).",
            "",
            _lt_weight_table(weighted, lambda m: methods.get(m, {}).get("label", m)),
            "",
            "</details>",
            "",
        ]

    figures = doc.get("figures") or []
    if figures:
        out += ["### Figures", ""]
        for path in figures:
            name = Path(path).name
            caption = next(
                (text for key, text in _LT_FIGURE_CAPTIONS.items() if key in name), "Long-tail figure"
            )
            out += [f"![{caption}]({_doc_link(path)})", "", f"*{caption} (`{path}`).*", ""]

    out += ["<details><summary>How this was measured</summary>", ""]
    for key in ("split", "selection", "metrics", "seconds_per_epoch"):
        if cfg.get(key):
            out += [f"- {key.replace('_', ' ').capitalize()}: {cfg[key]}."]
    if td.get("text"):
        out += [f"- Tail detection: {td['text']}."]
    out += _lt_measured_end(doc, "python -m benchmarks.longtail.run")
    return "\n".join(out)


# --------------------------------------------------------------------- longtail_regression


def _better(delta: dict[str, Any] | None, n_seeds: int) -> str:
    """``yes (k/n)`` when the paired Δ MAE is below 0 for every seed (lower MAE is better)."""
    if not delta or delta.get("mean") is None:
        return ""
    word = "**yes**" if delta["every_seed_better"] else "no"
    return f"{word} ({delta['n_better']}/{n_seeds})"


def _reg_delta(agg: dict[str, Any], key: str, base: str = "delta_vs_uniform") -> tuple[str, str]:
    """Paired Δ MAE (mean ± std) of ``key`` and its every-seed verdict; dashes for the base."""
    delta = (agg.get(base) or {}).get(key)
    if agg["method"] == ("uniform" if base == "delta_vs_uniform" else "lds") or not delta:
        return "—", ""
    return _pm(delta, 4, signed=True), _better(delta, agg["n_seeds"])


def render_longtail_regression(doc: dict[str, Any]) -> str:
    cfg = doc.get("config", {})
    methods = doc.get("methods", {})
    aggs = doc["aggregates"]
    seeds = cfg.get("seeds", [])

    def label(name: str) -> str:
        meta = methods.get(name, {})
        return meta.get("label", name) + (" †" if meta.get("uses_targets") else "")

    out = [machine_line(doc), "", *_lt_run_notes(doc)]
    out += [
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(str(s) for s in seeds)}); "
        f"{cfg.get('model', '?')}, {cfg.get('optimizer', '?')}, batch {cfg.get('batch_size', '?')}, "
        f"{cfg.get('loss', '?')}; epochs "
        + ", ".join(f"{d} {e}" for d, e in cfg.get("epochs", {}).items())
        + f"; warm-up {cfg.get('warmup_epochs', 1):g} epoch(s) for GradTail and loss rank. MAE of the log "
        "target on the test set after the last epoch; *balanced* = mean of the 10 per-bin MAEs; "
        "many/medium/few = mean over the bins of the group; *late* = mean balanced MAE over the last 25% "
        "of epochs; Δ = paired difference to uniform (or LDS) of the same seed, **negative is better**; "
        '"every seed" = Δ < 0 for every seed. † uses the training targets\' distribution.',
        "",
    ]
    for dataset, info in doc.get("datasets", {}).items():
        rows = [a for a in aggs if a["dataset"] == dataset]
        tail = (
            f", bins thinned to an exponential profile (r={info['imbalance']:g})"
            if info.get("imbalance")
            else ""
        )
        out += [
            f"### {info['name']}: MAE by target-bin group and paired Δ vs. uniform",
            "",
            f"{info['source']}, target {info['target']}, {info['n_features']} features; "
            f"{info['n_train']:,} training examples{tail}, per bin {info['counts']}; validation "
            f"{info['n_val']:,} / test {info['n_test']:,} (test per bin {info['test_per_bin']}); "
            f"{info['epochs']} epochs.",
            "",
            table(
                [
                    "method",
                    "balanced MAE",
                    "Δ balanced",
                    "every seed",
                    "Δ late",
                    "every seed (late)",
                    "many",
                    "medium",
                    "few",
                    "Δ few",
                    "every seed (few)",
                    "Δ few vs. LDS",
                    "val. balanced MAE",
                    "s / epoch",
                ],
                (
                    [
                        label(a["method"]),
                        _pm(a["test"]["balanced_mae"], 4),
                        *_reg_delta(a, "balanced_mae"),
                        *_reg_delta(a, "late_balanced_mae"),
                        _pm(a["test"]["many"], 4),
                        _pm(a["test"]["medium"], 4),
                        _pm(a["test"]["few"], 4),
                        *_reg_delta(a, "few"),
                        _reg_delta(a, "few", "delta_vs_lds")[0],
                        _pm(a["val"]["balanced_mae"], 4),
                        _pm(a["seconds_per_epoch"], 2),
                    ]
                    for a in rows
                ),
            ),
            "",
        ]
    td = cfg.get("tail_detection", {})
    marks = [f"{m:g}" for m in td.get("marks", [])]
    out += [
        "### Tail detection: AUROC for the training examples of the few-shot bins",
        "",
        "All training examples of the steps in the last "
        f"{100 * td.get('window', 0):g}% of training before the mark; GradTail's score is -alignment in "
        "its own run, the squared error (before the step's update) is the baseline. 0.5 = chance; below "
        "0.5 the score ranks the tail as *aligned*.",
        "",
        _lt_tail_detection_table(doc, marks, label, "squared error"),
        "",
    ]
    if doc.get("checks"):
        out += [
            "### Targets",
            "",
            table(
                ["target", "value (Δ MAE)", "verdict", "detail"],
                (
                    [
                        c["name"],
                        "n/a" if c["value"] is None else f"{c['value']:+.4f}",
                        {True: "pass", False: "**FAIL**", None: "n/a"}[c["passed"]],
                        c.get("detail", ""),
                    ]
                    for c in doc["checks"]
                ),
            ),
            "",
        ]
    weighted = [a for a in aggs if a["method"] != "uniform" and a.get("weight_by_group")]
    if weighted:
        out += [
            "<details><summary>Mean loss weight by bin group, after warm-up</summary>",
            "",
            _lt_weight_table(weighted, label),
            "",
            "</details>",
            "",
        ]
    figures = doc.get("figures") or []
    if figures:
        out += ["### Figures", ""]
        for path in figures:
            caption = "Test MAE by target bin per method, and the paired Δ vs. uniform"
            out += [f"![{caption}]({_doc_link(path)})", "", f"*{caption} (`{path}`).*", ""]
    out += ["<details><summary>How this was measured</summary>", ""]
    for key in ("bins", "split", "metrics"):
        if cfg.get(key):
            out += [f"- {key.capitalize()}: {cfg[key]}."]
    if td.get("text"):
        out += [f"- Tail detection: {td['text']}."]
    out += _lt_measured_end(doc, "python -m benchmarks.longtail.regression")
    return "\n".join(out)


def render_longtail_sweep(doc: dict[str, Any]) -> str:
    """The GradTail variant sweep: every variant ranked by validation (paired Δ vs. uniform)."""
    cfg = doc.get("config", {})
    methods = doc.get("methods", {})
    seeds = cfg.get("seeds", [])
    out = [machine_line(doc), ""]
    if doc.get("quick"):
        out += ["> **Quick smoke run** (one seed, few epochs): not evidence.", ""]
    gd = cfg.get("gradtail_defaults") or {}
    curve = gd.get("curve", {})
    out += [
        "Every variant is GradTail with the library defaults of the time (reference "
        f"{gd.get('reference')!r}, decay {gd.get('decay')}, curve {curve.get('kind')} with quantile "
        f"{curve.get('quantile')} and max "
        f"weight {curve.get('max_weight')}, normalised; warm-up {gd.get('warmup_steps')}) and the changes "
        "listed; `gradtail` tracks every Linear layer, `gradtail_head` the last one only.",
        "",
    ]
    crit = "val_late_balanced_accuracy"

    def criterion(a: dict[str, Any]) -> float:
        return float(((a.get("delta_vs_uniform") or {}).get(crit) or {}).get("mean") or -1e9)

    for dataset, info in doc.get("datasets", {}).items():
        rows = [a for a in doc["aggregates"] if a["dataset"] == dataset and a["method"] != "uniform"]
        rows = sorted((a for a in rows if a.get("delta_vs_uniform")), key=criterion, reverse=True)
        out += [
            f"### {info['name']}: GradTail variants, ranked by validation",
            "",
            f"Seeds {_lt_seeds(seeds, dataset)}, {info['epochs']} epochs. Ranked by "
            "the paired Δ of the **validation** balanced accuracy averaged over the last "
            f"{100 * cfg.get('late_fraction', 0.25):g}% of epochs (the criterion; the test columns are "
            "read after the choice and never used for it). Δ in percentage points vs. uniform of the "
            "same seed; (k/n) = seeds with Δ > 0.",
            "",
            table(
                [
                    "variant",
                    "what it changes",
                    "Δ val. late mean",
                    "Δ val. best epoch",
                    "Δ test, selected epoch",
                    "every seed",
                    "Δ test, late mean",
                    "every seed (late)",
                    "s / epoch",
                ],
                (
                    [
                        a["method"],
                        methods.get(a["method"], {}).get("description", ""),
                        _lt_delta(a, crit)[0] + " " + _every_seed(a["delta_vs_uniform"][crit], a["n_seeds"]),
                        _lt_delta(a, "val_selected_balanced_accuracy")[0],
                        *_lt_delta(a, "selected_balanced_accuracy"),
                        *_lt_delta(a, "late_balanced_accuracy"),
                        _pm(a["seconds_per_epoch"], 2),
                    ]
                    for a in rows
                ),
            ),
            "",
        ]
    out += [
        f"Regenerate: `{doc.get('command', 'python -m benchmarks.longtail.run --sweep')}`, then "
        "`.venv/bin/python benchmarks/render_tables.py`."
    ]
    return "\n".join(out)


def render_longtail_keras(doc: dict[str, Any]) -> str:
    """Keras ``model.fit`` with and without GradTailCallback on long-tailed data (paired Δ vs. uniform)."""
    cfg = doc.get("config", {})
    versions = doc.get("machine", {}).get("versions", {})
    methods = doc.get("methods", {})
    out = [machine_line(doc), ""]
    if doc.get("quick"):
        out += ["> **Quick smoke run** (one seed, few epochs): not evidence.", ""]
    epochs = ", ".join(f"{k} {v}" for k, v in cfg.get("epochs", {}).items())
    out += [
        f"Keras {versions.get('keras', '?')}, backend `{cfg.get('backend', '?')}`; seeds "
        f"{_lt_seeds(cfg.get('seeds', []))}; {cfg.get('model', '?')}, {cfg.get('loss', '?')}, "
        f"{cfg.get('optimizer', '?')}, batch {cfg.get('batch_size', '?')}; epochs {epochs}. GradTail: "
        f"{cfg.get('gradtail', '?')}. Pairing: {cfg.get('pairing', '?')}. "
        f"Metrics: {cfg.get('metrics', '?')}. "
        f"Timing: {cfg.get('timing', '?')}. Methods marked † use the training class counts.",
    ]
    for dataset, info in doc.get("datasets", {}).items():
        aggs = [a for a in doc.get("aggregates", []) if a["dataset"] == dataset]
        counts = info.get("counts", [])
        out += [
            "",
            f"### {info.get('name', dataset)}: Keras `model.fit`, paired Δ vs. uniform",
            "",
            f"{info.get('n_train', 0):,} training examples (class counts {min(counts, default=0)} to "
            f"{max(counts, default=0)}), balanced validation {info.get('n_val', 0):,} / test "
            f"{info.get('n_test', 0):,}; {info.get('epochs', '?')} epochs.",
            "",
        ]
        rows = []
        for agg in aggs:
            t = agg["test"]
            d_bal, e_bal = _lt_delta(agg, "balanced")
            d_late, e_late = _lt_delta(agg, "late")
            d_fin, e_fin = _lt_delta(agg, "final")
            d_few, _ = _lt_delta(agg, "few", 1)
            rows.append(
                [
                    methods.get(agg["method"], {}).get("label", agg["method"]),
                    _pm(t["balanced"]),
                    d_bal,
                    e_bal,
                    _pm(t["late"]),
                    d_late,
                    e_late,
                    d_fin,
                    e_fin,
                    _pm(t["many"]),
                    _pm(t["medium"]),
                    _pm(t["few"]),
                    d_few,
                    _pm(agg["val"]),
                    f"{_pm(agg['seconds_per_epoch'], 3)} ({_pm(agg['first_epoch_seconds'], 1)})",
                ]
            )
        out.append(
            table(
                [
                    "method",
                    "balanced acc.",
                    "Δ balanced (pp)",
                    "every seed",
                    "late mean",
                    "Δ late mean (pp)",
                    "every seed (late)",
                    "Δ final (pp)",
                    "every seed (final)",
                    "many",
                    "medium",
                    "few",
                    "Δ few (pp)",
                    "val. balanced acc.",
                    "s / epoch (first epoch)",
                ],
                rows,
            )
        )
        for agg in aggs:
            logs = agg.get("gradtail_logs") or {}
            if logs:
                out += [
                    "",
                    "GradTailCallback's logs in the last epoch (mean over seeds): "
                    + ", ".join(f"`{k}` {_pm(v, 3)}" for k, v in logs.items())
                    + f"; selected epoch {_pm(agg['selected_epoch'], 1)} of {info.get('epochs', '?')}.",
                ]
    out += [
        "",
        "Balanced accuracy and many / medium / few at the **selected epoch** (per run, the epoch of best "
        "validation balanced accuracy); *late mean* over the last 25% of epochs; *final* after the last "
        'epoch. Δ = paired difference to uniform of the same seed, in percentage points; "every seed" = '
        "Δ > 0 for every seed (n positive / n seeds).",
        "",
        f"Regenerate: `{doc.get('command', 'python -m benchmarks.longtail.keras_suite')}`, then "
        "`.venv/bin/python benchmarks/render_tables.py`.",
    ]
    return "\n".join(out)


RENDERERS: dict[str, Renderer] = {
    "core_ops": render_core_ops,
    "torch_overhead": render_torch_overhead,
    "jax_overhead": render_jax_overhead,
    "keras_overhead": render_keras_overhead,
    "longtail": render_longtail,
    "longtail_sweep": render_longtail_sweep,
    "longtail_regression": render_longtail_regression,
    "longtail_keras": render_longtail_keras,
}


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

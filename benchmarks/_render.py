"""Shared pieces of the benchmark renderers: number formats, Markdown tables, the machine line, the
run notes and the tables every long-tail suite shows.

Each benchmark owns the ``render(doc) -> str`` of the results file it writes (``core_ops.render``
for ``results/core_ops.json``, ...); ``render_tables.py`` finds them and writes their Markdown
between the markers of ``docs/benchmarks.md``. This module imports no array library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

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


# --------------------------------------------------------------------------- long-tail suites

_MARK_TEXT = {"0.05": "5%", "0.1": "10%", "0.25": "25%", "0.5": "50%", "1": "100%"}


def pm(stat: dict[str, Any] | None, digits: int = 1, *, signed: bool = False) -> str:
    """``mean ± std`` of a mean_std entry (no ± for a single seed)."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    sign = "+" if signed else ""
    text = f"{stat['mean']:{sign}.{digits}f}"
    if stat.get("n", 0) > 1:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def every_seed(delta: dict[str, Any] | None, n_seeds: int) -> str:
    if not delta:
        return ""
    word = "**yes**" if delta["every_seed_positive"] else "no"
    return f"{word} ({delta['n_positive']}/{n_seeds})"


def delta_cells(agg: dict[str, Any], key: str, digits: int = 2) -> tuple[str, str]:
    """The paired Δ of ``key`` (mean ± std) and its every-seed verdict; dashes for uniform."""
    delta = (agg.get("delta_vs_uniform") or {}).get(key)
    if agg["method"] == "uniform" or not delta:
        return "—", ""
    return pm(delta, digits, signed=True), every_seed(delta, agg["n_seeds"])


def mark_text(mark: str) -> str:
    return _MARK_TEXT.get(mark, f"{100 * float(mark):g}%")


def run_notes(doc: dict[str, Any]) -> list[str]:
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


def tail_detection_table(
    doc: dict[str, Any], marks: Sequence[str], label: Callable[[str], str], loss_score: str
) -> str:
    """AUROC per data set, GradTail method (and uniform), score and mark; ``loss_score`` names the loss."""
    methods = doc.get("methods", {})
    return table(
        ["data set", "method", "score", *(mark_text(m) for m in marks)],
        (
            [
                dataset,
                label(a["method"]),
                score,
                *(pm(a["tail_detection"][detector].get(m), 2) for m in marks),
            ]
            for dataset in doc.get("datasets", {})
            for a in doc["aggregates"]
            if a["dataset"] == dataset
            and (a["method"] == "uniform" or methods.get(a["method"], {}).get("gradtail"))
            for detector, score in (("alignment", "-alignment"), ("loss", loss_score))
            if detector in a["tail_detection"]
        ),
    )


def weight_table(weighted: Sequence[dict[str, Any]], label: Callable[[str], str]) -> str:
    """Mean loss weight (± std over seeds) of the many / medium / few group per data set and method."""
    return table(
        ["data set", "method", "many", "medium", "few"],
        (
            [
                a["dataset"],
                label(a["method"]),
                *(pm(a["weight_by_group"].get(g), 2) for g in ("many", "medium", "few")),
            ]
            for a in weighted
        ),
    )


def measured_section(doc: dict[str, Any], keys: Sequence[str], default_command: str) -> list[str]:
    """A suite's "How this was measured": the ``config`` entries ``keys``, tail detection, the
    GradTail defaults at run time, the methods and the command."""
    cfg = doc.get("config", {})
    out = ["<details><summary>How this was measured</summary>", ""]
    out += [f"- {k.replace('_', ' ').capitalize()}: {cfg[k]}." for k in keys if cfg.get(k)]
    td = cfg.get("tail_detection", {})
    if td.get("text"):
        out += [f"- Tail detection: {td['text']}."]
    gd = cfg.get("gradtail_defaults")
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


def figures_section(doc: dict[str, Any], caption: Callable[[str], str]) -> list[str]:
    """The run's figures (``doc["figures"]``, paths from the repository root) linked from docs/,
    each with ``caption(file name)``."""
    out: list[str] = []
    for path in doc.get("figures") or []:
        text = caption(path.rsplit("/", 1)[-1])
        link = path if path.startswith("/") else f"../{path}"
        out += [f"![{text}]({link})", "", f"*{text} (`{path}`).*", ""]
    return ["### Figures", "", *out] if out else []


def seeds_text(seeds: list[int] | dict[str, list[int]], dataset: str | None = None) -> str:
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

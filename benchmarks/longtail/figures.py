"""Figures of the long-tail suite, drawn from its JSON document (small PNGs, dpi <= 100)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .metrics import GROUPS

DPI = 80
PER_CLASS_DATASET = "fashion_lt100"
GROUP_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Save as a small PNG: dpi ``DPI``, quantised to an adaptive 64-colour palette."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=64).save(path, optimize=True)


def per_class_figure(doc: dict[str, Any], dataset: str, path: Path) -> Path:
    """Mean test accuracy per class (classes by training count), one line per method."""
    plt = _plt()
    info = doc["datasets"][dataset]
    counts = np.asarray(info["counts"])
    order = np.argsort(-counts, kind="stable")
    aggs = [a for a in doc["aggregates"] if a["dataset"] == dataset]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    markers = "osD^v<>ph*"
    for k, agg in enumerate(aggs):
        label = doc["methods"][agg["method"]]["label"]
        style = "-" if doc["methods"][agg["method"]]["gradtail"] else "--"
        ax.plot(
            np.arange(len(order)),
            np.asarray(agg["per_class_mean"], dtype=float)[order],
            style,
            marker=markers[k % len(markers)],
            markersize=4,
            linewidth=1.2,
            label=label,
        )
    ax.set_xticks(np.arange(len(order)))
    ax.set_xticklabels(
        [f"{info['class_names'][c]}\n{info['groups'][c]}\nn={counts[c]}" for c in order], fontsize=7
    )
    n_seeds = aggs[0]["n_seeds"] if aggs else 0
    ax.set(
        ylabel="test accuracy (%)",
        title=f"Per-class test accuracy, {info['name']}, mean of {n_seeds} seed(s); "
        "classes by training count",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def histogram_figure(doc: dict[str, Any], dataset: str, path: Path) -> Path | None:
    """Alignment histograms, many- vs medium- vs few-shot classes, early and late in training,
    one row per GradTail variant (counts pooled over seeds, each group normalised to density)."""
    variants = [m for m in doc["methods"] if doc["methods"][m]["gradtail"]]
    runs = [r for r in doc["runs"] if r["dataset"] == dataset and r.get("alignment_histograms")]
    variants = [m for m in variants if any(r["method"] == m for r in runs)]
    if not variants:
        return None
    plt = _plt()
    marks = list(runs[0]["alignment_histograms"]["marks"])
    edges = np.asarray(runs[0]["alignment_histograms"]["edges"])
    width = doc["config"]["tail_detection"]["window"]
    fig, axes = plt.subplots(
        len(variants), len(marks), figsize=(4.2 * len(marks), 2.4 * len(variants)), squeeze=False
    )
    for i, method in enumerate(variants):
        agg = next(a for a in doc["aggregates"] if a["dataset"] == dataset and a["method"] == method)
        for j, mark in enumerate(marks):
            ax = axes[i, j]
            for g in GROUPS:
                per_run = [r["alignment_histograms"]["marks"][mark][g] for r in runs if r["method"] == method]
                counts = np.sum(per_run, axis=0).astype(float)
                if counts.sum() > 0:
                    density = counts / (counts.sum() * np.diff(edges))
                    ax.stairs(density, edges, label=f"{g}-shot", color=GROUP_COLOURS[g], linewidth=1.3)
            auc = agg["tail_detection"].get("alignment", {}).get(mark, {}).get("mean")
            auc_text = "n/a" if auc is None else f"{auc:.2f}"
            ax.set_title(
                f"{doc['methods'][method]['label']}, {100 * float(mark):g}% of training\n"
                f"AUROC(-alignment, few vs rest) {auc_text}",
                fontsize=8,
            )
            ax.tick_params(labelsize=7)
            if i == len(variants) - 1:
                ax.set_xlabel(
                    f"alignment cos(g_i, G), steps in the last {100 * width:g}% before the mark", fontsize=7
                )
            if j == 0:
                ax.set_ylabel("density", fontsize=7)
            ax.legend(fontsize=6)
    fig.suptitle(f"GradTail alignment by class group, {doc['datasets'][dataset]['name']}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Redraw the figures of a saved JSON document: ``python -m benchmarks.longtail.figures JSON``."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m benchmarks.longtail.figures", description=main.__doc__)
    p.add_argument("json", type=Path)
    p.add_argument("--figures-dir", type=Path, default=None, help="default: figures/ beside the JSON")
    args = p.parse_args(argv)
    doc = json.loads(args.json.read_text())
    for path in make_figures(doc, args.figures_dir or args.json.parent / "figures"):
        print(path)
    return 0


def make_figures(doc: dict[str, Any], outdir: Path) -> list[Path]:
    """The per-class accuracy figure (``fashion_lt100``, else the first data set) and the
    alignment histograms of the same data set."""
    outdir.mkdir(parents=True, exist_ok=True)
    datasets = list(doc["datasets"])
    if not datasets:
        return []
    dataset = PER_CLASS_DATASET if PER_CLASS_DATASET in datasets else datasets[0]
    prefix = "longtail_quick" if doc.get("quick") else "longtail"
    paths = [per_class_figure(doc, dataset, outdir / f"{prefix}_per_class_{dataset}.png")]
    hist = histogram_figure(doc, dataset, outdir / f"{prefix}_alignment_{dataset}.png")
    if hist is not None:
        paths.append(hist)
    return paths


if __name__ == "__main__":
    raise SystemExit(main())

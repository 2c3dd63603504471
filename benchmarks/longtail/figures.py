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


def _group_label(doc: dict[str, Any], dataset: str, group: str) -> str:
    if doc["datasets"][dataset].get("hidden"):
        return {"many": "common subclasses", "few": "rare subclasses"}.get(group, group)
    return f"{group}-shot classes"


def per_class_figure(doc: dict[str, Any], dataset: str, path: Path) -> Path:
    """Mean test accuracy per class at the selected epoch (classes by training count), one line
    per method."""
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
            np.asarray(agg.get("selected_per_class_mean", agg["per_class_mean"]), dtype=float)[order],
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
        title=f"Per-class test accuracy (selected epoch), {info['name']}, mean of {n_seeds} seed(s); "
        "classes by training count",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def per_subclass_figure(doc: dict[str, Any], dataset: str, path: Path) -> Path | None:
    """Hidden stratification: mean test accuracy per subclass at the selected epoch, one line per
    method; rare subclasses marked."""
    info = doc["datasets"][dataset]
    aggs = [a for a in doc["aggregates"] if a["dataset"] == dataset and "selected_per_subclass_mean" in a]
    if not aggs:
        return None
    plt = _plt()
    names, rare = info["subclass_names"], set(info["rare_subclasses"])
    order = [c for c in range(len(names)) if c not in rare] + sorted(rare)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    markers = "osD^v<>ph*"
    for k, agg in enumerate(aggs):
        method = doc["methods"][agg["method"]]
        ax.plot(
            np.arange(len(order)),
            np.asarray(agg["selected_per_subclass_mean"], dtype=float)[order],
            "-" if method["gradtail"] else "--",
            marker=markers[k % len(markers)],
            markersize=4,
            linewidth=1.2,
            label=method["label"],
        )
    counts = info["subclass_counts"]
    ax.set_xticks(np.arange(len(order)))
    ax.set_xticklabels(
        [f"{names[c]}\n{'rare' if c in rare else 'common'}\nn={counts[c]}" for c in order], fontsize=7
    )
    ax.set(
        ylabel="superclass accuracy on the subclass (%)",
        title=f"Per-subclass test accuracy (selected epoch), {info['name']},\nmean of "
        f"{aggs[0]['n_seeds']} seed(s)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def weight_vs_score_figure(doc: dict[str, Any], dataset: str, path: Path) -> Path | None:
    """Mean loss weight per alignment bin, head vs tail, one panel per GradTail variant (pooled
    over seeds, after warm-up), with each group's alignment distribution shaded below."""
    variants = [m for m in doc["methods"] if doc["methods"][m]["gradtail"]]
    runs = [r for r in doc["runs"] if r["dataset"] == dataset and r.get("weight_vs_score")]
    variants = [m for m in variants if any(r["method"] == m for r in runs)]
    if not variants:
        return None
    plt = _plt()
    edges = np.asarray(runs[0]["weight_vs_score"]["edges"])
    centres = 0.5 * (edges[1:] + edges[:-1])
    fig, axes = plt.subplots(1, len(variants), figsize=(max(6.0, 3.6 * len(variants)), 3.6), squeeze=False)
    for ax, method in zip(axes[0], variants, strict=True):
        mine = [r["weight_vs_score"]["groups"] for r in runs if r["method"] == method]
        twin = ax.twinx()
        for g in GROUPS:
            count = np.sum([m[g]["count"] for m in mine], axis=0).astype(float)
            if count.sum() == 0:
                continue
            weights = np.array([[np.nan if v is None else v for v in m[g]["mean_weight"]] for m in mine])
            counts = np.array([m[g]["count"] for m in mine], dtype=float)
            total = np.nansum(np.nan_to_num(weights) * counts, axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
            label = _group_label(doc, dataset, g)
            ax.plot(centres, mean, "-o", markersize=2.5, color=GROUP_COLOURS[g], label=label)
            twin.fill_between(centres, count / count.sum(), step="mid", alpha=0.15, color=GROUP_COLOURS[g])
        twin.set_yticks([])
        ax.set_title(doc["methods"][method]["label"], fontsize=8)
        ax.set_xlabel("alignment cos(g_i, G)", fontsize=7)
        ax.set_ylabel("loss weight (batch mean 1)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(
        f"GradTail weight vs alignment after warm-up, {doc['datasets'][dataset]['name']}\n"
        "(shaded: each group's alignment distribution)",
        fontsize=9,
    )
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
                    label = _group_label(doc, dataset, g)
                    ax.stairs(density, edges, label=label, color=GROUP_COLOURS[g], linewidth=1.3)
            auc = agg["tail_detection"].get("alignment", {}).get(mark, {}).get("mean")
            auc_text = "n/a" if auc is None else f"{auc:.2f}"
            ax.set_title(
                f"{doc['methods'][method]['label']}, {100 * float(mark):g}% of training\n"
                f"AUROC(-alignment, tail vs rest) {auc_text}",
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
    """For ``fashion_lt100`` (else the first long-tailed data set): per-class accuracy by
    method, alignment histograms head vs tail early and late, weight vs alignment; for a
    hidden-stratification set: per-subclass accuracy and its alignment histograms."""
    outdir.mkdir(parents=True, exist_ok=True)
    datasets = list(doc["datasets"])
    if not datasets:
        return []
    # Named after the benchmark (longtail, longtail_cnn, longtail_variants, ...): runs that
    # write different tables never overwrite each other's figures.
    prefix = str(doc.get("benchmark", "longtail")) + ("_quick" if doc.get("quick") else "")
    long_tailed = [d for d in datasets if not doc["datasets"][d].get("hidden")]
    paths: list[Path | None] = []
    if long_tailed:
        dataset = PER_CLASS_DATASET if PER_CLASS_DATASET in long_tailed else long_tailed[0]
        paths += [
            per_class_figure(doc, dataset, outdir / f"{prefix}_per_class_{dataset}.png"),
            histogram_figure(doc, dataset, outdir / f"{prefix}_alignment_{dataset}.png"),
            weight_vs_score_figure(doc, dataset, outdir / f"{prefix}_weight_vs_score_{dataset}.png"),
        ]
    for dataset in (d for d in datasets if doc["datasets"][d].get("hidden")):
        paths += [
            per_subclass_figure(doc, dataset, outdir / f"{prefix}_per_subclass_{dataset}.png"),
            histogram_figure(doc, dataset, outdir / f"{prefix}_alignment_{dataset}.png"),
        ]
    return [p for p in paths if p is not None]


if __name__ == "__main__":
    raise SystemExit(main())

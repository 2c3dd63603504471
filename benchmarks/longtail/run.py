"""The long-tail evidence suite: every weighting method on every data set, several seeds.

For every (data set, method, seed) it trains the MLP of ``train.py`` (784 -> 512 -> 256 -> 10,
Adam 1e-3, batch 128) and records test balanced accuracy, many/medium/few-shot class
accuracy, validation balanced accuracy, seconds per epoch, the paired difference to uniform
weighting of the same seed and, from every training step's per-example scores, how well
GradTail's alignment (and the loss, as a baseline) finds the few-shot classes' examples
(AUROC at 10%, 50% and 100% of training). Aggregates over seeds, figures and a JSON file
for ``benchmarks/render_tables.py`` (``docs/benchmarks.md``, "Long-tailed data").

Usage::

    .venv/bin/python -m benchmarks.longtail.run                     # full run, ~12-15 min on 2 cores
    .venv/bin/python -m benchmarks.longtail.run --quick             # smoke run, ~1 min
    .venv/bin/python -m benchmarks.longtail.run --datasets digits_lt10 --methods uniform gradtail
    .venv/bin/python benchmarks/render_tables.py                    # tables into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import gradtail_ops

from .. import _meta
from .analysis import HIST_MARKS, MARKS, alignment_histograms, tail_detection, weight_by_group
from .datasets import DATASETS, SPLIT_SEED, load_dataset
from .methods import METHODS
from .metrics import GROUPS, mean_std
from .train import train

BENCHMARK = "longtail"
SCHEMA_VERSION = 1
REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path("benchmarks/results/longtail.json")
QUICK_OUT = Path("results/longtail_quick.json")
DEFAULT_SEEDS = (0, 1, 2)
DELTA_METRICS = (
    "balanced_accuracy",
    "late_balanced_accuracy",
    "many",
    "medium",
    "few",
    "accuracy",
    "val_balanced_accuracy",
    "val_late_balanced_accuracy",
)
LATE_FRACTION = 0.25


def late_epochs(epochs: int) -> int:
    """How many final epochs the late averages cover: the last 25%, at least one."""
    return max(1, round(LATE_FRACTION * epochs))


def _metric(row: dict[str, Any], key: str) -> float:
    if key.startswith("val_"):
        return float(row["val"][key[len("val_") :]])
    return float(row["test"][key])


# ------------------------------------------------------------------------------- machine


GIT_DIRTY = {
    "gradtail_ops_dirty": ("gradtail_ops", "adapters"),
    "longtail_suite_dirty": ("benchmarks/longtail",),
}


def machine_info(threads: int) -> dict[str, Any]:
    return _meta.machine_info(
        {"torch": torch.__version__, "numpy": np.__version__},
        git=_meta.git_state(GIT_DIRTY),
        fields={"threads": _meta.threads_info(threads, torch_num_threads=torch.get_num_threads())},
    )


# ---------------------------------------------------------------------------------- runs


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * float(x)


def run_one(
    split: Any, dataset: str, method: str, seed: int, epochs: int, args: argparse.Namespace, bar: Any
) -> dict[str, Any]:
    data = split.data
    result = train(
        data,
        method,
        seed=seed,
        epochs=epochs,
        warmup_epochs=args.warmup_epochs,
        progress=bar,
        validation=(split.x_val, split.y_val),
        record_scores=True,
        test_every_epoch=True,
    )
    k = late_epochs(epochs)
    total_steps = result.steps_per_epoch * epochs
    row: dict[str, Any] = {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "epochs": epochs,
        "steps_per_epoch": result.steps_per_epoch,
        "n_train": len(data.y_train),
        "test": {
            "accuracy": _pct(result.accuracy),
            "balanced_accuracy": _pct(result.balanced_accuracy),
            **{g: _pct(result.group_accuracy[g]) for g in GROUPS},
            "late_balanced_accuracy": _pct(float(np.mean(result.test_curve[-k:]))),
            "per_class": [_pct(a) for a in result.per_class_accuracy],
        },
        "val": {
            "balanced_accuracy": _pct(result.val_balanced_accuracy),
            "late_balanced_accuracy": _pct(float(np.mean(result.val_curve[-k:]))),
            "curve": [_pct(a) for a in result.val_curve],
        },
        "late_epochs": k,
        "seconds_per_epoch": result.seconds_per_epoch,
        "wall_seconds": result.wall_seconds,
        "tail_detection": tail_detection(
            result.scores, total_steps=total_steps, groups=data.groups, marks=args.marks, width=args.window
        ),
    }
    warmup_steps = round(args.warmup_epochs * result.steps_per_epoch)
    row["weight_by_group"] = weight_by_group(result.scores, groups=data.groups, start_step=warmup_steps)
    if "alignment" in result.scores:
        row["alignment_histograms"] = alignment_histograms(
            result.scores, total_steps=total_steps, groups=data.groups, marks=HIST_MARKS, width=args.window
        )
    return row


def add_deltas(rows: list[dict[str, Any]]) -> None:
    """Paired difference (percentage points) to uniform weighting of the same data set and seed."""
    base = {(r["dataset"], r["seed"]): r for r in rows if r["method"] == "uniform"}
    for r in rows:
        b = base.get((r["dataset"], r["seed"]))
        if b is None:
            r["delta_vs_uniform"] = None
            continue
        r["delta_vs_uniform"] = {k: _metric(r, k) - _metric(b, k) for k in DELTA_METRICS}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (data set, method); for deltas, whether every seed is > 0."""
    out = []
    keys = list(dict.fromkeys((r["dataset"], r["method"]) for r in rows))
    for dataset, method in keys:
        group = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
        agg: dict[str, Any] = {
            "dataset": dataset,
            "method": method,
            "seeds": [r["seed"] for r in group],
            "n_seeds": len(group),
            "test": {
                k: mean_std([r["test"][k] for r in group])
                for k in ("accuracy", "balanced_accuracy", "late_balanced_accuracy", *GROUPS)
            },
            "per_class_mean": np.mean([r["test"]["per_class"] for r in group], axis=0).tolist(),
            "val_balanced_accuracy": mean_std([r["val"]["balanced_accuracy"] for r in group]),
            "val_late_balanced_accuracy": mean_std([r["val"]["late_balanced_accuracy"] for r in group]),
            "seconds_per_epoch": mean_std([r["seconds_per_epoch"] for r in group]),
            "weight_by_group": {g: mean_std([r["weight_by_group"][g] for r in group]) for g in GROUPS},
        }
        if all(r.get("delta_vs_uniform") is not None for r in group):
            agg["delta_vs_uniform"] = {}
            for k in DELTA_METRICS:
                values = [r["delta_vs_uniform"][k] for r in group]
                agg["delta_vs_uniform"][k] = mean_std(values) | {
                    "n_positive": sum(v > 0 for v in values),
                    "every_seed_positive": all(v > 0 for v in values),
                }
        else:
            agg["delta_vs_uniform"] = None
        td: dict[str, Any] = {}
        for detector in group[0]["tail_detection"]["auroc"]:
            td[detector] = {
                mark: mean_std([r["tail_detection"]["auroc"][detector][mark] for r in group])
                for mark in group[0]["tail_detection"]["auroc"][detector]
            }
        agg["tail_detection"] = td
        out.append(agg)
    return out


# ---------------------------------------------------------------------------------- JSON


def _clean(obj: Any) -> Any:
    """NaN/inf become null (strict JSON), numpy scalars Python numbers, floats 6 significant digits."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None  # 6 significant digits
    return obj


def dumps(doc: Any, level: int = 0) -> str:
    """Indented JSON with every list of scalars and every dict of scalars on one line."""

    def scalar(x: Any) -> bool:
        return x is None or isinstance(x, (bool, int, float, str))

    flat = (isinstance(doc, list) and all(map(scalar, doc))) or (
        isinstance(doc, dict) and all(scalar(v) for v in doc.values())
    )
    if scalar(doc) or flat:
        return json.dumps(doc)
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(doc, dict):
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, level + 1)}" for k, v in doc.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}" if items else "{}"
    items = [f"{inner}{dumps(v, level + 1)}" for v in doc]
    return "[\n" + ",\n".join(items) + f"\n{pad}]" if items else "[]"


def _rel(path: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.longtail.run",
        description="Long-tail evidence suite: weighting methods x data sets x seeds, balanced accuracy, "
        "paired deltas vs. uniform, tail-detection AUROC of GradTail's alignment; writes JSON + figures.",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        choices=tuple(DATASETS),
        default=list(DATASETS),
        metavar="NAME",
        help=f"data sets, from {', '.join(DATASETS)} (default: all)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=tuple(METHODS),
        default=list(METHODS),
        metavar="NAME",
        help=f"methods (benchmarks/longtail/methods.py), from {', '.join(METHODS)} (default: all; "
        "uniform always runs first when given, every delta is paired with it)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=None, help=f"default {list(DEFAULT_SEEDS)}; --quick: [0]"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs for every data set (default per data set: "
        + ", ".join(f"{k} {v.epochs}" for k, v in DATASETS.items())
        + "; --quick: "
        + ", ".join(f"{k} {v.quick_epochs}" for k, v in DATASETS.items())
        + ")",
    )
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=1.0,
        help="warm-up epochs of gradtail* and loss_rank (default: 1)",
    )
    p.add_argument(
        "--marks",
        nargs="+",
        type=float,
        default=list(MARKS),
        help="AUROC at these fractions of training (default: 0.1 0.5 1)",
    )
    p.add_argument(
        "--window",
        type=float,
        default=0.05,
        help="AUROC window: the steps in (mark - window, mark] (default: 0.05)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--quick", action="store_true", help="1 seed, few epochs: a smoke run in about a minute")
    p.add_argument(
        "--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT}; --quick {QUICK_OUT})"
    )
    p.add_argument(
        "--figures-dir", type=Path, default=None, help="PNG output (default: figures/ beside --out)"
    )
    p.add_argument("--no-figures", action="store_true", help="write no figures")
    p.add_argument("--note", default=None, help="free text stored in the JSON (e.g. why epochs were cut)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else list(DEFAULT_SEEDS)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.figures_dir is None:
        args.figures_dir = args.out.parent / "figures"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = _meta.load_average()
    start = time.perf_counter()
    machine = machine_info(args.threads)
    # uniform first: every other method's delta is paired with it.
    methods = sorted(dict.fromkeys(args.methods), key=lambda m: m != "uniform")
    epochs = {
        d: args.epochs or (DATASETS[d].quick_epochs if args.quick else DATASETS[d].epochs)
        for d in args.datasets
    }
    rows: list[dict[str, Any]] = []
    datasets_info: dict[str, Any] = {}
    bar = tqdm(total=0, unit="step", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    for dataset in args.datasets:
        for seed in args.seeds:
            split = load_dataset(dataset, seed)
            data = split.data
            if dataset not in datasets_info:
                steps = int(np.ceil(len(data.y_train) / 128)) * epochs[dataset]
                bar.total += steps * len(methods) * len(args.seeds)
                bar.refresh()
                datasets_info[dataset] = {
                    "description": DATASETS[dataset].description,
                    "name": data.name,
                    "class_names": list(data.class_names),
                    "counts": [int(c) for c in data.counts],
                    "groups": list(data.groups),
                    "n_train": len(data.y_train),
                    "n_val": len(split.y_val),
                    "n_test": len(data.y_test),
                    "epochs": epochs[dataset],
                }
            for method in methods:
                bar.set_postfix_str(f"{dataset} {method} seed {seed}")
                rows.append(run_one(split, dataset, method, seed, epochs[dataset], args, bar))
    bar.close()
    add_deltas(rows)
    machine |= _meta.load_fields(load_before, _meta.load_average())
    defaults = {d: DATASETS[d].epochs for d in args.datasets}
    deviations = {}
    if not args.quick and epochs != defaults:
        deviations["epochs"] = {"used": epochs, "default": defaults}
    if not args.quick and list(args.seeds) != list(DEFAULT_SEEDS):
        deviations["seeds"] = {"used": list(args.seeds), "default": list(DEFAULT_SEEDS)}
    doc: dict[str, Any] = {
        **_meta.run_header(
            BENCHMARK,
            SCHEMA_VERSION,
            _meta.command_line(argv, prog="python -m benchmarks.longtail.run"),
            quick=bool(args.quick),
        ),
        "wall_seconds": time.perf_counter() - start,
        "dtype": "float32",
        "machine": machine,
        "config": {
            "model": "MLP d_in -> 512 -> 256 -> 10 (ReLU)",
            "optimizer": "Adam, lr 1e-3",
            "batch_size": 128,
            "epochs": epochs,
            "seeds": list(args.seeds),
            "warmup_epochs": args.warmup_epochs,
            "late_fraction": LATE_FRACTION,
            "split": "balanced test pool split per class into validation and test halves "
            f"(seed {SPLIT_SEED}); the long-tailed training subsample and the initialisation follow "
            "the run seed",
            "metrics": "accuracies in percent on the test half after the last epoch; "
            "late_balanced_accuracy: the mean of the balanced accuracies after each of the last "
            f"{100 * LATE_FRACTION:g}% of epochs (a fixed set, no selection; it damps the epoch-to-epoch "
            "swing of the rare classes); deltas in percentage points, paired with uniform of the same data "
            "set and seed; validation: the same after the last epoch and over the late epochs (val.curve: "
            "after every epoch; the test half keeps no curve, so selection can only use validation)",
            "seconds_per_epoch": "training steps only (slicing, forward, weighting, backward, Adam step), "
            f"{args.threads} intra-op thread(s); excludes recording and evaluation",
            "tail_detection": {
                "marks": list(args.marks),
                "window": args.window,
                "text": "AUROC of a per-example score for membership in a few-shot class, over every "
                "training example of the steps in (mark - window, mark] of training: -alignment for "
                "GradTail (its own training run), the loss (before the step's update) for every method",
            },
            "gradtail_defaults": {
                "reference": gradtail_ops.DEFAULT_REFERENCE,
                "decay": gradtail_ops.DEFAULT_DECAY,
                "curve": {
                    "kind": gradtail_ops.DEFAULT_CURVE.kind,
                    "quantile": gradtail_ops.DEFAULT_CURVE.quantile,
                    "max_weight": gradtail_ops.DEFAULT_CURVE.max_weight,
                    "normalize": gradtail_ops.DEFAULT_CURVE.normalize,
                },
                "warmup_steps": "one epoch (set by the suite)",
            },
        },
        "deviations": deviations or None,
        "note": args.note,
        "methods": {
            m: {
                "label": METHODS[m].label,
                "description": METHODS[m].description,
                "uses_class_counts": METHODS[m].uses_class_counts,
                "gradtail": METHODS[m].gradtail,
            }
            for m in methods
        },
        "datasets": datasets_info,
        "runs": rows,
        "aggregates": aggregate(rows),
    }
    doc = _clean(doc)
    if not args.no_figures:
        from .figures import make_figures

        doc["figures"] = [_rel(p) for p in make_figures(doc, args.figures_dir)]
    _meta.write_json(args.out, doc, dumps=dumps)
    print(summary(doc))
    figures = f"; figures: {', '.join(doc['figures'])}" if doc.get("figures") else ""
    print(f"JSON: {_rel(args.out)}{figures}")
    return 0


def summary(doc: dict[str, Any]) -> str:
    """A plain-text table of the aggregates (what the renderer writes as Markdown)."""
    lines = []
    for agg in doc["aggregates"]:
        d = agg["delta_vs_uniform"]
        bal = agg["test"]["balanced_accuracy"]
        delta = (
            ""
            if d is None
            else (
                f" d_bal {d['balanced_accuracy']['mean']:+6.2f} ± {d['balanced_accuracy']['std']:.2f}"
                f" ({d['balanced_accuracy']['n_positive']}/{agg['n_seeds']} >0)"
                f" d_late {d['late_balanced_accuracy']['mean']:+6.2f}"
                f" ({d['late_balanced_accuracy']['n_positive']}/{agg['n_seeds']} >0)"
                f" d_few {d['few']['mean']:+6.2f}"
            )
        )
        td = agg["tail_detection"].get("alignment") or {}
        aur = " ".join(f"{m}:{v['mean']:.2f}" for m, v in td.items() if v["mean"] is not None)
        lines.append(
            f"{agg['dataset']:<14} {agg['method']:<18} bal {bal['mean']:6.2f} ± {bal['std']:.2f}{delta}"
            + (f"  AUROC(-align) {aur}" if aur else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

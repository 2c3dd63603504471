"""The long-tail evidence suite: every weighting method on every data set, several seeds.

For every (data set, method, seed) it trains the MLP of ``train.py`` (784 -> 512 -> 256 -> C,
Adam 1e-3, batch 128) and records, after every epoch, the balanced accuracy on a validation
half and on a test half of the balanced test pool. It reports the test metrics at the epoch
of best validation balanced accuracy (validation-based selection), after the last epoch and
averaged over the late epochs; many/medium/few-shot class accuracy (rare / worst subclass on
the hidden-stratification set), seconds per epoch, the paired difference to uniform
weighting of the same seed and, from every training step's per-example scores, how well
GradTail's alignment (and the loss, as a baseline) finds the tail's examples (AUROC at 10%,
50% and 100% of training). Aggregates over seeds, figures and a JSON file for
``benchmarks/render_tables.py`` (``docs/benchmarks.md``, "Long-tailed data").

Usage::

    .venv/bin/python -m benchmarks.longtail.run --jobs 2            # the full run (docs/method.md)
    .venv/bin/python -m benchmarks.longtail.run --quick             # smoke run, < 3 min
    .venv/bin/python -m benchmarks.longtail.run --datasets digits_lt10 --methods uniform gradtail
    .venv/bin/python -m benchmarks.longtail.run --sweep --datasets fashion_lt100 \\
        --methods uniform --variant head_d999 head_only=true decay=0.999   # a variant sweep
    .venv/bin/python benchmarks/render_tables.py                    # tables into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gradtail_ops

from .. import _meta
from .analysis import (
    HIST_MARKS,
    MARKS,
    aggregate_tail_detection,
    alignment_histograms,
    tail_detection,
    weight_by_group,
    weight_vs_score,
)
from .datasets import DATASETS, SPLIT_SEED, load_dataset
from .methods import (
    LAST_LAYER_VERSION,
    METHODS,
    Context,
    GradTailWeighting,
    LastLayerRetraining,
    LogitAdjustedLastLayer,
    Method,
    Weighting,
)
from .metrics import (
    GROUPS,
    LATE_FRACTION,
    delta_stats,
    late_epochs,
    mean_std,
    paired_deltas,
    selected_epoch,
)
from .models import ARCH_TEXT, ARCHS, build_model
from .runner import clean, load_and_run, run_tasks
from .train import train

BENCHMARK = "longtail"
SWEEP_BENCHMARK = "longtail_sweep"
#: Round-two variants (sketched reference, deferred weighting, logit adjustment) on the MLP.
VARIANTS_BENCHMARK = "longtail_variants"
SCHEMA_VERSION = 1
REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path("benchmarks/results/longtail.json")
QUICK_OUT = Path("results/longtail_quick.json")
#: The default methods with ``--arch cnn`` / ``vit``: the MLP protocol's baselines and GradTail on
#: the head and on the whole model (``gradtail``: every nn.Linear, jointly).
ARCH_METHODS = ("uniform", "inverse_frequency", "class_balanced", "gradtail_head", "gradtail")
#: Scalar test metrics; each is reported after the last epoch (``k``), as the mean over the
#: late epochs (``late_k``) and at the epoch of best validation balanced accuracy
#: (``selected_k``). The subclass ones exist for hidden-stratification data sets only.
SCALARS = ("accuracy", "balanced_accuracy", "many", "medium", "few", "rare_subclass", "worst_subclass")
DELTA_METRICS = (
    *(f"{prefix}{k}" for prefix in ("", "late_", "selected_") for k in SCALARS),
    "val_balanced_accuracy",
    "val_late_balanced_accuracy",
    "val_selected_balanced_accuracy",
)
#: The methods of the full run (``--methods`` picks others, e.g. the per-example memory ones).
SUITE_METHODS = (
    "uniform",
    "inverse_frequency",
    "class_balanced",
    "focal",
    "loss_rank",
    "jtt",
    "jtt_up5",
    "gradtail",
    "class_balanced_gradtail",
)


def _metric(row: dict[str, Any], key: str) -> float | None:
    part, name = ("val", key[len("val_") :]) if key.startswith("val_") else ("test", key)
    value = row[part].get(name)
    return None if value is None else float(value)


# ------------------------------------------------------------------------------- machine


GIT_DIRTY = {
    "gradtail_ops_dirty": ("gradtail_ops", "adapters"),
    "longtail_suite_dirty": ("benchmarks/longtail",),
}


def machine_info(threads: int) -> dict[str, Any]:
    """The ``machine`` block of the long-tail suites (classification and ``regression.py``)."""
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
        validation=(split.x_val, split.y_val, split.sub_val),
        record_scores=True,
        test_every_epoch=True,
        arch=args.arch,
    )
    k = late_epochs(epochs)
    best = selected_epoch(result.val_curve)
    total_steps = result.steps_per_epoch * epochs
    final, chosen, late = result.test_metrics[-1], result.test_metrics[best], result.test_metrics[-k:]
    test: dict[str, Any] = {}
    for key in SCALARS:
        if key in final:
            test[key] = _pct(final[key])
            test[f"late_{key}"] = _pct(float(np.mean([m[key] for m in late])))
            test[f"selected_{key}"] = _pct(chosen[key])
    test["per_class"] = [_pct(a) for a in final["per_class"]]
    test["selected_per_class"] = [_pct(a) for a in chosen["per_class"]]
    if "per_subclass" in final:
        test["per_subclass"] = [_pct(a) for a in final["per_subclass"]]
        test["selected_per_subclass"] = [_pct(a) for a in chosen["per_subclass"]]
    row: dict[str, Any] = {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "epochs": epochs,
        "steps_per_epoch": result.steps_per_epoch,
        "n_train": len(data.y_train),
        "selected_epoch": best + 1,
        "test": test,
        "val": {
            "balanced_accuracy": _pct(result.val_curve[-1]),
            "late_balanced_accuracy": _pct(float(np.mean(result.val_curve[-k:]))),
            "selected_balanced_accuracy": _pct(result.val_curve[best]),
            "curve": [_pct(a) for a in result.val_curve],
        },
        "late_epochs": k,
        "seconds_per_epoch": result.seconds_per_epoch,
        "wall_seconds": result.wall_seconds,
    }
    groups = data.example_groups(result.scores["index"])
    row["tail_detection"] = tail_detection(
        result.scores, total_steps=total_steps, groups=groups, marks=args.marks, width=args.window
    )
    warmup_steps = round(args.warmup_epochs * result.steps_per_epoch)
    row["weight_by_group"] = weight_by_group(result.scores, groups=groups, start_step=warmup_steps)
    if "alignment" in result.scores:
        row["alignment_histograms"] = alignment_histograms(
            result.scores, total_steps=total_steps, groups=groups, marks=HIST_MARKS, width=args.window
        )
        row["weight_vs_score"] = weight_vs_score(result.scores, groups=groups, start_step=warmup_steps)
    return row


def run_key(dataset: str, seed: int, method: str, epochs: int, args: argparse.Namespace) -> str:
    """What determines a run: data set, seed, epochs, warm-up, the method's options and, for
    GradTail methods, the library defaults. Training is deterministic (one thread, seeded), so
    two runs with one key give the same numbers; ``--checkpoint`` reuses runs by this key."""
    spec = METHODS[method]
    key: dict[str, Any] = {
        "dataset": dataset,
        "seed": seed,
        "method": method,
        "epochs": epochs,
        "warmup_epochs": args.warmup_epochs,
        "options": spec.options,
        "marks": list(args.marks),
        "window": args.window,
    }
    if args.arch != "mlp":  # keeps the keys of the MLP runs' checkpoints
        key["arch"] = args.arch
    if spec.version:
        key["version"] = spec.version
    if spec.gradtail:
        key["defaults"] = [
            gradtail_ops.DEFAULT_REFERENCE,
            gradtail_ops.DEFAULT_DECAY,
            repr(gradtail_ops.DEFAULT_CURVE),
            gradtail_ops.DEFAULT_WARMUP_STEPS,
            spec.description,
        ]
    return json.dumps(key, sort_keys=True, default=str)


@functools.lru_cache(maxsize=2)
def _split(dataset: str, seed: int) -> Any:
    return load_dataset(dataset, seed)


def add_deltas(rows: list[dict[str, Any]]) -> None:
    """Paired difference (percentage points) to uniform weighting of the same data set and seed."""
    paired_deltas(rows, DELTA_METRICS, _metric)


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
                for k, v in group[0]["test"].items()
                if not isinstance(v, list)
            },
            "per_class_mean": np.mean([r["test"]["per_class"] for r in group], axis=0).tolist(),
            "selected_per_class_mean": np.mean(
                [r["test"]["selected_per_class"] for r in group], axis=0
            ).tolist(),
            "selected_epoch": mean_std([r["selected_epoch"] for r in group]),
            "val_balanced_accuracy": mean_std([r["val"]["balanced_accuracy"] for r in group]),
            "val_late_balanced_accuracy": mean_std([r["val"]["late_balanced_accuracy"] for r in group]),
            "val_selected_balanced_accuracy": mean_std(
                [r["val"]["selected_balanced_accuracy"] for r in group]
            ),
            "seconds_per_epoch": mean_std([r["seconds_per_epoch"] for r in group]),
            "weight_by_group": {g: mean_std([r["weight_by_group"][g] for r in group]) for g in GROUPS},
        }
        if "per_subclass" in group[0]["test"]:
            agg["selected_per_subclass_mean"] = np.mean(
                [r["test"]["selected_per_subclass"] for r in group], axis=0
            ).tolist()
        if all(r.get("delta_vs_uniform") is not None for r in group):
            agg["delta_vs_uniform"] = {}
            for k in DELTA_METRICS:
                values = [r["delta_vs_uniform"].get(k) for r in group]
                if None not in values:
                    agg["delta_vs_uniform"][k] = delta_stats(values)
        else:
            agg["delta_vs_uniform"] = None
        agg["tail_detection"] = aggregate_tail_detection(group)
        out.append(agg)
    return out


# ---------------------------------------------------------------------------------- JSON


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


def rel(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it."""
    path = path.resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ variants

VARIANT_KEYS: dict[str, Any] = {
    "head_only": bool,
    "reference": str,
    "decay": float,
    "kind": str,
    "quantile": float,
    "max_weight": float,
    "threshold": float,
    "temperature": float,
    "floor": float,
    "normalize": bool,
    "warmup_steps": int,
    "warmup_epochs": float,
    "sketch_rank": int,
    "last_layer": str,
    "gamma": float,
    "tau": float,
}


def parse_variant_options(items: Sequence[str]) -> dict[str, Any]:
    """``["head_only=true", "max_weight=5"]`` -> ``{"head_only": True, "max_weight": 5.0}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in VARIANT_KEYS:
            raise SystemExit(
                f"--variant options are KEY=VALUE with KEY one of {sorted(VARIANT_KEYS)}; Received: {item!r}."
            )
        kind = VARIANT_KEYS[key]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--variant {key} must be true or false; Received: {value!r}.")
            out[key] = value.lower() in ("true", "1")
        else:
            out[key] = kind(value)
    return out


def register_variant(name: str, options: dict[str, Any]) -> None:
    """Add a GradTail variant to ``METHODS`` (the registry the training loop reads)."""
    if name in METHODS:
        raise SystemExit(f"--variant NAME must be new; Received: {name!r}, already a method.")
    text = ", ".join(f"{k}={v}" for k, v in options.items()) or "no changes"

    if {"last_layer", "gamma", "tau"} & set(options):
        if not {"last_layer", "gamma"} <= set(options) <= {"last_layer", "gamma", "tau"}:
            raise SystemExit(
                f"--variant {name}: a last-layer variant takes last_layer=p_true|alignment|none, gamma=G "
                f"and optionally tau=T (logit adjustment) alone; Received: {sorted(options)}."
            )
        if options["last_layer"] not in ("p_true", "alignment", "none"):
            raise SystemExit(
                f"--variant {name}: last_layer must be p_true, alignment or none; "
                f"Received: {options['last_layer']!r}."
            )
        tau = options.get("tau")
        gamma = options["gamma"]
        if not (math.isfinite(gamma) and gamma >= 0) or (tau is not None and not math.isfinite(tau)):
            raise SystemExit(
                f"--variant {name}: gamma must be finite and >= 0, tau finite; Received: gamma={gamma}, "
                f"tau={tau}."
            )
        adjusted = f", on the logit-adjusted loss (tau {tau:g})" if tau is not None else ""
        fixed = {"score": options["last_layer"], "gamma": options["gamma"]}

        def make_last_layer(ctx: Context, **more: Any) -> Weighting:
            if tau is None:
                return LastLayerRetraining(ctx, **(fixed | more))
            return LogitAdjustedLastLayer(ctx, **({"tau": tau} | fixed | more))

        label = {
            "none": "plain last-layer retraining",
            "p_true": f"AFR-style, gamma {gamma:g}",
            "alignment": f"GradTail last-layer retraining, gamma {gamma:g}",
        }[options["last_layer"]] + (", logit-adjusted" if tau is not None else "")
        METHODS[name] = Method(
            name,
            label,
            f"last-layer retraining (as afr) with score {options['last_layer']}, gamma {options['gamma']:g}"
            + adjusted,
            make_last_layer,
            version=LAST_LAYER_VERSION if options["last_layer"] == "alignment" else 0,
            uses_class_counts=tau is not None,
            options=dict(options),
        )
        return

    def make(ctx: Context, **more: Any) -> Weighting:
        opts = dict(options) | more
        warmup_epochs = opts.pop("warmup_epochs", None)
        if warmup_epochs is not None:
            opts["warmup_steps"] = round(warmup_epochs * ctx.steps_per_epoch)
        return GradTailWeighting(ctx, **opts)

    METHODS[name] = Method(
        name,
        f"GradTail variant {name}",
        f"GradTail (defaults) with {text}",
        make,
        gradtail=True,
        options=dict(options),
    )


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
        default=None,
        metavar="NAME",
        help="methods (benchmarks/longtail/methods.py), from "
        + ", ".join(METHODS)
        + " (default: "
        + " ".join(SUITE_METHODS)
        + "; uniform always runs first, every delta is paired with it; "
        "on a hidden-stratification set the class-count methods are skipped, whose weights "
        "are all 1 there, i.e. uniform)",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="seeds for every data set (default per data set: "
        + ", ".join(f"{k} {list(v.seeds)}" for k, v in DATASETS.items())
        + "; --quick: [0])",
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
    p.add_argument(
        "--arch",
        choices=ARCHS,
        default="mlp",
        help="the model (benchmarks/longtail/models.py; default: mlp). cnn and vit need 28x28 images "
        "(the Fashion-MNIST sets); they write benchmark longtail_ARCH (default JSON "
        "benchmarks/results/longtail_ARCH.json) and default to the methods "
        + " ".join(ARCH_METHODS)
        + ", without GradTail(model) where gradtail_torch cannot track the model",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs in parallel, one process each with --threads threads (default: 1); more jobs "
        "make seconds/epoch noisier, not the accuracies",
    )
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME [KEY=VALUE ...]",
        help="add a GradTail variant as a method NAME (repeatable): GradTail options as KEY=VALUE "
        f"({', '.join(sorted(VARIANT_KEYS))}), e.g. --variant head_w5 head_only=true max_weight=5; "
        "warmup_epochs replaces the suite's --warmup-epochs for it",
    )
    p.add_argument("--quick", action="store_true", help="1 seed, few epochs: a smoke run, < 3 minutes")
    p.add_argument(
        "--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT}; --quick {QUICK_OUT})"
    )
    p.add_argument(
        "--figures-dir", type=Path, default=None, help="PNG output (default: figures/ beside --out)"
    )
    p.add_argument("--no-figures", action="store_true", help="write no figures")
    p.add_argument(
        "--sweep",
        action="store_true",
        help=f'a variant sweep: the JSON is benchmark "{SWEEP_BENCHMARK}" (its own table in '
        "docs/benchmarks.md, variants ranked by validation only)",
    )
    p.add_argument(
        "--variants-table",
        action="store_true",
        help=f'the JSON is benchmark "{VARIANTS_BENCHMARK}" (default '
        f"benchmarks/results/{VARIANTS_BENCHMARK}.json; its own section in docs/benchmarks.md, the "
        "suite's usual table): for variants set beside the defaults without replacing the main table",
    )
    p.add_argument("--note", default=None, help="free text stored in the JSON (e.g. why epochs were cut)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="JSON-lines file: every finished run is appended to it, and runs already in it with "
        "the same key (data set, seed, method and its options, epochs, warm-up, GradTail defaults) "
        "are reused instead of rerun (training is deterministic), so an interrupted or extended "
        "run picks up where it stopped",
    )
    p.add_argument(
        "--reuse",
        type=Path,
        nargs="+",
        default=[],
        help="more --checkpoint files to reuse runs from (read only; e.g. from runs in parallel)",
    )
    args = p.parse_args(argv)
    args.methods_given = args.methods is not None
    args.arch_skipped = {}
    if args.arch != "mlp" and args.sweep:
        p.error("--sweep chooses the MLP's defaults; it takes no --arch")
    if args.variants_table and (args.sweep or args.arch != "mlp"):
        p.error("--variants-table is the MLP's table of variants; it takes neither --sweep nor --arch")
    if args.methods is None and args.arch != "mlp":
        args.methods = list(ARCH_METHODS)
        reason = whole_model_gradtail_error(args.arch)
        if reason is not None:
            args.arch_skipped = {m: reason for m in args.methods if m == "gradtail"}
            args.methods = [m for m in args.methods if m not in args.arch_skipped]
    elif args.methods is None:
        args.methods = list(SUITE_METHODS)
    for spec in args.variant:
        register_variant(spec[0], parse_variant_options(spec[1:]))
        if spec[0] not in args.methods:
            args.methods.append(spec[0])
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    args.seeds_given = args.seeds is not None
    if args.out is None:
        default, quick = DEFAULT_OUT, QUICK_OUT
        if args.arch != "mlp":
            default = default.with_name(f"longtail_{args.arch}.json")
            quick = quick.with_name(f"longtail_{args.arch}_quick.json")
        if args.variants_table:
            default = default.with_name(f"{VARIANTS_BENCHMARK}.json")
            quick = quick.with_name(f"{VARIANTS_BENCHMARK}_quick.json")
        args.out = quick if args.quick else default
    if args.figures_dir is None:
        args.figures_dir = args.out.parent / "figures"
    return args


def benchmark_name(args: argparse.Namespace) -> str:
    """``longtail`` (the MLP), ``longtail_cnn`` / ``longtail_vit``, or ``longtail_sweep``."""
    if args.sweep:
        return SWEEP_BENCHMARK
    if args.variants_table:
        return VARIANTS_BENCHMARK
    return BENCHMARK if args.arch == "mlp" else f"{BENCHMARK}_{args.arch}"


def whole_model_gradtail_error(arch: str) -> str | None:
    """Why ``GradTail(model)`` cannot train ``arch`` (one weighted backward on a tiny batch), or None."""
    from gradtail_torch import GradTail

    torch.manual_seed(0)
    model = build_model(arch, 784, 10)
    gt = GradTail(model, warmup_steps=0)
    try:
        gt.backward(
            torch.nn.functional.cross_entropy(model(torch.rand(4, 784)), torch.arange(4), reduction="none")
        )
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        return f"GradTail(model) fails on arch {arch}: {type(exc).__name__}: {exc}"
    finally:
        gt.remove()
    return None


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
    seeds = {
        d: list(args.seeds) if args.seeds_given else [0] if args.quick else list(DATASETS[d].seeds)
        for d in args.datasets
    }
    datasets_info: dict[str, Any] = {}
    tasks = []
    for dataset in args.datasets:
        split = load_dataset(dataset, seeds[dataset][0])
        data = split.data
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
        if data.sub_train is not None:
            datasets_info[dataset] |= {
                "hidden": True,
                "subclass_names": list(data.subclass_names),
                "rare_subclasses": list(data.rare_subclasses),
                "subclass_counts": np.bincount(data.sub_train, minlength=len(data.subclass_names)).tolist(),
            }
        steps = int(np.ceil(len(data.y_train) / 128)) * epochs[dataset]
        # Class counts are equal on a hidden-stratification set: the class-count methods are
        # uniform weighting there (logit adjustment a constant shift), so they never run.
        skip = DATASETS[dataset].hidden
        tasks += [
            (dataset, s, m, epochs[dataset], steps)
            for s in seeds[dataset]
            for m in methods
            if not (skip and METHODS[m].uses_class_counts)
        ]
    rows, n_reused = run_tasks(
        tasks, functools.partial(load_and_run, _split, run_one), args, key=run_key, read=args.reuse
    )
    add_deltas(rows)
    machine |= _meta.load_fields(load_before, _meta.load_average())
    deviations = _meta.deviations(
        args.quick,
        epochs=(epochs, {d: DATASETS[d].epochs for d in args.datasets}),
        seeds=(seeds, {d: list(DATASETS[d].seeds) for d in args.datasets}),
    )
    doc: dict[str, Any] = {
        **_meta.run_header(
            benchmark_name(args),
            SCHEMA_VERSION,
            _meta.command_line(argv, prog="python -m benchmarks.longtail.run"),
            quick=bool(args.quick),
        ),
        "wall_seconds": time.perf_counter() - start,
        "dtype": "float32",
        "machine": machine,
        "config": {
            **({} if args.arch == "mlp" else {"arch": args.arch}),
            "model": ARCH_TEXT[args.arch],
            "optimizer": "Adam, lr 1e-3",
            "batch_size": 128,
            "epochs": epochs,
            "seeds": seeds,
            "warmup_epochs": args.warmup_epochs,
            "late_fraction": LATE_FRACTION,
            "split": "balanced test pool split per class into validation and test halves "
            f"(seed {SPLIT_SEED}); the long-tailed training subsample and the initialisation follow "
            "the run seed",
            "metrics": "accuracies in percent on the test half; each after the last epoch, as the "
            f"late mean (the mean over the last {100 * LATE_FRACTION:g}% of epochs, a fixed set) and at "
            "the selected epoch (the epoch of best validation balanced accuracy of that run: "
            "validation-based selection, the test half is only read at the chosen epoch); deltas in "
            "percentage points, paired with uniform of the same data set and seed; hidden-"
            "stratification sets: balanced accuracy over the superclasses, rare_subclass = mean "
            "accuracy over the rare subclasses' test images, worst_subclass = the lowest subclass "
            "accuracy (their test and validation halves are split per subclass)",
            "selection": "per run, the epoch with the highest validation balanced accuracy (earliest on "
            "ties); validation never sees the test half, and no method option is chosen on test",
            "seconds_per_epoch": "training steps only (slicing, forward, weighting, backward, Adam step), "
            f"{args.threads} intra-op thread(s); excludes recording and evaluation",
            "tail_detection": {
                "marks": list(args.marks),
                "window": args.window,
                "text": "AUROC of a per-example score for membership in the tail (a few-shot class; "
                "a rare subclass on hidden-stratification sets), over every training example of the "
                "steps in (mark - window, mark] of training: -alignment for GradTail (its own training "
                "run), the loss (before the step's update) for every method",
            },
            "gradtail_defaults": _meta.gradtail_defaults(
                f"{gradtail_ops.DEFAULT_WARMUP_STEPS} in the library; the suite passes "
                "one epoch (the recommended setting)"
            ),
        },
        "deviations": deviations or None,
        "note": args.note,
        **({"methods_skipped": args.arch_skipped} if args.arch_skipped else {}),
        "checkpoint": None
        if args.checkpoint is None
        else {
            "path": rel(args.checkpoint),
            "reuse": [rel(p) for p in args.reuse],
            "reused_runs": n_reused,
            "new_runs": len(tasks) - n_reused,
        },
        "methods": {
            m: {
                "label": METHODS[m].label,
                "description": METHODS[m].description,
                "uses_class_counts": METHODS[m].uses_class_counts,
                "gradtail": METHODS[m].gradtail,
                "options": METHODS[m].options,
            }
            for m in methods
        },
        "datasets": datasets_info,
        "runs": rows,
        "aggregates": aggregate(rows),
    }
    doc = clean(doc)
    if not args.no_figures:
        from .figures import make_figures

        doc["figures"] = [rel(p) for p in make_figures(doc, args.figures_dir)]
    _meta.write_json(args.out, doc, dumps=dumps)
    print(summary(doc))
    figures = f"; figures: {', '.join(doc['figures'])}" if doc.get("figures") else ""
    print(f"JSON: {rel(args.out)}{figures}")
    return 0


def _delta_text(d: dict[str, Any], key: str, n: int, label: str) -> str:
    if key not in d:
        return ""
    v = d[key]
    return f" {label} {v['mean']:+6.2f} ± {v['std']:.2f} ({v['n_positive']}/{n})"


def summary(doc: dict[str, Any]) -> str:
    """A plain-text table of the aggregates (what the renderer writes as Markdown)."""
    lines = []
    for agg in doc["aggregates"]:
        d = agg["delta_vs_uniform"]
        bal = agg["test"]["selected_balanced_accuracy"]
        n = agg["n_seeds"]
        delta = ""
        if d is not None:
            delta = (
                _delta_text(d, "selected_balanced_accuracy", n, "d_sel")
                + _delta_text(d, "late_balanced_accuracy", n, "d_late")
                + _delta_text(d, "selected_few", n, "d_few")
                + _delta_text(d, "selected_rare_subclass", n, "d_rare")
                + _delta_text(d, "selected_worst_subclass", n, "d_worst")
                + _delta_text(d, "val_late_balanced_accuracy", n, "d_val_late")
            )
        td = agg["tail_detection"].get("alignment") or {}
        aur = " ".join(f"{m}:{v['mean']:.2f}" for m, v in td.items() if v["mean"] is not None)
        lines.append(
            f"{agg['dataset']:<14} {agg['method']:<24} sel {bal['mean']:6.2f} ± {bal['std']:.2f}{delta}"
            + (f"  AUROC(-align) {aur}" if aur else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

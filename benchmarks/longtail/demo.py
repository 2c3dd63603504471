"""`make demo`: GradTail at work on real long-tailed data, against uniform and inverse-frequency
weighting. Prints a table and writes a figure; honest whatever the numbers are."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import LongTailData, digits_lt, fashion_mnist_available, fashion_mnist_lt
from .train import METHODS, RunResult, train

LABELS = {
    "uniform": "uniform",
    "inverse_frequency": "inverse class frequency (uses labels)",
    "gradtail": "GradTail (defaults)",
}


def load(dataset: str) -> tuple[LongTailData, int]:
    if dataset == "fashion" or (dataset == "auto" and fashion_mnist_available()):
        return fashion_mnist_lt(imbalance=100.0), 12
    if dataset == "auto":
        print("Fashion-MNIST (Debian package dataset-fashion-mnist) is not available here: using digits-LT.")
    return digits_lt(imbalance=10.0), 60


def table(data: LongTailData, results: list[RunResult]) -> str:
    head = f"{'method':<40} {'acc':>6} {'bal.acc':>8} {'many':>6} {'medium':>7} {'few':>6} {'s/epoch':>8}"
    rows = [head, "-" * len(head)]
    for r in results:
        g = r.group_accuracy
        rows.append(
            f"{LABELS[r.method]:<40} {100 * r.accuracy:6.1f} {100 * r.balanced_accuracy:8.1f} "
            f"{100 * g['many']:6.1f} {100 * g['medium']:7.1f} {100 * g['few']:6.1f} "
            f"{r.seconds_per_epoch:8.2f}"
        )
    return "\n".join(rows)


def figure(data: LongTailData, results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-data.counts, kind="stable")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(results)
    for k, r in enumerate(results):
        left.bar(
            np.arange(len(order)) + k * width,
            100 * r.per_class_accuracy[order],
            width,
            label=LABELS[r.method],
        )
    left.set_xticks(np.arange(len(order)) + 0.4 - width / 2)
    left.set_xticklabels(
        [f"{data.class_names[c]}\n(n={data.counts[c]})" for c in order], fontsize=7, rotation=45
    )
    left.set(ylabel="test accuracy (%)", title=f"Per-class accuracy, {data.name}, classes by training count")
    left.legend(fontsize=8)
    trace = next((r.trace for r in results if r.trace), None)
    if trace and trace["alignment"]:
        align, weight = np.asarray(trace["alignment"]), np.asarray(trace["weight"])
        group = np.asarray(trace["group"])
        for g, colour in (("many", "tab:blue"), ("medium", "tab:orange"), ("few", "tab:red")):
            sel = group == g
            right.scatter(align[sel], weight[sel], s=4, alpha=0.3, color=colour, label=f"{g}-shot classes")
        right.set(
            xlabel="alignment cos(g_i, G) over training",
            ylabel="weight",
            title="GradTail: weight against alignment",
        )
        right.legend(fontsize=8, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=("auto", "fashion", "digits"), default="auto")
    parser.add_argument(
        "--epochs", type=int, default=None, help="defaults: 12 (Fashion-MNIST-LT), 60 (digits-LT)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/demo"))
    args = parser.parse_args(argv)
    # One intra-op thread: these GEMMs are small, and two threads stall badly whenever another
    # process holds a core (measured: 10x slower steps on a shared 2-core machine).
    torch.set_num_threads(1)
    data, epochs = load(args.dataset)
    epochs = args.epochs or epochs
    print(
        f"Data: {data.name}: {len(data.y_train)} training examples, class counts {data.counts.tolist()}; "
        f"balanced test set of {len(data.y_test)}."
    )
    print(
        "Model: MLP, Adam 1e-3, batch 128; GradTail tracks every Linear layer with the library's defaults "
        "and a one-epoch warm-up."
    )
    steps = epochs * int(np.ceil(len(data.y_train) / 128))
    results = []
    for method in METHODS:
        with tqdm(total=steps, desc=f"{method:<18}", file=sys.stdout, leave=True) as bar:
            results.append(train(data, method, seed=args.seed, epochs=epochs, progress=bar))
    print()
    print(table(data, results))
    base = results[0]
    gt_result = results[-1]
    d_bal = 100 * (gt_result.balanced_accuracy - base.balanced_accuracy)
    d_few = 100 * (gt_result.group_accuracy["few"] - base.group_accuracy["few"])
    print(
        f"\nGradTail vs uniform: balanced accuracy {d_bal:+.1f} pp, few-shot {d_few:+.1f} pp "
        "(one seed; docs/benchmarks.md has multi-seed results)."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "demo.png"
    figure(data, results, path)
    print(f"Figure: {path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

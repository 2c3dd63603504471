"""The sketched reference (``sketch_rank``) against the exact one: speed, memory and accuracy.

Three measurements, side by side in one run, on one machine (recorded in the JSON):

1. ``every_layer``: the MLP 784 -> 1024 -> 1024 -> 512 -> 1000, B = 256, one thread: a plain
   step, ``GradTail(model.head)``, ``GradTail(model)`` exact and sketched (``gt.backward``);
   median step time over interleaved repeats and the step's peak live memory (persistent
   tensors: parameters, gradients and GradTail state, plus the allocator's peak growth
   inside the step), each as a ratio to the plain step.
2. ``lm_head``: a 4096 -> 32,000 head without bias (B = 8 sequences, T = 128 tokens, one
   loss per sequence): reference state of the sketch against the exact one, step time
   against a plain step of that head, and the alignment difference on the same steps.
3. ``accuracy``: the long-tail suite's MLP (784 -> 512 -> 256 -> 10) trained on
   Fashion-MNIST-LT r=100 (digits-LT when Fashion-MNIST is not installed) with the exact
   GradTail, a sketched GradTail scoring the same forwards: alignment difference, rank
   correlation of the weights and the few-shot tail-detection AUROC of both.

Run: ``python -m benchmarks.sketch_reference`` (about 10 minutes on 2 cores; ``--quick`` for
a smoke run). Results: ``benchmarks/results/sketch_reference.json``; the section of
docs/benchmarks.md is generated from it by ``benchmarks/render_tables.py``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._meta import (
    git_state,
    load_average,
    load_fields,
    machine_info,
    round_robin,
    timed,
    utc_timestamp,
    write_json,
)
from benchmarks.torch_overhead import profiler_peak
from gradtail_torch import GradTail

RESULTS = Path(__file__).parent / "results" / "sketch_reference.json"
QUICK = Path("results") / "sketch_reference_quick.json"
MLP_DIMS = (784, 1024, 1024, 512, 1000)
RANK = 16
#: The LM head's rank: with the default co-range size 2k + 1 its state is 1.7% of the exact
#: reference (the target allows 2%); k = 16 left a max alignment error of 0.024 there.
LM_RANK = 20
DEVICE = torch.device("cpu")  # --device cuda for scripts/gpu_check.sh


def _mlp(dims: Sequence[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(dims):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(DEVICE)


def _state_bytes(gt: GradTail | None) -> int:
    if gt is None:
        return 0
    tensors = [t for layer in gt.state.mean for t in layer]
    tensors += [t for f in (gt._state.sketch or ()) if f is not None for t in f]
    return sum(t.numel() * t.element_size() for t in tensors)


def _persistent_bytes(model: nn.Module, gt: GradTail | None) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * params + _state_bytes(gt)  # parameters and their gradients


def _median_times(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    def run(name: str) -> float:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return timed(lambda: (steps[name](), torch.cuda.synchronize() if DEVICE.type == "cuda" else None))

    times = round_robin(list(steps), repeats, run)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _peak_growth(step: Callable[[], None]) -> int:
    """The allocator's peak growth during one step (the CUDA allocator's on a GPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    return profiler_peak(step)[0]


def every_layer(batch: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, MLP_DIMS[0], generator=g).to(DEVICE)
    y = torch.randint(0, MLP_DIMS[-1], (batch,), generator=g).to(DEVICE)
    variants: dict[str, tuple[nn.Module, GradTail | None]] = {}
    for name in ("plain", "head", "head_sketch", "every_layer_exact", "every_layer_sketch"):
        model = _mlp(MLP_DIMS, seed=0)
        gt = None
        if name == "head":
            gt = GradTail(model[-1])
        elif name == "head_sketch":
            gt = GradTail(model[-1], sketch_rank=RANK)
        elif name == "every_layer_exact":
            gt = GradTail(model)
        elif name == "every_layer_sketch":
            gt = GradTail(model, sketch_rank=RANK)
        variants[name] = (model, gt)

    def stepper(model: nn.Module, gt: GradTail | None) -> Callable[[], None]:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, reduction="none")
            if gt is None:
                loss.mean().backward()
            else:
                gt.backward(loss)
            opt.step()

        return step

    steps = {name: stepper(*mv) for name, mv in variants.items()}
    for step in steps.values():
        for _ in range(3):
            step()
    medians = _median_times(steps, repeats)
    out: dict[str, Any] = {"batch": batch, "dims": list(MLP_DIMS), "repeats": repeats, "variants": {}}
    for name, (model, gt) in variants.items():
        peak_growth = _peak_growth(steps[name])
        out["variants"][name] = {
            "step_seconds": medians[name],
            "state_bytes": _state_bytes(gt),
            "peak_bytes": _persistent_bytes(model, gt) + peak_growth,
            "sketched_layers": None
            if gt is None or gt._state.sketch is None
            else sum(f is not None for f in gt._state.sketch),
        }
    plain = out["variants"]["plain"]
    for entry in out["variants"].values():
        entry["time_ratio"] = entry["step_seconds"] / plain["step_seconds"]
        entry["memory_ratio"] = entry["peak_bytes"] / plain["peak_bytes"]
    return out


def lm_head(batch: int, steps: int, repeats: int, d_in: int = 4096, vocab: int = 32_000) -> dict[str, Any]:
    torch.set_num_threads(1)
    tokens = 128
    g = torch.Generator().manual_seed(1)
    # Hidden states with structure (a few shared directions) and Zipf-distributed targets.
    basis = torch.randn(8, d_in, generator=g)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)

    def batch_data() -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.randn(batch, tokens, 8, generator=g) @ basis + 0.5 * torch.randn(
            batch, tokens, d_in, generator=g
        )
        target = torch.multinomial(probs, batch * tokens, replacement=True, generator=g).reshape(
            batch, tokens
        )
        return h, target

    def per_sequence_loss(head: nn.Linear, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        return (
            F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), reduction="none")
            .reshape(batch, -1)
            .mean(1)
        )

    torch.manual_seed(2)
    head = nn.Linear(d_in, vocab, bias=False).to(DEVICE)
    exact, sketch = GradTail(head, decay=0.99), GradTail(head, decay=0.99, sketch_rank=LM_RANK)
    diffs, corr = [], []
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(steps):  # both score the same forward; the exact weights train
        h, target = batch_data()
        loss = per_sequence_loss(head, h, target)
        w_exact = exact.weights(loss)
        sketch.weights(loss)
        opt.zero_grad(set_to_none=True)
        (w_exact * loss).mean().backward()
        opt.step()
        if int(exact.state.count) > 1:
            a, b = exact.last_alignment.cpu().numpy(), sketch.last_alignment.cpu().numpy()
            diffs.append(float(np.abs(a - b).max()))
            corr.append(float(np.corrcoef(a, b)[0, 1]))
    state_ratio = _state_bytes(sketch) / _state_bytes(exact)
    exact.remove()
    sketch.remove()

    h, target = batch_data()
    timed: dict[str, Callable[[], None]] = {}
    for name in ("plain", "exact", "sketch"):
        torch.manual_seed(2)
        layer = nn.Linear(d_in, vocab, bias=False)
        gt = (
            None
            if name == "plain"
            else GradTail(layer, decay=0.99, sketch_rank=LM_RANK if name == "sketch" else None)
        )

        def step(layer: nn.Linear = layer, gt: GradTail | None = gt) -> None:
            layer.weight.grad = None
            loss = per_sequence_loss(layer, h, target)
            if gt is None:
                loss.mean().backward()
            else:
                gt.backward(loss)

        timed[name] = step
    for step in timed.values():
        step()
        step()
    medians = _median_times(timed, repeats)
    return {
        "batch": batch,
        "tokens": tokens,
        "d_in": d_in,
        "vocab": vocab,
        "rank": LM_RANK,
        "state_ratio": state_ratio,
        "alignment_max_abs_diff": max(diffs) if diffs else None,
        "alignment_correlation_min": min(corr) if corr else None,
        "scored_steps": len(diffs),
        "step_seconds": medians,
        "time_ratio_exact": medians["exact"] / medians["plain"],
        "time_ratio_sketch": medians["sketch"] / medians["plain"],
    }


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive < score of a negative): low alignment should mean tail."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    below = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return 1.0 - below / (len(pos) * len(neg))


def accuracy(epochs: int, seed: int) -> dict[str, Any]:
    from benchmarks.longtail.data import digits_lt, fashion_mnist_available, fashion_mnist_lt

    torch.set_num_threads(2)
    data = fashion_mnist_lt(100.0, seed=seed) if fashion_mnist_available() else digits_lt(10.0, seed=seed)
    x = torch.as_tensor(data.x_train, dtype=torch.float32)
    y = torch.as_tensor(data.y_train)
    few = np.asarray(data.groups)[data.y_train] == "few"
    model = _mlp((x.shape[1], 512, 256, len(data.class_names)), seed=seed)
    exact, sketch = GradTail(model), GradTail(model, sketch_rank=RANK)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = 128
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(x) // batch
    records: list[dict[str, float]] = []
    early_exact: list[tuple[np.ndarray, np.ndarray]] = []
    early_sketch: list[tuple[np.ndarray, np.ndarray]] = []
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        for k in range(steps_per_epoch):
            index = order[k * batch : (k + 1) * batch]
            loss = F.cross_entropy(model(x[index]), y[index], reduction="none")
            w_exact = exact.weights(loss)
            w_sketch = sketch.weights(loss)
            opt.zero_grad(set_to_none=True)
            (w_exact * loss).mean().backward()
            opt.step()
            if int(exact.state.count) <= 1:
                continue
            a, b = exact.last_alignment.numpy(), sketch.last_alignment.numpy()
            ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
            records.append(
                {
                    "max_abs_diff": float(np.abs(a - b).max()),
                    "mean_abs_diff": float(np.abs(a - b).mean()),
                    "rank_corr": float(np.corrcoef(ra, rb)[0, 1]),
                    "weights_agree": float(np.mean(w_exact.numpy() == w_sketch.numpy())),
                }
            )
            if epoch * steps_per_epoch + k < max(2, steps_per_epoch * epochs // 10):
                early_exact.append((a, few[index]))
                early_sketch.append((b, few[index]))

    def pooled_auroc(chunks: list[tuple[np.ndarray, np.ndarray]]) -> float:
        return _auroc(np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))

    sketched = [f is not None for f in (sketch._state.sketch or ())]
    return {
        "dataset": data.name,
        "epochs": epochs,
        "seed": seed,
        "rank": RANK,
        "sketched_layers": sketched,
        "state_ratio": _state_bytes(sketch) / _state_bytes(exact),
        "steps": len(records),
        "alignment_max_abs_diff": max(r["max_abs_diff"] for r in records),
        "alignment_mean_abs_diff": statistics.mean(r["mean_abs_diff"] for r in records),
        "rank_corr_min": min(r["rank_corr"] for r in records),
        "rank_corr_mean": statistics.mean(r["rank_corr"] for r in records),
        "weights_agree_mean": statistics.mean(r["weights_agree"] for r in records),
        "early_auroc_exact": pooled_auroc(early_exact),
        "early_auroc_sketch": pooled_auroc(early_sketch),
    }


#: The targets of the sketch (our issue "Below the exact floor"), checked on the JSON.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("every-layer step time vs plain (stretch 1.25)", "every_layer_time", 1.35),
    ("every-layer peak memory vs plain", "every_layer_memory", 1.30),
    ("head alone (sketched) step time vs plain", "head_time", 1.15),
    ("LM head: sketch state / exact state", "lm_state", 0.02),
    ("LM head: max abs alignment difference", "lm_alignment", 0.02),
    ("LM head: step time vs plain", "lm_time", 1.10),
    ("long-tail MLP: max abs alignment difference", "lt_alignment", 0.02),
    ("long-tail MLP: few-shot AUROC difference", "lt_auroc", 0.01),
)


def target_values(doc: dict[str, Any]) -> dict[str, float | None]:
    """The measured value of each target (None where that part was not run)."""
    sketch, lm, ac = doc["every_layer"]["variants"]["every_layer_sketch"], doc["lm_head"], doc["accuracy"]
    return {
        "every_layer_time": sketch["time_ratio"],
        "every_layer_memory": sketch["memory_ratio"],
        "head_time": doc["every_layer"]["variants"].get("head_sketch", {}).get("time_ratio"),
        "lm_state": lm["state_ratio"],
        "lm_alignment": lm["alignment_max_abs_diff"],
        "lm_time": lm["time_ratio_sketch"],
        "lt_alignment": None if ac is None else ac["alignment_max_abs_diff"],
        "lt_auroc": None if ac is None else abs(ac["early_auroc_exact"] - ac["early_auroc_sketch"]),
    }


def render(doc: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md for this results file."""
    ev, machine = doc["every_layer"], doc["machine"]
    lines = [
        f"Machine: {machine['cpu_model']} ({doc.get('device', 'cpu')}), "
        f"load {machine['loadavg_1min_before']:.1f} before and "
        f"{machine['loadavg_1min_after']:.1f} after; {doc['timestamp']}; sketch rank k = {RANK}.",
        "",
        f"**Every layer of the MLP {' -> '.join(map(str, ev['dims']))}, B = {ev['batch']}, one thread** "
        f"(median of {ev['repeats']} interleaved steps; peak = parameters, gradients and GradTail state "
        "plus the allocator's peak growth in the step):",
        "",
        "| variant | step time vs plain | peak memory vs plain | GradTail state (MB) | sketched layers |",
        "|---|---|---|---|---|",
    ]
    for name, e in ev["variants"].items():
        sketched = "" if e["sketched_layers"] is None else str(e["sketched_layers"])
        lines.append(
            f"| {name} | {e['time_ratio']:.2f}x | {e['memory_ratio']:.2f}x | "
            f"{e['state_bytes'] / 2**20:.1f} | {sketched} |"
        )
    lm = doc["lm_head"]
    lines += [
        "",
        f"**A {lm['d_in']} -> {lm['vocab']:,} head** (B = {lm['batch']} sequences of {lm['tokens']} tokens, "
        f"one loss per sequence; sketch rank k = {lm['rank']}):",
        "",
        "| measure | value |",
        "|---|---|",
        f"| sketch state / exact state | {lm['state_ratio']:.4f} |",
        f"| step time, exact GradTail vs plain | {lm['time_ratio_exact']:.2f}x |",
        f"| step time, sketched GradTail vs plain | {lm['time_ratio_sketch']:.2f}x |",
        f"| max abs alignment difference ({lm['scored_steps']} steps) | {lm['alignment_max_abs_diff']:.4f} |",
    ]
    values = target_values(doc)
    lines += [
        "",
        "**Targets** (met when the value is at most the bound):",
        "",
        "| target | bound | value | met |",
    ]
    lines.append("|---|---|---|---|")
    for text, key, bound in TARGETS:
        value = values[key]
        shown = "not run" if value is None else f"{value:.4f}"
        met = "" if value is None else ("yes" if value <= bound else "**no**")
        lines.append(f"| {text} | {bound:g} | {shown} | {met} |")
    ac = doc["accuracy"]
    if ac is None:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"**Accuracy on {ac['dataset']}** (the suite's MLP, {ac['epochs']} epochs, seed {ac['seed']}; "
        f"sketched layers {ac['sketched_layers']}, state {ac['state_ratio']:.3f} of exact):",
        "",
        "| measure | value |",
        "|---|---|",
        f"| max abs alignment difference, all {ac['steps']} steps | {ac['alignment_max_abs_diff']:.4f} |",
        f"| mean abs alignment difference | {ac['alignment_mean_abs_diff']:.5f} |",
        f"| rank correlation of the alignments (min / mean) | {ac['rank_corr_min']:.4f} / "
        f"{ac['rank_corr_mean']:.4f} |",
        f"| share of equal weights (rank curve) | {ac['weights_agree_mean']:.4f} |",
        f"| few-shot AUROC, first 10% of training: exact / sketch | {ac['early_auroc_exact']:.3f} / "
        f"{ac['early_auroc_sketch']:.3f} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small smoke run (results/ folder, not committed)"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (scripts/gpu_check.sh)")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the speed and memory parts")
    args = parser.parse_args(argv)
    quick = args.quick
    global DEVICE
    DEVICE = torch.device(args.device)
    before = load_average()
    results = {
        "every_layer": every_layer(batch=32 if quick else 256, repeats=3 if quick else 15),
        "lm_head": lm_head(
            batch=2 if quick else 8,
            steps=3 if quick else 11,
            repeats=1 if quick else 3,
            d_in=512 if quick else 4096,
            vocab=4000 if quick else 32_000,
        ),
        "accuracy": None if args.skip_accuracy else accuracy(epochs=1 if quick else 4, seed=0),
    }
    fields = load_fields(before, load_average())
    git = git_state({"dirty_library": ["gradtail_ops", "adapters"]})
    doc = {
        "benchmark": "sketch_reference",
        "timestamp": utc_timestamp(),
        "machine": machine_info({"torch": torch.__version__}, git=git, fields=fields),
        "quick": quick,
        "device": str(DEVICE),
        **results,
    }
    out = args.out or (QUICK if quick else RESULTS)
    write_json(out, doc)
    print(render(doc))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

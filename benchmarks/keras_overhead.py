"""``model.fit`` epoch time with ``gradtail_keras.GradTailCallback`` against without, per Keras backend.

For each backend (``torch``, ``jax``; one subprocess each, as Keras fixes its backend at import)
and each of two MLPs (ReLU, softmax head: the tracked layer), two copies of the model start from
the same weights: ``mlp_512x1000``, 784 -> 1024 -> 1024 -> 512 -> 1000, the model of the torch
and JAX overhead benchmarks, and ``mlp_small``, 784 -> 512 -> 256 -> 10, where the callback's
fixed cost weighs more. Adam, sparse categorical cross-entropy, batch 128, random inputs with
long-tailed (Zipf) labels. After a warm-up epoch each (it compiles the step on JAX),
``fit(epochs=1)`` calls of the two alternate, the order rotating every round; each reports the
median epoch time. The target: the callback's epoch at most 1.2x the plain one (issue #5). The
callback runs with the library defaults; Keras' progress bar is off (``verbose=0``) in both.

Usage::

    .venv/bin/python benchmarks/keras_overhead.py            # full run (both backends), a few minutes
    .venv/bin/python benchmarks/keras_overhead.py --quick    # smoke run, < 60 s
    .venv/bin/python benchmarks/render_tables.py             # the table into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "adapters"):  # run from a checkout without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchmarks import _meta  # noqa: E402
from benchmarks._render import (  # noqa: E402
    fmt_check,
    fmt_ratio,
    fmt_seconds,
    fmt_target,
    machine_line,
    table,
)

BENCHMARK = "keras_overhead"
SCHEMA_VERSION = 1
DEFAULT_OUT = Path("benchmarks/results/keras_overhead.json")
QUICK_OUT = Path("results/keras_overhead_quick.json")
BACKENDS = ("torch", "jax")
MODELS = {"mlp_512x1000": (784, 1024, 1024, 512, 1000), "mlp_small": (784, 512, 256, 10)}
TARGET_VALUE = 1.2
TARGET = {"op": "<=", "value": TARGET_VALUE, "text": "fit epoch with GradTailCallback / without <= 1.2"}
TIMING_METHOD = (
    "one fit(epochs=1, verbose=0) call per model and round, perf_counter around the call; the two "
    "models alternate with the order rotating each round, after one untimed warm-up epoch each; "
    "median over rounds. Paired: median over rounds of the per-round ratio; min-based: ratio of the "
    "fastest epochs. One process per backend, one intra-op thread. Also recorded (not the checked "
    "ratio): the process CPU time of each epoch (time.process_time), which leaves out the time the "
    "process waits for a core, so its ratios move less with the load of other processes."
)


def check(value: float, min_based: float, paired: float) -> dict[str, Any]:
    """The verdict on the ratio of medians; noise-bound when a robust ratio lands on the other side."""
    return _meta.target_check("epoch_ratio", TARGET, value, min_based=min_based, paired=paired)


# ------------------------------------------------------------------------------ worker
def worker(opts: argparse.Namespace) -> dict[str, Any]:
    """Time both models on this process's backend (KERAS_BACKEND is set by the parent)."""
    import numpy as np

    if os.environ["KERAS_BACKEND"] == "torch":
        import torch

        torch.set_num_threads(1)
    import keras

    backend_lib = "torch" if keras.backend.backend() == "torch" else "jax"
    lib = __import__(backend_lib)
    versions = {"keras": keras.__version__, backend_lib: lib.__version__, "numpy": np.__version__}
    return {
        "versions": versions,
        "results": [time_model(opts, name, sizes) for name, sizes in MODELS.items()],
    }


def time_model(opts: argparse.Namespace, name: str, sizes: Sequence[int]) -> dict[str, Any]:
    import keras
    import numpy as np

    from gradtail_keras import GradTailCallback

    rng = np.random.default_rng(opts.seed)
    x = rng.normal(size=(opts.examples, sizes[0])).astype("float32")
    freq = 1.0 / np.arange(1, sizes[-1] + 1)  # long-tailed (Zipf) labels
    y = rng.choice(sizes[-1], size=opts.examples, p=freq / freq.sum()).astype("int32")

    def build() -> Any:
        keras.utils.set_random_seed(opts.seed)
        layers = [keras.Input((sizes[0],))]
        layers += [keras.layers.Dense(n, activation="relu") for n in sizes[1:-1]]
        layers += [keras.layers.Dense(sizes[-1], activation="softmax")]
        model = keras.Sequential(layers)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        return model

    models = {"plain": build(), "gradtail": build()}
    callbacks: dict[str, list[Any]] = {"plain": [], "gradtail": [GradTailCallback()]}

    cpu: dict[str, list[float]] = {variant: [] for variant in models}

    def epoch(variant: str) -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        models[variant].fit(x, y, batch_size=opts.batch, epochs=1, verbose=0, callbacks=callbacks[variant])
        cpu[variant].append(time.process_time() - start_cpu)
        return time.perf_counter() - start

    first = {variant: epoch(variant) for variant in models}
    cpu = {variant: [] for variant in models}  # the warm-up epochs are not timed
    times = _meta.round_robin(list(models), opts.repeats, epoch)
    plain, gradtail = times["plain"], times["gradtail"]
    cpu_plain, cpu_gradtail = cpu["plain"], cpu["gradtail"]
    ratio = statistics.median(gradtail) / statistics.median(plain)
    paired = statistics.median(g / p for g, p in zip(gradtail, plain, strict=True))
    min_based = min(gradtail) / min(plain)
    state = callbacks["gradtail"][0].get_state()
    return {
        "backend": keras.backend.backend(),
        "model": name,
        "layers": "->".join(str(n) for n in sizes),
        "head": f"{sizes[-2]}x{sizes[-1]}",
        "steps_per_epoch": -(-opts.examples // opts.batch),
        "first_epoch_seconds": first,
        "seconds": {variant: statistics.median(t) for variant, t in times.items()},
        "seconds_min": {variant: min(t) for variant, t in times.items()},
        "seconds_all": times,
        "repeats": opts.repeats,
        "ratio": ratio,
        "ratio_paired": paired,
        "ratio_min_based": min_based,
        "cpu_seconds": {variant: statistics.median(t) for variant, t in cpu.items()},
        "ratio_cpu": statistics.median(cpu_gradtail) / statistics.median(cpu_plain),
        "ratio_cpu_paired": statistics.median(g / p for g, p in zip(cpu_gradtail, cpu_plain, strict=True)),
        "reference_updates": int(state["count"]),
        "checks": [check(ratio, min_based, paired)],
    }


# ------------------------------------------------------------------------------ parent
def run_backend(backend: str, opts: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    env = dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS="1")
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{backend} worker failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="fit epoch time with gradtail_keras.GradTailCallback vs without, per Keras backend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="fewer examples and rounds: < 60 s")
    _meta.add_out_argument(p, DEFAULT_OUT, QUICK_OUT)
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated Keras backends")
    p.add_argument("--examples", type=int, default=None, help="training examples (default 4096; quick 1024)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; quick 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.examples is None:
        args.examples = 1024 if args.quick else 4096
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    _meta.resolve_out(args, DEFAULT_OUT, QUICK_OUT)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(raw)
    if opts.worker:
        print("RESULT " + json.dumps(worker(opts)), flush=True)
        return 0
    load_before = _meta.load_average()
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    versions: dict[str, str] = {}
    for backend in opts.backends:
        out = run_backend(backend, opts, raw)
        versions.update(out["versions"])
        for entry in out["results"]:
            results.append(entry)
            s = entry["seconds"]
            print(
                f"{backend:6s} {entry['model']:13s} plain {s['plain']:.3f} s, GradTail {s['gradtail']:.3f} s "
                f"per epoch: x{entry['ratio']:.3f} (paired x{entry['ratio_paired']:.3f}, min-based "
                f"x{entry['ratio_min_based']:.3f}; CPU time x{entry['ratio_cpu']:.3f}, paired "
                f"x{entry['ratio_cpu_paired']:.3f})",
                flush=True,
            )
    load_after = _meta.load_average()
    machine = _meta.machine_info(
        versions,
        git=_meta.git_state({"gradtail_ops_dirty": ("gradtail_ops", "adapters/gradtail_keras")}),
        fields={"threads": _meta.threads_info(1, torch="torch.set_num_threads(1)", xla="1 thread")},
    ) | _meta.load_fields(load_before, load_after)
    checks = [c for r in results for c in r["checks"]]
    doc = {
        **_meta.run_header(BENCHMARK, SCHEMA_VERSION, _meta.command_line(argv)),
        "quick": opts.quick,
        "examples": opts.examples,
        "batch": opts.batch,
        "repeats": opts.repeats,
        "seed": opts.seed,
        "dtype": "float32",
        "wall_seconds": time.perf_counter() - started,
        "machine": machine,
        "model": {
            "layers": {name: "->".join(str(n) for n in sizes) for name, sizes in MODELS.items()},
            "activations": "ReLU, softmax head",
            "optimizer": "Adam(1e-3)",
            "loss": "sparse_categorical_crossentropy",
            "gradtail": "GradTailCallback() with the library defaults, tracking the head",
        },
        "method": {"timing": TIMING_METHOD},
        "results": results,
        "summary": _meta.check_summary(checks),
    }
    _meta.write_json(opts.out, doc)
    _meta.print_closing(doc, opts.out, load_before, load_after)
    return 0


# ----------------------------------------------------- render: results/keras_overhead.json


def render(doc: dict[str, Any]) -> str:
    results = doc["results"]
    checks = [c for r in results for c in r.get("checks", [])]
    passed = sum(c["passed"] is True for c in checks)
    versions = doc.get("machine", {}).get("versions", {})
    model = doc.get("model", {})
    out = [machine_line(doc), ""]
    if doc.get("quick"):
        out += ["> **Quick smoke run** (fewer examples and rounds): the target is for the full run.", ""]
    out += [
        f"Models: {', '.join(f'`{k}` {v}' for k, v in (model.get('layers') or {}).items())} "
        f"({model.get('activations', '?')}), {model.get('optimizer', '?')}, {model.get('loss', '?')}; "
        f"{doc.get('examples', '?')} examples, batch {doc.get('batch', '?')}; GradTail: "
        f"{model.get('gradtail', '?')}. Keras {versions.get('keras', '?')}. One epoch = one "
        "`model.fit(..., epochs=1, verbose=0)` call.",
        "",
        f"**{passed} of {len(checks)} targets pass** (verdict on the ratio of medians).",
        "",
        table(
            [
                "backend",
                "model",
                "epoch without",
                "epoch with GradTailCallback",
                f"ratio (target {fmt_target(checks[0]['target'])})" if checks else "ratio",
                "paired",
                "min-based",
                "CPU-time ratio / paired",
                "extra per step",
                "first epoch without / with",
            ],
            (
                [
                    f"`{r['backend']}`",
                    f"`{r['model']}`",
                    fmt_seconds(r["seconds"]["plain"]),
                    fmt_seconds(r["seconds"]["gradtail"]),
                    fmt_check(r["checks"][0]),
                    fmt_ratio(r.get("ratio_paired")),
                    fmt_ratio(r.get("ratio_min_based")),
                    f"{fmt_ratio(r.get('ratio_cpu'))} / {fmt_ratio(r.get('ratio_cpu_paired'))}",
                    fmt_seconds((r["seconds"]["gradtail"] - r["seconds"]["plain"]) / r["steps_per_epoch"]),
                    f"{fmt_seconds(r['first_epoch_seconds']['plain'])} / "
                    f"{fmt_seconds(r['first_epoch_seconds']['gradtail'])}",
                ]
                for r in results
            ),
        ),
        "",
        "*extra per step*: (median epoch with - without) / steps per epoch. *first epoch*: the "
        "warm-up epoch, which includes tracing and compiling the train step (JAX). *CPU-time "
        "ratio*: the same ratios from the process CPU time of each epoch (not the checked value; "
        "less moved by other processes' load).",
    ]
    method = doc.get("method", {})
    if method.get("timing"):
        out += ["", f"Timing: {method['timing']}"]
    out += ["", f"Regenerate: `{doc.get('command', 'python benchmarks/keras_overhead.py')}`, then render."]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())

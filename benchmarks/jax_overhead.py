"""Jitted training-step time of ``gradtail_optax`` against a plain jitted JAX step, on CPU.

One run times a whole jitted training step (forward, loss, gradient, SGD update via optax) of an
MLP 784 -> 1024 -> 1024 -> 512 -> 1000 (ReLU) for three variants that compute the same update:

* ``plain``: ``jax.grad`` of the mean cross-entropy, ``optax.sgd``.
* ``efficient``: the recommended path: one forward under ``jax.vjp``, the head's per-example
  output gradients (``gradtail_optax.loss_and_output_grads``), ``gradtail_optax.head`` (update)
  on the 512x1000 head, then one backward of the weighted loss (cotangent ``w / B``).
* ``transform``: per-example gradients of every parameter (``jax.vmap(jax.grad(...))``), then
  ``optax.chain(gradtail_optax.gradtail(alignment_mask=head only), optax.sgd(...))``: the same
  weights as ``efficient`` (the same leaves are scored), from materialised gradients.

Every variant is one ``jax.jit`` function with donated parameters and state; the variants of one
batch size run interleaved (round robin, rotating the order) and each reports the median.
``jax.jit(...)._cache_size()`` is recorded after timing (1 = compiled once, no retracing), and
XLA's compiled memory analysis (temporary buffer bytes) for each step.

Usage::

    .venv/bin/python benchmarks/jax_overhead.py             # full run (B=64, 256), a few minutes
    .venv/bin/python benchmarks/jax_overhead.py --quick     # smoke run (B=64), < 60 s
    .venv/bin/python benchmarks/render_tables.py            # tables into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "adapters"):  # run from a checkout without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def _threads_from_argv(argv: Sequence[str]) -> int:
    for k, arg in enumerate(argv):
        if arg == "--threads" and k + 1 < len(argv):
            return int(argv[k + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return 1


from benchmarks import _meta  # noqa: E402
from benchmarks._render import (  # noqa: E402
    fmt_bytes,
    fmt_check,
    fmt_ratio,
    fmt_seconds,
    machine_line,
    table,
)

# XLA reads its flags once, at backend start: set them before jax is imported.
THREADS = _threads_from_argv(sys.argv[1:]) if __name__ == "__main__" else 1
if THREADS == 1:
    _meta.xla_thread_flags(1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import gradtail_optax  # noqa: E402

BENCHMARK = "jax_overhead"
SCHEMA_VERSION = 1
DEFAULT_OUT = Path("benchmarks/results/jax_overhead.json")
QUICK_OUT = Path("results/jax_overhead_quick.json")

SIZES = (784, 1024, 1024, 512, 1000)
BATCHES_FULL = (64, 256)
BATCHES_QUICK = (64,)
VARIANTS = ("plain", "efficient", "efficient_sketch", "transform")
VARIANT_TEXT = {
    "plain": "jax.grad of the mean cross-entropy + optax.sgd",
    "efficient": "jax.vjp forward, loss_and_output_grads, head_weights (512x1000 head), one backward "
    "with cotangent w/B + optax.sgd",
    "efficient_sketch": "the efficient path with the sketched reference (sketch_rank=16) for the head",
    "transform": "jax.vmap(jax.grad) per-example gradients of every parameter + "
    "optax.chain(gradtail(alignment_mask=head), optax.sgd)",
}
TARGETS = {
    "efficient_ratio": {
        "op": "<=",
        "value": 1.15,
        "applies": "every B, efficient",
        "text": "efficient-path step / plain jitted step <= 1.15 (512x1000 head scored)",
    },
    "efficient_sketch_ratio": {
        "op": "<=",
        "value": 1.10,
        "applies": "every B, efficient_sketch",
        "text": "efficient path with sketch_rank=16 / plain jitted step <= 1.10",
    },
}
TIMING_METHOD = (
    "time.perf_counter around one call of the jitted step followed by jax.block_until_ready on its "
    "outputs (parameters and state donated, so each call updates in place). Each variant trains its "
    "own copy of the same initial parameters on the same batch; `warmup` calls first (the first one "
    "compiles), then plain and efficient run interleaved round robin with the order rotated every "
    "round; seconds = median over the rounds. The transformation (10-50x slower, allocating GiBs per "
    "call, which slows the calls after it) runs afterwards in its own `transform_repeats` rounds, "
    "interleaved with fresh plain calls that its ratio is taken against. The target's verdict is on "
    "the ratio of medians; min-based = ratio of the fastest calls, paired = median over rounds of the "
    "ratio within a round."
)
MEMORY_METHOD = (
    "XLA's compiled memory analysis of the jitted step (jax.jit(step).lower(...).compile()."
    "memory_analysis()): temp_size_in_bytes, the scratch buffers one call needs beyond its "
    "arguments and outputs."
)


# --------------------------------------------------------------------------- model and steps


def init_params(seed: int) -> list[dict[str, jax.Array]]:
    key = jax.random.key(seed)
    params = []
    for k, (d_in, d_out) in zip(
        jax.random.split(key, len(SIZES) - 1), itertools.pairwise(SIZES), strict=True
    ):
        bound = 1.0 / np.sqrt(d_in)
        kw, kb = jax.random.split(k)
        params.append(
            {
                "kernel": jax.random.uniform(kw, (d_in, d_out), minval=-bound, maxval=bound),
                "bias": jax.random.uniform(kb, (d_out,), minval=-bound, maxval=bound),
            }
        )
    return params


def body(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    return x


def logits_fn(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    return body(params, x) @ params[-1]["kernel"] + params[-1]["bias"]


ce = optax.softmax_cross_entropy_with_integer_labels
HEAD_MASK = [{"kernel": False, "bias": False}] * (len(SIZES) - 2) + [{"kernel": True, "bias": True}]


def make_batch(batch: int, seed: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed + batch)
    x = jnp.asarray(rng.normal(size=(batch, SIZES[0])), jnp.float32)
    return x, jnp.asarray(rng.integers(0, SIZES[-1], batch), jnp.int32)


def make_variant(variant: str, batch: int, lr: float) -> tuple[Callable[..., Any], Callable[[Any], Any]]:
    """(jitted step(params, state, x, y) -> (params, state), init(params) -> state)."""
    sgd = optax.sgd(lr)
    if variant == "plain":

        def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> Any:
            grads = jax.grad(lambda p: ce(logits_fn(p, x), y).mean())(params)
            updates, state = sgd.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        init = sgd.init
    elif variant in ("efficient", "efficient_sketch"):
        ht = gradtail_optax.head(batch_size=batch, sketch_rank=16 if variant == "efficient_sketch" else None)

        def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> Any:
            opt_state, gt = state

            def forward(p: Any) -> Any:
                h = body(p, x)
                logits = h @ p[-1]["kernel"] + p[-1]["bias"]
                return ce(logits, y), (h, logits)

            _, backward, (h, logits) = jax.vjp(forward, params, has_aux=True)
            _, dlogits = gradtail_optax.loss_and_output_grads(ce, logits, y)
            w, _, gt = ht.update(gt, h, dlogits)
            (grads,) = backward(w / batch)
            updates, opt_state = sgd.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), (opt_state, gt)

        def init(params: Any) -> Any:
            return sgd.init(params), ht.init(params[-1])

    elif variant == "transform":
        tx = optax.chain(gradtail_optax.gradtail(batch_size=batch, alignment_mask=HEAD_MASK), sgd)

        def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> Any:
            def example_loss(p: Any, xi: jax.Array, yi: jax.Array) -> jax.Array:
                return ce(logits_fn(p, xi[None]), yi[None])[0]

            grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        init = tx.init
    else:
        raise ValueError(variant)
    return jax.jit(step, donate_argnums=(0, 1)), init


def n_params() -> int:
    return sum(a * b + b for a, b in itertools.pairwise(SIZES))


def temp_bytes(step: Any, params: Any, state: Any, x: Any, y: Any) -> int | None:
    try:
        analysis = step.lower(params, state, x, y).compile().memory_analysis()
        return int(analysis.temp_size_in_bytes)
    except Exception:  # not every backend/version reports it
        return None


def time_batch(batch: int, opts: argparse.Namespace) -> dict[str, Any]:
    """Two phases: the close variants (plain, efficient) interleaved, then the transformation.

    The transformation allocates `B x` the parameters every call (GiBs); timed in the same rounds
    it slows the calls after it (allocator and page-fault work), so it gets its own phase,
    interleaved with fresh plain calls that its ratio is taken against.
    """
    x, y = make_batch(batch, opts.seed)
    runs: dict[str, dict[str, Any]] = {}

    def setup(v: str) -> None:
        step, init = make_variant(v, batch, opts.lr)
        params = init_params(opts.seed)
        runs[v] = {"step": step, "params": params, "state": init(params)}
        runs[v]["temp_bytes"] = temp_bytes(step, runs[v]["params"], runs[v]["state"], x, y)

    def call(v: str) -> float:
        r = runs[v]
        start = time.perf_counter()
        r["params"], r["state"] = r["step"](r["params"], r["state"], x, y)
        jax.block_until_ready((r["params"], r["state"]))
        return time.perf_counter() - start

    def warm_up(v: str) -> float:
        elapsed = 0.0
        for k in range(opts.warmup):
            elapsed = call(v)
            if k == 0:
                runs[v]["first_call_seconds"] = elapsed
        return elapsed

    close = [v for v in opts.variants if v != "transform"]
    for v in close:
        setup(v)
    rounds = _meta.rounds_for(sum(warm_up(v) for v in close), opts.repeats, opts.budget)
    times = _meta.round_robin(close, rounds, call)
    plain_times = {v: times["plain"] for v in close}
    if "transform" in opts.variants:
        setup("transform")
        warm_up("transform")
        phase2 = _meta.round_robin(["plain", "transform"], max(1, opts.transform_repeats), call)
        times["transform"] = phase2["transform"]
        plain_times["transform"] = phase2["plain"]
    return {"times": times, "plain_times": plain_times, "runs": runs}


def agreement(batch: int, opts: argparse.Namespace) -> dict[str, Any]:
    """Max |difference| of the parameters after 3 steps: efficient vs transform (same weights)."""
    out = {}
    for v in ("efficient", "transform"):
        step, init = make_variant(v, batch, opts.lr)
        params = init_params(opts.seed)
        state = init(params)
        for t in range(3):
            xt, yt = make_batch(batch, opts.seed + 1000 * (t + 1))
            params, state = step(params, state, xt, yt)
        weights = optax.tree.get(state, "weights")
        out[v] = (params, weights)
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(out["efficient"][0]), jax.tree.leaves(out["transform"][0]), strict=True
        )
    )
    wdiff = float(jnp.max(jnp.abs(out["efficient"][1] - out["transform"][1])))
    return {"B": batch, "max_abs_param_diff_efficient_vs_transform": diff, "max_abs_weight_diff": wdiff}


def check(key: str, value: float | None, min_based: float | None, paired: float | None) -> dict[str, Any]:
    """The verdict on the ratio of medians; noise-bound when a robust ratio lands on the other side."""
    return _meta.target_check(key, TARGETS[key], value, min_based=min_based, paired=paired)


# --------------------------------------------------------------------------- machine


def machine_info(opts: argparse.Namespace) -> dict[str, Any]:
    import jaxlib

    versions = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
    }
    return _meta.machine_info(
        versions,
        git=_meta.git_state({"gradtail_ops_dirty": ("gradtail_ops", "adapters/gradtail_optax")}),
        fields={
            "jax_backend": jax.default_backend(),
            "threads": _meta.threads_info(opts.threads, xla_flags=os.environ.get("XLA_FLAGS", "")),
        },
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Jitted training-step time of gradtail_optax's efficient path and transformation "
        "vs. a plain jitted JAX step, on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="B=64 only, few repeats: < 60 s")
    _meta.add_out_argument(p, DEFAULT_OUT, QUICK_OUT)
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,256; quick 64)")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per B (default 41; quick 5)")
    p.add_argument(
        "--transform-repeats",
        type=int,
        default=None,
        help="rounds of the slow transformation, timed after the others against fresh plain calls "
        "(default 5; quick 2)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed rounds per B; rounds drop (never below 3) to fit (default 60; quick 5)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls per variant, the first compiles (default 3; quick 2)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="1: XLA CPU runs single-threaded (--xla_cpu_multi_thread_eigen=false "
        "intra_op_parallelism_threads=1, set before jax starts); 0 keeps XLA's default",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")
    args.batches = (
        list(BATCHES_QUICK if args.quick else BATCHES_FULL)
        if args.batches is None
        else [int(b) for b in args.batches.split(",") if b.strip()]
    )
    if args.repeats is None:
        args.repeats = 5 if args.quick else 41
    if args.transform_repeats is None:
        args.transform_repeats = 2 if args.quick else 5
    if args.budget is None:
        args.budget = 5.0 if args.quick else 60.0
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    _meta.resolve_out(args, DEFAULT_OUT, QUICK_OUT)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.threads != THREADS and __name__ == "__main__":
        print("note: --threads takes effect only when given on the command line", file=sys.stderr)
    load_before = _meta.load_average()
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    sanity: list[dict[str, Any]] = []
    for batch in opts.batches:
        t0 = time.perf_counter()
        measured = time_batch(batch, opts)
        times, runs = measured["times"], measured["runs"]
        for v in opts.variants:
            plain = measured["plain_times"][v]
            plain_s = statistics.median(plain)
            sec = statistics.median(times[v])
            entry: dict[str, Any] = {
                "B": batch,
                "variant": v,
                "description": VARIANT_TEXT[v],
                "seconds": sec,
                "seconds_min": min(times[v]),
                "seconds_all": times[v],
                "repeats": len(times[v]),
                "ratio_to_plain": sec / plain_s,
                "ratio_to_plain_min_based": min(times[v]) / min(plain),
                # Median over rounds of this variant's time / the plain step's time in the same round.
                "ratio_to_plain_paired": statistics.median(
                    a / b for a, b in zip(times[v], plain, strict=True)
                ),
                "first_call_seconds": runs[v].get("first_call_seconds"),
                "cache_size": runs[v]["step"]._cache_size(),
                "temp_bytes": runs[v]["temp_bytes"],
            }
            if v == "transform":
                entry["per_example_grad_bytes"] = 4 * batch * n_params()
            target = {"efficient": "efficient_ratio", "efficient_sketch": "efficient_sketch_ratio"}.get(v)
            entry["checks"] = (
                [
                    check(
                        target,
                        entry["ratio_to_plain"],
                        entry["ratio_to_plain_min_based"],
                        entry["ratio_to_plain_paired"],
                    )
                ]
                if target is not None
                else []
            )
            results.append(entry)
            print(
                f"B={batch:4d} {v:10s} {sec * 1e3:9.2f} ms  x{entry['ratio_to_plain']:.3f} "
                f"(min-based x{entry['ratio_to_plain_min_based']:.3f}, paired "
                f"x{entry['ratio_to_plain_paired']:.3f}), cache {entry['cache_size']}, "
                f"temp {entry['temp_bytes'] or 0:,} B",
                flush=True,
            )
        if {"efficient", "transform"} <= set(opts.variants):
            sanity.append(agreement(batch, opts))
        print(f"[B={batch}] {time.perf_counter() - t0:.0f} s", flush=True)
        del measured, runs
        gc.collect()
    load_after = _meta.load_average()
    machine = machine_info(opts) | _meta.load_fields(load_before, load_after)
    doc = {
        **_meta.run_header(BENCHMARK, SCHEMA_VERSION, _meta.command_line(argv)),
        "quick": opts.quick,
        "repeats": opts.repeats,
        "transform_repeats": opts.transform_repeats,
        "budget_seconds": opts.budget,
        "warmup": opts.warmup,
        "seed": opts.seed,
        "lr": opts.lr,
        "dtype": "float32",
        "wall_seconds": time.perf_counter() - started,
        "machine": machine,
        "model": {
            "layers": "->".join(str(s) for s in SIZES) + " (ReLU), head 512x1000",
            "params": n_params(),
            "optimizer": f"optax.sgd({opts.lr})",
            "gradtail": "library defaults (rank curve, direction reference, decay 0.99), head scored",
        },
        "variants": {v: VARIANT_TEXT[v] for v in opts.variants},
        "method": {"timing": TIMING_METHOD, "memory": MEMORY_METHOD},
        "results": results,
        "sanity": sanity,
    }
    _meta.write_json(opts.out, doc)
    checks = [c for r in results for c in r["checks"]]
    print(f"{sum(c['passed'] is True for c in checks)} of {len(checks)} targets pass; wrote {opts.out}")
    return 0


# ----------------------------------------------------- render: results/jax_overhead.json


_JO_VARIANTS = (
    ("plain", "plain"),
    ("efficient", "efficient path"),
    ("efficient_sketch", "efficient path, sketched"),
    ("transform", "transformation"),
)


def _jo_cell(entry: dict[str, Any] | None) -> str:
    if not entry or "seconds" not in entry:
        return "n/a"
    return f"{fmt_seconds(entry['seconds'])} ({fmt_ratio(entry['ratio_to_plain'])})"


def render(doc: dict[str, Any]) -> str:
    results = doc["results"]
    index = {(r["B"], r["variant"]): r for r in results}
    batches = list(dict.fromkeys(r["B"] for r in results))
    present = {r["variant"] for r in results}
    variants = [(k, t) for k, t in _JO_VARIANTS if k in present]
    checks = [(r, c) for r in results for c in r.get("checks", [])]
    passed = sum(c["passed"] is True for _, c in checks)
    noisy = sum(bool(c.get("noise_bound")) for _, c in checks)
    versions = doc.get("machine", {}).get("versions", {})
    model = doc.get("model", {})

    out = [machine_line(doc), ""]
    if doc.get("quick"):
        out += ["> **Quick smoke run** (B=64 only, few repeats): the targets are meant for the full run.", ""]
    out += [
        f"Model: {model.get('layers', '?')}, {model.get('params', 0):,} parameters, "
        f"{model.get('optimizer', '?')}; GradTail: {model.get('gradtail', '?')}. jaxlib "
        f"{versions.get('jaxlib', '?')}, optax {versions.get('optax', '?')}. One step = one call of the "
        "jitted step function (forward, gradient, update).",
        "",
        f"**{passed} of {len(checks)} targets pass** (verdict on the ratio of medians)"
        + (
            f"; {noisy} verdict(s) are noise-bound: the ratio of the fastest calls or the median of "
            "per-round ratios lands on the other side of the target."
            if noisy
            else "."
        ),
        "",
        table(
            ["target", "where", "measured", "paired", "min-based"],
            (
                [
                    c["target"]["text"],
                    f"B={r['B']}, {r['variant']}",
                    fmt_check(c),
                    fmt_ratio(c.get("paired")),
                    fmt_ratio(c.get("min_based")),
                ]
                for r, c in checks
            ),
        ),
        "",
        "### Step time (median; ratio to the plain jitted step)",
        "",
        table(
            ["B", *(t for _, t in variants), "compiled once", "XLA temp memory", "per-example gradients"],
            (
                [
                    b,
                    *(_jo_cell(index.get((b, k))) for k, _ in variants),
                    " / ".join(str(index.get((b, k), {}).get("cache_size", "?")) for k, _ in variants),
                    " / ".join(fmt_bytes(index.get((b, k), {}).get("temp_bytes")) for k, _ in variants),
                    fmt_bytes(index.get((b, "transform"), {}).get("per_example_grad_bytes")),
                ]
                for b in batches
            ),
        ),
        "",
        "*compiled once*: `jax.jit(step)._cache_size()` after timing (1 = no retracing); *XLA temp "
        "memory*: scratch bytes of one call, from the compiled step's memory analysis; both in the "
        "column order " + ", ".join(t for _, t in variants) + ".",
    ]
    sanity = doc.get("sanity") or []
    if sanity:
        out += [""] + [
            f"Check (B={s['B']}): after 3 steps from the same start, efficient path vs. transformation: "
            f"max |parameter difference| {s['max_abs_param_diff_efficient_vs_transform']:.1e}, max |weight "
            f"difference| {s['max_abs_weight_diff']:.1e}."
            for s in sanity
        ]
    method = doc.get("method", {})
    out += ["", "<details><summary>How this was measured</summary>", ""]
    if method.get("timing"):
        out += [f"- Timing: {method['timing']}"]
    if method.get("memory"):
        out += [f"- Memory: {method['memory']}"]
    threads = doc.get("machine", {}).get("threads", {})
    if threads.get("xla_flags"):
        out += [f"- `XLA_FLAGS={threads['xla_flags']}`."]
    for key, text in (doc.get("variants") or {}).items():
        out += [f"- `{key}`: {text}"]
    out += ["", "</details>"]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())

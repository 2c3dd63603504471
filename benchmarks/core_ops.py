"""Core-op benchmarks for gradtail_ops: factored vs. materialised, per backend, in one run.

Three cases, each run on every requested backend (NumPy, PyTorch CPU, JAX under ``jax.jit``):

* ``head_2d``: ``linear_alignment(A, D, GW, Gb)`` vs. building the per-example gradients
  ``(D[:, :, None] * A[:, None, :], D)`` and calling ``alignment``. Targets: factored at least
  5x faster and at least 50x less peak memory.
* ``sequence``: ``linear_alignment`` on (B, T, d) inputs with ``method="ghost"``,
  ``"materialize"`` and ``"auto"``. Target: auto at most 1.2x the better of the other two.
* ``dense``: ``alignment(X, v)`` for X of shape (B, N) vs. the memory-bound floor, one
  ``X @ v`` plus the backend's own row norms. Target: at most 1.5x the floor.

Timings are medians over repeats in which the compared variants run interleaved (round
robin), so a change in machine load hits all of them alike. Results go to a JSON file that
``benchmarks/render_tables.py`` turns into ``docs/benchmarks.md``.

Usage::

    .venv/bin/python benchmarks/core_ops.py                 # full run, ~3-6 min on 2 cores
    .venv/bin/python benchmarks/core_ops.py --quick         # smoke run, < 1 min
    .venv/bin/python benchmarks/core_ops.py --backends numpy,jax --cases dense
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

from benchmarks import _meta  # noqa: E402
from benchmarks._render import (  # noqa: E402
    TIMES,
    fmt_bytes,
    fmt_check,
    fmt_ratio,
    fmt_seconds,
    fmt_target,
    machine_line,
    table,
)
from gradtail_ops import alignment, linear_alignment  # noqa: E402

BENCHMARK = "core_ops"
SCHEMA_VERSION = 1
ALL_BACKENDS = ("numpy", "torch", "jax")
ALL_CASES = ("head_2d", "sequence", "dense")
DEFAULT_OUT = Path("benchmarks/results/core_ops.json")
QUICK_OUT = Path("results/core_ops_quick.json")

TARGETS = {
    "head_2d.speedup": {"op": ">=", "value": 5.0, "text": "factored >= 5x faster than materialising"},
    "head_2d.memory_ratio": {"op": ">=", "value": 50.0, "text": "factored >= 50x less peak memory"},
    "sequence.auto_vs_best": {
        "op": "<=",
        "value": 1.2,
        "text": "auto <= 1.2x the better of ghost/materialize",
    },
    "dense.vs_floor": {"op": "<=", "value": 1.5, "text": "alignment <= 1.5x (X @ v + row norms)"},
}

SHAPES_FULL = {
    "head_2d": [(256, 2048, 1000), (64, 2048, 1000)],
    # T=16 with d 1024->1000 is the one shape here where "auto" picks ghost.
    "sequence": [(32, 128, 64, 64), (32, 128, 256, 256), (32, 128, 1024, 1000), (32, 16, 1024, 1000)],
    "dense": [(256, 2**16), (256, 2**18)],
}
SHAPES_QUICK = {
    "head_2d": [(16, 256, 100)],
    "sequence": [(4, 16, 32, 32), (4, 16, 128, 128)],
    "dense": [(32, 2**12)],
}

MEMORY_METHODS = {
    "numpy": (
        "tracemalloc peak of the call (NumPy reports every array buffer to tracemalloc; "
        "tracing starts just before the call, so inputs are excluded and the output included)"
    ),
    "torch": (
        "torch.profiler(profile_memory=True): peak of the running sum of the CPU allocator's "
        "[memory] events (alloc +bytes, free -bytes) recorded during the call; inputs excluded, "
        "output included"
    ),
    "jax": (
        "compiled.memory_analysis() of the jitted function: temp_size_in_bytes + "
        "output_size_in_bytes (XLA's static buffer assignment; arguments excluded)"
    ),
    "rss_crosscheck": (
        "rss_peak_delta_bytes: VmHWM - VmRSS around one call after resetting VmHWM via "
        "/proc/self/clear_refs; a lower bound for small temporaries (the C allocator reuses "
        "freed heap pages), honest for large ones (mmap'd, paged in on first touch)"
    ),
}
TIMING_METHOD = (
    "time.perf_counter around one call; NumPy and torch CPU are synchronous, JAX calls the "
    "AOT-compiled jax.jit(fn).lower(*args).compile() executable and block_until_ready on its "
    "output (compile time reported separately). Each variant runs once to warm up, then the "
    "compared variants of one case run interleaved (round robin, the order rotated every round, "
    "with a CPU-free pause of 10% of each call, at most 0.3 s, after it) `repeats` times, fewer "
    "(never below 3) where the rounds would exceed `budget_seconds`; seconds = median. Checks "
    "use the ratio of medians; "
    "each also records min_based (ratio of fastest repeats) and paired (median of per-round "
    "ratios), and noise_bound = true where those verdicts disagree."
)


# --------------------------------------------------------------------------- backends


@dataclass
class Prepared:
    """A ready-to-time call of one function on one backend."""

    call: Callable[[], Any]
    static_bytes: int | None = None
    compile_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Backend:
    name = ""

    def asarray(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def prepare(self, fn: Callable[..., Any], args: Sequence[Any]) -> Prepared:
        return Prepared(call=lambda: fn(*args))

    def peak_bytes(self, prepared: Prepared) -> int:
        raise NotImplementedError

    def to_numpy(self, out: Any) -> np.ndarray:
        return np.asarray(out)

    def versions(self) -> dict[str, str]:
        return {}


class NumpyBackend(Backend):
    name = "numpy"

    def asarray(self, x: np.ndarray) -> Any:
        return x

    def peak_bytes(self, prepared: Prepared) -> int:
        gc.collect()
        tracemalloc.start()
        try:
            out = prepared.call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        del out
        return int(peak)

    def versions(self) -> dict[str, str]:
        blas = "?"
        with contextlib.suppress(Exception):
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
        return {"numpy": np.__version__, "numpy_blas": blas}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        # scripts/gpu_check.sh sets GRADTAIL_BENCH_DEVICE=cuda on a lent GPU machine.
        self.device = os.environ.get("GRADTAIL_BENCH_DEVICE", "cpu")

    def asarray(self, x: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def prepare(self, fn: Callable[..., Any], args: Sequence[Any]) -> Prepared:
        torch = self.torch

        def call() -> Any:
            with torch.inference_mode():
                out = fn(*args)
            if self.device != "cpu":
                torch.cuda.synchronize()
            return out

        return Prepared(call=call)

    def peak_bytes(self, prepared: Prepared) -> int:
        from torch.profiler import ProfilerActivity, profile

        if self.device != "cpu":
            torch = self.torch
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = prepared.call()
            peak = torch.cuda.max_memory_allocated() - base
            del out
            return int(peak)

        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = prepared.call()
        del out
        trace = _meta.chrome_trace(prof)
        events = [e for e in trace.get("traceEvents", []) if e.get("name") == "[memory]"]
        events.sort(key=lambda e: (e.get("ts", 0), e.get("args", {}).get("Ev Idx", 0)))
        live = peak = 0
        for e in events:
            args = e.get("args", {})
            if args.get("Device Type", 0) != 0:  # CPU only
                continue
            live += int(args.get("Bytes", 0))
            peak = max(peak, live)
        return peak

    def to_numpy(self, out: Any) -> np.ndarray:
        return out.detach().cpu().numpy()

    def versions(self) -> dict[str, str]:
        return {"torch": self.torch.__version__, "torch_num_threads": str(self.torch.get_num_threads())}


class JaxBackend(Backend):
    name = "jax"

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp

    def asarray(self, x: np.ndarray) -> Any:
        return self.jax.block_until_ready(self.jnp.asarray(x))

    def prepare(self, fn: Callable[..., Any], args: Sequence[Any]) -> Prepared:
        jax = self.jax
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - start
        static, extra = None, {}
        with contextlib.suppress(Exception):
            mem = compiled.memory_analysis()
            static = int(mem.temp_size_in_bytes) + int(mem.output_size_in_bytes)
            extra = {
                "xla_temp_bytes": int(mem.temp_size_in_bytes),
                "xla_output_bytes": int(mem.output_size_in_bytes),
                "xla_argument_bytes": int(mem.argument_size_in_bytes),
            }
        return Prepared(
            call=lambda: jax.block_until_ready(compiled(*args)),
            static_bytes=static,
            compile_seconds=compile_s,
            extra=extra,
        )

    def peak_bytes(self, prepared: Prepared) -> int:
        if prepared.static_bytes is None:
            raise RuntimeError("compiled.memory_analysis() is not available")
        return prepared.static_bytes

    def versions(self) -> dict[str, str]:
        import jaxlib

        return {"jax": self.jax.__version__, "jaxlib": jaxlib.__version__}


def make_backend(name: str) -> Backend:
    return {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[name]()


# --------------------------------------------------------------------------- measuring


def rss_peak_delta(prepared: Prepared) -> int | None:
    """Peak RSS growth during one call (Linux only; None where VmHWM cannot be reset)."""
    gc.collect()
    if not _meta.reset_peak_rss():
        return None
    before = _meta.read_status_kib("VmRSS")
    out = prepared.call()
    peak = _meta.read_status_kib("VmHWM")
    del out
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def time_interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int, budget_s: float
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Warm each call once, then run them round robin; returns per-call times and outputs."""
    outputs, warm = {}, {}
    for name, call in calls.items():
        gc.collect()
        start = time.perf_counter()
        outputs[name] = call()
        warm[name] = time.perf_counter() - start

    def run(name: str) -> float:
        elapsed = _meta.timed(calls[name])
        # Let the allocator give back a big output/temporaries before the next variant
        # starts (XLA frees a 2 GB temp after block_until_ready returns, which otherwise
        # lands in the next, cheap, call's time). Sleeping costs no CPU.
        time.sleep(min(0.3, 0.1 * elapsed))
        return elapsed

    rounds = _meta.rounds_for(sum(warm.values()), repeats, budget_s)
    return _meta.round_robin(list(calls), rounds, run), outputs


def check(key: str, value: float | None, **robust: float | None) -> dict[str, Any]:
    """The check of target ``key`` on ``value`` and the noise-robust ``robust`` ratios."""
    return _meta.target_check(key.split(".", 1)[1], TARGETS[key], value, **robust)


def _ratios(variants: dict[str, dict[str, Any]], num: str, den: str) -> dict[str, float | None]:
    """Ratio of medians, of minima, and median of per-round ratios, for ``num / den``."""
    a, b = variants[num], variants[den]
    paired = [x / y for x, y in zip(a["seconds_all"], b["seconds_all"], strict=False) if y > 0]
    return {
        "value": _meta.ratio(a["seconds"], b["seconds"]),
        "min_based": _meta.ratio(a["seconds_min"], b["seconds_min"]),
        "paired": float(np.median(paired)) if paired else None,
    }


def _max_abs_diff(backend: Backend, a: Any, b: Any) -> float:
    x, y = backend.to_numpy(a).astype(np.float64), backend.to_numpy(b).astype(np.float64)
    return float(np.max(np.abs(x - y))) if x.size else 0.0


def run_variants(
    backend: Backend,
    fns: dict[str, Callable[..., Any]],
    args_np: Sequence[np.ndarray],
    repeats: int,
    budget_s: float,
    memory: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Time (and measure memory of) several functions of the same arguments on one backend."""
    args = [backend.asarray(a) for a in args_np]
    prepared = {name: backend.prepare(fn, args) for name, fn in fns.items()}
    times, outputs = time_interleaved({k: p.call for k, p in prepared.items()}, repeats, budget_s)
    variants: dict[str, dict[str, Any]] = {}
    for name, p in prepared.items():
        entry: dict[str, Any] = {
            "seconds": float(np.median(times[name])),
            "seconds_min": float(np.min(times[name])),
            "seconds_all": [float(t) for t in times[name]],
            "repeats": len(times[name]),
        }
        if p.compile_seconds is not None:
            entry["compile_seconds"] = p.compile_seconds
        if memory:
            try:
                entry["peak_bytes"] = backend.peak_bytes(p)
            except Exception as exc:  # report, never hide
                entry["peak_bytes"] = None
                entry["peak_bytes_error"] = f"{type(exc).__name__}: {exc}"
            entry["rss_peak_delta_bytes"] = rss_peak_delta(p)
        entry.update(p.extra)
        variants[name] = entry
    del prepared, args
    return variants, outputs


# --------------------------------------------------------------------------- cases


def _rng(seed: int, *shape_key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *shape_key])


def head_inputs(seed: int, b: int, d_in: int, d_out: int) -> list[np.ndarray]:
    rng = _rng(seed, b, d_in, d_out)
    a = rng.standard_normal((b, d_in), dtype=np.float32)
    d = rng.standard_normal((b, d_out), dtype=np.float32) / np.float32(b)
    gw = (d.T @ a) / np.float32(b) + np.float32(0.01) * rng.standard_normal((d_out, d_in), dtype=np.float32)
    gb = d.mean(axis=0) + np.float32(0.01) * rng.standard_normal(d_out, dtype=np.float32)
    return [a, d, gw.astype(np.float32), gb.astype(np.float32)]


def head_factored(a: Any, d: Any, gw: Any, gb: Any) -> Any:
    return linear_alignment(a, d, gw, gb)


def head_materialize(a: Any, d: Any, gw: Any, gb: Any) -> Any:
    return alignment([d[:, :, None] * a[:, None, :], d], [gw, gb])


def case_head_2d(backend: Backend, shape: tuple[int, ...], opts: argparse.Namespace) -> dict[str, Any]:
    b, d_in, d_out = shape
    variants, outs = run_variants(
        backend,
        {"factored": head_factored, "materialize": head_materialize},
        head_inputs(opts.seed, b, d_in, d_out),
        opts.repeats,
        opts.budget,
    )
    fac, mat = variants["factored"], variants["materialize"]
    return {
        "case": "head_2d",
        "backend": backend.name,
        "shapes": {"B": b, "d_in": d_in, "d_out": d_out},
        "variants": variants,
        "checks": [
            check("head_2d.speedup", **_ratios(variants, "materialize", "factored")),
            check("head_2d.memory_ratio", _meta.ratio(mat.get("peak_bytes"), fac.get("peak_bytes"))),
        ],
        "max_abs_diff": _max_abs_diff(backend, outs["factored"], outs["materialize"]),
    }


def seq_inputs(seed: int, b: int, t: int, d_in: int, d_out: int) -> list[np.ndarray]:
    rng = _rng(seed, b, t, d_in, d_out)
    a = rng.standard_normal((b, t, d_in), dtype=np.float32)
    d = rng.standard_normal((b, t, d_out), dtype=np.float32) / np.float32(b * t)
    gw = np.einsum("bto,bti->oi", d, a) / np.float32(b)
    gw = gw + np.float32(0.01) * rng.standard_normal((d_out, d_in), dtype=np.float32) / np.float32(b * t)
    gb = d.sum(axis=1).mean(axis=0)
    return [a, d, gw.astype(np.float32), gb.astype(np.float32)]


def _seq_fn(method: str) -> Callable[..., Any]:
    def fn(a: Any, d: Any, gw: Any, gb: Any) -> Any:
        return linear_alignment(a, d, gw, gb, method=method)

    fn.__name__ = f"linear_alignment_{method}"
    return fn


def auto_choice(t: int, d_in: int, d_out: int) -> str | None:
    """Which method "auto" takes (from the package's private rule; None if it moved)."""
    try:
        from gradtail_ops.linear import _use_ghost

        return "ghost" if _use_ghost("auto", t, d_in, d_out) else "materialize"
    except Exception:
        return None


def case_sequence(backend: Backend, shape: tuple[int, ...], opts: argparse.Namespace) -> dict[str, Any]:
    b, t, d_in, d_out = shape
    methods = ("ghost", "materialize", "auto")
    variants, outs = run_variants(
        backend,
        {m: _seq_fn(m) for m in methods},
        seq_inputs(opts.seed, b, t, d_in, d_out),
        opts.repeats,
        opts.budget,
    )
    best_name = min(("ghost", "materialize"), key=lambda m: variants[m]["seconds"])
    return {
        "case": "sequence",
        "backend": backend.name,
        "shapes": {"B": b, "T": t, "d_in": d_in, "d_out": d_out},
        "variants": variants,
        "auto_choice": auto_choice(t, d_in, d_out),
        "best": best_name,
        "checks": [
            check("sequence.auto_vs_best", **_ratios(variants, "auto", best_name)),
        ],
        "ghost_vs_materialize": _meta.ratio(variants["ghost"]["seconds"], variants["materialize"]["seconds"]),
        "max_abs_diff": max(
            _max_abs_diff(backend, outs["ghost"], outs["materialize"]),
            _max_abs_diff(backend, outs["auto"], outs["materialize"]),
        ),
    }


def dense_floor(backend_name: str) -> Callable[..., Any]:
    """One plain pass: ``X @ v`` plus the backend's own row norms."""

    def floor(x: Any, v: Any) -> Any:
        return x @ v, _native_row_norms(backend_name, x)

    return floor


def dense_components(backend_name: str) -> dict[str, Callable[..., Any]]:
    """Pieces of alignment() and of the floor, timed alone to see where the time goes."""
    from gradtail_ops._checks import namespace

    def xp_vecdot_rows(x: Any, v: Any) -> Any:
        return namespace(x).vecdot(x, x)

    def matvec(x: Any, v: Any) -> Any:
        return x @ v

    def native_rows(x: Any, v: Any) -> Any:
        return _native_row_norms(backend_name, x)

    return {"matvec": matvec, "xp_vecdot_rows": xp_vecdot_rows, "native_row_norms": native_rows}


def _native_row_norms(backend_name: str, x: Any) -> Any:
    if backend_name == "numpy":
        return np.einsum("ij,ij->i", x, x)
    if backend_name == "torch":
        import torch

        return torch.linalg.vector_norm(x, dim=1)
    import jax.numpy as jnp

    return jnp.sum(x * x, axis=1)


def dense_alignment(x: Any, v: Any) -> Any:
    return alignment(x, v)


def case_dense(backend: Backend, shape: tuple[int, ...], opts: argparse.Namespace) -> dict[str, Any]:
    b, n = shape
    rng = _rng(opts.seed, b, n)
    x = rng.standard_normal((b, n), dtype=np.float32)
    v = x.mean(axis=0) + np.float32(0.1) * rng.standard_normal(n, dtype=np.float32)
    variants, _ = run_variants(
        backend,
        {"alignment": dense_alignment, "floor": dense_floor(backend.name)},
        [x, v],
        opts.repeats,
        opts.budget,
    )
    parts, _ = run_variants(backend, dense_components(backend.name), [x, v], opts.repeats, opts.budget, False)
    return {
        "case": "dense",
        "backend": backend.name,
        "shapes": {"B": b, "N": n},
        "variants": variants,
        "components": {k: {"seconds": p["seconds"], "repeats": p["repeats"]} for k, p in parts.items()},
        "checks": [check("dense.vs_floor", **_ratios(variants, "alignment", "floor"))],
    }


CASES = {"head_2d": case_head_2d, "sequence": case_sequence, "dense": case_dense}


# --------------------------------------------------------------------------- machine info


def machine_info(backends: Sequence[Backend]) -> dict[str, Any]:
    versions: dict[str, str] = {}
    with contextlib.suppress(Exception):
        import array_api_compat

        versions["array_api_compat"] = array_api_compat.__version__
    for be in backends:
        versions.update(be.versions())
    return _meta.machine_info(versions, git=_meta.git_state({"gradtail_ops_dirty": ("gradtail_ops",)}))


# --------------------------------------------------------------------------- main


def _fmt_entry(entry: dict[str, Any]) -> str:
    shape = "x".join(f"{k}={v}" for k, v in entry["shapes"].items())
    parts = [f"{k}={v['seconds'] * 1e3:.2f}ms" for k, v in entry["variants"].items()]
    checks = [
        f"{c['name']}={c['value']:.2f}({'PASS' if c['passed'] else 'FAIL'})"
        for c in entry["checks"]
        if c["value"] is not None
    ]
    return f"[{entry['backend']:5s}] {entry['case']:8s} {shape}: {' '.join(parts)} | {' '.join(checks)}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark gradtail_ops core ops (factored vs. materialised) on NumPy, torch and JAX.",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats: a smoke run in < 60 s")
    p.add_argument(
        "--backends",
        default=",".join(ALL_BACKENDS),
        help="comma-separated subset of numpy,torch,jax (default: all)",
    )
    p.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help="comma-separated subset of " + ",".join(ALL_CASES) + " (default: all)",
    )
    _meta.add_out_argument(p, DEFAULT_OUT, QUICK_OUT)
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per variant (default 11; quick 3)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per case and backend for the timed rounds; repeats drop (never below 3) to fit "
        "(default 10; quick 2)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads for every backend (torch.set_num_threads, threadpoolctl for NumPy's "
        "BLAS, XLA_FLAGS for JAX); 0 keeps each library's default. On a shared machine 1 gives "
        "stable numbers: with another process on a core, 2-thread torch ops can stall for ms",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for the inputs (default: 0)")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for b in args.backends:
        if b not in ALL_BACKENDS:
            p.error(f"unknown backend {b!r}; choose from {ALL_BACKENDS}")
    for c in args.cases:
        if c not in ALL_CASES:
            p.error(f"unknown case {c!r}; choose from {ALL_CASES}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 11
    if args.budget is None:
        args.budget = 2.0 if args.quick else 10.0
    _meta.resolve_out(args, DEFAULT_OUT, QUICK_OUT)
    return args


def limit_threads(n: int) -> dict[str, Any]:
    """Cap intra-op threads of every backend at ``n`` (before torch/JAX are imported)."""
    applied: dict[str, Any] = _meta.threads_info(n)
    if n <= 0:
        return applied
    applied["XLA_FLAGS"] = _meta.xla_thread_flags(n)
    try:
        from threadpoolctl import threadpool_limits

        applied["_threadpoolctl"] = threadpool_limits(limits=n)  # kept alive by the caller
        applied["numpy_blas"] = f"threadpoolctl limit {n}"
    except ImportError:
        applied["numpy_blas"] = "threadpoolctl missing: library default"
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(n)
        applied["torch"] = f"set_num_threads({n})"
    return applied


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    threads = limit_threads(opts.threads)
    load_before = _meta.load_average()
    started = time.perf_counter()
    backends, skipped = [], {}
    for name in opts.backends:
        try:
            backends.append(make_backend(name))
        except Exception as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
            print(f"skipping backend {name}: {skipped[name]}", file=sys.stderr)
    shapes = SHAPES_QUICK if opts.quick else SHAPES_FULL
    results = []
    for case in opts.cases:
        for shape in shapes[case]:
            for be in backends:
                entry = CASES[case](be, shape, opts)
                results.append(entry)
                print(_fmt_entry(entry), flush=True)
                gc.collect()
    load_after = _meta.load_average()
    machine = machine_info(backends)
    machine |= _meta.load_fields(load_before, load_after, one_minute_only=True)
    machine["threads"] = {k: v for k, v in threads.items() if not k.startswith("_")}
    checks = [c for r in results for c in r["checks"]]
    doc = {
        **_meta.run_header(BENCHMARK, SCHEMA_VERSION, _meta.command_line(argv)),
        "quick": opts.quick,
        "repeats": opts.repeats,
        "budget_seconds": opts.budget,
        "seed": opts.seed,
        "dtype": "float32",
        "wall_seconds": time.perf_counter() - started,
        "machine": machine,
        "method": {"timing": TIMING_METHOD, "memory": MEMORY_METHODS},
        "targets": TARGETS,
        "skipped_backends": skipped,
        "summary": _meta.check_summary(checks),
        "results": results,
    }
    out = _meta.write_json(Path.cwd() / opts.out, doc)
    _meta.print_closing(doc, out, load_before, load_after)
    return 0


# ----------------------------------------------------- render: results/core_ops.json


def _check(entry: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in entry["checks"] if c["name"] == name)


def _header_target(entries: list[dict[str, Any]], name: str) -> str:
    return fmt_target(_check(entries[0], name)["target"]) if entries else ""


def render(doc: dict[str, Any]) -> str:
    results = doc["results"]
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    checks = [c for r in results for c in r["checks"]]
    passed = sum(c["passed"] is True for c in checks)
    out = [machine_line(doc), ""]
    if doc.get("quick"):
        out += ["> **Quick smoke run** (tiny shapes): the targets are meant for the full shapes.", ""]
    noisy = sum(bool(c.get("noise_bound")) for c in checks)
    line = f"**{passed} of {len(checks)} targets pass** (verdict on the ratio of medians)."
    if noisy:
        line += (
            f" {noisy} verdict(s) are noise-bound: the ratio of the fastest repeats or the median "
            "of per-round ratios lands on the other side of the target."
        )
    out.append(line)
    failed = [
        f"{r['backend']} {r['case']} {_shape_text(r)}: {c['name']} {fmt_ratio(c['value'])} "
        f"(target {fmt_target(c['target'])}){' (noise-bound)' if c.get('noise_bound') else ''}"
        for r in results
        for c in r["checks"]
        if c["passed"] is False
    ]
    if failed:
        out += ["", "Failing:", ""] + [f"- {f}" for f in failed]
    skipped = doc.get("skipped_backends") or {}
    if skipped:
        out += ["", "Skipped backends: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())]

    head = by_case.get("head_2d", [])
    if head:
        out += [
            "",
            "### 2-D head: `linear_alignment` vs. materialised per-example gradients + `alignment`",
            "",
            table(
                [
                    "backend",
                    "B",
                    "d_in → d_out",
                    "factored",
                    "materialised",
                    f"speedup (target {_header_target(head, 'speedup')})",
                    "factored peak",
                    "materialised peak",
                    f"memory ratio (target {_header_target(head, 'memory_ratio')})",
                    "RSS peak Δ fact. / mat.",
                    "max abs diff",
                ],
                (
                    [
                        r["backend"],
                        r["shapes"]["B"],
                        f"{r['shapes']['d_in']} → {r['shapes']['d_out']}",
                        fmt_seconds(r["variants"]["factored"]["seconds"]),
                        fmt_seconds(r["variants"]["materialize"]["seconds"]),
                        fmt_check(_check(r, "speedup")),
                        fmt_bytes(r["variants"]["factored"].get("peak_bytes")),
                        fmt_bytes(r["variants"]["materialize"].get("peak_bytes")),
                        fmt_check(_check(r, "memory_ratio")),
                        f"{fmt_bytes(r['variants']['factored'].get('rss_peak_delta_bytes'))} / "
                        f"{fmt_bytes(r['variants']['materialize'].get('rss_peak_delta_bytes'))}",
                        f"{r.get('max_abs_diff', float('nan')):.1e}",
                    ]
                    for r in head
                ),
            ),
        ]

    seq = by_case.get("sequence", [])
    if seq:
        out += [
            "",
            '### Sequence head: `linear_alignment(method="ghost" | "materialize" | "auto")`',
            "",
            table(
                [
                    "backend",
                    f"B {TIMES} T",
                    "d_in → d_out",
                    "ghost",
                    "materialize",
                    "auto (picks)",
                    "faster",
                    f"auto / faster (target {_header_target(seq, 'auto_vs_best')})",
                    "peak ghost / mat.",
                    "max abs diff",
                ],
                (
                    [
                        r["backend"],
                        f"{r['shapes']['B']} {TIMES} {r['shapes']['T']}",
                        f"{r['shapes']['d_in']} → {r['shapes']['d_out']}",
                        fmt_seconds(r["variants"]["ghost"]["seconds"]),
                        fmt_seconds(r["variants"]["materialize"]["seconds"]),
                        f"{fmt_seconds(r['variants']['auto']['seconds'])} ({r.get('auto_choice') or '?'})",
                        r.get("best", "?"),
                        fmt_check(_check(r, "auto_vs_best")),
                        f"{fmt_bytes(r['variants']['ghost'].get('peak_bytes'))} / "
                        f"{fmt_bytes(r['variants']['materialize'].get('peak_bytes'))}",
                        f"{r.get('max_abs_diff', float('nan')):.1e}",
                    ]
                    for r in seq
                ),
            ),
        ]

    dense = by_case.get("dense", [])
    if dense:
        out += [
            "",
            "### Dense: `alignment(X, v)` vs. the floor `X @ v` + row norms",
            "",
            table(
                [
                    "backend",
                    f"B {TIMES} N",
                    "alignment",
                    "floor",
                    f"alignment / floor (target {_header_target(dense, 'vs_floor')})",
                    "`X @ v` alone",
                    "`xp.vecdot(X, X)` alone",
                    "native row norms alone",
                ],
                (
                    [
                        r["backend"],
                        f"{r['shapes']['B']} {TIMES} {r['shapes']['N']}",
                        fmt_seconds(r["variants"]["alignment"]["seconds"]),
                        fmt_seconds(r["variants"]["floor"]["seconds"]),
                        fmt_check(_check(r, "vs_floor")),
                        fmt_seconds(r.get("components", {}).get("matvec", {}).get("seconds")),
                        fmt_seconds(r.get("components", {}).get("xp_vecdot_rows", {}).get("seconds")),
                        fmt_seconds(r.get("components", {}).get("native_row_norms", {}).get("seconds")),
                    ]
                    for r in dense
                ),
            ),
        ]

    method = doc.get("method", {})
    out += ["", "<details><summary>How this was measured</summary>", ""]
    if method.get("timing"):
        out += [f"- Timing: {method['timing']}"]
    for backend, text in method.get("memory", {}).items():
        out += [f"- Memory ({backend}): {text}"]
    out += ["", "</details>"]
    return "\n".join(out)


def _shape_text(r: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["shapes"].items())


if __name__ == "__main__":
    raise SystemExit(main())

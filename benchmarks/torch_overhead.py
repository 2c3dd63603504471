"""Training-step overhead of ``gradtail_torch.GradTail`` against a plain PyTorch step, on CPU.

One run times a whole training step (forward, loss, backward, SGD step) of an MLP for
several ways of computing GradTail weights, side by side:

* ``plain``: mean cross-entropy, ``loss.backward()``.
* ``gt_head``: GradTail on the head alone, ``w = gt.weights(loss); (w * loss).mean().backward()``.
* ``gt_all_backward``: GradTail on every ``nn.Linear``, ``gt.backward(loss)`` (the book-keeping
  path: ``gt.last_backward == "book-keeping"`` is checked every step).
* ``gt_all_weights``: GradTail on every ``nn.Linear``, ``gt.weights`` + a weighted backward.
* ``func_head``: per-example head gradients materialised with ``torch.func`` (``vmap(grad)``
  over the head only) + ``gradtail_ops.score_and_update`` + a weighted backward.
* ``opacus_all``: Opacus ``GradSampleModule`` per-example gradients of the whole model +
  ``score_and_update`` + the weighted mean gradient written to ``.grad`` (if Opacus imports).

and, alone, the bare alignment kernel of the head (``linear_dots_and_sq_norms`` +
``linear_mean_grad`` on the head's (B, d_in) inputs and (B, d_out) output gradients), so the
extra time of ``gt_head`` over ``plain`` can be compared with the work it cannot avoid.

Model: 784 -> 1024 -> 1024 (ReLU), then 1024 -> 512 -> 1000 (head "512x1000") or
1024 -> 2048 -> 1000 (head "2048x1000"); batch sizes 64, 256, 1024. The variants of one
(head, B) run interleaved (round robin, rotating the order) and each reports the median.
Peak memory is measured for each variant in a fresh subprocess (see ``MEMORY_METHOD``).
A torch.profiler pass then splits GradTail's own time into its parts.

Usage::

    .venv/bin/python benchmarks/torch_overhead.py            # full run, ~6-9 min on 2 cores
    .venv/bin/python benchmarks/torch_overhead.py --quick    # smoke run (B=64), < 60 s
    .venv/bin/python benchmarks/render_tables.py             # tables into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "adapters", REPO / "benchmarks"):  # run from a checkout without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# The run measures a snapshot of the package sources taken at its start, shared with its memory
# subprocesses through this variable, so edits to the working tree during a run (a shared
# checkout) cannot mix versions.
SNAPSHOT_ENV = "GRADTAIL_BENCH_SNAPSHOT"


def _snapshot_sources() -> str | None:
    snap = os.environ.get(SNAPSHOT_ENV)
    if snap is None and "--no-snapshot" not in sys.argv and __name__ == "__main__":
        snap = tempfile.mkdtemp(prefix="gradtail_bench_src_")
        skip = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO / "gradtail_ops", Path(snap) / "gradtail_ops", ignore=skip)
        shutil.copytree(REPO / "adapters" / "gradtail_torch", Path(snap) / "gradtail_torch", ignore=skip)
        os.environ[SNAPSHOT_ENV] = snap
        import atexit

        atexit.register(shutil.rmtree, snap, True)
    if snap is not None:
        sys.path.insert(0, snap)
    return snap


SNAPSHOT = _snapshot_sources()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import gradtail_ops  # noqa: E402
from benchmarks import _meta  # noqa: E402
from benchmarks._render import (  # noqa: E402
    fmt_bytes,
    fmt_ratio,
    fmt_seconds,
    machine_line,
    table,
)
from benchmarks.longtail.models import ARCH_TEXT  # noqa: E402
from benchmarks.longtail.models import build_model as build_arch_model  # noqa: E402
from gradtail_ops import (  # noqa: E402
    DEFAULT_CURVE,
    DEFAULT_DECAY,
    ema_init,
    inverse_norms,
    linear_dots_and_sq_norms,
    linear_mean_grad,
    score_and_update,
    weighted_batch_mean,
)
from gradtail_ops._tree import leaves  # noqa: E402
from gradtail_torch import GradTail  # noqa: E402

BENCHMARK = "torch_overhead"
SCHEMA_VERSION = 1
DEFAULT_OUT = Path("benchmarks/results/torch_overhead.json")
QUICK_OUT = Path("results/torch_overhead_quick.json")

D_IN, HIDDEN, CLASSES = 784, 1024, 1000
HEADS = {"512x1000": 512, "2048x1000": 2048}  # name -> width of the head's input
BATCHES_FULL = (64, 256, 1024)
BATCHES_QUICK = (64,)
VARIANTS = (
    "plain",
    "gt_head",
    "gt_all_backward",
    "gt_all_weights",
    "func_head",
    "opacus_all",
)
GT_VARIANTS = ("gt_head", "gt_all_backward", "gt_all_weights")
VARIANT_TEXT = {
    "plain": "plain step, mean cross-entropy",
    "gt_head": "GradTail(head): gt.weights(loss), (w * loss).mean().backward()",
    "gt_all_backward": "GradTail(model), every nn.Linear: gt.backward(loss) (book-keeping)",
    "gt_all_weights": "GradTail(model), every nn.Linear: gt.weights(loss) + weighted backward",
    "func_head": "torch.func vmap(grad) per-example head gradients + score_and_update + weighted backward",
    "opacus_all": "Opacus GradSampleModule (whole model) + score_and_update + weighted mean .grad",
}

TARGETS = {
    "head_ratio": {
        "op": "<=",
        "value": 1.15,
        "applies": "head 512x1000, B=256, gt_head",
        "text": "GradTail step / plain step <= 1.15 with the 512x1000 head tracked alone (B=256)",
    },
    "all_backward_ratio": {
        "op": "<=",
        "value": 1.35,
        "applies": "head 512x1000, B=256, gt_all_backward",
        "text": "GradTail step / plain step <= 1.35 with every Linear tracked through gt.backward (B=256)",
    },
    "extra_over_kernel": {
        "op": "<=",
        "value": 2.0,
        "applies": "head 2048x1000, every B, gt_head",
        "text": "(gt_head step - plain step) <= 2x the bare head kernel's time, 2048x1000 head",
    },
    "memory_ratio": {
        "op": "<=",
        "value": 1.1,
        "applies": "every head and B, the three GradTail variants",
        "text": "GradTail step's peak memory <= 1.1x the plain step's peak (live tensors, state included)",
    },
}

TIMING_METHOD = (
    "time.perf_counter around one whole step (optimizer.zero_grad(set_to_none=True), forward, "
    "loss, backward, SGD step; torch CPU ops are synchronous). Every variant trains its own copy "
    "of the same initial model on the same batch; each runs `warmup` steps first (GradTail's "
    "first step has no reference), then the variants of one (head, B) run interleaved "
    "round robin with the order rotated every round; seconds = median over the rounds. "
    "The head kernel is timed in the same rounds under torch.no_grad()."
)
MEMORY_METHOD = {
    "step_peak_bytes": (
        "Peak of live tensor bytes during one step, counting everything the step holds: "
        "persistent_bytes + the gradients left by the previous step (grad_bytes_between_steps) + "
        "step_transient_bytes. The memory target compares this number with the plain step's."
    ),
    "step_transient_bytes": (
        "torch.profiler(profile_memory=True) over two steps after the warm-up: peak of the running "
        "sum of the CPU allocator's [memory] events (alloc +bytes, free -bytes) inside the second "
        "step, minus the sum at its start. Profiling the step before too means every block the "
        "measured step frees was seen being allocated. Sees every tensor (activations, autograd "
        "buffers, .grad, per-example gradients, GradTail temporaries), not Python objects."
    ),
    "persistent_bytes": (
        "Tensors alive between steps, computed from their shapes: parameters, the batch, and the "
        "reference state (GradTail's EMA: one weight- and bias-sized copy per tracked layer)."
    ),
    "rss_peak_above_baseline_bytes": (
        "Cross-check from the OS, in a fresh subprocess per variant started with "
        "MALLOC_MMAP_THRESHOLD_=65536 (every block over 64 KiB is its own mmap, returned to the "
        "OS when freed, so no reuse of freed heap pages hides a peak): VmHWM after one step, "
        "reset with /proc/self/clear_refs just before it, minus VmRSS before the model was built "
        "(taken after the same variant ran on a tiny model, so library code paged in and lazy "
        "initialisation are in the baseline). Includes allocator and Python overheads the "
        "profiler does not see."
    ),
    "process_peak_rss_bytes": (
        "Peak RSS of that subprocess (VmHWM, read before the reset and at the end; not ru_maxrss, "
        "which on Linux includes the parent's RSS at fork): the whole process (Python, torch "
        "and its libraries, model, warm-up steps), for scale."
    ),
}


# --------------------------------------------------------------------------- models and steps


DIMS = (D_IN, HIDDEN, CLASSES)
TINY_DIMS = (16, 16, 10)  # warms the code paths (pages in library code) before a memory baseline

# Image models of the long-tail suite (benchmarks/longtail/models.py) on 28x28 inputs, 10 classes:
# plain vs. GradTail on the head vs. GradTail(model) (every nn.Linear; weights + weighted backward,
# as the suite trains them), timed side by side; peak memory in-process.
ARCHS = ("cnn", "vit")
ARCH_CLASSES = 10
ARCH_VARIANTS = ("plain", "gt_head", "gt_all_weights")
ARCH_BATCHES_FULL = (128,)
ARCH_BATCHES_QUICK = (32,)


def build_model(head_width: int, seed: int, dims: tuple[int, int, int] = DIMS) -> nn.Sequential:
    d_in, hidden, classes = dims
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, head_width),
        nn.ReLU(),
        nn.Linear(head_width, classes),
    )


def make_batch(batch: int, seed: int, dims: tuple[int, int, int] = DIMS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randn(batch, dims[0], generator=g), torch.randint(0, dims[2], (batch,), generator=g)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def materialized_bytes(variant: str, head_width: int, batch: int) -> int:
    """Bytes of the per-example gradients a materialising variant builds (0 for the others)."""
    if variant == "func_head":
        return 4 * batch * (head_width * CLASSES + CLASSES)
    if variant == "opacus_all":
        return 4 * batch * n_params(build_model(head_width, 0))
    return 0


class Step:
    """One variant's model, optimizer and GradTail objects; ``step(x, y)`` runs one step."""

    def __init__(
        self,
        variant: str,
        head_width: int,
        seed: int,
        lr: float,
        dims: tuple[int, int, int] = DIMS,
        *,
        arch: str | None = None,
    ) -> None:
        self.variant = variant
        if arch is None:
            self.model: nn.Module = build_model(head_width, seed, dims)
        else:
            torch.manual_seed(seed)
            self.model = build_arch_model(arch, D_IN, ARCH_CLASSES)
        self.model.train()
        self.head = [m for m in self.model.modules() if isinstance(m, nn.Linear)][-1]
        self.body = self.model[:-1] if isinstance(self.model, nn.Sequential) else None
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.gt: GradTail | None = None
        self.state = None
        self.gsm = None
        self.step: Callable[[torch.Tensor, torch.Tensor], Any]
        if variant == "plain":
            self.step = self._plain
        elif variant == "gt_head":
            self.gt = GradTail(self.head)
            self.step = self._gt_weights
        elif variant == "gt_all_backward":
            self.gt = GradTail(self.model)
            self.step = self._gt_backward
        elif variant == "gt_all_weights":
            self.gt = GradTail(self.model)
            self.step = self._gt_weights
        elif variant == "func_head":
            self.state = ema_init([self.head.weight.detach(), self.head.bias.detach()])
            self.step = self._func_head
        elif variant == "opacus_all":
            from opacus import GradSampleModule

            self.params = list(self.model.parameters())
            self.state = ema_init([p.detach() for p in self.params])
            self.gsm = GradSampleModule(self.model)
            self.step = self._opacus
        else:
            raise ValueError(variant)

    # the steps -----------------------------------------------------------------------
    def _plain(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()

    def _gt_weights(self, x: torch.Tensor, y: torch.Tensor) -> None:
        assert self.gt is not None
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y, reduction="none")
        w = self.gt.weights(loss)
        (w * loss).mean().backward()
        self.opt.step()

    def _gt_backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        assert self.gt is not None
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y, reduction="none")
        self.gt.backward(loss)
        if self.gt.last_backward != "book-keeping":
            raise RuntimeError(f"gt.backward took the {self.gt.last_backward!r} path, not book-keeping")
        self.opt.step()

    def _func_head(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from torch.func import functional_call, grad, vmap

        head = self.head
        self.opt.zero_grad(set_to_none=True)
        assert self.body is not None, "func_head needs the MLP (nn.Sequential) models"
        h = self.body(x)
        loss = F.cross_entropy(head(h), y, reduction="none")
        params = {k: v.detach() for k, v in head.named_parameters()}

        def one(p: dict[str, torch.Tensor], hi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(head, p, (hi[None],)), yi[None])

        with torch.no_grad():
            g = vmap(grad(one), in_dims=(None, 0, 0))(params, h.detach(), y)
            out = score_and_update(
                self.state, [g["weight"], g["bias"]], decay=DEFAULT_DECAY, curve=DEFAULT_CURVE
            )
        del g
        self.state = out.state
        (out.weights.detach() * loss).mean().backward()
        self.opt.step()

    def _opacus(self, x: torch.Tensor, y: torch.Tensor) -> None:
        assert self.gsm is not None
        self.gsm.zero_grad(set_to_none=True)  # clears .grad and .grad_sample
        loss = F.cross_entropy(self.gsm(x), y)  # loss_reduction="mean": grad_sample is per example
        loss.backward()
        with torch.no_grad():
            samples = [p.grad_sample for p in self.params]
            out = score_and_update(self.state, samples, decay=DEFAULT_DECAY, curve=DEFAULT_CURVE)
            self.state = out.state
            for p, gs in zip(self.params, samples, strict=True):
                p.grad = weighted_batch_mean(gs, out.weights)
                p.grad_sample = None
        del samples
        self.opt.step()

    # memory book-keeping ---------------------------------------------------------------
    def persistent_bytes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        total += x.numel() * x.element_size() + y.numel() * y.element_size()
        state = self.gt.state if self.gt is not None else self.state
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in leaves(state.mean))
        return total


class HeadKernel:
    """The bare factored alignment work of the head: dots/norms, then the weighted mean gradient."""

    def __init__(self, head_width: int, batch: int, seed: int) -> None:
        model = build_model(head_width, seed)
        x, y = make_batch(batch, seed)
        head = model[-1]
        self.a = model[:-1](x).detach()
        out = head(self.a)
        loss = F.cross_entropy(out, y, reduction="none")
        (self.d,) = torch.autograd.grad(loss.sum(), [out])
        with torch.no_grad():
            self.gw, self.gb = linear_mean_grad(self.a, self.d)
            self.coef = inverse_norms(linear_dots_and_sq_norms(self.a, self.d, self.gw, self.gb)[1])

    def __call__(self) -> Any:
        with torch.no_grad():
            parts = linear_dots_and_sq_norms(self.a, self.d, self.gw, self.gb)
            return parts, linear_mean_grad(self.a, self.d, bias=True, example_weights=self.coef)


def opacus_status() -> tuple[bool, str]:
    try:
        import opacus
        from opacus import GradSampleModule

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            gsm = GradSampleModule(m)
            F.cross_entropy(gsm(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
            shapes = [tuple(p.grad_sample.shape) for p in m.parameters()]
        if shapes[0] != (5, 8, 4):
            return False, f"opacus {opacus.__version__}: unexpected grad_sample shape {shapes[0]}"
        return True, f"opacus {opacus.__version__} imports and runs beside torch {torch.__version__}"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def skip_reason(variant: str, head_width: int, batch: int, opts: argparse.Namespace) -> str | None:
    if variant == "opacus_all" and not opts.opacus_ok:
        return f"Opacus unavailable ({opts.opacus_info})"
    size = materialized_bytes(variant, head_width, batch)
    if size > opts.max_materialize_gib * 2**30:
        return (
            f"per-example gradients would take {size / 2**30:.1f} GiB "
            f"(> --max-materialize-gib {opts.max_materialize_gib:g})"
        )
    return None


# --------------------------------------------------------------------------- timing


def time_config(
    head_width: int, batch: int, variants: Sequence[str], opts: argparse.Namespace
) -> tuple[dict[str, list[float]], list[float]]:
    x, y = make_batch(batch, opts.seed)
    steps = {v: Step(v, head_width, opts.seed, opts.lr) for v in variants}
    kernel = HeadKernel(head_width, batch, opts.seed)
    calls: dict[str, Callable[[], Any]] = {v: (lambda s=s: s.step(x, y)) for v, s in steps.items()}
    calls["kernel"] = kernel
    warm: dict[str, float] = {}
    for name, call in calls.items():
        for _ in range(opts.warmup):
            warm[name] = _meta.timed(call)
    rounds = _meta.rounds_for(sum(warm.values()), opts.repeats, opts.budget)
    times = _meta.round_robin(list(calls), rounds, lambda name: _meta.timed(calls[name]))
    kernel_times = times.pop("kernel")
    return times, kernel_times


# --------------------------------------------------------------------------- memory


def profiler_peak(call: Callable[[], Any]) -> tuple[int, int]:
    """Live-byte growth of the CPU allocator during the second of two calls: (peak, net).

    The first call runs under the profiler too, so every block that the measured call frees
    (last step's gradients, GradTail state, cached records) was allocated under the profiler
    and its free is counted; blocks allocated before profiling started are never freed in
    the measured call.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
        with record_function("measured_step"):
            call()
    trace = _meta.chrome_trace(prof)
    events = trace.get("traceEvents", [])
    span = next(e for e in events if e.get("name") == "measured_step" and e.get("ph") == "X")
    start, stop = float(span["ts"]), float(span["ts"]) + float(span.get("dur", 0))
    mem = [e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    mem.sort(key=lambda e: (float(e.get("ts", 0)), e.get("args", {}).get("Ev Idx", 0)))
    live = 0
    before = peak = None
    for e in mem:
        ts = float(e.get("ts", 0))
        if ts >= start and before is None:
            before = peak = live
        if ts > stop:
            break
        live += int(e["args"].get("Bytes", 0))
        if before is not None:
            peak = max(peak, live)  # type: ignore[type-var]
    if before is None:  # no allocation at all in the measured call
        return 0, 0
    return int(peak) - before, live - before  # type: ignore[operator]


def measure_memory(
    variant: str, head_width: int, batch: int, seed: int, lr: float, warmup: int, rss: bool = True
) -> dict[str, Any]:
    """Memory of one variant's step (run in a fresh process by ``memory_subprocess``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Library code paged in and lazy initialisation belong to the baseline: run the same
        # variant on a tiny model first, then drop it.
        tx, ty = make_batch(4, seed, TINY_DIMS)
        tiny = Step(variant, 8, seed, lr, TINY_DIMS)
        for _ in range(warmup + 2):
            tiny.step(tx, ty)
        del tiny, tx, ty
        gc.collect()
        baseline = _meta.read_status_kib("VmRSS")
        x, y = make_batch(batch, seed)
        s = Step(variant, head_width, seed, lr)
        for _ in range(warmup):
            s.step(x, y)
        grads = sum(
            p.grad.numel() * p.grad.element_size() for p in s.model.parameters() if p.grad is not None
        )
        out: dict[str, Any] = {
            "persistent_bytes": s.persistent_bytes(x, y),
            "grad_bytes_between_steps": grads,
        }
        hwm_before = _meta.read_status_kib("VmHWM") or 0
        if rss and baseline is not None and _meta.reset_peak_rss():
            gc.collect()
            s.step(x, y)
            peak_kib = _meta.read_status_kib("VmHWM")
            out["rss_peak_above_baseline_bytes"] = None if peak_kib is None else (peak_kib - baseline) * 1024
        transient, net = profiler_peak(lambda: s.step(x, y))
        out["step_transient_bytes"] = transient
        out["step_net_bytes"] = net
        out["step_peak_bytes"] = out["persistent_bytes"] + grads + transient
    if rss:
        # Not ru_maxrss: Linux folds the parent's RSS at fork into a child's ru_maxrss.
        out["process_peak_rss_bytes"] = max(hwm_before, _meta.read_status_kib("VmHWM") or 0) * 1024
    return out


def step_memory(s: Step, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """In-process memory of a warmed-up step: its persistent tensors, the gradients the previous
    step left, and the allocator's peak growth during one step (``profiler_peak``)."""
    grads = sum(p.grad.numel() * p.grad.element_size() for p in s.model.parameters() if p.grad is not None)
    transient, net = profiler_peak(lambda: s.step(x, y))
    persistent = s.persistent_bytes(x, y)
    return {
        "persistent_bytes": persistent,
        "grad_bytes_between_steps": grads,
        "step_transient_bytes": transient,
        "step_net_bytes": net,
        "step_peak_bytes": persistent + grads + transient,
    }


def arch_rows(arch: str, batch: int, opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Step time (interleaved rounds, median) and in-process peak memory of ``ARCH_VARIANTS`` on
    the long-tail suite's ``arch`` model; a variant whose GradTail cannot track the model (or
    fails in its first steps) is recorded as skipped with the error."""
    g = torch.Generator().manual_seed(opts.seed + batch)
    x, y = torch.rand(batch, D_IN, generator=g), torch.randint(0, ARCH_CLASSES, (batch,), generator=g)
    steps: dict[str, Step] = {}
    skipped: dict[str, str] = {}
    warm: dict[str, float] = {}
    for v in ARCH_VARIANTS:
        try:
            s = Step(v, 0, opts.seed, opts.lr, arch=arch)
            for _ in range(opts.warmup):
                warm[v] = _meta.timed(lambda s=s: s.step(x, y))  # type: ignore[misc]
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            skipped[v] = f"{type(exc).__name__}: {exc}"
            continue
        steps[v] = s
    rounds = _meta.rounds_for(sum(warm.values()), opts.repeats, opts.budget)
    times = _meta.round_robin(list(steps), rounds, lambda v: _meta.timed(lambda: steps[v].step(x, y)))
    memory = {v: step_memory(st, x, y) for v, st in steps.items()}
    plain_s = statistics.median(times["plain"])
    plain_peak = memory["plain"]["step_peak_bytes"]
    rows: list[dict[str, Any]] = []
    for v in ARCH_VARIANTS:
        row: dict[str, Any] = {"arch": arch, "B": batch, "variant": v}
        if v in skipped:
            rows.append(row | {"skipped": skipped[v]})
            continue
        seconds = statistics.median(times[v])
        row |= {
            "params": n_params(steps[v].model),
            "seconds": seconds,
            "seconds_min": min(times[v]),
            "repeats": len(times[v]),
            "ratio_to_plain": seconds / plain_s,
            "peak_bytes": memory[v]["step_peak_bytes"],
            "peak_ratio_to_plain": _meta.ratio(memory[v]["step_peak_bytes"], plain_peak),
            "memory": memory[v],
        }
        if steps[v].gt is not None:
            row["tracked_linears"] = len(steps[v].gt.layers)
        rows.append(row)
    return rows


def memory_subprocess(variant: str, head_width: int, batch: int, opts: argparse.Namespace) -> dict[str, Any]:
    spec = {"variant": variant, "head_width": head_width, "batch": batch, "seed": opts.seed, "lr": opts.lr}
    spec["warmup"] = opts.warmup
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    cmd += ["--threads", str(opts.threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "memory subprocess timed out"}
    if res.returncode != 0:
        return {"error": f"memory subprocess failed ({res.returncode}): {res.stderr.strip()[-500:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- profile


class Timer:
    """Accumulates wall time per label (nested labels count in their parents too)."""

    def __init__(self, use_profiler_labels: bool) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.labels = use_profiler_labels

    @contextlib.contextmanager
    def span(self, label: str) -> Iterator[None]:
        ctx = torch.profiler.record_function(label) if self.labels else contextlib.nullcontext()
        start = time.perf_counter()
        with ctx:
            yield
        self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
        self.calls[label] = self.calls.get(label, 0) + 1

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.span(label):
                return fn(*args, **kwargs)

        return wrapped


# What GradTail's time is split into. Parent -> children (a label's "self" time is its total
# minus its children's: Python code, validation, array_api_compat dispatch, small ops).
PROFILE_TREE = {
    "step": ["forward", "loss", "backward", "gt.weights", "gt.backward", "weighted backward", "optimizer"],
    "gt.backward": ["inspect_graph", "_step", "book-keeping grads"],
    "gt.weights": ["_step"],
    "_step": ["check_loss", "autograd.grad (output grads)", "linear_score_and_update"],
    "linear_score_and_update": [
        "dots_and_sq_norms",
        "inverse_norms",
        "reference mean grad",
        "cosine",
        "weight curve",
        "ema_update",
    ],
}


@contextlib.contextmanager
def instrumented(timer: Timer) -> Iterator[None]:
    """Wrap GradTail's internals with timing spans (benchmark-side monkeypatching only)."""
    import gradtail_ops.curves as curves_mod
    import gradtail_ops.step as step_mod
    import gradtail_torch.hook as hook_mod

    patches = [
        (hook_mod, "inspect_graph", "inspect_graph"),
        (hook_mod, "linear_tail_step", "linear_tail_step"),
        (hook_mod.GradTail, "_book_keeping_exact", "book-keeping proof"),
        (hook_mod, "linear_mean_grad", "book-keeping grads"),
        (step_mod, "multi_linear_dots_and_sq_norms", "dots_and_sq_norms"),
        (step_mod, "inverse_norms", "inverse_norms"),
        (step_mod, "linear_mean_grad", "reference mean grad"),
        (step_mod, "cosine_from_dots", "cosine"),
        (step_mod, "ema_update", "ema_update"),
        (curves_mod.WeightCurve, "__call__", "weight curve"),
        (hook_mod.GradTail, "_check_loss", "check_loss"),
        (hook_mod.GradTail, "_output_grads", "autograd.grad (output grads)"),
        (hook_mod.GradTail, "_step", "_step"),
    ]
    saved = []
    for owner, attr, label in patches:
        original = owner.__dict__[attr]
        saved.append((owner, attr, original))
        setattr(owner, attr, timer.wrap(label, original))
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def profiled_step(s: Step, x: torch.Tensor, y: torch.Tensor, timer: Timer) -> None:
    gt = s.gt
    assert gt is not None
    with timer.span("step"):
        s.opt.zero_grad(set_to_none=True)
        with timer.span("forward"):
            out = s.model(x)
        with timer.span("loss"):
            loss = F.cross_entropy(out, y, reduction="none")
        if s.variant == "gt_all_backward":
            with timer.span("gt.backward"):
                gt.backward(loss)
        else:
            with timer.span("gt.weights"):
                w = gt.weights(loss)
            with timer.span("weighted backward"):
                (w * loss).mean().backward()
        with timer.span("optimizer"):
            s.opt.step()


def plain_profiled_step(s: Step, x: torch.Tensor, y: torch.Tensor, timer: Timer) -> None:
    with timer.span("step"):
        s.opt.zero_grad(set_to_none=True)
        with timer.span("forward"):
            out = s.model(x)
        with timer.span("loss"):
            loss = F.cross_entropy(out, y)
        with timer.span("backward"):
            loss.backward()
        with timer.span("optimizer"):
            s.opt.step()


def profile_breakdown(head_width: int, batch: int, opts: argparse.Namespace) -> dict[str, Any]:
    """Where a GradTail step's time goes: perf_counter spans + torch.profiler top ops."""
    from torch.profiler import ProfilerActivity, profile

    x, y = make_batch(batch, opts.seed)
    variants = ["plain", *GT_VARIANTS]
    steps = {v: Step(v, head_width, opts.seed, opts.lr) for v in variants}
    for s in steps.values():
        for _ in range(opts.warmup):
            s.step(x, y)
    n = opts.profile_steps
    result: dict[str, Any] = {"head": f"{head_width}x{CLASSES}", "B": batch, "steps": n, "variants": {}}
    # 1) perf_counter spans, interleaved, no profiler running (its overhead distorts small ops).
    timers = {v: Timer(False) for v in variants}
    for _ in range(n):
        for v in variants:
            if v == "plain":
                plain_profiled_step(steps[v], x, y, timers[v])
            else:
                with instrumented(timers[v]):
                    profiled_step(steps[v], x, y, timers[v])
    # 2) torch.profiler over the same steps: the aten ops inside GradTail's part of the step.
    for v in variants:
        timer = timers[v]
        per_step = {k: t / n for k, t in timer.seconds.items()}
        entry: dict[str, Any] = {"spans_ms": {k: 1e3 * t for k, t in per_step.items()}}
        selfs = {}
        for parent, children in PROFILE_TREE.items():
            if parent in per_step:
                kids = sum(per_step.get(c, 0.0) for c in children)
                selfs[parent] = 1e3 * (per_step[parent] - kids)
        entry["self_ms"] = selfs
        if v != "plain":
            ptimer = Timer(True)
            with instrumented(ptimer), profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(max(2, n // 2)):
                    profiled_step(steps[v], x, y, ptimer)
            k = max(2, n // 2)
            gt_label = "gt.backward" if v == "gt_all_backward" else "gt.weights"
            entry["profiler_top_ops"] = top_ops_under(prof, gt_label, k)
        result["variants"][v] = entry
    return result


def top_ops_under(prof: Any, label: str, steps: int, limit: int = 12) -> list[dict[str, Any]]:
    """aten ops (self CPU time per step) that ran inside the ``label`` record_function spans."""
    events = prof.events()
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.name == label]
    totals: dict[str, list[float]] = {}
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        start = e.time_range.start
        if any(a <= start <= b for a, b in spans):
            t = totals.setdefault(e.name, [0.0, 0])
            t[0] += e.self_cpu_time_total
            t[1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:limit]
    return [
        {"op": name, "self_ms_per_step": us / 1e3 / steps, "calls_per_step": c / steps}
        for name, (us, c) in rows
    ]


# --------------------------------------------------------------------------- checks and report


def check(key: str, value: float | None) -> dict[str, Any]:
    return _meta.target_check(key, TARGETS[key], value)


def checks_for(head: str, batch: int, variant: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    if head == "512x1000" and batch == 256 and variant == "gt_head":
        out.append(check("head_ratio", entry.get("ratio_to_plain")))
    if head == "512x1000" and batch == 256 and variant == "gt_all_backward":
        out.append(check("all_backward_ratio", entry.get("ratio_to_plain")))
    if head == "2048x1000" and variant == "gt_head":
        out.append(check("extra_over_kernel", entry.get("extra_over_kernel")))
    if variant in GT_VARIANTS and "peak_ratio_to_plain" in entry:
        out.append(check("memory_ratio", entry.get("peak_ratio_to_plain")))
    return out


def grad_agreement(head_width: int, batch: int, opts: argparse.Namespace) -> float:
    """Max |.grad| difference of gt.backward (book-keeping) vs gt.weights + weighted backward."""
    x, y = make_batch(batch, opts.seed)
    a, b = (
        Step("gt_all_backward", head_width, opts.seed, opts.lr),
        Step("gt_all_weights", head_width, opts.seed, 0.0),
    )
    for _ in range(2):  # the second step has a reference, so the weights are not all ones
        for s in (a, b):
            s.opt.zero_grad(set_to_none=True)
        la = F.cross_entropy(a.model(x), y, reduction="none")
        lb = F.cross_entropy(b.model(x), y, reduction="none")
        a.gt.backward(la)  # type: ignore[union-attr]
        (b.gt.weights(lb) * lb).mean().backward()  # type: ignore[union-attr]
    return max(
        float((p.grad - q.grad).abs().max())
        for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True)
    )


def source_hash(ops_dir: Path, torch_dir: Path) -> str:
    """Hash of the package sources in two directories (same value for a snapshot and its origin)."""
    import hashlib

    h = hashlib.sha256()
    for prefix, folder in (("gradtail_ops", ops_dir), ("gradtail_torch", torch_dir)):
        for path in sorted(folder.glob("*.py")):
            h.update(f"{prefix}/{path.name}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def imported_source_hash() -> str:
    """Hash of the sources this process imported (the snapshot when there is one)."""
    import gradtail_torch

    return source_hash(Path(gradtail_ops.__file__).parent, Path(gradtail_torch.__file__).parent)


def working_tree_hash() -> str:
    return source_hash(REPO / "gradtail_ops", REPO / "adapters" / "gradtail_torch")


GIT_DIRTY = {"gradtail_ops_dirty": ("gradtail_ops", "adapters")}


def machine_info(opts: argparse.Namespace, git: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    versions = {"torch": torch.__version__, "numpy": np.__version__}
    if opts.opacus_ok:
        import opacus

        versions["opacus"] = opacus.__version__
    return _meta.machine_info(
        versions,
        git=git,
        fields={
            "torch_num_threads": torch.get_num_threads(),
            "threads": _meta.threads_info(opts.threads, torch_num_threads=torch.get_num_threads()),
        },
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training-step time and peak memory of gradtail_torch.GradTail vs. a plain step "
        "(and torch.func / Opacus per-example gradients), on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="B=64 only, few repeats, in-process memory: < 60 s")
    _meta.add_out_argument(p, DEFAULT_OUT, QUICK_OUT)
    p.add_argument("--heads", default=",".join(HEADS), help="comma-separated subset of " + ",".join(HEADS))
    p.add_argument(
        "--batches", default=None, help="comma-separated batch sizes (default 64,256,1024; quick 64)"
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of " + ",".join(VARIANTS),
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per (head, B) (default 11; quick 3)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed rounds per (head, B); rounds drop (never below 3) to fit "
        "(default 30; quick 3)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per variant before timing (default 2; quick 1)",
    )
    p.add_argument(
        "--memory",
        choices=("subprocess", "inprocess", "none"),
        default=None,
        help="peak memory: a fresh subprocess per variant (RSS cross-check honest), in this process "
        "(profiler only), or not at all (default subprocess; quick inprocess)",
    )
    p.add_argument(
        "--max-materialize-gib",
        type=float,
        default=None,
        help="skip torch.func/Opacus where their per-example gradients would exceed this many GiB "
        "(default 2; quick 0.75)",
    )
    p.add_argument(
        "--profile-batch", type=int, default=None, help="B of the profile pass (default 256; quick 64)"
    )
    p.add_argument(
        "--profile-steps", type=int, default=None, help="steps in the profile pass (default 8; quick 2)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 0 keeps torch's default. On a shared 2-core machine 1 gives "
        "stable ratios: with another process on a core, 2-thread ops stall for tens of ms",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="import the package from the working tree instead of a copy taken at the start",
    )
    p.add_argument(
        "--archs",
        default=",".join(ARCHS),
        help="comma-separated subset of " + ",".join(ARCHS) + " (the long-tail suite's image models; "
        "empty: none)",
    )
    p.add_argument(
        "--arch-batches", default=None, help="batch sizes of the --archs rows (default 128; quick 32)"
    )
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for a in args.archs:
        if a not in ARCHS:
            p.error(f"unknown arch {a!r}; choose from {ARCHS}")
    if args.arch_batches is None:
        args.arch_batches = list(ARCH_BATCHES_QUICK if args.quick else ARCH_BATCHES_FULL)
    else:
        args.arch_batches = [int(b) for b in args.arch_batches.split(",") if b.strip()]
    for h in args.heads:
        if h not in HEADS:
            p.error(f"unknown head {h!r}; choose from {tuple(HEADS)}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")
    if args.batches is None:
        args.batches = list(BATCHES_QUICK if args.quick else BATCHES_FULL)
    else:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 11
    if args.budget is None:
        args.budget = 3.0 if args.quick else 30.0
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.max_materialize_gib is None:
        args.max_materialize_gib = 0.75 if args.quick else 2.0
    if args.memory is None:
        args.memory = "inprocess" if args.quick else "subprocess"
    if args.profile_batch is None:
        args.profile_batch = 64 if args.quick else 256
    if args.profile_steps is None:
        args.profile_steps = 2 if args.quick else 8
    _meta.resolve_out(args, DEFAULT_OUT, QUICK_OUT)
    return args


def _fmt_row(e: dict[str, Any]) -> str:
    if e.get("skipped"):
        return f"  {e['variant']:16s} skipped: {e['skipped']}"
    mem = e.get("memory", {})
    parts = [
        f"  {e['variant']:16s} {e['seconds'] * 1e3:9.2f} ms",
        f"x{e['ratio_to_plain']:.3f}",
        f"peak {mem.get('step_peak_bytes', 0) / 2**20:8.1f} MiB" if mem.get("step_peak_bytes") else "",
        f"(x{e['peak_ratio_to_plain']:.2f})" if e.get("peak_ratio_to_plain") else "",
    ]
    for c in e.get("checks", []):
        parts.append(f"{c['name']}={c['value']:.3f} {'PASS' if c['passed'] else 'FAIL'}")
    return " ".join(p for p in parts if p)


def child_main(spec_json: str, threads: int) -> int:
    if threads:
        torch.set_num_threads(threads)
    spec = json.loads(spec_json)
    print(json.dumps({**measure_memory(**spec), "source_hash": imported_source_hash()}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts._child is not None:
        return child_main(opts._child, opts.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    load_before = _meta.load_average()
    started = time.perf_counter()
    tree_start = working_tree_hash()
    git_start = _meta.git_state(GIT_DIRTY)
    measured = imported_source_hash()
    opts.opacus_ok, opts.opacus_info = (
        opacus_status() if "opacus_all" in opts.variants else (False, "not requested")
    )
    print(f"opacus: {opts.opacus_info}", flush=True)
    results: list[dict[str, Any]] = []
    kernels: list[dict[str, Any]] = []
    sanity: list[dict[str, Any]] = []
    for head in opts.heads:
        width = HEADS[head]
        for batch in opts.batches:
            runnable = [v for v in opts.variants if skip_reason(v, width, batch, opts) is None]
            t0 = time.perf_counter()
            times, kernel_times = time_config(width, batch, runnable, opts)
            kernel_s = statistics.median(kernel_times)
            kernels.append(
                {
                    "head": head,
                    "B": batch,
                    "seconds": kernel_s,
                    "seconds_min": min(kernel_times),
                    "seconds_all": kernel_times,
                }
            )
            plain_s = statistics.median(times["plain"])
            memory: dict[str, dict[str, Any]] = {}
            if opts.memory != "none":
                for v in runnable:
                    if opts.memory == "subprocess":
                        memory[v] = memory_subprocess(v, width, batch, opts)
                    else:
                        memory[v] = measure_memory(
                            v, width, batch, opts.seed, opts.lr, opts.warmup, rss=False
                        )
            plain_peak = memory.get("plain", {}).get("step_peak_bytes")
            print(f"[{head} B={batch}] kernel {kernel_s * 1e3:.2f} ms ({time.perf_counter() - t0:.0f} s)")
            for v in opts.variants:
                entry: dict[str, Any] = {
                    "head": head,
                    "B": batch,
                    "variant": v,
                    "description": VARIANT_TEXT[v],
                }
                reason = skip_reason(v, width, batch, opts)
                if reason is not None:
                    entry["skipped"] = reason
                    entry["checks"] = []
                    results.append(entry)
                    print(_fmt_row(entry))
                    continue
                sec = statistics.median(times[v])
                entry.update(
                    {
                        "seconds": sec,
                        "seconds_min": min(times[v]),
                        "seconds_all": times[v],
                        "repeats": len(times[v]),
                        "ratio_to_plain": sec / plain_s,
                        "extra_seconds": sec - plain_s,
                        "kernel_seconds": kernel_s,
                        "extra_over_kernel": (sec - plain_s) / kernel_s,
                    }
                )
                if v in memory:
                    entry["memory"] = memory[v]
                    entry["peak_bytes"] = memory[v].get("step_peak_bytes")
                    ratio = _meta.ratio(entry["peak_bytes"], plain_peak)
                    if ratio is not None:
                        entry["peak_ratio_to_plain"] = ratio
                    rss_ratio = _meta.ratio(
                        memory[v].get("rss_peak_above_baseline_bytes"),
                        memory["plain"].get("rss_peak_above_baseline_bytes"),
                    )
                    if rss_ratio is not None:
                        entry["rss_peak_ratio_to_plain"] = rss_ratio
                entry["checks"] = checks_for(head, batch, v, entry)
                results.append(entry)
                print(_fmt_row(entry), flush=True)
            if {"gt_all_backward", "gt_all_weights"} <= set(runnable) and batch == min(opts.batches):
                item: dict[str, Any] = {"head": head, "B": batch}
                item["max_abs_grad_diff_bookkeeping_vs_weighted"] = grad_agreement(width, batch, opts)
                sanity.append(item)
            gc.collect()
    profiles = []
    if set(GT_VARIANTS) <= set(opts.variants):
        for head in opts.heads:
            t0 = time.perf_counter()
            profiles.append(profile_breakdown(HEADS[head], opts.profile_batch, opts))
            print(f"[profile {head} B={opts.profile_batch}] {time.perf_counter() - t0:.0f} s", flush=True)
    arch_results: list[dict[str, Any]] = []
    for arch in opts.archs:
        for batch in opts.arch_batches:
            t0 = time.perf_counter()
            arch_results += arch_rows(arch, batch, opts)
            print(f"[{arch} B={batch}] {time.perf_counter() - t0:.0f} s", flush=True)
            for e in arch_results[-len(ARCH_VARIANTS) :]:
                print(_fmt_row(e), flush=True)
    load_after = _meta.load_average()
    machine = machine_info(opts, git_start)  # git: the snapshot's commit, taken at the start
    machine |= _meta.load_fields(load_before, load_after)
    machine["git_commit_at_end"] = _meta.git("rev-parse", "HEAD")
    child_hashes = {r["memory"].get("source_hash") for r in results if r.get("memory")} - {None}
    tree_end = working_tree_hash()
    machine["source"] = {
        "measured_hash": measured,
        "snapshot": SNAPSHOT is not None,
        "memory_subprocess_hashes": sorted(child_hashes),
        "consistent": child_hashes <= {measured},
        "working_tree_hash_start": tree_start,
        "working_tree_hash_end": tree_end,
        "measured_is_working_tree_at_end": measured == tree_end,
    }
    if not machine["source"]["consistent"]:
        print("WARNING: the memory subprocesses imported other sources than the timed run", file=sys.stderr)
    if tree_end != measured:
        print(
            "note: gradtail_ops/gradtail_torch in the working tree differ from the measured snapshot "
            f"(measured {measured}, working tree now {tree_end})",
            file=sys.stderr,
        )
    checks = [c for r in results for c in r["checks"]]
    doc = {
        **_meta.run_header(BENCHMARK, SCHEMA_VERSION, _meta.command_line(argv)),
        "quick": opts.quick,
        "repeats": opts.repeats,
        "budget_seconds": opts.budget,
        "warmup": opts.warmup,
        "seed": opts.seed,
        "lr": opts.lr,
        "dtype": "float32",
        "wall_seconds": time.perf_counter() - started,
        "machine": machine,
        "model": {
            "layers": f"{D_IN}->{HIDDEN}->{HIDDEN} (ReLU), then ->W->{CLASSES} with W = head input width",
            "heads": {
                h: {"head": f"{w}->{CLASSES}", "params": n_params(build_model(w, 0))}
                for h, w in HEADS.items()
            },
        },
        "variants": {v: VARIANT_TEXT[v] for v in opts.variants},
        "opacus": {"available": opts.opacus_ok, "info": opts.opacus_info},
        "method": {
            "timing": TIMING_METHOD,
            "memory": MEMORY_METHOD,
            "memory_mode": opts.memory,
            "kernel": "linear_dots_and_sq_norms(A, D, G_W, G_b) + linear_mean_grad(A, D, example_weights=c) "
            "on the head's inputs A (B, d_in) and output gradients D (B, d_out), under torch.no_grad()",
            "profile": "perf_counter spans around GradTail's internals (benchmark-side wrappers, no package "
            "change), averaged over `steps` steps; self_ms = a span minus its listed children (Python, "
            "validation, array_api_compat dispatch, small ops). profiler_top_ops: torch.profiler self CPU "
            "time of the ops inside gt.weights / gt.backward.",
        },
        "targets": TARGETS,
        "summary": _meta.check_summary(checks),
        "results": results,
        "kernel": kernels,
        "sanity": sanity,
        "profile": profiles,
        "arch_models": {a: ARCH_TEXT[a] for a in opts.archs},
        "arch_results": arch_results,
    }
    out = _meta.write_json(Path.cwd() / opts.out, doc)
    _meta.print_closing(doc, out, load_before, load_after)
    return 0


# ----------------------------------------------------- render: results/torch_overhead.json


_TO_VARIANTS = (
    ("plain", "plain"),
    ("gt_head", "GradTail head"),
    ("gt_all_backward", "GradTail all, `gt.backward`"),
    ("gt_all_weights", "GradTail all, weights + backward"),
    ("func_head", "torch.func head"),
    ("opacus_all", "Opacus all"),
)
# Profile spans shown as columns (label in the JSON, column header).
_TO_SPANS = (
    ("forward", "forward"),
    ("autograd.grad (output grads)", "`autograd.grad`"),
    ("dots_and_sq_norms", "dots + norms"),
    ("reference mean grad", "reference mean grad"),
    ("ema_update", "`ema_update`"),
    ("book-keeping grads", "book-keeping grads"),
    ("weighted backward", "weighted backward"),
    ("backward", "backward"),
    ("optimizer", "SGD step"),
)


def _to_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    if entry.get("skipped"):
        return "skipped"
    return f"{fmt_seconds(entry['seconds'])} ({fmt_ratio(entry['ratio_to_plain'])})"


def _to_mem_cell(entry: dict[str, Any] | None, plain: dict[str, Any] | None = None) -> str:
    if entry is None:
        return ""
    if entry.get("skipped"):
        return "skipped"
    mem = entry.get("memory") or {}
    if mem.get("error"):
        return "error"
    if entry.get("peak_bytes") is None:
        return "n/a"
    cell = f"{fmt_bytes(entry['peak_bytes'])} ({fmt_ratio(entry.get('peak_ratio_to_plain'))})"
    state = mem.get("persistent_bytes", 0) - ((plain or {}).get("memory") or {}).get("persistent_bytes", 0)
    if plain is not None and plain is not entry and state > 0:
        cell += f", state {fmt_bytes(state)}"
    if entry.get("rss_peak_ratio_to_plain") is not None:
        cell += f" / RSS {fmt_ratio(entry['rss_peak_ratio_to_plain'])}"
    return cell


def render(doc: dict[str, Any]) -> str:
    results = doc["results"]
    index = {(r["head"], r["B"], r["variant"]): r for r in results}
    configs = list(dict.fromkeys((r["head"], r["B"]) for r in results))
    present = {r["variant"] for r in results}
    variants = [(k, t) for k, t in _TO_VARIANTS if k in present]
    kernels = {(k["head"], k["B"]): k for k in doc.get("kernel", [])}
    checks = [(r, c) for r in results for c in r["checks"]]
    passed = sum(c["passed"] is True for _, c in checks)

    out = [machine_line(doc), ""]
    if doc.get("quick"):
        out += ["> **Quick smoke run** (B=64 only, few repeats): the targets are meant for the full run.", ""]
    source = doc.get("machine", {}).get("source") or {}
    if source.get("consistent") is False:
        out += ["> **Warning:** the memory subprocesses imported other package sources; rerun.", ""]
    elif source.get("measured_is_working_tree_at_end") is False:
        out += [
            "> Note: the package changed in the working tree during this run; it measured the "
            f"sources as they were at its start (hash {source.get('measured_hash')}).",
            "",
        ]
    model = doc.get("model", {})
    heads = ", ".join(f"{h} ({v['params']:,} parameters in all)" for h, v in model.get("heads", {}).items())
    out += [
        f"Model: {model.get('layers', '?')}; heads {heads}. One step = zero_grad, forward, loss, "
        "backward, SGD step. Opacus: " + (doc.get("opacus", {}).get("info") or "n/a") + ".",
        "",
        f"**{passed} of {len(checks)} targets pass.**",
        "",
        table(
            ["target", "where", "measured", "result"],
            (
                [
                    c["target"]["text"],
                    f"{r['head']}, B={r['B']}, {r['variant']}",
                    fmt_ratio(c["value"]),
                    {True: "pass", False: "**FAIL**", None: "n/a"}[c["passed"]],
                ]
                for r, c in checks
            ),
        ),
    ]

    out += [
        "",
        "### Step time (median; ratio to the plain step)",
        "",
        table(
            ["head", "B", *(t for _, t in variants), "head kernel", "GradTail head: extra / kernel"],
            (
                [
                    h,
                    b,
                    *(_to_cell(index.get((h, b, k))) for k, _ in variants),
                    fmt_seconds(kernels.get((h, b), {}).get("seconds")),
                    fmt_ratio(index.get((h, b, "gt_head"), {}).get("extra_over_kernel")),
                ]
                for h, b in configs
            ),
        ),
    ]
    if any(r.get("memory") for r in results):
        out += [
            "",
            "### Peak memory of a step",
            "",
            "Peak live tensor bytes (ratio to plain; of which the reference state kept between steps) / "
            "ratio of the RSS cross-check.",
            "",
            table(
                ["head", "B", *(t for _, t in variants)],
                (
                    [
                        h,
                        b,
                        *(
                            _to_mem_cell(index.get((h, b, k)), index.get((h, b, "plain")))
                            for k, _ in variants
                        ),
                    ]
                    for h, b in configs
                ),
            ),
        ]

    out += _arch_section(doc)

    for prof in doc.get("profile", []):
        pv = prof["variants"]
        spans = [(k, t) for k, t in _TO_SPANS if any(k in v["spans_ms"] for v in pv.values())]
        out += [
            "",
            f"### Where the time goes: head {prof['head']}, B={prof['B']} (ms per step, mean of "
            f"{prof['steps']} steps)",
            "",
            table(
                ["variant", "step", *(t for _, t in spans), "other GradTail (Python, checks, small ops)"],
                (
                    [
                        v,
                        f"{e['spans_ms'].get('step', float('nan')):.1f}",
                        *(f"{e['spans_ms'][k]:.1f}" if k in e["spans_ms"] else "" for k, _ in spans),
                        _other_gradtail_ms(e),
                    ]
                    for v, e in pv.items()
                ),
            ),
        ]
        # Written by runs before the EMA prototype was removed (the committed JSON has it);
        # rendered while such a file is the current result.
        ema = prof.get("ema_update_ms")
        if ema:
            out += [
                "",
                "`ema_update` alone on the real reference state (ms): "
                + "; ".join(
                    f"{name} ({r['reference_floats']:,.0f} floats): package {r['package']:.2f}, "
                    f"prototype {r['prototype']:.2f} ({fmt_ratio(r['package'] / r['prototype'])} faster)"
                    for name, r in ema.items()
                )
                + ".",
            ]
        tops = [(v, e["profiler_top_ops"]) for v, e in pv.items() if e.get("profiler_top_ops")]
        if tops:
            out += ["", "Top ops inside GradTail's call (torch.profiler self CPU, ms per step):", ""]
            out += [
                f"- {v}: " + ", ".join(f"`{o['op']}` {o['self_ms_per_step']:.1f}" for o in ops[:6])
                for v, ops in tops
            ]

    sanity = doc.get("sanity") or []
    if sanity:
        out += [""] + [
            f"Check ({s['head']}, B={s['B']}): max |.grad| difference, `gt.backward` book-keeping vs. "
            f"weights + weighted backward: {s['max_abs_grad_diff_bookkeeping_vs_weighted']:.1e}" + "."
            for s in sanity
        ]

    method = doc.get("method", {})
    out += ["", "<details><summary>How this was measured</summary>", ""]
    if method.get("timing"):
        out += [f"- Timing: {method['timing']}"]
    if method.get("kernel"):
        out += [f"- Head kernel: {method['kernel']}"]
    for key, text in (method.get("memory") or {}).items():
        out += [f"- Memory, `{key}`: {text}"]
    if method.get("profile"):
        out += [f"- Profile: {method['profile']}"]
    for key, text in (doc.get("variants") or {}).items():
        out += [f"- `{key}`: {text}"]
    out += ["", "</details>"]
    return "\n".join(out)


_ARCH_COLUMNS = (("plain", "plain"), ("gt_head", "GradTail head"), ("gt_all_weights", "GradTail(model)"))


def _arch_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    if entry.get("skipped"):
        return "fails: " + entry["skipped"].split(":", 1)[0]
    peak = f"{fmt_bytes(entry['peak_bytes'])} ({fmt_ratio(entry.get('peak_ratio_to_plain'))})"
    return f"{_to_cell(entry)} / {peak}"


def _arch_section(doc: dict[str, Any]) -> list[str]:
    """The CNN and ViT rows: step time and in-process peak memory, ratios to the plain step."""
    rows = doc.get("arch_results") or []
    if not rows:
        return []
    index = {(r["arch"], r["B"], r["variant"]): r for r in rows}
    configs = list(dict.fromkeys((r["arch"], r["B"]) for r in rows))
    out = [
        "",
        "### The long-tail suite's image models (CNN, ViT)",
        "",
        "Median step time (ratio to plain) / peak live tensor bytes of a step, in-process (ratio to "
        "plain). GradTail(model) tracks every nn.Linear (weights + weighted backward).",
        "",
        table(
            ["model", "B", *(t for _, t in _ARCH_COLUMNS)],
            ([a, b, *(_arch_cell(index.get((a, b, k))) for k, _ in _ARCH_COLUMNS)] for a, b in configs),
        ),
    ]
    out += [""] + [f"- {a}: {text}" for a, text in (doc.get("arch_models") or {}).items()]
    failures = [r for r in rows if r.get("skipped")]
    out += [f"- {r['arch']} `{r['variant']}` failed: {r['skipped']}" for r in failures]
    return out


def _other_gradtail_ms(entry: dict[str, Any]) -> str:
    """GradTail's time outside the spans shown as columns: its self times and the small parts."""
    spans, selfs = entry["spans_ms"], entry.get("self_ms", {})
    if "gt.weights" not in spans and "gt.backward" not in spans:
        return ""
    small = ("check_loss", "inspect_graph", "inverse_norms", "cosine", "weight curve")
    total = sum(spans.get(k, 0.0) for k in small)
    total += sum(
        v for k, v in selfs.items() if k in ("gt.weights", "gt.backward", "_step", "linear_score_and_update")
    )
    return f"{total:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())

"""What every benchmark script shares: machine, load, git state, header, JSON output, timing
rounds, peak-RSS probes and target checks.

Every benchmark JSON carries the same ``machine`` block (read by ``benchmarks/render_tables.py``)
and the same header (``benchmark``, ``schema_version``, ``date``, ``command``); these functions
build them, so the four scripts write them alike.

This module imports no array library: ``jax_overhead.py`` sets ``XLA_FLAGS`` through it before JAX
is imported, and ``torch_overhead.py`` imports ``gradtail_ops`` from a snapshot of the sources, so
``gradtail_ops`` is looked up only when :func:`machine_info` runs.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``; ``platform.processor()`` elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_bytes() -> int | None:
    """Total memory in bytes from ``/proc/meminfo``; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_usable() -> int | None:
    """How many CPUs this process may run on (its affinity mask); None where unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def git(*args: str) -> str | None:
    """Stripped stdout of ``git ARGS`` run in the repository; None if git fails or is missing."""
    try:
        res = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_state(dirty: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """``{"commit": HEAD, key: uncommitted changes under paths?, ...}`` for each ``key: paths`` in ``dirty``.

    A flag is None where git cannot tell (no git, not a checkout).
    """
    state: dict[str, Any] = {"commit": git("rev-parse", "HEAD")}
    for key, paths in dirty.items():
        status = git("status", "--porcelain", "--", *paths)
        state[key] = None if status is None else bool(status)
    return state


def machine_info(
    extra_versions: Mapping[str, str] | None = None,
    *,
    git: dict[str, Any],
    fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``machine`` block: platform, CPU, memory, library versions, then ``fields``, then ``git``.

    ``versions`` holds Python and gradtail_ops, then ``extra_versions`` in their order; ``git`` is a
    :func:`git_state` result.
    """
    import gradtail_ops

    versions = {"python": platform.python_version(), "gradtail_ops": gradtail_ops.__version__}
    versions.update(extra_versions or {})
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": cpu_usable(),
        "mem_total_bytes": mem_total_bytes(),
        "versions": versions,
        **(fields or {}),
        "git": git,
    }


def gradtail_defaults(warmup_steps: str) -> dict[str, Any]:
    """The ``config.gradtail_defaults`` block: the library's GradTail defaults, then ``warmup_steps``.

    ``warmup_steps`` says in words what warm-up the benchmark uses. ``gradtail_ops`` is looked up
    when this runs (see the module docstring).

    Examples
    --------
    >>> gradtail_defaults("one epoch")["curve"]["kind"] == __import__("gradtail_ops").DEFAULT_CURVE.kind
    True
    """
    import gradtail_ops

    curve = gradtail_ops.DEFAULT_CURVE
    return {
        "reference": gradtail_ops.DEFAULT_REFERENCE,
        "decay": gradtail_ops.DEFAULT_DECAY,
        "curve": {
            "kind": curve.kind,
            "quantile": curve.quantile,
            "max_weight": curve.max_weight,
            "normalize": curve.normalize,
        },
        "warmup_steps": warmup_steps,
    }


def threads_info(requested: int, **fields: Any) -> dict[str, Any]:
    """The ``machine.threads`` block: the requested count (0: "library default"), then ``fields``."""
    return {"requested": requested or "library default", **fields}


def xla_thread_flags(n: int) -> str:
    """Append flags capping XLA's CPU intra-op threads at ``n`` to ``XLA_FLAGS``; return the new value.

    XLA reads them once, when its backend starts: call this before JAX is imported.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={n}".strip()
    )
    return os.environ["XLA_FLAGS"]


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (``os.getloadavg()``)."""
    return os.getloadavg()


def load_fields(
    before: Sequence[float], after: Sequence[float], *, one_minute_only: bool = False
) -> dict[str, Any]:
    """The ``machine`` keys for the load averages taken before and after the timed work."""
    full = {} if one_minute_only else {"loadavg_before": list(before), "loadavg_after": list(after)}
    return full | {"loadavg_1min_before": before[0], "loadavg_1min_after": after[0]}


def utc_timestamp() -> str:
    """Now, in UTC, ISO 8601 to the second (the ``date`` of a run)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line(argv: Sequence[str] | None = None, *, prog: str | None = None) -> str:
    """The command of a run, for the ``command`` key.

    Without ``prog``: the interpreter's name and ``sys.argv``, or ``argv`` joined where ``main``
    was given one. With ``prog``: ``prog`` and the shell-quoted arguments (``sys.argv[1:]`` or
    ``argv``).
    """
    if prog is not None:
        return prog + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    return " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv)


def run_header(
    benchmark: str, schema_version: int, command: str, *, quick: bool | None = None
) -> dict[str, Any]:
    """The first keys of a result file: benchmark, schema_version, [quick,] date, command.

    ``quick`` is placed before ``date`` only when given (the long-tail suite's layout); the other
    benchmarks write it after the header.
    """
    header: dict[str, Any] = {"benchmark": benchmark, "schema_version": schema_version}
    if quick is not None:
        header["quick"] = quick
    return header | {"date": utc_timestamp(), "command": command}


def deviations(quick: bool, **settings: tuple[Any, Any]) -> dict[str, Any]:
    """``{name: {"used": ..., "default": ...}}`` for each ``name=(used, default)`` that differ; none
    for a ``--quick`` smoke run (its settings differ by design).

    Examples
    --------
    >>> deviations(False, epochs=(12, 12), seeds=([0, 1], [0, 1, 2]))
    {'seeds': {'used': [0, 1], 'default': [0, 1, 2]}}
    """
    if quick:
        return {}
    return {k: {"used": u, "default": d} for k, (u, d) in settings.items() if u != d}


def write_json(path: Path, doc: Any, *, dumps: Callable[[Any], str] | None = None) -> Path:
    """Write ``doc`` to ``path`` (parents created) with a final newline; return ``path``.

    ``dumps`` encodes it (default: ``json.dumps(doc, indent=1)``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((dumps(doc) if dumps is not None else json.dumps(doc, indent=1)) + "\n")
    return path


def add_out_argument(parser: Any, default: Path, quick: Path) -> None:
    """``--out``: the full run writes ``default`` (committed); ``--quick`` writes ``quick`` (ignored)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON output (default: {default}; with --quick: {quick}, so a smoke run never "
        "overwrites the full results)",
    )


def resolve_out(args: Any, default: Path, quick: Path) -> None:
    """Fill ``args.out`` when the command line left it out."""
    if args.out is None:
        args.out = quick if args.quick else default


def check_summary(checks: list[dict[str, Any]]) -> dict[str, int]:
    """Counts of target checks by verdict (``passed`` is True, False or None)."""
    return {
        "checks": len(checks),
        "passed": sum(c["passed"] is True for c in checks),
        "failed": sum(c["passed"] is False for c in checks),
        "unknown": sum(c["passed"] is None for c in checks),
    }


def print_closing(doc: dict[str, Any], out: Path, load_before: Any, load_after: Any) -> None:
    """The last line of a checked benchmark: verdicts, load, wall time, output path."""
    s = doc["summary"]
    print(
        f"{s['passed']}/{s['checks']} targets pass ({s['failed']} fail, {s['unknown']} unknown); "
        f"load {load_before[0]:.2f} -> {load_after[0]:.2f}; {doc['wall_seconds']:.0f} s; wrote {out}"
    )


# --------------------------------------------------------------------------- timing


def timed(call: Callable[[], Any]) -> float:
    """Seconds of one ``call()`` (``time.perf_counter``); the caller synchronises async work."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def rounds_for(per_round: float, repeats: int, budget_s: float) -> int:
    """Timed rounds that fit ``budget_s`` at ``per_round`` seconds each: at least 3, at most ``repeats``."""
    return max(3, min(repeats, int(budget_s / per_round) if per_round > 0 else repeats))


def round_robin(names: Sequence[str], rounds: int, run: Callable[[str], float]) -> dict[str, list[float]]:
    """Run every name once per round, the order rotated each round (no variant always goes first);
    ``run(name)`` returns the seconds of one call. Garbage is collected between rounds."""
    names = list(names)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        gc.collect()
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(run(n))
    return times


# --------------------------------------------------------------------------- peak RSS (Linux)


def read_status_kib(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); None where it cannot be read."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``/proc/self/clear_refs``); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def chrome_trace(prof: Any) -> dict[str, Any]:
    """The events of a finished ``torch.profiler.profile`` as its Chrome trace JSON (the one export
    that keeps the ``[memory]`` events with their order)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            trace: dict[str, Any] = json.load(fh)
    finally:
        os.unlink(path)
    return trace


# --------------------------------------------------------------------------- target checks


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``; None when either is missing or ``den <= 0``."""
    if num is None or den is None or den <= 0:
        return None
    return float(num) / float(den)


def passes(target: Mapping[str, Any], value: float | None) -> bool | None:
    """``value`` against ``target`` (``{"op": ">=" or "<=", "value": ...}``); None if not finite."""
    if value is None or not math.isfinite(value):
        return None
    if target["op"] == ">=":
        return bool(value >= target["value"])
    return bool(value <= target["value"])


def target_check(
    name: str, target: Mapping[str, Any], value: float | None, **robust: float | None
) -> dict[str, Any]:
    """A target check: the verdict on ``value`` (a ratio of medians), then each noise-robust ratio
    in ``robust`` (``min_based``: of the fastest repeats, ``paired``: median of per-round ratios)
    with its own verdict; ``noise_bound`` when the verdicts that exist disagree.

    Examples
    --------
    >>> c = target_check("r", {"op": "<=", "value": 1.15}, 1.2, min_based=1.1, paired=1.16)
    >>> c["passed"], c["min_based_passed"], c["noise_bound"]
    (False, True, True)
    """
    entry: dict[str, Any] = {
        "name": name,
        "value": value,
        "target": dict(target),
        "passed": passes(target, value),
    }
    if robust:
        for key, v in robust.items():
            entry[key] = v
            entry[f"{key}_passed"] = passes(target, v)
        verdicts = {entry["passed"], *(entry[f"{k}_passed"] for k in robust)}
        entry["noise_bound"] = len(verdicts - {None}) > 1
    return entry

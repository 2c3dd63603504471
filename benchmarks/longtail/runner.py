"""Checkpointed, optionally parallel execution of benchmark runs (``run.py``, ``regression.py``).

A task is ``(dataset, seed, method, epochs, steps)``; ``steps`` only sizes the progress bar.
Training is deterministic (one thread per run, seeded), so a finished run's row is stored
under a key of everything that determines it and reused by any later call with that key.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

Task = tuple[str, int, str, int, int]
#: ``worker(task[:4], args, bar)`` trains one run and returns its row; module-level, so that a
#: worker process can run it.
Worker = Callable[[tuple[str, int, str, int], argparse.Namespace, Any], dict[str, Any]]


def clean(obj: Any) -> Any:
    """NaN/inf become null (strict JSON), numpy scalars Python numbers, floats 6 significant digits."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None  # 6 significant digits
    return obj


def load_checkpoint(path: Path | None) -> dict[str, dict[str, Any]]:
    """Rows of earlier runs saved by ``--checkpoint`` (one JSON object per line), by run key."""
    if path is None or not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            out[entry["key"]] = entry["row"]
    return out


def save_checkpoint(path: Path | None, key: str, row: dict[str, Any]) -> None:
    """Append one run's row under its key (nothing without a path)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"key": key, "row": clean(row)}) + "\n")


def load_and_run(
    load: Callable[[str, int], Any],
    run_one: Callable[..., dict[str, Any]],
    task: tuple[str, int, str, int],
    args: argparse.Namespace,
    bar: Any,
) -> dict[str, Any]:
    """A `Worker` from a data loader and a run function: ``run_one(load(dataset, seed), dataset,
    method, seed, epochs, args, bar)``. Bind the first two with ``functools.partial`` (module-level
    functions, so that the partial pickles to a worker process); cache ``load``."""
    dataset, seed, method, epochs = task
    return run_one(load(dataset, seed), dataset, method, seed, epochs, args, bar)


def run_tasks(
    tasks: Sequence[Task],
    worker: Worker,
    args: argparse.Namespace,
    *,
    key: Callable[[str, int, str, int, argparse.Namespace], str],
    read: Sequence[Path | None] = (),
) -> tuple[list[dict[str, Any]], int]:
    """Every task's row in task order, and how many came from a checkpoint.

    Rows stored under a task's ``key`` in ``args.checkpoint`` or any of ``read`` are reused;
    the others run, ``args.jobs`` at a time (forked worker processes with ``args.threads``
    intra-op threads each; in this process when ``args.jobs <= 1``), and are appended to
    ``args.checkpoint`` as they finish. ``args.no_progress`` hides the step bar.
    """
    bar = tqdm(
        total=sum(t[-1] for t in tasks), unit="step", disable=args.no_progress, file=sys.stderr,
        dynamic_ncols=True,
    )  # fmt: skip
    cached: dict[str, dict[str, Any]] = {}
    for path in [*read, args.checkpoint]:
        cached |= load_checkpoint(path)
    results: dict[tuple[str, int, str], dict[str, Any]] = {}
    for t in tasks:
        row = cached.get(key(*t[:4], args))
        if row is not None:
            results[t[:3]] = row
            bar.update(t[-1])
    reused = len(results)
    todo = [t for t in tasks if t[:3] not in results]

    def done(task: Task, row: dict[str, Any]) -> None:
        results[task[:3]] = row
        save_checkpoint(args.checkpoint, key(*task[:4], args), row)

    if args.jobs <= 1:
        for task in todo:
            bar.set_postfix_str(f"{task[0]} {task[2]} seed {task[1]}")
            done(task, worker(task[:4], args, bar))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("fork"), initializer=torch.set_num_threads,
            initargs=(args.threads,),
        ) as pool:  # fmt: skip
            futures = {pool.submit(worker, t[:4], args, None): t for t in todo}
            for future in as_completed(futures):
                task = futures[future]
                done(task, future.result())
                bar.update(task[-1])
                bar.set_postfix_str(f"done {task[0]} {task[2]} seed {task[1]}")
    bar.close()
    return [results[t[:3]] for t in tasks], reused

"""The persistent per-example memory inside a `GradTailState`: index checks and the step.

Shared by the transformation and the efficient head path. The math is the core's
(`gradtail_ops.memory_update`, `gradtail_ops.memory_weights`); this module adds what JAX
needs: static checks of ``index``, the first-step and warm-up rules of
`gradtail_torch.GradTail` written with ``jnp.where`` (no Python branch on traced values), and
the data-parallel case, where every device folds the *global* batch into its copy so the
copies stay identical.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from gradtail_ops import MemoryState, memory_update, memory_weights

from ._options import Options

__all__ = ["check_index", "empty_memory", "memory_step"]


def empty_memory(memory_size: int | None, dtype: Any) -> MemoryState | None:
    """Zeros of shape (memory_size,) (scores in ``dtype``, int32 visits), or None when off.

    Plain ``jnp.zeros`` (uncommitted, like the rest of the state): a jitted step then compiles
    once (see `init_state`).
    """
    if memory_size is None:
        return None
    return MemoryState(score=jnp.zeros((memory_size,), dtype), visits=jnp.zeros((memory_size,), jnp.int32))


def check_index(index: Any, memory: MemoryState | None, batch: int, call: str) -> jax.Array | None:
    """``index`` as a JAX integer array of shape (batch,), or None when the memory is off.

    Raises (statically, so also under ``jax.jit``) when ``index`` is missing while the state
    holds a memory, given while it holds none, or of the wrong shape or dtype. Out-of-range
    values raise in `gradtail_ops.memory_update` when they are concrete (eager calls).
    """
    if memory is None:
        if index is not None:
            raise ValueError(
                f"`index` was given to {call} but the state has no per-example memory: build it with "
                "memory_size=<number of training examples> to use one; Received: index of type "
                f"{type(index).__name__} with shape {tuple(getattr(index, 'shape', ()))}."
            )
        return None
    size = int(memory.score.shape[0])
    if index is None:
        raise ValueError(
            f"The state keeps a per-example memory (memory_size={size}): pass index=, each example's "
            f"row in [0, {size}), to {call}; Received: index=None."
        )
    rows = jnp.asarray(index)
    if not jnp.issubdtype(rows.dtype, jnp.integer):
        raise TypeError(
            f"`index` must be an integer array of shape ({batch},), each example's row in [0, {size}); "
            f"Received: dtype={rows.dtype} with shape {tuple(rows.shape)}."
        )
    if tuple(rows.shape) != (batch,):
        raise ValueError(
            f"`index` must have shape ({batch},) (batch_size, per device under pmap/shard_map), one row "
            f"per example; Received: shape {tuple(rows.shape)}."
        )
    return rows


def _names(axis_name: Hashable) -> tuple[Hashable, ...]:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _gather(x: jax.Array, names: tuple[Hashable, ...], devices: int) -> jax.Array:
    """Every device's ``x`` (shape (B,)) in device order, shape (devices * B,), on every device.

    Each device writes its block into zeros and one ``psum`` adds them: the result is the
    same on every device, and ``shard_map`` types it device-invariant (unlike ``all_gather``),
    so the memory can be a replicated part of the state.
    """
    b = x.shape[0]
    start = jax.lax.axis_index(names) * b
    blocks = jax.lax.dynamic_update_slice(jnp.zeros((devices * b,), x.dtype), x, (start,))
    gathered: jax.Array = jax.lax.psum(blocks, names)  # type: ignore[no-untyped-call]
    return gathered


def memory_step(
    memory: MemoryState, index: jax.Array, alignment: jax.Array, steps_before: jax.Array, opts: Options
) -> tuple[jax.Array, MemoryState]:
    """Fold this batch's alignments into the memory; return the weights and the new memory.

    The rules of `gradtail_torch.GradTail`: the memory is not updated while ``steps_before``
    (reference updates before this step) is 0, as every alignment is then 0; the weights are
    ones while ``steps_before < max(1, warmup_steps)`` and the memory's weights after that.
    The first rule is a NaN score (the core leaves non-finite scores out), so the update stays
    a scatter of B rows, in place under ``jax.jit`` with a donated state.

    With ``opts.axis_name``, the indices and alignments of all devices are gathered first, so
    every device applies the same global-batch update (a single-device run on the whole
    batch), and the weights are normalised over the global batch; each device keeps its own
    examples' weights.

    Returns
    -------
    weights : jax.Array, shape (B,)
    memory : MemoryState
    """
    dtype = memory.score.dtype
    align = alignment.astype(dtype)
    batch = index.shape[0]
    names: tuple[Hashable, ...] = ()
    if opts.axis_name is not None:
        names = _names(opts.axis_name)
        devices = math.prod(int(jax.lax.axis_size(n)) for n in names)
        index, align = _gather(index, names, devices), _gather(align, names, devices)
    score = jnp.where(steps_before >= 1, align, jnp.asarray(jnp.nan, dtype))
    memory = memory_update(memory, index, score, decay=opts.memory_decay, copy=False)
    weights = memory_weights(
        memory, index, eta=opts.memory_eta, max_weight=opts.memory_max_weight, normalize=True
    )
    if names:
        weights = jax.lax.dynamic_slice(weights, (jax.lax.axis_index(names) * batch,), (batch,))
    weighting = steps_before >= max(1, opts.warmup_steps)
    weights = jnp.where(weighting, weights, jnp.ones_like(weights))
    return jax.lax.stop_gradient(weights), memory

"""`gradtail_ops.Collectives` for a JAX mapped axis (``pmap`` / ``shard_map``).

The core applies the policy (what is averaged, gathered and when); this module supplies the
JAX operations: ``pmean`` for the batch reference, and for the per-example memory a gather
of every device's indices and scores and the slice of this device's weights.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from gradtail_ops import Collectives

__all__ = ["collectives"]


def _names(axis_name: Hashable) -> tuple[Hashable, ...]:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _devices(names: tuple[Hashable, ...]) -> int:
    return math.prod(int(jax.lax.axis_size(n)) for n in names)


def collectives(axis_name: Hashable | None) -> Collectives | None:
    """The cross-device operations over ``axis_name`` (None: a single device, no collectives).

    ``gather`` puts every device's ``(B,)`` block in device order, ``(devices * B,)``, on
    every device: each device writes its block into zeros and one ``psum`` adds them, so
    the result is the same everywhere and ``shard_map`` types it device-invariant (unlike
    ``all_gather``), and the memory can be a replicated part of the state. ``local`` takes
    this device's block back.
    """
    if axis_name is None:
        return None
    names = _names(axis_name)

    def mean(tree: Any) -> Any:
        return jax.lax.pmean(tree, axis_name)  # type: ignore[no-untyped-call]

    def gather(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        start = jax.lax.axis_index(names) * b
        blocks = jax.lax.dynamic_update_slice(jnp.zeros((_devices(names) * b,), x.dtype), x, (start,))
        gathered: jax.Array = jax.lax.psum(blocks, names)  # type: ignore[no-untyped-call]
        return gathered

    def local(x: jax.Array) -> jax.Array:
        b = x.shape[0] // _devices(names)
        return jax.lax.dynamic_slice(x, (jax.lax.axis_index(names) * b,), (b,))

    return Collectives(mean=mean, gather=gather, local=local)

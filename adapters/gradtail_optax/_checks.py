"""Checks of how the transformation is called: batch size, its place in a chain, device-local gradients.

The GradTail options themselves are validated by the core (`gradtail_ops.GradTailConfig`);
what is checked here is JAX/optax plumbing that only the adapter can see.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable
from types import FrameType
from typing import Any

import jax

from gradtail_ops import check_int

__all__ = ["check_batch_size", "check_device_local", "check_placement"]


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` as a positive Python int (NumPy integers accepted), or an error naming it."""
    return check_int("batch_size", batch_size, low=1)


# optax wrappers that call their inner transformation with values gradtail cannot take:
# MultiSteps feeds it accumulated (parameter-shaped) sums, apply_if_finite swaps its output for
# zeros shaped like its input. Both then fail deep inside lax.cond; this names the fix instead.
_WRAPPERS = {
    ("optax.transforms._accumulation", "_do_update"): "optax.MultiSteps",
    ("optax.transforms._accumulation", "_skip_update"): "optax.MultiSteps",
    ("optax.transforms._conditionality", "do_update"): "optax.apply_if_finite",
}
# optax.chain and optax.named_chain: their update_fn collects the earlier states in `new_state`.
_CHAIN = ("optax.transforms._combining", "update_fn")


def check_placement(what: str) -> None:
    """Raise TypeError when ``what`` does not receive the per-example gradients first-hand.

    Two cases, found on the call stack (Python only, once per trace under jit; a walk over at
    most 40 frames): a known optax wrapper re-feeding it (``optax.MultiSteps``,
    ``optax.apply_if_finite``), and an ``optax.chain`` / ``optax.named_chain`` in which another
    transformation ran before it: that one saw per-example gradients (an optimiser there keeps
    per-example moments, silently).
    """
    fix = f"{what}(optax.adam(1e-3), batch_size=B, ...)"
    frame: FrameType | None = sys._getframe(1)
    for _ in range(40):
        if frame is None:
            return
        key = (frame.f_globals.get("__name__", ""), frame.f_code.co_name)
        wrapper = _WRAPPERS.get(key)
        if wrapper is not None:
            raise TypeError(
                f"{what} cannot run inside {wrapper}: it takes per-example gradients and must come first, "
                f"outside any wrapper. Wrap the optimiser instead: {what}({wrapper}(optax.adam(1e-3), ...), "
                "batch_size=B, ...)."
            )
        if key == _CHAIN:
            before = frame.f_locals.get("new_state")
            if before:
                raise TypeError(
                    f"{what} takes per-example gradients and must come first in optax.chain, but "
                    f"{len(before)} transformation(s) ran before it on the per-example gradients (an "
                    "optimiser there would keep per-example moments). Put it first, or let it wrap the "
                    f"optimiser so the order cannot be wrong: {fix}; Received: it at position "
                    f"{len(before)} of the chain."
                )
        frame = frame.f_back


def _varying_axes(x: Any) -> frozenset[Any] | None:
    """The mesh axes over which ``x`` varies inside ``shard_map`` (None where JAX does not say)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return None if vma is None else frozenset(vma)


def check_device_local(grads: list[Any], axis_name: Hashable) -> None:
    """Raise when, under ``shard_map`` with its type checks on, no gradient varies over the axis.

    ``jax.grad`` with respect to replicated (device-invariant) parameters inside ``shard_map``
    sums the gradient over the devices (the transpose of the implicit broadcast), so
    "per-example" gradients taken that way mix every device's examples. Only checked where
    JAX tracks varying axes (``shard_map(..., check_vma=True)``, the default).
    """
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    try:
        probe = _varying_axes(jax.lax.axis_index(names))
    except NameError:  # no such mapped axis here: the pmean will say so
        return
    if not probe or not set(names) <= probe:
        return  # varying axes are not tracked (check_vma=False, pmap)
    if any(set(names) & (_varying_axes(g) or frozenset()) for g in grads):
        return
    raise ValueError(
        f"The per-example gradients are identical on every device of axis {axis_name!r}: under "
        "shard_map, jax.grad with respect to replicated parameters sums each gradient over the "
        "devices. Differentiate with respect to device-varying parameters, e.g. "
        f"jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(jax.lax.pcast(params, {axis_name!r}, "
        "to='varying'), x, y)."
    )

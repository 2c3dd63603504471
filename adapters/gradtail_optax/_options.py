"""Options shared by the transformation and the efficient head path, validated once."""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, cast

import jax

from gradtail_ops import WeightCurve, validate_memory_options, validate_step_options

__all__ = [
    "Decay",
    "Options",
    "check_device_local",
    "check_memory_size",
    "check_not_wrapped",
    "make_options",
    "resolve_decay",
]

#: A float in [0, 1], or an optax-style schedule ``count -> decay`` (count: int32 step number).
Decay = float | Callable[[jax.Array], Any]


@dataclass(frozen=True)
class Options:
    """Everything that shapes one GradTail step (hashable, so it is static under jit)."""

    decay: Decay
    reference: Literal["mean", "direction"]
    warmup_steps: int
    curve: WeightCurve
    eps: float
    axis_name: Hashable | None
    memory_decay: float = 0.5
    memory_eta: float = 1.0
    memory_max_weight: float = 3.0


def make_options(
    *,
    decay: Decay,
    reference: Literal["mean", "direction"],
    warmup_steps: int,
    kind: Any,
    max_weight: float,
    threshold: float,
    temperature: float,
    quantile: float,
    floor: float,
    normalize: bool,
    eps: float,
    axis_name: Hashable | None,
    memory_decay: float = 0.5,
    memory_eta: float = 1.0,
    memory_max_weight: float = 3.0,
) -> Options:
    """Validate the options (ValueError naming the argument) and bind the curve."""
    validate_step_options(
        decay=0.0 if callable(decay) else decay, reference=reference, warmup_steps=warmup_steps
    )
    if not callable(decay) and not isinstance(decay, (int, float)):
        raise TypeError(
            "`decay` must be a float in [0, 1] or a schedule `count -> decay`; "
            f"Received: {type(decay).__name__}."
        )
    curve = WeightCurve(  # validates the options now, not at the first step
        kind=kind,
        max_weight=max_weight,
        threshold=threshold,
        temperature=temperature,
        quantile=quantile,
        floor=floor,
        normalize=normalize,
    )
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"`eps` must be a non-negative float; Received: eps={eps!r}.")
    validate_memory_options(
        memory_decay=memory_decay, memory_eta=memory_eta, memory_max_weight=memory_max_weight
    )
    return Options(
        decay=decay,
        reference=reference,
        warmup_steps=warmup_steps,
        curve=curve,
        eps=float(eps),
        axis_name=axis_name,
        memory_decay=float(memory_decay),
        memory_eta=float(memory_eta),
        memory_max_weight=float(memory_max_weight),
    )


def check_memory_size(memory_size: Any) -> int | None:
    """None (the memory is off) or the positive int number of training examples."""
    validate_memory_options(memory_size=memory_size, memory_decay=0.0, memory_eta=0.0, memory_max_weight=1.0)
    return cast("int | None", memory_size)


def resolve_decay(decay: Decay, count: jax.Array) -> Any:
    """The decay for this step: the float itself, or the schedule evaluated at ``count``."""
    return decay(count) if callable(decay) else float(decay)


# optax wrappers that call their inner transformation with values gradtail cannot take:
# MultiSteps feeds it accumulated (parameter-shaped) sums, apply_if_finite swaps its output for
# zeros shaped like its input. Both then fail deep inside lax.cond; this names the fix instead.
_WRAPPERS = {
    ("optax.transforms._accumulation", "_do_update"): "optax.MultiSteps",
    ("optax.transforms._accumulation", "_skip_update"): "optax.MultiSteps",
    ("optax.transforms._conditionality", "do_update"): "optax.apply_if_finite",
}


def check_not_wrapped(what: str) -> None:
    """Raise TypeError when called (a few frames down) from inside a known optax wrapper.

    Runs in Python only, once per trace under jit: a walk over at most 40 frames.
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(40):
        if frame is None:
            return
        key = (frame.f_globals.get("__name__", ""), frame.f_code.co_name)
        wrapper = _WRAPPERS.get(key)
        if wrapper is not None:
            raise TypeError(
                f"{what} cannot run inside {wrapper}: it takes per-example gradients and must come first "
                f"in the chain, outside any wrapper. Wrap what follows it instead, e.g. "
                f"optax.chain(gradtail_optax.gradtail(...), {wrapper}(optax.adam(1e-3), ...))."
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

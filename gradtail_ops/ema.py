"""Bias-corrected exponential moving average of the reference gradient."""

from __future__ import annotations

from typing import Any, NamedTuple

from array_api_compat import device as array_device

from ._checks import compute_dtype, namespace
from ._kernels import lerp, select_fresh, sums_finite
from ._tree import leaves, map_leaves, same_structure, structure_repr

__all__ = ["EMAState", "ema_init", "ema_mean", "ema_update"]

Array = Any


class EMAState(NamedTuple):
    """State of the running reference gradient (a NamedTuple, hence a JAX pytree).

    Attributes
    ----------
    mean : array or nested list/tuple of arrays
        The bias-corrected moving average, with the template's structure and shapes.
        Zeros before the first update.
    total : array, shape ()
        Accumulated weight ``1 - prod_t decay_t`` of the updates applied so far; 0 before
        the first update. Tracking it (rather than a step count) keeps the bias correction
        exact when the decay follows a schedule.
    count : array, shape (), int32
        Number of updates applied (updates skipped for non-finite input do not count).
    """

    mean: Any
    total: Array
    count: Array


def ema_init(template: Any, /) -> EMAState:
    """An empty moving average for gradients shaped like ``template``.

    Parameters
    ----------
    template : array or nested list/tuple of arrays
        Arrays with the gradient shapes (their values are ignored). The state uses their
        floating dtype, at least float32, and their device.

    Returns
    -------
    EMAState
        Zero mean, ``total = 0``, ``count = 0``.

    Examples
    --------
    >>> import numpy as np
    >>> state = ema_init((np.zeros((2, 3)), np.zeros(2)))
    >>> [m.shape for m in state.mean], float(state.total), int(state.count)
    ([(2, 3), (2,)], 0.0, 0)
    """
    arrays = leaves(template)
    xp = namespace(*arrays)
    dtype = compute_dtype(xp, **{f"template[{k}]": a for k, a in enumerate(arrays)})
    dev = array_device(arrays[0])
    mean = map_leaves(lambda a: xp.zeros(a.shape, dtype=dtype, device=array_device(a)), template)
    return EMAState(
        mean=mean,
        total=xp.zeros((), dtype=dtype, device=dev),
        count=xp.zeros((), dtype=xp.int32, device=dev),
    )


def ema_update(state: EMAState, batch_mean_grad: Any, /, *, decay: float | Array) -> EMAState:
    """Fold one batch's reference gradient into the moving average.

    ``total' = decay * total + (1 - decay)`` and
    ``mean' = mean + r * (g - mean)`` with ``r = (1 - decay) / total'``, which is the bias-corrected
    EMA ``sum_t w_t g_t / sum_t w_t`` for any sequence of decays. After the first update
    the mean equals ``g`` exactly; with ``decay = 0`` it equals the latest ``g``.

    Parameters
    ----------
    state : EMAState
        The current state.
    batch_mean_grad : array or nested list/tuple of arrays
        This batch's reference gradient, with the state's structure and shapes.
    decay : float or array of shape ()
        In [0, 1]; may change from call to call. Array values are clipped to [0, 1], and a
        non-finite one skips the update, so a jitted schedule cannot corrupt the state.

    Returns
    -------
    EMAState
        The new state. When a value of ``batch_mean_grad`` is not finite, or the update
        would overflow the dtype, the state is returned unchanged (decided with array ops,
        so it is ``jax.jit``-safe).

    Examples
    --------
    >>> import numpy as np
    >>> s = ema_update(ema_init(np.zeros(2)), np.array([1.0, 2.0]), decay=0.9)
    >>> ema_mean(s)
    array([1., 2.])
    >>> ema_mean(ema_update(s, np.array([3.0, 2.0]), decay=0.5))
    array([2.81818182, 2.        ])
    """
    if not same_structure(state.mean, batch_mean_grad):
        raise ValueError(
            "`batch_mean_grad` must have the structure of the state's mean; Received: "
            f"{structure_repr(batch_mean_grad)} for a state holding {structure_repr(state.mean)}."
        )
    old, new = leaves(state.mean), leaves(batch_mean_grad)
    for k, (m, g) in enumerate(zip(old, new, strict=True)):
        if tuple(g.shape) != tuple(m.shape):
            raise ValueError(
                f"`batch_mean_grad` leaf {k} must have shape {tuple(m.shape)}; "
                f"Received: shape {tuple(g.shape)} (state {structure_repr(state.mean)}, "
                f"received {structure_repr(batch_mean_grad)})."
            )
    xp = namespace(state.total, *new)
    compute_dtype(xp, **{f"batch_mean_grad[{k}]": g for k, g in enumerate(new)})
    dtype = state.total.dtype
    if isinstance(decay, (int, float)):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"`decay` must lie in [0, 1]; Received: decay={decay}.")
        d = xp.asarray(float(decay), dtype=dtype, device=array_device(state.total))
    else:
        d = xp.astype(decay, dtype)
        decay_ok = xp.isfinite(d)
        d = xp.clip(xp.where(decay_ok, d, xp.ones_like(d)), 0.0, 1.0)
    total = d * state.total + (1.0 - d)
    rate = xp.where(
        total > 0, (1.0 - d) / xp.where(total > 0, total, xp.ones_like(total)), xp.zeros_like(total)
    )
    moved = [lerp(xp, m, xp.astype(g, dtype, copy=False), rate) for m, g in zip(old, new, strict=True)]
    # A non-finite batch, a non-finite traced decay, or an update that overflows leaves the
    # state unchanged (checked on the result, so all three are caught): it never turns non-finite.
    ok = sums_finite(xp, moved)
    if not isinstance(decay, (int, float)):
        ok = ok & decay_ok
    it = iter([select_fresh(xp, ok, n, m) for n, m in zip(moved, old, strict=True)])
    return EMAState(
        mean=map_leaves(lambda _: next(it), state.mean),
        total=xp.where(ok, total, state.total),
        count=xp.where(ok, state.count + 1, state.count),
    )


def ema_mean(state: EMAState, /) -> Any:
    """The bias-corrected moving average, with the template's structure.

    Parameters
    ----------
    state : EMAState

    Returns
    -------
    array or nested list/tuple of arrays
        Zeros before the first update (so alignments against it are 0).

    Examples
    --------
    >>> import numpy as np
    >>> ema_mean(ema_init(np.zeros(3)))
    array([0., 0., 0.])
    """
    return state.mean

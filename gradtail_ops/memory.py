"""Persistent per-example memory: a running score for every training example.

A GradTail step scores each example against the reference of *this* moment, so one batch's
alignment is noisy and forgotten at the next step. With the example indices from the data
loader, each example can instead keep an exponential moving average of its own score over
its visits (epochs). The memory then weights an example by its running score, and its
ranking is a tail-mining tool (``benchmarks/longtail/mine.py``, docs/tail_mining.md).

The state is two arrays of shape (N,) for N training examples (O(N) memory) and an update
touches only the B rows of the batch (O(B log B) work: one sort of the indices, for the
duplicate handling). Where the score comes from is up to the caller; the adapters feed
GradTail's alignment (Chen et al., 2022, "GradTail", arXiv:2201.05938). The memory itself
is ours; its evidence is in docs/tail_mining.md.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

import array_api_extra as xpx
from array_api_compat import device as array_device
from array_api_compat import is_array_api_strict_namespace

from ._checks import compute_dtype, namespace
from .config import MemoryConfig

__all__ = ["MemoryState", "memory_init", "memory_update", "memory_weights", "validate_memory_options"]

Array = Any


class MemoryState(NamedTuple):
    """Per-example running scores (a NamedTuple, hence a JAX pytree).

    Attributes
    ----------
    score : array, shape (N,), floating
        Each example's bias-corrected EMA, over its visits, of its batch-standardised score
        (low = tail-like, as for GradTail's alignment). 0 for an example never visited.
    visits : array, shape (N,), int32
        How many updates included the example (a batch that holds it twice counts once; a
        non-finite score does not count).
    """

    score: Array
    visits: Array


def _check_count(num_examples: Any) -> int:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(
            f"`num_examples` must be a positive int (the training-set size); Received: {num_examples!r}."
        )
    return num_examples


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_memory_options(
    *, memory_size: Any = None, memory_decay: Any, memory_eta: Any, memory_max_weight: Any
) -> None:
    """Check an adapter's per-example memory options; one rule for every adapter.

    Parameters
    ----------
    memory_size : int or None, optional
        None (the memory is off) or the positive number of training examples N.
    memory_decay : float
        Per-visit decay of `memory_update`, in [0, 1).
    memory_eta : float
        ``eta`` of `memory_weights`, finite and >= 0.
    memory_max_weight : float
        ``max_weight`` of `memory_weights`, finite and >= 1.

    Raises
    ------
    ValueError
        Naming the first invalid option ("Received: ...").

    Examples
    --------
    >>> validate_memory_options(memory_size=1000, memory_decay=0.5, memory_eta=1.0, memory_max_weight=3.0)
    >>> validate_memory_options(memory_decay=1.0, memory_eta=1.0, memory_max_weight=3.0)
    Traceback (most recent call last):
    ...
    ValueError: `memory_decay` must be a finite number in [0.0, 1.0); Received: memory_decay=1.0.
    """
    MemoryConfig(
        1 if memory_size is None else memory_size,
        decay=memory_decay,
        eta=memory_eta,
        max_weight=memory_max_weight,
    )


def memory_init(
    num_examples: int,
    /,
    *,
    like: Array | None = None,
    dtype: Any = None,
    device: Any = None,
    xp: ModuleType | None = None,
) -> MemoryState:
    """An empty memory for ``num_examples`` training examples.

    Parameters
    ----------
    num_examples : int
        N, the size of the training set; indices passed later lie in ``[0, N)``.
    like : array, optional
        Take the namespace, the floating dtype (at least float32) and the device from it.
    dtype : dtype, optional
        Floating dtype of ``score``. Defaults to ``like``'s (at least float32), else float32.
    device : device, optional
        Defaults to ``like``'s device, else the namespace's default.
    xp : namespace, optional
        The array namespace. Defaults to ``like``'s, else NumPy (through array-api-compat).

    Returns
    -------
    MemoryState
        ``score`` zeros of shape (N,) and ``visits`` int32 zeros of shape (N,).

    Examples
    --------
    >>> import numpy as np
    >>> state = memory_init(4, like=np.zeros(1, dtype=np.float32))
    >>> state.score.dtype, state.visits.dtype, state.score.shape
    (dtype('float32'), dtype('int32'), (4,))
    """
    n = _check_count(num_examples)
    if xp is None:
        if like is not None:
            xp = namespace(like)
        else:
            import array_api_compat.numpy as np_compat

            xp = np_compat
    if dtype is None:
        dtype = compute_dtype(xp, like=like) if like is not None else xp.float32
    elif not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"`dtype` must be a real floating dtype; Received: dtype={dtype}.")
    if device is None and like is not None:
        device = array_device(like)
    return MemoryState(
        score=xp.zeros((n,), dtype=dtype, device=device),
        visits=xp.zeros((n,), dtype=xp.int32, device=device),
    )


def _check_index(xp: ModuleType, index: Array, n: int, name: str = "index") -> Array:
    """Validate dtype and rank; raise for out-of-range entries when the values are concrete.

    Returns a boolean array, shape (B,): the entries inside ``[0, n)`` (all of them unless
    the values are traced, e.g. under ``jax.jit``, where nothing can be raised).
    """
    if not xp.isdtype(index.dtype, "integral"):
        raise TypeError(
            f"`{name}` must have an integer dtype (example indices); Received: dtype={index.dtype} "
            f"with shape {tuple(index.shape)}."
        )
    if index.ndim != 1:
        raise ValueError(
            f"`{name}` must have shape (B,), one index per example; Received: shape {tuple(index.shape)}."
        )
    valid = (index >= 0) & (index < n)
    try:
        all_valid = bool(xp.all(valid))
    except TypeError:  # traced (jax.jit): out-of-range entries are ignored, see the docstrings
        return valid
    if not all_valid:
        low, high = int(xp.min(index)), int(xp.max(index))
        raise IndexError(
            f"`{name}` entries must lie in [0, {n}) (the memory holds {n} examples); "
            f"Received: entries from {low} to {high} in an index of shape {tuple(index.shape)}."
        )
    return valid


def _standardize(xp: ModuleType, score: Array, use: Array, dtype: Any) -> Array:
    """``(s - mean) / std`` over the entries where ``use`` holds; 0 elsewhere and for std 0."""
    bound = float(xp.finfo(dtype).max) ** 0.25  # batch statistics of huge finite scores stay finite
    safe = xp.clip(xp.where(use, score, xp.zeros_like(score)), -bound, bound)
    weight = xp.astype(use, dtype)
    n = xp.maximum(xp.sum(weight), xp.asarray(1.0, dtype=dtype))
    mu = xp.sum(safe * weight) / n
    var = xp.sum(weight * (safe - mu) ** 2) / n
    z = (safe - mu) / xp.sqrt(var + xp.finfo(dtype).eps)
    return xp.where(use, z, xp.zeros_like(z))


def _segment_means(xp: ModuleType, key: Array, values: Array, use: Array, dtype: Any) -> tuple[Array, Array]:
    """Per position, the mean of ``values`` over the used positions holding the same ``key``.

    Returns ``(mean, count)``, shape (B,) each; ``count`` is the number of used positions
    in the group (mean 0 where it is 0). Sort-based, O(B log B), no data-dependent shapes.
    A group of one is returned exactly (no summation round-off).
    """
    order = xp.argsort(key, stable=True)
    inverse = xp.argsort(order, stable=True)
    sorted_key = xp.take(key, order)
    weight = xp.astype(use, dtype)
    sorted_vals = xp.take(xp.where(use, values, xp.zeros_like(values)), order)
    sorted_w = xp.take(weight, order)
    start = xp.searchsorted(sorted_key, sorted_key, side="left")
    end = xp.searchsorted(sorted_key, sorted_key, side="right")
    cum_v = xp.cumulative_sum(sorted_vals, include_initial=True)
    cum_w = xp.cumulative_sum(sorted_w, include_initial=True)
    total = xp.take(cum_v, end) - xp.take(cum_v, start)
    count = xp.take(cum_w, end) - xp.take(cum_w, start)
    mean = total / xp.maximum(count, xp.ones_like(count))
    single = (end - start) == 1
    mean = xp.where(single, sorted_vals, mean)
    return xp.take(mean, inverse), xp.take(count, inverse)


def _scatter_set(xp: ModuleType, target: Array, index: Array, values: Array, *, copy: bool) -> Array:
    """``target[index] = values`` for indices whose duplicates carry equal values.

    array-api-extra's ``at`` (functional on JAX, in place on NumPy/PyTorch when
    ``copy=False``). ``array_api_strict`` has no integer-array assignment: there a dense
    (N, B) comparison stands in (test sizes only).
    """
    if is_array_api_strict_namespace(xp):
        n = target.shape[0]
        rows = xp.arange(n, dtype=index.dtype, device=array_device(target))
        hit = xp.astype(rows[:, None] == index[None, :], values.dtype)
        hits = xp.sum(hit, axis=1)
        total, hits_or_one = xp.sum(hit * values[None, :], axis=1), xp.maximum(hits, xp.ones_like(hits))
        # Duplicates carry equal values, so the division is exact (floor division for counts).
        integral = xp.isdtype(values.dtype, "integral")
        placed = total // hits_or_one if integral else total / hits_or_one
        return xp.where(hits > 0, xp.astype(placed, target.dtype), target)
    return xpx.at(target, index).set(values, copy=True if copy else None, xp=xp)


def memory_update(
    state: MemoryState,
    index: Array,
    score: Array,
    /,
    *,
    decay: float | Array,
    standardize: bool = True,
    copy: bool = True,
    xp: ModuleType | None = None,
) -> MemoryState:
    """Fold one batch's scores into the examples' running scores.

    The batch's finite scores are standardised over the batch, ``z_i = (s_i - mean) / std``
    (so scores from different stages of training are comparable), and each example's
    entry moves by the bias-corrected EMA over its visits::

        m' = m + r (z - m),   r = (1 - decay) / (1 - decay ** (visits + 1)),   visits' = visits + 1

    so the first visit stores ``z`` itself and later visits weight the newest score by
    ``1 - decay`` (``decay = 0``: the latest score only).

    Parameters
    ----------
    state : MemoryState
        From `memory_init`.
    index : array, shape (B,), integer
        Each example's row in the memory, in ``[0, N)``.
    score : array, shape (B,), floating
        This batch's scores (e.g. GradTail's alignment; low = tail-like).
    decay : float or array of shape ()
        Per-visit decay in [0, 1). Array values are clipped to [0, 1 - eps].
    standardize : bool, optional
        Standardise the scores over the batch first. Defaults to True.
    copy : bool, optional
        True (default): return new arrays, leaving ``state`` untouched (O(N) copy per
        call). False: write the B rows into ``state``'s arrays in place where the backend
        allows it (NumPy, PyTorch; JAX is always functional, and in place under ``jax.jit``
        with donated buffers), for O(B) work per step; ``state`` must not be used after.
    xp : namespace, optional
        Defaults to the namespace of the arguments.

    Returns
    -------
    MemoryState
        The new state. Rows outside the batch are unchanged.

    Notes
    -----
    - Duplicate indices in one batch (e.g. a sampler with replacement) are one visit with
      the mean of their standardised scores; every duplicate writes that same value, so the
      result does not depend on the backend's scatter order.
    - A non-finite score is left out of the batch statistics and does not update its row
      (neither ``score`` nor ``visits``): the state never turns non-finite.
    - Out-of-range indices raise an IndexError, except under ``jax.jit`` (values unknown at
      trace time), where their rows are not updated.
    - Every operation is an Array-API array op with static shapes: ``jax.jit``-safe.

    Examples
    --------
    >>> import numpy as np
    >>> state = memory_init(4, like=np.zeros(1))
    >>> state = memory_update(state, np.array([0, 2]), np.array([0.1, 0.9]), decay=0.5)
    >>> state.score.round(3), state.visits
    (array([-1.,  0.,  1.,  0.]), array([1, 0, 1, 0], dtype=int32))
    >>> state = memory_update(state, np.array([2, 3]), np.array([0.0, 0.4]), decay=0.5)
    >>> state.score.round(3)
    array([-1.   ,  0.   , -0.333,  1.   ])
    """
    if not isinstance(state, MemoryState):
        raise TypeError(
            f"`state` must be a MemoryState (from memory_init); Received: {type(state).__name__}."
        )
    if xp is None:
        xp = namespace(state.score, index, score)
    dtype = state.score.dtype
    n = int(state.score.shape[0])
    valid = _check_index(xp, index, n)
    compute_dtype(xp, score=score)
    if tuple(score.shape) != tuple(index.shape):
        raise ValueError(
            f"`score` must have shape (B,), matching `index` {tuple(index.shape)}; "
            f"Received: shape {tuple(score.shape)}."
        )
    if isinstance(decay, (int, float)):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"`decay` must lie in [0, 1); Received: decay={decay}.")
        d = xp.asarray(float(decay), dtype=dtype, device=array_device(state.score))
    else:
        d = xp.astype(decay, dtype)
        d = xp.clip(xp.where(xp.isfinite(d), d, xp.zeros_like(d)), 0.0, 1.0 - float(xp.finfo(dtype).eps))
    s = xp.astype(score, dtype)
    use = xp.isfinite(s) & valid
    z = _standardize(xp, s, use, dtype) if standardize else xp.where(use, s, xp.zeros_like(s))
    # One key per memory row; out-of-range entries (traced only) share the key n.
    key = xp.where(valid, index, xp.full_like(index, n))
    zbar, count = _segment_means(xp, key, z, use, dtype)
    row = xp.where(valid, index, xp.zeros_like(index))
    old = xp.take(state.score, row)
    visits = xp.take(state.visits, row)
    rate = (1.0 - d) / (1.0 - d ** xp.astype(visits + 1, dtype))
    moved = old + rate * (zbar - old)
    update = count > 0
    new_score = xp.where(update, moved, old)
    new_visits = xp.where(update, visits + 1, visits)
    # Rows of out-of-range entries point past the end: JAX's scatter drops them.
    target = xp.where(valid, index, xp.full_like(index, n))
    return MemoryState(
        score=_scatter_set(xp, state.score, target, new_score, copy=copy),
        visits=_scatter_set(xp, state.visits, target, new_visits, copy=copy),
    )


def memory_weights(
    state: MemoryState,
    index: Array,
    /,
    *,
    eta: float = 1.0,
    max_weight: float = 3.0,
    normalize: bool = True,
    xp: ModuleType | None = None,
) -> Array:
    """Loss weights from the running scores: ``clip(exp(-eta * m_i), 1/cap, cap)``.

    Low running score (tail-like) means a weight above 1, high means below 1; an example
    never visited gets 1. The form is the one measured in docs/tail_mining.md; its
    exponential keeps the weight ratio between two examples a function of their score
    difference only.

    Parameters
    ----------
    state : MemoryState
    index : array, shape (B,), integer
        The batch's rows in the memory, in ``[0, N)``.
    eta : float, optional
        Temperature: the log-weight per standard deviation of running score, >= 0.
        Defaults to 1.0.
    max_weight : float, optional
        The cap, >= 1: weights lie in ``[1 / max_weight, max_weight]`` before
        normalisation. Defaults to 3.0.
    normalize : bool, optional
        Divide by the batch mean so the weights average 1 (keeps the loss scale). Defaults
        to True.
    xp : namespace, optional

    Returns
    -------
    array, shape (B,)
        Finite positive weights in the memory's dtype, on its device. Out-of-range indices
        raise an IndexError, except under ``jax.jit``, where they get weight 1.

    Examples
    --------
    >>> import numpy as np
    >>> state = MemoryState(np.array([-1.0, 0.0, 2.0]), np.array([3, 0, 3], dtype=np.int32))
    >>> memory_weights(state, np.array([0, 1, 2]), eta=1.0, max_weight=3.0, normalize=False).round(3)
    array([2.718, 1.   , 0.333])
    """
    if not isinstance(state, MemoryState):
        raise TypeError(
            f"`state` must be a MemoryState (from memory_init); Received: {type(state).__name__}."
        )
    if not (isinstance(eta, (int, float)) and eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"`eta` must be a finite number >= 0; Received: eta={eta!r}.")
    if not (isinstance(max_weight, (int, float)) and max_weight >= 1 and math.isfinite(max_weight)):
        raise ValueError(f"`max_weight` must be a finite number >= 1; Received: max_weight={max_weight!r}.")
    if xp is None:
        xp = namespace(state.score, index)
    n = int(state.score.shape[0])
    valid = _check_index(xp, index, n)
    row = xp.where(valid, index, xp.zeros_like(index))
    m = xp.take(state.score, row)
    seen = (xp.take(state.visits, row) > 0) & valid & xp.isfinite(m)
    cap = math.log(float(max_weight))
    logw = xp.clip(-float(eta) * xp.where(seen, m, xp.zeros_like(m)), -cap, cap)
    w = xp.where(seen, xp.exp(logw), xp.ones_like(m))
    if normalize:
        w = w / xp.mean(w)
    return w

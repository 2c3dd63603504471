"""The per-example index for the memory, carried through ``model.fit`` as ``sample_weight``.

``fit`` slices, shuffles and batches ``x``, ``y`` and ``sample_weight`` together, on every
backend and for every data source, so the index must travel in one of them. ``x`` and ``y``
must stay what the model and the loss expect. Before any callback runs, Keras builds the
compiled loss and metrics symbolically from the first batch, ``sample_weight`` included, so
the slot must hold an array of shape (N,): a nested structure (a dict) or extra columns
break that build. An integer ``sample_weight`` passes it unchanged on JAX and torch, exact,
and cannot be mistaken for weights (which are floating): the callback's train and test steps
take it out before Keras' own step sees the batch. The cost: with the memory, ``fit``'s
``sample_weight`` (and ``class_weight``, which Keras turns into it) carries the index only.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

__all__ = ["indexed", "split_index"]

_MAX_INDEX = 2**31 - 1  # the memory's rows are int32


def indexed(index: Any) -> np.ndarray:
    """The ``sample_weight`` for ``fit`` that carries each example's row in the memory.

    Parameters
    ----------
    index : array-like of int, shape (N,)
        Each example's row in the per-example memory, in ``[0, memory_size)``; typically
        ``np.arange(len(x))``.

    Returns
    -------
    np.ndarray, shape (N,), int32
        Pass it as ``model.fit(x, y, sample_weight=...)`` with a `GradTailCallback` that has
        ``memory_size`` (or yield it as the third element of a dataset's batches).

    Raises
    ------
    ValueError, TypeError
        For an index that is not 1-D, integer and in ``[0, 2**31)``.

    Examples
    --------
    >>> indexed(range(3))
    array([0, 1, 2], dtype=int32)
    >>> indexed([0.5, 1.0])
    Traceback (most recent call last):
    ...
    TypeError: `index` must hold integers (each example's row in the memory); Received: dtype float64.
    """
    rows = np.asarray(index)
    if rows.dtype.kind not in "iu":
        raise TypeError(
            f"`index` must hold integers (each example's row in the memory); Received: dtype {rows.dtype}."
        )
    if rows.ndim != 1:
        raise ValueError(f"`index` must have shape (N,), one row per example; Received: shape {rows.shape}.")
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) > _MAX_INDEX):
        raise ValueError(
            f"`index` entries must lie in [0, 2**31); Received: entries from {rows.min()} to {rows.max()}."
        )
    return rows.astype(np.int32)


def split_index(data: Any) -> tuple[Any, Any]:
    """``(data without sample weights, index (B,))`` for one batch as a step receives it.

    The index is None (and ``data`` unchanged) when the batch's ``sample_weight`` is not an
    integer array, as from `indexed`.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if sample_weight is None or not keras.backend.is_int_dtype(sample_weight.dtype):
        return data, None
    return keras.utils.pack_x_y_sample_weight(x, y, None), sample_weight

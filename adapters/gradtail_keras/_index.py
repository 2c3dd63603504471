"""The per-example index for the memory, carried through ``model.fit`` in ``sample_weight``.

``fit`` slices, shuffles and batches ``x``, ``y`` and ``sample_weight`` together, on every
backend and for every data source. ``x`` and ``y`` are read by Keras before any callback runs
(to build the model and the compiled loss), ``sample_weight`` is not: so the index travels as a
dict ``{"gradtail_index": index, "sample_weight": weights}`` in that slot, and the callback's
train and test steps take it out again before Keras' own step sees the batch.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

__all__ = ["INDEX_KEY", "WEIGHT_KEY", "indexed", "split_index"]

#: Key of the example indices in an indexed ``sample_weight`` (see `indexed`).
INDEX_KEY = "gradtail_index"
#: Key of the user's own sample weights in an indexed ``sample_weight``.
WEIGHT_KEY = "sample_weight"


def indexed(index: Any, sample_weight: Any = None) -> dict[str, Any]:
    """``sample_weight`` for ``fit`` that carries each example's row in the memory.

    Parameters
    ----------
    index : array-like of int, shape (N,)
        Each example's row in the per-example memory, in ``[0, memory_size)``; typically
        ``np.arange(len(x))``.
    sample_weight : array-like, shape (N,) or (N, ...), optional
        The sample weights to apply as usual. Defaults to None (none).

    Returns
    -------
    dict
        Pass it as ``model.fit(x, y, sample_weight=...)`` (or yield it as the third element of
        a dataset's batches).

    Raises
    ------
    ValueError, TypeError
        For an index that is not 1-D integer, or sample weights of another length.

    Examples
    --------
    >>> sorted(indexed(np.arange(4)))
    ['gradtail_index']
    >>> indexed([0.5, 1.0])
    Traceback (most recent call last):
    ...
    TypeError: `index` must hold integers (each example's row in the memory); Received: dtype float64.
    """
    rows = np.asarray(index)
    if rows.dtype.kind not in "iu":
        raise TypeError(
            "`index` must hold integers (each example's row in the memory); "
            f"Received: dtype {rows.dtype}."
        )
    if rows.ndim != 1:
        raise ValueError(f"`index` must have shape (N,), one row per example; Received: shape {rows.shape}.")
    out: dict[str, Any] = {INDEX_KEY: rows}
    if sample_weight is not None:
        weights = np.asarray(sample_weight)
        if weights.ndim == 0 or weights.shape[0] != rows.shape[0]:
            raise ValueError(
                f"`sample_weight` must have one entry per example ({rows.shape[0]}, like `index`); "
                f"Received: shape {weights.shape}."
            )
        out[WEIGHT_KEY] = weights
    return out


def split_index(data: Any) -> tuple[Any, Any]:
    """``(data without the index, index or None)`` for one batch as a train step receives it."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if not isinstance(sample_weight, dict) or INDEX_KEY not in sample_weight:
        return data, None
    index = sample_weight[INDEX_KEY]
    return keras.utils.pack_x_y_sample_weight(x, y, sample_weight.get(WEIGHT_KEY)), index

"""Factored ("ghost") GradTail math for linear layers: no per-example gradient is built.

For ``z = W a + b`` with ``W`` of shape (d_out, d_in), example ``i``'s gradient is
``g_i = (sum_t d_it a_it^T, sum_t d_it)`` with ``d_it = dL_i/dz_it``. Every quantity GradTail
needs (inner products with a reference, norms, batch means) has a form that only touches the
layer's inputs ``A`` and output gradients ``D``; Goodfellow (2015), Li et al. (2022) and
Bu et al. (2022) use the same identities for per-example clipping.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, Literal

from ._checks import check_shape, compute_dtype, namespace
from ._kernels import row_dots, row_sq_norms
from .alignment import cosine_from_dots

__all__ = [
    "linear_alignment",
    "linear_dots_and_sq_norms",
    "linear_mean_grad",
    "linear_sq_norms",
    "multi_linear_alignment",
    "multi_linear_dots_and_sq_norms",
]

Array = Any
Method = Literal["auto", "ghost", "materialize"]
_METHODS = ("auto", "ghost", "materialize")
# Elements of one materialised chunk of per-example weight gradients (64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24


def _factors(inputs: Array, output_grads: Array, extra: dict[str, Array]) -> tuple[ModuleType, Array, Array]:
    """Validate a layer's inputs and output gradients and cast them to the compute dtype."""
    xp = namespace(inputs, output_grads, *extra.values())
    dtype = compute_dtype(xp, inputs=inputs, output_grads=output_grads, **extra)
    if inputs.ndim not in (2, 3):
        raise ValueError(
            f"`inputs` must have shape (B, d_in) or (B, T, d_in); Received: shape {tuple(inputs.shape)}."
        )
    if output_grads.ndim != inputs.ndim or output_grads.shape[:-1] != inputs.shape[:-1]:
        lead = "(B, T, d_out)" if inputs.ndim == 3 else "(B, d_out)"
        raise ValueError(
            f"`output_grads` must have shape {lead} matching `inputs` on every axis but the last; "
            f"Received: inputs shape {tuple(inputs.shape)} and output_grads shape "
            f"{tuple(output_grads.shape)}."
        )
    return xp, xp.astype(inputs, dtype, copy=False), xp.astype(output_grads, dtype, copy=False)


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}; Received: {method!r}.")


def _use_ghost(method: str, steps: int, d_in: int, d_out: int, *, with_dots: bool) -> bool:
    """Choose between the Gram ("ghost") and the materialised sequence formulas.

    Ghost costs two (T, T) Grams, ``T^2 (d_in + d_out)`` multiply-adds per example;
    materialising costs ``T d_in d_out`` to build ``g_i`` plus memory traffic over it. With an
    inner product to take as well, ghost also pays ``T d_in d_out`` for ``A G_W^T`` while the
    materialised ``g_i`` gives it almost free. The constants are measured on CPU
    (benchmarks/core_ops.py): ghost wins when ``2 T (d_in + d_out) < d_in d_out`` with the
    inner product and when ``T (d_in + d_out) < d_in d_out`` for norms alone.
    """
    if method != "auto":
        return method == "ghost"
    factor = 2 if with_dots else 1
    return factor * steps * (d_in + d_out) < d_in * d_out


def _materialized_parts(
    xp: ModuleType, a: Array, d: Array, weight_ref: Array | None
) -> tuple[Array | None, Array]:
    """Sequence-layer ``<g_W,i, G_W>`` and ``||g_W,i||^2``, materialising in bounded chunks."""
    batch, _, d_in = a.shape
    d_out = d.shape[-1]
    chunk = max(1, min(batch, _CHUNK_ELEMENTS // max(1, d_in * d_out)))
    ref_flat = None if weight_ref is None else xp.reshape(weight_ref, (-1,))
    dots, sqs = [], []
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        g = xp.matrix_transpose(d[start:stop, ...]) @ a[start:stop, ...]  # (c, d_out, d_in)
        g = xp.reshape(g, (stop - start, -1))
        sqs.append(row_sq_norms(xp, g))
        if ref_flat is not None:
            dots.append(g @ ref_flat)
    sq = sqs[0] if len(sqs) == 1 else xp.concat(sqs)
    if ref_flat is None:
        return None, sq
    return (dots[0] if len(dots) == 1 else xp.concat(dots)), sq


def _weight_sq_norms(xp: ModuleType, a: Array, d: Array, method: str, *, with_dots: bool) -> Array:
    if a.ndim == 2:
        return row_sq_norms(xp, d) * row_sq_norms(xp, a)
    steps, d_in, d_out = a.shape[1], a.shape[2], d.shape[2]
    if _use_ghost(method, steps, d_in, d_out, with_dots=with_dots):
        gram_a = a @ xp.matrix_transpose(a)
        gram_d = d @ xp.matrix_transpose(d)
        return xp.sum(xp.reshape(gram_a * gram_d, (a.shape[0], -1)), axis=1)
    return _materialized_parts(xp, a, d, None)[1]


def _bias_sums(xp: ModuleType, d: Array) -> Array:
    return d if d.ndim == 2 else xp.sum(d, axis=1)


def linear_sq_norms(
    inputs: Array, output_grads: Array, /, *, bias: bool = True, method: Method = "auto"
) -> Array:
    """Squared norm of each example's gradient of a linear layer, without building it.

    Parameters
    ----------
    inputs : array, shape (B, d_in) or (B, T, d_in)
        The layer's inputs ``a_i`` (``a_it`` for sequences).
    output_grads : array, shape (B, d_out) or (B, T, d_out)
        Each example's own loss gradient with respect to the layer's output.
    bias : bool, optional
        Whether the layer has a bias (its gradient counts in the norm). Defaults to True.
    method : {"auto", "ghost", "materialize"}, optional
        For sequence inputs: the (T, T) Gram identity ``<A_i A_i^T, D_i D_i^T>``, or
        materialising each ``D_i^T A_i`` in bounded chunks; "auto" picks the one with fewer
        operations for these shapes. Ignored for 2-D inputs (``||d_i||^2 ||a_i||^2``).
        Defaults to "auto".

    Returns
    -------
    array, shape (B,)
        ``||g_i||^2`` over weight (and bias), in the inputs' dtype (at least float32).

    Examples
    --------
    >>> import numpy as np
    >>> linear_sq_norms(np.array([[3.0, 4.0]]), np.array([[1.0, 0.0, 0.0]]))
    array([26.])
    """
    _check_method(method)
    xp, a, d = _factors(inputs, output_grads, {})
    sq = _weight_sq_norms(xp, a, d, method, with_dots=False)
    if bias:
        sums = _bias_sums(xp, d)
        sq = sq + row_sq_norms(xp, sums)
    return sq


def linear_dots_and_sq_norms(
    inputs: Array,
    output_grads: Array,
    mean_weight_grad: Array,
    mean_bias_grad: Array | None = None,
    /,
    *,
    method: Method = "auto",
) -> tuple[Array, Array, Array]:
    """``<g_i, G>``, ``||g_i||^2`` and ``||G||^2`` for a linear layer in factored form.

    Parameters
    ----------
    inputs : array, shape (B, d_in) or (B, T, d_in)
        The layer's inputs.
    output_grads : array, shape (B, d_out) or (B, T, d_out)
        Each example's own loss gradient with respect to the layer's output.
    mean_weight_grad : array, shape (d_out, d_in)
        Reference gradient of the weight (torch's layout).
    mean_bias_grad : array, shape (d_out,), optional
        Reference gradient of the bias; None for a layer without bias.
    method : {"auto", "ghost", "materialize"}, optional
        How sequence norms are computed (see `linear_sq_norms`). Defaults to "auto".

    Returns
    -------
    dots, sq_norms : arrays, shape (B,)
    ref_sq_norm : array, shape ()

    Notes
    -----
    2-D inputs cost one (B, d_in) x (d_in, d_out) product and never allocate a
    (B, d_out, d_in) array: ``<g_i, G> = d_i^T G_W a_i + d_i . G_b`` and
    ``||g_i||^2 = ||d_i||^2 (||a_i||^2 + 1)``.

    Examples
    --------
    >>> import numpy as np
    >>> a, d = np.array([[1.0, 2.0]]), np.array([[1.0]])
    >>> dots, sq, ref = linear_dots_and_sq_norms(a, d, np.array([[1.0, 2.0]]), np.array([0.0]))
    >>> dots, sq, float(ref)
    (array([5.]), array([6.]), 5.0)
    """
    _check_method(method)
    extra = {"mean_weight_grad": mean_weight_grad}
    if mean_bias_grad is not None:
        extra["mean_bias_grad"] = mean_bias_grad
    xp, a, d = _factors(inputs, output_grads, extra)
    dtype = a.dtype
    d_in, d_out = a.shape[-1], d.shape[-1]
    check_shape("mean_weight_grad", mean_weight_grad, (d_out, d_in), "(d_out, d_in) of the layer")
    gw = xp.astype(mean_weight_grad, dtype, copy=False)
    ref_sq = row_sq_norms(xp, xp.reshape(gw, (-1,)))
    if a.ndim == 3 and not _use_ghost(method, a.shape[1], d_in, d_out, with_dots=True):
        dots, sq = _materialized_parts(xp, a, d, gw)
    else:
        projected = a @ xp.matrix_transpose(gw)  # (B, [T,] d_out): the flop floor
        dots = row_dots(xp, d, projected)
        if a.ndim == 3:
            dots = xp.sum(dots, axis=1)
        sq = _weight_sq_norms(xp, a, d, method, with_dots=True)
    if mean_bias_grad is not None:
        check_shape("mean_bias_grad", mean_bias_grad, (d_out,), "(d_out,) of the layer")
        gb = xp.astype(mean_bias_grad, dtype, copy=False)
        sums = _bias_sums(xp, d)
        dots = dots + sums @ gb
        sq = sq + row_sq_norms(xp, sums)
        ref_sq = ref_sq + row_sq_norms(xp, gb)
    return dots, sq, ref_sq


def linear_alignment(
    inputs: Array,
    output_grads: Array,
    mean_weight_grad: Array,
    mean_bias_grad: Array | None = None,
    /,
    *,
    eps: float = 0.0,
    method: Method = "auto",
) -> Array:
    """GradTail alignment of a linear layer's per-example gradients, in factored form.

    Equal to ``alignment`` applied to the materialised per-example gradients
    ``(D_i^T A_i, sum_t D_i)`` (Chen et al., 2022, arXiv:2201.05938), at the cost of one
    matrix product for 2-D inputs.

    Parameters
    ----------
    inputs : array, shape (B, d_in) or (B, T, d_in)
        The layer's inputs ``a_i``.
    output_grads : array, shape (B, d_out) or (B, T, d_out)
        Each example's own loss gradient with respect to the layer's output.
    mean_weight_grad : array, shape (d_out, d_in)
        Reference gradient of the weight.
    mean_bias_grad : array, shape (d_out,), optional
        Reference gradient of the bias; None for a layer without bias.
    eps : float, optional
        Norms at or below ``eps`` count as zero. Defaults to 0.0.
    method : {"auto", "ghost", "materialize"}, optional
        How sequence norms are computed (see `linear_sq_norms`). Defaults to "auto".

    Returns
    -------
    array, shape (B,)
        Cosines in [-1, 1]; 0 for a zero gradient or reference; NaN for a non-finite example.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> d = np.array([[1.0], [1.0]])
    >>> linear_alignment(a, d, np.array([[1.0, 0.0]]))
    array([1., 0.])
    """
    dots, sq, ref = linear_dots_and_sq_norms(
        inputs, output_grads, mean_weight_grad, mean_bias_grad, method=method
    )
    return cosine_from_dots(dots, sq, ref, eps=eps)


def linear_mean_grad(
    inputs: Array, output_grads: Array, /, *, bias: bool = True, example_weights: Array | None = None
) -> tuple[Array, Array | None]:
    """Batch-mean gradient of a linear layer, ``(1/B) sum_i c_i g_i``, in factored form.

    Parameters
    ----------
    inputs : array, shape (B, d_in) or (B, T, d_in)
        The layer's inputs.
    output_grads : array, shape (B, d_out) or (B, T, d_out)
        Each example's own loss gradient with respect to the layer's output.
    bias : bool, optional
        Whether to return the bias part. Defaults to True.
    example_weights : array, shape (B,), optional
        Per-example coefficients ``c_i``; e.g. ``1 / ||g_i||`` gives the mean of unit
        directions (our "direction" reference) and GradTail weights give the weighted
        training gradient. Defaults to all ones (the plain batch mean).

    Returns
    -------
    mean_weight_grad : array, shape (d_out, d_in)
    mean_bias_grad : array, shape (d_out,), or None when ``bias=False``

    Examples
    --------
    >>> import numpy as np
    >>> gw, gb = linear_mean_grad(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0], [-1.0]]))
    >>> gw, gb
    (array([[-1., -1.]]), array([0.]))
    """
    extra = {} if example_weights is None else {"example_weights": example_weights}
    xp, a, d = _factors(inputs, output_grads, extra)
    batch = a.shape[0]
    # The 1/B goes onto the per-example side: a (B,) or (B, T, d_out) pass, not a (d_out, d_in) one.
    if example_weights is not None:
        check_shape("example_weights", example_weights, (batch,), "one coefficient per example")
        coef = xp.astype(example_weights, a.dtype, copy=False) / batch
        d = d * xp.reshape(coef, (batch,) + (1,) * (d.ndim - 1))
    else:
        d = d / batch
    rows_d = xp.reshape(d, (-1, d.shape[-1]))
    rows_a = xp.reshape(a, (-1, a.shape[-1]))
    weight = xp.matrix_transpose(rows_d) @ rows_a
    if not bias:
        return weight, None
    return weight, xp.sum(rows_d, axis=0)


def multi_linear_alignment(
    layers: Sequence[tuple[Array, Array]],
    means: Sequence[Sequence[Array]],
    /,
    *,
    eps: float = 0.0,
    method: Method = "auto",
) -> Array:
    """Joint alignment over several linear layers: one cosine over all their parameters.

    Parameters
    ----------
    layers : sequence of (inputs, output_grads)
        For each layer, arrays as in `linear_alignment`; all share the batch size B.
    means : sequence of (mean_weight_grad,) or (mean_weight_grad, mean_bias_grad)
        The reference gradient per layer; a 1-tuple marks a layer without bias.
    eps : float, optional
        Norms at or below ``eps`` count as zero. Defaults to 0.0.
    method : {"auto", "ghost", "materialize"}, optional
        How sequence norms are computed. Defaults to "auto".

    Returns
    -------
    array, shape (B,)
        ``cos(g_i, G)`` with ``g_i`` and ``G`` concatenated over all layers.

    Examples
    --------
    >>> import numpy as np
    >>> layer = (np.array([[1.0, 0.0]]), np.array([[1.0]]))
    >>> multi_linear_alignment([layer, layer], [(np.array([[1.0, 0.0]]),), (np.array([[0.0, 1.0]]),)])
    array([0.5])
    """
    dots, sq, ref = multi_linear_dots_and_sq_norms(layers, means, method=method)
    return cosine_from_dots(dots, sq, ref, eps=eps)


def multi_linear_dots_and_sq_norms(
    layers: Sequence[tuple[Array, Array]], means: Sequence[Sequence[Array]], /, *, method: Method = "auto"
) -> tuple[Array, Array, Array]:
    """Sums over layers of `linear_dots_and_sq_norms` (see `multi_linear_alignment`).

    Examples
    --------
    >>> import numpy as np
    >>> layer = (np.array([[1.0, 0.0]]), np.array([[2.0]]))
    >>> dots, sq, ref = multi_linear_dots_and_sq_norms([layer], [(np.array([[1.0, 0.0]]), np.array([1.0]))])
    >>> dots, sq, float(ref)
    (array([4.]), array([8.]), 2.0)
    """
    if len(layers) == 0 or len(layers) != len(means):
        raise ValueError(
            "`layers` and `means` must be non-empty and of equal length; "
            f"Received: {len(layers)} layers and {len(means)} means."
        )
    total: list[Array] = []
    batch = None
    for k, (layer, mean) in enumerate(zip(layers, means, strict=True)):
        if len(layer) != 2 or len(mean) not in (1, 2):
            raise ValueError(
                f"`layers[{k}]` must be (inputs, output_grads) and `means[{k}]` must be "
                f"(mean_weight_grad,) or (mean_weight_grad, mean_bias_grad); Received: "
                f"{len(layer)} and {len(mean)} items."
            )
        if batch is None:
            batch = layer[0].shape[0]
        elif layer[0].shape[0] != batch:
            raise ValueError(
                f"All layers must share the batch size {batch}; Received: layers[{k}] inputs "
                f"with shape {tuple(layer[0].shape)}."
            )
        parts = linear_dots_and_sq_norms(layer[0], layer[1], *mean, method=method)
        total = list(parts) if not total else [t + p for t, p in zip(total, parts, strict=True)]
    return total[0], total[1], total[2]

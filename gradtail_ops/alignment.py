"""Alignment (cosine) of per-example gradients with a reference gradient."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

from ._checks import check_batch, check_shape, compute_dtype, namespace
from ._kernels import row_sq_norms
from ._tree import is_sequence, structure_repr

__all__ = ["alignment", "cosine_from_dots", "dense_dots_and_sq_norms"]

Array = Any


def cosine_from_dots(
    dots: Array, sq_norms: Array, ref_sq_norm: Array, /, *, eps: float = 0.0, xp: ModuleType | None = None
) -> Array:
    """Cosines from inner products and squared norms.

    Parameters
    ----------
    dots : array, shape (B,)
        ``<g_i, G>`` for each example.
    sq_norms : array, shape (B,)
        ``||g_i||^2`` for each example.
    ref_sq_norm : array, shape ()
        ``||G||^2``.
    eps : float, optional
        Norms at or below ``eps`` count as zero and give cosine 0. Defaults to 0.0.
    xp : namespace, optional
        The array namespace; inferred from ``dots`` when omitted.

    Returns
    -------
    array, shape (B,)
        ``dots / (||g_i|| ||G||)`` clipped to [-1, 1]; 0 where either norm is zero; NaN for
        an example whose dot or norm is not finite (so that example alone is marked).

    Examples
    --------
    >>> import numpy as np
    >>> cosine_from_dots(np.array([1.0, 0.0]), np.array([4.0, 0.0]), np.array(1.0))
    array([0.5, 0. ])
    """
    xp = namespace(dots) if xp is None else xp
    finite = xp.isfinite(dots) & xp.isfinite(sq_norms)
    # Mask before dividing: non-finite examples are marked NaN at the end, without
    # floating-point warnings on the way.
    zeros = xp.zeros_like(dots)
    norms = xp.sqrt(xp.where(finite, sq_norms, zeros))
    ref_norm = xp.sqrt(ref_sq_norm)
    denom = norms * ref_norm
    nonzero = finite & (norms > eps) & (ref_norm > eps) & (denom > 0)
    cos = xp.where(nonzero, xp.where(finite, dots, zeros) / xp.where(nonzero, denom, zeros + 1.0), zeros)
    return xp.where(finite, xp.clip(cos, -1.0, 1.0), xp.full_like(cos, float("nan")))


def dense_dots_and_sq_norms(per_sample_grads: Any, mean_grad: Any, /) -> tuple[Array, Array, Array]:
    """``<g_i, G>``, ``||g_i||^2`` and ``||G||^2`` for materialised per-example gradients.

    Parameters
    ----------
    per_sample_grads : array of shape (B, *S), or list/tuple of such arrays
        Per-example gradients, one array per parameter.
    mean_grad : array of shape S, or list/tuple of such arrays
        The reference gradient, with the structure of ``per_sample_grads``.

    Returns
    -------
    dots, sq_norms : arrays, shape (B,)
    ref_sq_norm : array, shape ()
        All in the accumulation dtype (the inputs' dtype, at least float32).

    Examples
    --------
    >>> import numpy as np
    >>> d, n, r = dense_dots_and_sq_norms(np.ones((2, 3)), np.ones(3))
    >>> d, n, float(r)
    (array([3., 3.]), array([3., 3.]), 3.0)
    """
    grads, means = _pairs(per_sample_grads, mean_grad)
    xp = namespace(*grads, *means)
    named = {f"per_sample_grads[{k}]": g for k, g in enumerate(grads)}
    named |= {f"mean_grad[{k}]": m for k, m in enumerate(means)}
    dtype = compute_dtype(xp, **named)
    batch = check_batch("per_sample_grads[0]", grads[0])
    dots = sq = ref = None
    for k, (g, m) in enumerate(zip(grads, means, strict=True)):
        check_batch(f"per_sample_grads[{k}]", g)
        if g.shape[0] != batch:
            raise ValueError(
                f"All per-example gradients must share the batch size {batch}; "
                f"Received: per_sample_grads[{k}] with shape {tuple(g.shape)}."
            )
        check_shape(
            f"mean_grad[{k}]", m, tuple(g.shape[1:]), f"per_sample_grads[{k}] has shape {tuple(g.shape)}"
        )
        flat = xp.reshape(xp.astype(g, dtype, copy=False), (batch, -1))
        vec = xp.reshape(xp.astype(m, dtype, copy=False), (-1,))
        part_dots, part_sq, part_ref = flat @ vec, row_sq_norms(xp, flat), row_sq_norms(xp, vec)
        dots = part_dots if dots is None else dots + part_dots
        sq = part_sq if sq is None else sq + part_sq
        ref = part_ref if ref is None else ref + part_ref
    return dots, sq, ref


def alignment(per_sample_grads: Any, mean_grad: Any, /, *, eps: float = 0.0) -> Array:
    """Cosine between each example's gradient and the reference gradient.

    The GradTail score (Chen et al., 2022, "GradTail: Learning Long-Tailed Data Using
    Gradient-based Sample Weighting", arXiv:2201.05938): examples whose gradient disagrees
    with the running reference are the part of the data the model has not learned yet.

    Parameters
    ----------
    per_sample_grads : array of shape (B, *S), or list/tuple of such arrays
        Per-example gradients; with several arrays (one per parameter) the cosine is taken
        over all of them together, as if they were concatenated.
    mean_grad : array of shape S, or list/tuple of such arrays
        The reference gradient ``G``, matching ``per_sample_grads``.
    eps : float, optional
        Norms at or below ``eps`` count as zero. Defaults to 0.0.

    Returns
    -------
    array, shape (B,)
        ``cos(g_i, G)`` in [-1, 1], in the inputs' dtype (at least float32), on their
        device; 0 when either vector is zero; NaN for an example with a non-finite gradient
        (or one so large that its squared norm overflows the dtype).

    Raises
    ------
    ValueError
        When shapes or structures do not match.
    TypeError
        When arrays come from different libraries or are not floating point.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    >>> alignment(g, np.array([1.0, 0.0]))
    array([ 1.,  0., -1.])
    """
    dots, sq, ref = dense_dots_and_sq_norms(per_sample_grads, mean_grad)
    return cosine_from_dots(dots, sq, ref, eps=eps)


def _pairs(per_sample_grads: Any, mean_grad: Any) -> tuple[Sequence[Array], Sequence[Array]]:
    if is_sequence(per_sample_grads) != is_sequence(mean_grad) or (
        is_sequence(per_sample_grads) and len(per_sample_grads) != len(mean_grad)
    ):
        raise ValueError(
            "`per_sample_grads` and `mean_grad` must have the same structure (one array, or "
            f"lists/tuples of equal length); Received: {structure_repr(per_sample_grads)} and "
            f"{structure_repr(mean_grad)}."
        )
    if not is_sequence(per_sample_grads):
        return [per_sample_grads], [mean_grad]
    if len(per_sample_grads) == 0:
        raise ValueError("`per_sample_grads` must hold at least one array; Received: an empty sequence.")
    return list(per_sample_grads), list(mean_grad)

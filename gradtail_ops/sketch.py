"""A sketched reference for linear layers: the EMA reference held at low rank, never formed.

A linear layer's reference gradient ``G`` (d_out, d_in) is an EMA of batch updates
``Δ = (1/B) Σ_i c_i Σ_t d_it a_itᵀ``, each of rank at most B·T. Instead of ``G`` itself the
state keeps two linear sketches (Tropp, Yurtsever, Udell and Cevher, 2017, "Practical
sketching algorithms for low-rank matrix approximation", SIAM J. Matrix Anal. Appl.):

    Y = G Ω   (d_out, k)        W = Ψ G   (l, d_in)

with fixed random test matrices ``Ω`` (d_in, k) and ``Ψ`` (l, d_out). Both are linear in
``G``, so the EMA update of the sketches is the EMA of the sketched batch updates,
``Δ Ω = (1/B) D_cᵀ (A Ω)`` and ``Ψ Δ = (1/B) (D_c Ψᵀ)ᵀ A``, which cost
``O(B·k·(d_in + d_out))`` instead of ``O(B·d_in·d_out)``. The reference is reconstructed as
``G ≈ Q X`` with ``Q = orth(Y)`` and ``X = (Ψ Q)⁺ W`` (exact when rank(G) ≤ k), and the
alignment's inner products become ``<g_i, G> ≈ Σ_t (Qᵀ d_it) · (X a_it)``.

The sketch is ours to apply to GradTail (Chen et al., 2022, arXiv:2201.05938); its error
against the exact reference is measured in benchmarks/sketch_accuracy.py.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import device as array_device

from ._kernels import row_dots

__all__ = ["SketchFactors", "sketch_batch_update", "sketch_dots", "sketch_factors", "use_sketch"]

Array = Any


class SketchFactors(NamedTuple):
    """The fixed random test matrices of one sketched layer.

    Attributes
    ----------
    omega : array, shape (d_in, k)
        Right test matrix: ``Y = G Ω``.
    psi : array, shape (l, d_out)
        Left test matrix: ``W = Ψ G``.
    """

    omega: Array
    psi: Array


def use_sketch(d_out: int, d_in: int, rank: int, size: int) -> bool:
    """Whether sketching a (d_out, d_in) layer pays.

    It does when its state (sketches and test matrices, ``(k + l)(d_in + d_out)`` numbers)
    is at most a quarter of the exact ``d_in·d_out``. Below that the exact reference is
    both small and cheap, so it is kept.

    Examples
    --------
    >>> use_sketch(1024, 1024, 16, 33), use_sketch(10, 512, 16, 33)
    (True, False)
    """
    return 4 * (rank + size) * (d_in + d_out) <= d_in * d_out


def sketch_factors(d_out: int, d_in: int, rank: int, size: int, *, seed: int, like: Array) -> SketchFactors:
    """Gaussian test matrices, scaled to unit expected column norm, in ``like``'s library.

    Drawn with NumPy (the Array API has no random numbers) from ``seed`` and the layer's shape,
    then moved to ``like``'s namespace, dtype and device once, at initialisation.

    Examples
    --------
    >>> f = sketch_factors(4, 6, 2, 5, seed=0, like=np.zeros(1))
    >>> f.omega.shape, f.psi.shape
    ((6, 2), (5, 4))
    """
    from ._checks import namespace

    xp = namespace(like)
    rng = np.random.default_rng([seed, d_out, d_in, rank, size])
    omega = rng.standard_normal((d_in, rank)) / np.sqrt(d_in)
    psi = rng.standard_normal((size, d_out)) / np.sqrt(d_out)
    dev = array_device(like)
    return SketchFactors(
        omega=xp.asarray(omega, dtype=like.dtype, device=dev),
        psi=xp.asarray(psi, dtype=like.dtype, device=dev),
    )


def _rows(x: Array, xp: ModuleType) -> Array:
    return xp.reshape(x, (-1, x.shape[-1]))


def reconstruct(xp: ModuleType, y: Array, w: Array, factors: SketchFactors) -> tuple[Array, Array]:
    """``(Q, X)`` with ``G ≈ Q X``: ``Q`` (d_out, k) orthonormal columns, ``X`` (k, d_in).

    ``‖Q X‖_F = ‖X‖_F`` since ``QᵀQ = I``. A zero sketch (no update yet) gives ``X = 0``.

    ``X = (Ψ Q)⁺ W`` is solved through the normal equations, a k x k solve instead of an SVD:
    ``Ψ Q`` is a Gaussian matrix times orthonormal columns, so it is well conditioned (about
    ``(1 + √(k/l)) / (1 - √(k/l))``, squared by the normal equations) whatever the rank of
    ``Y``; least squares is exact whenever ``W = Ψ Q X`` has a solution (rank(G) ≤ k).
    """
    q, _ = xp.linalg.qr(y)
    m = factors.psi @ q  # (l, k)
    mt = xp.matrix_transpose(m)
    x = xp.linalg.solve(mt @ m, mt @ w)
    return q, x


def sketch_dots(
    xp: ModuleType, a: Array, d: Array, y: Array, w: Array, factors: SketchFactors
) -> tuple[Array, Array]:
    """``<g_W,i, G_W>`` per example (B,) and ``‖G_W‖²`` (shape ()) from the sketches.

    ``a`` (B, [T,] d_in) and ``d`` (B, [T,] d_out), already in the compute dtype.
    """
    q, x = reconstruct(xp, y, w, factors)
    left = d @ q  # (B, [T,] k)
    right = a @ xp.matrix_transpose(x)  # (B, [T,] k)
    dots = row_dots(xp, left, right)
    if a.ndim == 3:
        dots = xp.sum(dots, axis=1)
    return dots, xp.sum(x * x)


def sketch_batch_update(
    xp: ModuleType, a: Array, d: Array, coef: Array | None, factors: SketchFactors
) -> tuple[Array, Array, Array]:
    """The sketches of this batch's reference ``Δ = (1/B) Σ_i c_i Σ_t d_it a_itᵀ``.

    Returns ``(Δ Ω, Ψ Δ, δ)``, shapes (d_out, k), (l, d_in) and (d_out,), without forming
    ``Δ``; ``δ = (1/B) Σ_i c_i Σ_t d_it`` is the (exact) bias reference.
    """
    batch = a.shape[0]
    scale = xp.ones((batch,), dtype=a.dtype, device=array_device(a)) if coef is None else coef
    d = d * xp.reshape(scale / batch, (batch,) + (1,) * (d.ndim - 1))
    rows_a, rows_d = _rows(a, xp), _rows(d, xp)
    y_update = xp.matrix_transpose(rows_d) @ (rows_a @ factors.omega)
    w_update = xp.matrix_transpose(rows_d @ xp.matrix_transpose(factors.psi)) @ rows_a
    return y_update, w_update, xp.sum(rows_d, axis=0)

"""One GradTail step in one call: score the batch, weight it, update the reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

from ._checks import check_shape, compute_dtype, namespace
from ._tree import leaves, map_leaves
from .alignment import cosine_from_dots, dense_dots_and_sq_norms
from .curves import WeightCurve
from .defaults import DEFAULT_CURVE, DEFAULT_DECAY, DEFAULT_REFERENCE
from .ema import EMAState, ema_mean, ema_update
from .linear import Method, linear_mean_grad, multi_linear_dots_and_sq_norms

__all__ = [
    "REFERENCES",
    "GradTailOutput",
    "inverse_norms",
    "linear_score_and_update",
    "score_and_update",
    "validate_step_options",
    "weighted_batch_mean",
]

Array = Any
Reference = Literal["mean", "direction"]
#: ``score(dots, sq_norms, ref_sq_norm) -> (B,)``: low means tail-like, as for the cosine.
Score = Callable[[Array, Array, Array], Array]
REFERENCES: tuple[str, ...] = ("mean", "direction")


class GradTailOutput(NamedTuple):
    """What a GradTail step returns.

    Attributes
    ----------
    weights : array, shape (B,)
        Loss weights to treat as constants: ``loss = mean_i(weights_i * L_i)``.
    alignment : array, shape (B,)
        ``cos(g_i, G)`` against the reference of previous batches (or the custom ``score``).
    sq_norms : array, shape (B,)
        ``||g_i||^2`` over the scored parameters (for magnitude-aware scores and logging).
    state : EMAState
        The reference after folding in this batch.
    """

    weights: Array
    alignment: Array
    sq_norms: Array
    state: EMAState


def inverse_norms(sq_norms: Array, /) -> Array:
    """``1 / ||g_i||``, and 0 for a zero gradient: coefficients of the direction reference.

    Parameters
    ----------
    sq_norms : array, shape (B,)

    Returns
    -------
    array, shape (B,)

    Examples
    --------
    >>> import numpy as np
    >>> inverse_norms(np.array([4.0, 0.0]))
    array([0.5, 0. ])
    """
    xp = namespace(sq_norms)
    positive = sq_norms > 0
    return xp.where(
        positive, 1.0 / xp.sqrt(xp.where(positive, sq_norms, xp.ones_like(sq_norms))), 0.0 * sq_norms
    )


def validate_step_options(*, decay: float | Array, reference: str, warmup_steps: int) -> None:
    """Raise ValueError for step options out of range (adapters call it at construction).

    Parameters
    ----------
    decay : float or array
        Checked to lie in [0, 1] when it is a Python number (arrays may be traced).
    reference : str
        One of `REFERENCES`.
    warmup_steps : int
        A non-negative int.

    Examples
    --------
    >>> validate_step_options(decay=0.9, reference="direction", warmup_steps=0)
    """
    if isinstance(decay, (int, float)) and not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"`decay` must lie in [0, 1]; Received: decay={decay}.")
    if reference not in REFERENCES:
        raise ValueError(f"`reference` must be one of {REFERENCES}; Received: reference={reference!r}.")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(
            f"`warmup_steps` must be a non-negative int; Received: warmup_steps={warmup_steps!r}."
        )


def _finish(
    xp: Any,
    state: EMAState,
    scored: tuple[Array, Array, Array, Any],
    decay: float | Array,
    curve: WeightCurve | None,
    warmup_steps: int,
    eps: float,
    reduce_mean: Callable[[Any], Any] | None,
    score: Score | None,
) -> GradTailOutput:
    """Weights from the score, then the EMA update: the part both step functions share."""
    dots, sq, ref_sq, batch_reference = scored
    curve = DEFAULT_CURVE if curve is None else curve
    align = cosine_from_dots(dots, sq, ref_sq, eps=eps, xp=xp) if score is None else score(dots, sq, ref_sq)
    # Ones until a reference exists and through warm-up; the EMA is updated regardless.
    active = state.count >= max(1, warmup_steps)
    weights = xp.where(active, curve(align), xp.ones_like(align))
    if reduce_mean is not None:
        batch_reference = reduce_mean(batch_reference)
    return GradTailOutput(weights, align, sq, ema_update(state, batch_reference, decay=decay))


def score_and_update(
    state: EMAState,
    per_sample_grads: Any,
    /,
    *,
    decay: float | Array = DEFAULT_DECAY,
    reference: Reference = DEFAULT_REFERENCE,
    curve: WeightCurve | None = None,
    warmup_steps: int = 0,
    eps: float = 0.0,
    reduce_mean: Callable[[Any], Any] | None = None,
    score: Score | None = None,
) -> GradTailOutput:
    """A whole GradTail step from materialised per-example gradients.

    Scores the batch against the reference of previous batches, maps the alignments to
    weights, then folds this batch's (unweighted) reference gradient into the EMA, so a
    batch never scores against itself (Chen et al., 2022, arXiv:2201.05938; the
    formulation is ours, see docs/method.md).

    Parameters
    ----------
    state : EMAState
        From ``ema_init(template)`` with ``template`` structured like ``mean_grad`` of
        `alignment` (an array or list/tuple of arrays shaped like one example's gradient).
    per_sample_grads : array of shape (B, *S), or list/tuple of such arrays
        Per-example gradients of the scored parameters.
    decay : float or array of shape (), optional
        EMA decay in [0, 1]. Defaults to 0.999 (``defaults.DEFAULT_DECAY``).
    reference : {"direction", "mean"}, optional
        What the EMA averages: the plain batch-mean gradient, or the batch mean of the
        unit-normalised per-example gradients (counts examples, not gradient mass).
        Defaults to "direction" (``defaults.DEFAULT_REFERENCE``).
    curve : WeightCurve, optional
        The weighting curve. Defaults to ``defaults.DEFAULT_CURVE`` (batch rank, lowest
        30% weighted 3x, normalised to mean 1).
    warmup_steps : int, optional
        Steps (reference updates) during which the weights are 1. The first call always
        gives ones, as no reference exists yet. Defaults to 0.
    eps : float, optional
        Norms at or below ``eps`` count as zero. Defaults to 0.0.
    reduce_mean : callable, optional
        Applied to this batch's reference gradient before the EMA update, e.g. a
        cross-device mean (``jax.lax.pmean``) so all replicas keep one state.
    score : callable, optional
        ``score(dots, sq_norms, ref_sq_norm) -> (B,)`` replacing the cosine (e.g. a
        magnitude-aware score); lower means more tail-like, as the curves expect. It gets
        ``<g_i, G>``, ``||g_i||^2`` and ``||G||^2``. Defaults to the cosine.

    Returns
    -------
    GradTailOutput
        ``weights``, ``alignment`` and ``sq_norms`` of shape (B,), and the new state.

    Examples
    --------
    >>> import numpy as np
    >>> from gradtail_ops import ema_init
    >>> state = ema_init(np.zeros(2))
    >>> curve = WeightCurve(max_weight=2.0)
    >>> g = np.array([[1.0, 0.0], [1.0, 0.1]])
    >>> out = score_and_update(state, g, decay=0.9, reference="mean", curve=curve)
    >>> out.weights  # no reference yet
    array([1., 1.])
    >>> out = score_and_update(out.state, np.array([[1.0, 0.0], [-1.0, 0.0]]), decay=0.9,
    ...                        reference="mean", curve=curve)
    >>> out.weights.round(3)
    array([1., 2.])
    """
    validate_step_options(decay=decay, reference=reference, warmup_steps=warmup_steps)
    dots, sq, ref_sq = dense_dots_and_sq_norms(per_sample_grads, ema_mean(state))
    xp = namespace(dots)
    coef = inverse_norms(sq) if reference == "direction" else None
    batch_reference = weighted_batch_mean(per_sample_grads, coef)
    scored = (dots, sq, ref_sq, batch_reference)
    return _finish(xp, state, scored, decay, curve, warmup_steps, eps, reduce_mean, score)


def linear_score_and_update(
    state: EMAState,
    layers: Sequence[tuple[Array, Array]],
    /,
    *,
    decay: float | Array = DEFAULT_DECAY,
    reference: Reference = DEFAULT_REFERENCE,
    curve: WeightCurve | None = None,
    warmup_steps: int = 0,
    eps: float = 0.0,
    reduce_mean: Callable[[Any], Any] | None = None,
    method: Method = "auto",
    score: Score | None = None,
) -> GradTailOutput:
    """A whole GradTail step for linear layers, in factored form, scored jointly.

    Same semantics as `score_and_update`, but from each layer's inputs and per-example
    output gradients: no per-example gradient and no (B, d_out, d_in) array is built.

    Parameters
    ----------
    state : EMAState
        From ``ema_init([(W1, b1), (W2,), ...])``: one tuple per layer, holding arrays shaped
        like the weight (d_out, d_in) and, for a layer with bias, the bias (d_out,).
    layers : sequence of (inputs, output_grads)
        Per layer, inputs (B, d_in) or (B, T, d_in) and each example's loss gradient with
        respect to the layer output, (B, d_out) or (B, T, d_out).
    decay, reference, curve, warmup_steps, eps, reduce_mean, score
        As in `score_and_update`.
    method : {"auto", "ghost", "materialize"}, optional
        How sequence norms are computed (see `linear_sq_norms`). Defaults to "auto".

    Returns
    -------
    GradTailOutput

    Examples
    --------
    >>> import numpy as np
    >>> from gradtail_ops import ema_init
    >>> W, b = np.zeros((1, 2)), np.zeros(1)
    >>> state = ema_init([(W, b)])
    >>> layer = (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0], [-1.0]]))
    >>> out = linear_score_and_update(state, [layer], decay=0.9, reference="direction",
    ...                               curve=WeightCurve())
    >>> out.weights, int(out.state.count)
    (array([1., 1.]), 1)
    """
    validate_step_options(decay=decay, reference=reference, warmup_steps=warmup_steps)
    means = ema_mean(state)
    dots, sq, ref_sq = multi_linear_dots_and_sq_norms(layers, means, method=method)
    xp = namespace(dots)
    coef = inverse_norms(sq) if reference == "direction" else None
    batch_reference = type(means)(
        tuple(
            linear_mean_grad(a, d, bias=len(mean) == 2, example_weights=coef)[: len(mean)]
            for (a, d), mean in zip(layers, means, strict=True)
        )
    )
    scored = (dots, sq, ref_sq, batch_reference)
    return _finish(xp, state, scored, decay, curve, warmup_steps, eps, reduce_mean, score)


def weighted_batch_mean(per_sample_grads: Any, example_weights: Array | None = None, /) -> Any:
    """``(1/B) sum_i c_i g_i`` for each array of a (nested list/tuple of) per-example gradients.

    Parameters
    ----------
    per_sample_grads : array of shape (B, *S), or nested list/tuple of such arrays
    example_weights : array of shape (B,), optional
        The coefficients ``c_i``; all ones (the plain mean) when omitted.

    Returns
    -------
    array of shape S, or the same structure of such arrays
        In the gradients' dtype (at least float32).

    Examples
    --------
    >>> import numpy as np
    >>> weighted_batch_mean(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, 0.0]))
    array([0.5, 1. ])
    """

    def one(g: Array) -> Array:
        xp = namespace(g) if example_weights is None else namespace(g, example_weights)
        dtype = compute_dtype(xp, per_sample_grads=g)
        batch = g.shape[0]
        flat = xp.reshape(xp.astype(g, dtype, copy=False), (batch, -1))
        if example_weights is None:
            total = xp.sum(flat, axis=0)
        else:
            check_shape("example_weights", example_weights, (batch,), "one coefficient per example")
            total = xp.astype(example_weights, dtype, copy=False) @ flat
        return xp.reshape(total / batch, tuple(g.shape[1:]))

    if not leaves(per_sample_grads):
        raise ValueError("`per_sample_grads` must hold at least one array; Received: an empty structure.")
    return map_leaves(one, per_sample_grads)

"""One GradTail step in one call: score the batch, weight it, update the reference.

`tail_step` (materialised per-example gradients) and `linear_tail_step` (linear layers in
factored form) apply the whole policy of a `GradTailConfig` to a `TailState`: the score,
the curve, warm-up, the per-example memory and its gating, empty batches and the
cross-replica hooks. The adapters call them and add only framework plumbing.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from array_api_compat import device as array_device

from ._checks import check_shape, compute_dtype, namespace
from ._tree import leaves, map_leaves
from .alignment import cosine_from_dots, dense_dots_and_sq_norms
from .config import REFERENCES, GradTailConfig, Method, Reference
from .curves import WeightCurve
from .defaults import DEFAULT_CURVE, DEFAULT_DECAY, DEFAULT_REFERENCE
from .ema import EMAState, ema_mean, ema_update
from .linear import _factors as linear_factors
from .linear import linear_mean_grad, linear_sq_norms, multi_linear_dots_and_sq_norms
from .memory import MemoryState, memory_update, memory_weights
from .sketch import SketchFactors, sketch_batch_update, sketch_dots
from .state import TailState, next_steps
from .validation import check_choice, check_int, check_real

__all__ = [
    "REFERENCES",
    "Collectives",
    "GradTailOutput",
    "TailOutput",
    "inverse_norms",
    "linear_score_and_update",
    "linear_tail_step",
    "score_and_update",
    "tail_step",
    "validate_step_options",
    "weighted_batch_mean",
]

Array = Any
#: ``score(dots, sq_norms, ref_sq_norm) -> (B,)``: low means tail-like, as for the cosine.
Score = Callable[[Array, Array, Array], Array]


class Collectives(NamedTuple):
    """Cross-replica operations for data-parallel training, supplied by the adapter.

    Attributes
    ----------
    mean : callable
        Cross-replica mean of a nested list/tuple of arrays (e.g. ``jax.lax.pmean`` or an
        all-reduce): applied to the batch's reference gradient before the EMA update, so
        every replica keeps the same reference.
    gather : callable, optional
        ``(B,) -> (R * B,)``, every replica's entries in replica order, identical on all
        replicas. With the per-example memory, indices and scores are gathered so every
        replica applies the same global-batch update.
    local : callable, optional
        ``(R * B,) -> (B,)``, this replica's block of a gathered array.
    """

    mean: Callable[[Any], Any]
    gather: Callable[[Array], Array] | None = None
    local: Callable[[Array], Array] | None = None


class TailOutput(NamedTuple):
    """What `tail_step` and `linear_tail_step` return.

    Attributes
    ----------
    weights : array, shape (B,)
        Loss weights to treat as constants: ``loss = mean_i(weights_i * L_i)``.
    alignment : array, shape (B,)
        ``cos(g_i, G)`` against the reference of previous batches (or the custom ``score``).
    sq_norms : array, shape (B,)
        ``||g_i||^2`` over the scored parameters.
    state : TailState
        The state after this batch.
    """

    weights: Array
    alignment: Array
    sq_norms: Array
    state: TailState


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
    """Raise for step options out of range (kept from 0.1; `GradTailConfig` checks everything).

    Parameters
    ----------
    decay : float or array
        A concrete number must be finite and lie in [0, 1] (traced arrays are not checked).
    reference : str
        One of `REFERENCES`.
    warmup_steps : int
        A non-negative int.

    Examples
    --------
    >>> validate_step_options(decay=0.9, reference="direction", warmup_steps=0)
    """
    if not callable(decay) and (getattr(decay, "shape", None) != () or _concrete(decay)):
        check_real("decay", decay, low=0.0, high=1.0)
    check_choice("reference", reference, REFERENCES)
    try:
        check_int("warmup_steps", warmup_steps, low=0)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _concrete(x: Any) -> bool:
    try:
        float(x)
    except Exception:
        return False
    return True


def _check_batch_index(state: TailState, index: Array | None, batch: int) -> None:
    """The index is given exactly when the memory is on, with one entry per example."""
    if state.memory is None:
        if index is not None:
            raise ValueError(
                "`index` was given but the state has no per-example memory: configure one with "
                "memory_size=<number of training examples> (MemoryConfig); Received: index of shape "
                f"{tuple(getattr(index, 'shape', ()))}."
            )
        return
    size = int(state.memory.score.shape[0])
    if index is None:
        raise ValueError(
            f"The state keeps a per-example memory (memory_size={size}): pass index=, each example's "
            f"row in [0, {size}); Received: index=None."
        )
    if tuple(getattr(index, "shape", ())) != (batch,):
        raise ValueError(
            f"`index` must have shape ({batch},), one row per example of the batch; "
            f"Received: shape {tuple(getattr(index, 'shape', ()))}."
        )


def _empty_output(xp: Any, state: TailState, like: Array) -> TailOutput:
    """An empty batch changes nothing: weights, alignments and norms of shape (0,)."""
    dtype = state.ema.total.dtype
    empty = xp.zeros((0,), dtype=dtype, device=array_device(like))
    return TailOutput(empty, empty, empty, state)


def _policy(
    xp: Any,
    state: TailState,
    scored: tuple[Array, Array, Array, Any],
    config: GradTailConfig,
    index: Array | None,
    collectives: Collectives | None,
    score: Score | None,
    copy_memory: bool,
) -> TailOutput:
    """Weights from the score (curve or memory), then the reference and memory updates."""
    dots, sq, ref_sq, batch_reference = scored
    align = (
        cosine_from_dots(dots, sq, ref_sq, eps=config.eps, xp=xp)
        if score is None
        else score(dots, sq, ref_sq)
    )
    updates_before = state.ema.count
    # Ones until a reference exists and through warm-up; the EMA is updated regardless.
    active = updates_before >= max(1, config.warmup_steps)
    memory = state.memory
    if config.memory is None or memory is None:
        weights = xp.where(active, config.curve(align), xp.ones_like(align))
    else:
        weights, memory = _memory_policy(
            xp, memory, index, align, updates_before, config, collectives, copy_memory
        )
        weights = xp.where(active, weights, xp.ones_like(weights))
    if collectives is not None:
        batch_reference = collectives.mean(batch_reference)
    ema = ema_update(state.ema, batch_reference, decay=config.decay_at(state.steps))
    return TailOutput(
        weights, align, sq, state._replace(ema=ema, memory=memory, steps=next_steps(xp, state.steps))
    )


def _memory_policy(
    xp: Any,
    memory: MemoryState,
    index: Array,
    align: Array,
    updates_before: Array,
    config: GradTailConfig,
    collectives: Collectives | None,
    copy_memory: bool,
) -> tuple[Array, MemoryState]:
    """Fold the alignments into the memory, and read the weights from it.

    Before the first reference update every alignment is 0 and meaningless: the scores are
    then NaN, which the memory leaves out (a static-shape rule, ``jax.jit``-safe).
    """
    assert config.memory is not None
    dtype = memory.score.dtype
    scores = xp.astype(align, dtype)
    scores = xp.where(updates_before >= 1, scores, xp.full_like(scores, float("nan")))
    rows = index
    if collectives is not None and collectives.gather is not None:
        rows, scores = collectives.gather(index), collectives.gather(scores)
    memory = memory_update(memory, rows, scores, decay=config.memory.decay, copy=copy_memory)
    weights = memory_weights(
        memory, rows, eta=config.memory.eta, max_weight=config.memory.max_weight, normalize=True
    )
    if collectives is not None and collectives.local is not None:
        weights = collectives.local(weights)
    return xp.astype(weights, align.dtype), memory


def tail_step(
    state: TailState,
    per_sample_grads: Any,
    /,
    *,
    config: GradTailConfig,
    index: Array | None = None,
    collectives: Collectives | None = None,
    score: Score | None = None,
    copy_memory: bool = True,
) -> TailOutput:
    """A whole GradTail step from materialised per-example gradients, under ``config``.

    Scores the batch against the reference of previous batches, maps the alignments to
    weights (the config's curve, or the per-example memory), then folds this batch's
    unweighted reference gradient into the EMA, so a batch never scores against itself
    (Chen et al., 2022, arXiv:2201.05938; the formulation is ours, docs/method.md).

    The policy, in full:

    - weights are 1 until the reference has ``max(1, warmup_steps)`` updates;
    - the memory (``config.memory``) is updated once a reference exists, and gives the
      weights after warm-up instead of the curve; ``index`` is then required;
    - a batch with a non-finite gradient does not update the reference (its examples get
      weight 1 and a NaN alignment), but counts as a step for a decay schedule;
    - an empty batch (B = 0) changes nothing and returns arrays of shape (0,).

    Parameters
    ----------
    state : TailState
        From ``tail_init(template, config=config)``, ``template`` shaped like one example's
        gradient (an array or nested list/tuple of arrays).
    per_sample_grads : array of shape (B, *S), or nested list/tuple of such arrays
        Per-example gradients of the scored parameters.
    config : GradTailConfig
        The policy (decay or schedule, reference, warm-up, curve, eps, memory).
    index : integer array of shape (B,), optional
        The examples' rows in the memory, in ``[0, config.memory.size)``. Required exactly
        when the config has a memory.
    collectives : Collectives, optional
        Cross-replica mean (and gather for the memory) in data-parallel training.
    score : callable, optional
        ``score(dots, sq_norms, ref_sq_norm) -> (B,)`` replacing the cosine; lower means
        more tail-like.
    copy_memory : bool, optional
        False lets NumPy/PyTorch update the memory in place (O(B) instead of O(N)); the
        caller then gives up the old state. Defaults to True.

    Returns
    -------
    TailOutput
        ``weights``, ``alignment``, ``sq_norms`` of shape (B,), and the new state.

    Examples
    --------
    >>> import numpy as np
    >>> from gradtail_ops import GradTailConfig, WeightCurve, tail_init
    >>> curve = WeightCurve(kind="sigmoid", max_weight=2.0)
    >>> config = GradTailConfig(decay=0.9, reference="mean", curve=curve)
    >>> state = tail_init(np.zeros(2), config=config)
    >>> out = tail_step(state, np.array([[1.0, 0.0], [1.0, 0.1]]), config=config)
    >>> out.weights  # no reference yet
    array([1., 1.])
    >>> out = tail_step(out.state, np.array([[1.0, 0.0], [-1.0, 0.0]]), config=config)
    >>> out.weights.round(3)
    array([1., 2.])
    """
    if state.sketch is not None:
        raise ValueError(
            "The state sketches linear layers (`sketch_rank`), which only the factored step "
            "`linear_tail_step` supports; Received: a sketched state in tail_step. Build the state "
            "without a sketch for materialised per-example gradients."
        )
    first = leaves(per_sample_grads)[0] if leaves(per_sample_grads) else None
    if first is not None and first.ndim >= 1 and first.shape[0] == 0:
        _check_batch_index(state, index, 0)
        return _empty_output(namespace(first), state, first)
    dots, sq, ref_sq = dense_dots_and_sq_norms(per_sample_grads, ema_mean(state.ema))
    xp = namespace(dots)
    _check_batch_index(state, index, int(dots.shape[0]))
    coef = inverse_norms(sq) if config.reference == "direction" else None
    batch_reference = weighted_batch_mean(per_sample_grads, coef)
    scored = (dots, sq, ref_sq, batch_reference)
    return _policy(xp, state, scored, config, index, collectives, score, copy_memory)


def linear_tail_step(
    state: TailState,
    layers: Sequence[tuple[Array, Array]],
    /,
    *,
    config: GradTailConfig,
    index: Array | None = None,
    collectives: Collectives | None = None,
    score: Score | None = None,
    copy_memory: bool = True,
) -> TailOutput:
    """A whole GradTail step for linear layers, in factored form, scored jointly.

    Same policy as `tail_step`, from each layer's inputs and per-example output gradients:
    no per-example gradient and no (B, d_out, d_in) array is built.

    Parameters
    ----------
    state : TailState
        From ``tail_init([(W1, b1), (W2,), ...], config=config)``: one tuple per layer,
        arrays shaped like the weight (d_out, d_in) and, for a layer with bias, the bias.
    layers : sequence of (inputs, output_grads)
        Per layer, inputs (B, d_in) or (B, T, d_in) and each example's loss gradient with
        respect to the layer output, (B, d_out) or (B, T, d_out).
    config, index, collectives, score, copy_memory
        As in `tail_step`; ``config.method`` chooses how sequence norms are computed.

    Returns
    -------
    TailOutput

    Examples
    --------
    >>> import numpy as np
    >>> from gradtail_ops import GradTailConfig, tail_init
    >>> config = GradTailConfig(decay=0.9)
    >>> state = tail_init([(np.zeros((1, 2)), np.zeros(1))], config=config)
    >>> layer = (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0], [-1.0]]))
    >>> out = linear_tail_step(state, [layer], config=config)
    >>> out.weights, int(out.state.ema.count)
    (array([1., 1.]), 1)
    """
    if layers and layers[0][0].ndim >= 1 and layers[0][0].shape[0] == 0:
        _check_batch_index(state, index, 0)
        return _empty_output(namespace(layers[0][0]), state, layers[0][0])
    means = ema_mean(state.ema)
    sketch = state.sketch or (None,) * len(means)
    if len(layers) != len(means):
        raise ValueError(
            f"`layers` must hold one (inputs, output_grads) pair per layer of the state ({len(means)}); "
            f"Received: {len(layers)} layers."
        )
    exact = [k for k, f in enumerate(sketch) if f is None]
    parts = [
        _sketched_dots_and_sq_norms(layers[k], means[k], f, config.method)
        for k, f in enumerate(sketch)
        if f is not None
    ]
    if exact:
        exact_layers, exact_means = [layers[k] for k in exact], [means[k] for k in exact]
        parts.append(multi_linear_dots_and_sq_norms(exact_layers, exact_means, method=config.method))
    # Summed layer by layer without a leading 0 + tensor (an extra op per step on the hot path).
    dots, sq, ref_sq = (functools.reduce(operator.add, (p[n] for p in parts)) for n in range(3))
    xp = namespace(dots)
    _check_batch_index(state, index, int(dots.shape[0]))
    coef = inverse_norms(sq) if config.reference == "direction" else None
    batch_reference = type(means)(
        tuple(
            _batch_update(a, d, mean, f, coef) for (a, d), mean, f in zip(layers, means, sketch, strict=True)
        )
    )
    scored = (dots, sq, ref_sq, batch_reference)
    return _policy(xp, state, scored, config, index, collectives, score, copy_memory)


def _sketched_dots_and_sq_norms(
    layer: tuple[Array, Array], mean: Sequence[Array], factors: SketchFactors, method: Method
) -> tuple[Array, Array, Array]:
    """One sketched layer's ``<g_i, G>``, ``||g_i||^2`` (exact) and ``||G||^2``."""
    y, w, *bias = mean
    xp, a, d = linear_factors(layer[0], layer[1], {"sketch": y})
    dots, ref_sq = sketch_dots(xp, a, d, y, w, factors)
    sq = linear_sq_norms(a, d, bias=bool(bias), method=method)
    if bias:
        sums = d if d.ndim == 2 else xp.sum(d, axis=1)
        dots = dots + sums @ xp.astype(bias[0], a.dtype, copy=False)
        ref_sq = ref_sq + xp.sum(bias[0] * bias[0])
    return dots, sq, ref_sq


def _batch_update(
    a: Array, d: Array, mean: Sequence[Array], factors: SketchFactors | None, coef: Array | None
) -> tuple[Array, ...]:
    """The batch's reference for one layer: exact, or its sketches (and the exact bias)."""
    if factors is None:
        return linear_mean_grad(a, d, bias=len(mean) == 2, example_weights=coef)[: len(mean)]
    xp, a, d = linear_factors(a, d, {})
    y_update, w_update, bias = sketch_batch_update(xp, a, d, coef, factors)
    return (y_update, w_update) if len(mean) == 2 else (y_update, w_update, bias)


def _legacy_config(
    decay: float | Array,
    reference: str,
    curve: WeightCurve | None,
    warmup_steps: int,
    eps: float,
    method: str,
) -> GradTailConfig:
    validate_step_options(decay=decay, reference=reference, warmup_steps=warmup_steps)
    schedule = decay if isinstance(decay, (int, float)) else (lambda _steps: decay)
    return GradTailConfig(
        decay=schedule,
        reference=reference,  # type: ignore[arg-type]
        warmup_steps=warmup_steps,
        curve=DEFAULT_CURVE if curve is None else curve,
        eps=eps,
        method=method,  # type: ignore[arg-type]
    )


def _legacy(out: TailOutput) -> GradTailOutput:
    return GradTailOutput(out.weights, out.alignment, out.sq_norms, out.state.ema)


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
    """A GradTail step on an `EMAState` with flat options (the 0.1 form of `tail_step`).

    Prefer `tail_step` with a `GradTailConfig` (it adds the memory and decay schedules);
    this form stays for 0.1 code and gives the same results.

    Parameters
    ----------
    state : EMAState
        From ``ema_init(template)``.
    per_sample_grads : array of shape (B, *S), or list/tuple of such arrays
    decay : float or array of shape (), optional
        EMA decay in [0, 1]. Defaults to 0.999 (``DEFAULT_DECAY``).
    reference : {"direction", "mean"}, optional
        Defaults to "direction".
    curve : WeightCurve, optional
        Defaults to ``DEFAULT_CURVE``.
    warmup_steps : int, optional
        Defaults to 0.
    eps : float, optional
        Defaults to 0.0.
    reduce_mean : callable, optional
        Cross-replica mean of the batch reference (`Collectives.mean`).
    score : callable, optional
        Replaces the cosine (see `tail_step`).

    Returns
    -------
    GradTailOutput

    Examples
    --------
    >>> import numpy as np
    >>> from gradtail_ops import ema_init
    >>> out = score_and_update(ema_init(np.zeros(2)), np.array([[1.0, 0.0], [0.0, 1.0]]), decay=0.9)
    >>> out.weights, int(out.state.count)
    (array([1., 1.]), 1)
    """
    config = _legacy_config(decay, reference, curve, warmup_steps, eps, "auto")
    tail = TailState(ema=state, memory=None, steps=state.count)
    collectives = None if reduce_mean is None else Collectives(mean=reduce_mean)
    return _legacy(tail_step(tail, per_sample_grads, config=config, collectives=collectives, score=score))


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
    """The factored GradTail step on an `EMAState` with flat options (0.1 form of `linear_tail_step`).

    Parameters
    ----------
    state : EMAState
        From ``ema_init([(W1, b1), (W2,), ...])``.
    layers : sequence of (inputs, output_grads)
    decay, reference, curve, warmup_steps, eps, reduce_mean, score
        As in `score_and_update`.
    method : {"auto", "ghost", "materialize"}, optional
        Defaults to "auto".

    Returns
    -------
    GradTailOutput

    Examples
    --------
    >>> import numpy as np
    >>> from gradtail_ops import ema_init
    >>> state = ema_init([(np.zeros((1, 2)), np.zeros(1))])
    >>> layer = (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0], [-1.0]]))
    >>> out = linear_score_and_update(state, [layer], decay=0.9)
    >>> out.weights, int(out.state.count)
    (array([1., 1.]), 1)
    """
    config = _legacy_config(decay, reference, curve, warmup_steps, eps, method)
    tail = TailState(ema=state, memory=None, steps=state.count)
    collectives = None if reduce_mean is None else Collectives(mean=reduce_mean)
    return _legacy(linear_tail_step(tail, layers, config=config, collectives=collectives, score=score))


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

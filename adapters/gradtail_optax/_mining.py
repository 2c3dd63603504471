"""`score_batches`: every example's GradTail alignment over a data set, one jitted call a batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from gradtail_ops import (
    check_choice,
    cosine_from_dots,
    dense_dots_and_sq_norms,
    inverse_norms,
    linear_mean_grad,
    linear_sq_norms,
    multi_linear_dots_and_sq_norms,
)

from ._head import _pairs
from ._state import GradTailState

__all__ = ["score_batches", "score_head_batches"]


def _sq_norms(grads: list[jax.Array]) -> jax.Array:
    return sum(jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1) for g in grads)  # type: ignore[return-value]


def _progress(progress: bool, total: int | None) -> Any:
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, unit="batch", desc="gradtail: scoring")
    return None


def _check_inputs(reference: str, state: Any, batches: Iterable[Any]) -> None:
    check_choice("reference", reference, ("direction", "mean"))
    if state is None and iter(batches) is batches:
        raise TypeError(
            "`batches` is a one-shot iterator but building the reference reads the data twice: pass a "
            f"list or a re-iterable loader, or a trained state=; Received: {type(batches).__name__}."
        )


def score_batches(
    per_example_grad_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    /,
    *,
    state: GradTailState | None = None,
    reference: Literal["direction", "mean"] = "direction",
    eps: float = 0.0,
    progress: bool = False,
) -> np.ndarray:
    """Every example's GradTail alignment over a data set, for mining: low = tail-like.

    The JAX counterpart of ``gradtail_torch.score_dataset``, with the same output: the cosine
    between each example's gradient and a reference (Chen et al., 2022, "GradTail",
    arXiv:2201.05938). Each batch is one jitted call (a new batch shape, such as a smaller
    last batch, compiles once more); one batch is held at a time.

    Without ``state`` the reference is built from the same batches in a first pass: the mean
    over all N examples of their unit-normalised gradients (``"direction"``, the library's
    default) or of their gradients (``"mean"``). With ``state`` (the `GradTailState` of a
    trained `gradtail` transformation) its running reference is used and the data read once.

    Parameters
    ----------
    per_example_grad_fn : callable
        ``per_example_grad_fn(params, batch) -> pytree`` of per-example gradients, batch axis
        first, of the parameters to score, e.g. ``jax.vmap(jax.grad(loss), (None, 0, 0))``
        wrapped to take ``(params, (x, y))``. Return only the scored leaves (e.g. the head's)
        to score part of the model; with ``state`` they must be the leaves the state scores,
        in their flattening order.
    params : pytree
        Passed to ``per_example_grad_fn``.
    batches : iterable
        Re-iterable (a list, a loader object) when ``state`` is None, in a fixed order: the
        result follows it.
    state : GradTailState, optional
        Score against this state's reference (``state.ema.mean``).
    reference : {"direction", "mean"}, optional
        The reference built from the data (ignored with ``state``). Defaults to "direction".
    eps : float, optional
        Norms at or below ``eps`` count as zero. Defaults to 0.0.
    progress : bool, optional
        Show a progress bar (tqdm, when installed). Defaults to False.

    Returns
    -------
    ndarray, shape (N,), float64
        Cosines in [-1, 1] in the batches' order; 0 for a zero gradient, NaN for an example
        whose gradient is not finite (left out of the reference).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> def loss(w, x, y):
    ...     return (x @ w - y) ** 2
    >>> grads = lambda w, b: jax.vmap(jax.grad(loss), (None, 0, 0))(w, *b)
    >>> x = jax.random.normal(jax.random.key(0), (12, 3))
    >>> batches = [(x[:8], x[:8, 0]), (x[8:], x[8:, 0])]
    >>> score_batches(grads, jnp.zeros(3), batches).shape
    (12,)
    """
    _check_inputs(reference, state, batches)

    def leaves(p: Any, batch: Any) -> list[jax.Array]:
        out = jax.tree.leaves(per_example_grad_fn(p, batch))
        if not out:
            raise ValueError("`per_example_grad_fn` returned no arrays; Received: an empty pytree.")
        return out

    @jax.jit
    def reference_sums(p: Any, batch: Any) -> tuple[list[jax.Array], jax.Array]:
        grads = leaves(p, batch)
        sq = _sq_norms(grads)
        finite = jnp.isfinite(sq)
        # Non-finite examples are left out of the reference (their coefficient and gradient are 0).
        ones = jnp.ones_like(sq)
        coef = inverse_norms(jnp.where(finite, sq, 0.0)) if reference == "direction" else ones
        coef = jnp.where(finite, coef, 0.0)
        sums = [
            jnp.tensordot(coef, jnp.where(finite.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0), axes=1)
            for g in grads
        ]
        return sums, jnp.asarray(sq.shape[0])

    @jax.jit
    def scores(p: Any, batch: Any, means: list[jax.Array]) -> jax.Array:
        dots, sq, ref_sq = dense_dots_and_sq_norms(leaves(p, batch), means)
        cosines: jax.Array = cosine_from_dots(dots, sq, ref_sq, eps=eps)
        return cosines

    return _run(reference_sums, scores, params, batches, state, progress)


def _run(
    reference_sums: Callable[[Any, Any], tuple[Any, jax.Array]],
    scores: Callable[[Any, Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any],
    state: GradTailState | None,
    progress: bool,
) -> np.ndarray:
    """The two streamed passes (or one, against ``state``) shared by both scorers."""
    try:
        total: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    bar = _progress(progress, None if total is None else total * (1 if state is not None else 2))
    means: Any
    try:
        if state is None:
            acc: Any = None
            count = 0
            for batch in batches:
                sums, n = reference_sums(params, batch)
                acc = sums if acc is None else jax.tree.map(jnp.add, acc, sums)
                count += int(n)
                if bar is not None:
                    bar.update(1)
            if acc is None or count == 0:
                raise ValueError("`batches` yielded no examples; Received: an empty iterable.")
            means = jax.tree.map(lambda a: a / count, acc)
        else:
            if getattr(state, "sketch", None) is not None:
                raise ValueError(
                    "`state` holds a sketched reference (sketch_rank): mining scores against the exact "
                    "reference; pass state=None to build it from the data."
                )
            if int(state.ema.count) == 0:
                raise ValueError(
                    "`state` holds no reference yet (ema.count 0): train with it first, or pass "
                    "state=None to build the reference from the data."
                )
            means, count = list(state.ema.mean), -1
        out = []
        for batch in batches:
            out.append(np.asarray(scores(params, batch, means), dtype=np.float64))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if not out:
        raise ValueError("`batches` yielded no examples; Received: an empty iterable.")
    result = np.concatenate(out)
    if count >= 0 and result.shape[0] != count:
        raise RuntimeError(
            f"`batches` yielded {count} examples in the first pass and {result.shape[0]} in the second; "
            "it must yield the same data each pass."
        )
    return result


def score_head_batches(
    head_fn: Callable[[Any, Any], tuple[Any, Any]],
    params: Any,
    batches: Iterable[Any],
    /,
    *,
    bias: bool | list[bool] = True,
    state: GradTailState | None = None,
    reference: Literal["direction", "mean"] = "direction",
    eps: float = 0.0,
    progress: bool = False,
) -> np.ndarray:
    """Every example's alignment on dense head layers, in factored form: the efficient path.

    Like `score_batches`, but for dense layers ``z = a @ kernel + bias``: ``head_fn`` returns
    each batch's head inputs and per-example output gradients (as for `head_weights`), and
    the factored ops of `gradtail_ops` give the cosines without building any per-example
    gradient (Chen et al., 2022, "GradTail", arXiv:2201.05938). Same output as
    `score_batches` with ``per_example_grad_fn`` returning the head's kernel and bias
    gradients.

    Parameters
    ----------
    head_fn : callable
        ``head_fn(params, batch) -> (head_inputs, head_output_grads)``: arrays of shape
        (B, d_in) or (B, T, d_in) and (B, d_out) or (B, T, d_out), or lists of them (several
        layers, scored jointly), e.g. the head's input from the forward and
        `loss_and_output_grads` of the per-example losses to the logits.
    params : pytree
        Passed to ``head_fn``.
    batches : iterable
        Re-iterable when ``state`` is None, in a fixed order: the result follows it.
    bias : bool or list of bool, optional
        Whether each layer has a bias (its gradient is part of the score). Defaults to True.
    state : GradTailState, optional
        From `head_init` / `head_weights`: score against its reference (``ema.mean``, one
        ``(kernel_ref, bias_ref)`` tuple per layer in the ``(d_out, d_in)`` layout).
    reference, eps, progress
        As in `score_batches`.

    Returns
    -------
    ndarray, shape (N,), float64
        Cosines in [-1, 1] in the batches' order; NaN for a non-finite example.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, optax
    >>> from gradtail_optax import loss_and_output_grads
    >>> ce = optax.softmax_cross_entropy_with_integer_labels
    >>> def head_fn(p, batch):
    ...     x, y = batch
    ...     return x, loss_and_output_grads(ce, x @ p["kernel"] + p["bias"], y)[1]
    >>> x = jax.random.normal(jax.random.key(0), (12, 3))
    >>> head = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    >>> score_head_batches(head_fn, head, [(x[:8], jnp.zeros(8, int)), (x[8:], jnp.ones(4, int))]).shape
    (12,)
    """
    _check_inputs(reference, state, batches)

    def layers(p: Any, batch: Any) -> tuple[list[tuple[jax.Array, jax.Array]], list[bool]]:
        pairs = _pairs(*head_fn(p, batch))
        biases = list(bias) if isinstance(bias, (list, tuple)) else [bias] * len(pairs)
        if len(biases) != len(pairs):
            raise ValueError(
                f"`bias` must hold one bool per layer; Received: {len(biases)} for {len(pairs)} layers."
            )
        return pairs, biases

    @jax.jit
    def reference_sums(p: Any, batch: Any) -> tuple[list[tuple[jax.Array, ...]], jax.Array]:
        pairs, biases = layers(p, batch)
        sq = sum(linear_sq_norms(a, d, bias=b) for (a, d), b in zip(pairs, biases, strict=True))
        finite = jnp.isfinite(sq)
        coef = inverse_norms(jnp.where(finite, sq, 0.0)) if reference == "direction" else jnp.ones_like(sq)
        coef = jnp.where(finite, coef, 0.0)
        batch_size = sq.shape[0]
        sums = []
        for (a, d), b in zip(pairs, biases, strict=True):
            # Non-finite examples are left out of the reference (zeroed factors, coefficient 0).
            a = jnp.where(finite.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0)
            d = jnp.where(finite.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0)
            gw, gb = linear_mean_grad(a, d, bias=b, example_weights=coef)
            sums.append(tuple(g * batch_size for g in ((gw,) if gb is None else (gw, gb))))
        return sums, jnp.asarray(batch_size)

    @jax.jit
    def scores(p: Any, batch: Any, means: list[tuple[jax.Array, ...]]) -> jax.Array:
        pairs, _ = layers(p, batch)
        dots, sq, ref_sq = multi_linear_dots_and_sq_norms(pairs, means)
        cosines: jax.Array = cosine_from_dots(dots, sq, ref_sq, eps=eps)
        return cosines

    return _run(reference_sums, scores, params, batches, state, progress)

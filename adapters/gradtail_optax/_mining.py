"""`score_batches`: every example's GradTail alignment over a data set, one jitted call a batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from gradtail_ops import cosine_from_dots, dense_dots_and_sq_norms, inverse_norms

from ._transform import GradTailState

__all__ = ["score_batches"]


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
    if reference not in ("direction", "mean"):
        raise ValueError(f"`reference` must be 'direction' or 'mean'; Received: {reference!r}.")
    if state is None and iter(batches) is batches:
        raise TypeError(
            "`batches` is a one-shot iterator but building the reference reads the data twice: pass a "
            f"list or a re-iterable loader, or a trained state=; Received: {type(batches).__name__}."
        )

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

    try:
        total: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    bar = _progress(progress, None if total is None else total * (1 if state is not None else 2))
    try:
        if state is None:
            acc: list[jax.Array] | None = None
            count = 0
            for batch in batches:
                sums, n = reference_sums(params, batch)
                acc = sums if acc is None else [a + s for a, s in zip(acc, sums, strict=True)]
                count += int(n)
                if bar is not None:
                    bar.update(1)
            if acc is None or count == 0:
                raise ValueError("`batches` yielded no examples; Received: an empty iterable.")
            means = [a / count for a in acc]
        else:
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

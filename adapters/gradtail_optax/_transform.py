"""`gradtail`: an optax gradient transformation from per-example gradients to their weighted mean."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtail_ops import (
    DEFAULT_CURVE,
    DEFAULT_DECAY,
    DEFAULT_REFERENCE,
    DEFAULT_WARMUP_STEPS,
    EMAState,
    MemoryState,
    ema_init,
    score_and_update,
    weighted_batch_mean,
)
from gradtail_ops.curves import Curve

from ._memory import check_index, empty_memory, memory_step
from ._options import (
    Decay,
    check_device_local,
    check_memory_size,
    check_not_wrapped,
    make_options,
    resolve_decay,
)

__all__ = ["GradTailState", "gradtail"]

MaskOrFn = Any | Callable[[Any], Any] | None


class GradTailState(NamedTuple):
    """State of `gradtail` and of the efficient head path (a NamedTuple, hence a pytree).

    Attributes
    ----------
    ema : gradtail_ops.EMAState
        The running reference gradient of the scored parameters: ``ema.mean`` is a list with
        one array per scored leaf (flattening order of the parameters) for `gradtail`, and a
        list of ``(kernel_ref, bias_ref)`` tuples for `head_weights`, the kernel's reference in
        the core's ``(d_out, d_in)`` layout (the transpose of a JAX kernel). ``ema.count``
        counts reference updates (a batch with a non-finite gradient does not update the
        reference).
    count : jax.Array, shape (), int32
        Steps taken (update calls), including skipped reference updates.
    weights : jax.Array, shape (B,)
        The latest step's loss weights (ones before the first step). Read them with
        ``optax.tree.get(opt_state, "weights")``.
    alignment : jax.Array, shape (B,)
        The latest step's alignments ``cos(g_i, G)`` (zeros before the first step; NaN marks an
        example whose gradient was not finite, the only non-finite value the state can hold).
    memory : gradtail_ops.MemoryState or None
        The persistent per-example memory when built with ``memory_size=N``: ``memory.score``
        (shape (N,), the state's float dtype), each example's running score (EMA over its
        visits of its batch-standardised alignment; low is tail-like, 0 if never visited),
        and ``memory.visits`` (shape (N,), int32). None (no leaves) when the memory is off.
        Read it with ``optax.tree.get(opt_state, "memory")``.
    """

    ema: EMAState
    count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count, as in optax's states
    weights: jax.Array
    alignment: jax.Array
    memory: MemoryState | None = None


def _zeros_like(leaf: Any, dtype: Any) -> jax.Array:
    # zeros_like keeps a JAX array's sharding (and leaves an uncommitted one uncommitted), like
    # optax's own states; other leaves (NumPy, ShapeDtypeStruct) get fresh uncommitted zeros.
    if isinstance(leaf, jax.Array):
        return jnp.zeros_like(leaf, dtype=dtype)
    return jnp.zeros(tuple(leaf.shape), dtype)


def init_state(template: Any, batch_size: int, memory_size: int | None = None) -> GradTailState:
    """A fresh state for ``ema_init(template)``: weights 1, alignments 0 of shape (batch_size,).

    With ``memory_size``, an empty per-example memory of that many rows in the state's dtype.

    ``template`` is a list of arrays (or of tuples of arrays); only shapes and dtypes are used.
    The core's `ema_init` runs under ``jax.eval_shape``, for its structure and dtype rule
    (at least float32) without allocating; the zeros are then made like the template leaves.
    (Called eagerly, `ema_init` would place its arrays with an explicit ``device=``, which
    commits them: a jitted step would then compile twice, once for the uncommitted arrays of
    the first call and once for the committed ones it returns.)
    """
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype), template)  # type: ignore[no-untyped-call]
    shapes = jax.eval_shape(ema_init, spec)
    dtype = shapes.total.dtype
    ema = EMAState(
        mean=jax.tree.map(lambda a, s: _zeros_like(a, s.dtype), template, shapes.mean),
        total=jnp.zeros((), dtype),
        count=jnp.zeros((), shapes.count.dtype),
    )
    return GradTailState(
        ema=ema,
        count=jnp.zeros((), jnp.int32),
        weights=jnp.ones((batch_size,), dtype),
        alignment=jnp.zeros((batch_size,), dtype),
        memory=empty_memory(memory_size, dtype),
    )


def next_state(
    state: GradTailState, ema: EMAState, weights: Any, alignment: Any, memory: MemoryState | None = None
) -> GradTailState:
    """The state after a step, in the dtypes of ``state`` (so a jitted step never retraces)."""
    return GradTailState(
        ema=ema,
        count=optax.safe_int32_increment(state.count),
        weights=weights.astype(state.weights.dtype),
        alignment=alignment.astype(state.alignment.dtype),
        memory=memory,
    )


def check_batch_size(batch_size: Any) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(
            "`batch_size` must be a positive int (the number of examples per step, per device under "
            f"pmap/shard_map); Received: batch_size={batch_size!r}."
        )
    return batch_size


def _resolve_mask(alignment_mask: MaskOrFn, params_like: Any, treedef: Any) -> list[bool]:
    """One Python bool per leaf of ``params_like`` from a mask pytree (or prefix) or a callable."""
    n = treedef.num_leaves
    if alignment_mask is None:
        return [True] * n
    mask = alignment_mask(params_like) if callable(alignment_mask) else alignment_mask
    try:
        full = jax.tree.broadcast(mask, params_like)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            "`alignment_mask` must be a pytree of bools with the structure of the parameters (or a "
            f"prefix of it); Received: {jax.tree.structure(mask)} for parameters "
            f"{treedef}. ({exc})"
        ) from None
    flat, mask_def = jax.tree.flatten(full)
    if mask_def != treedef or len(flat) != n:
        raise ValueError(
            "`alignment_mask` must have the structure of the parameters; Received: "
            f"{mask_def} for parameters {treedef}."
        )
    out = []
    for k, m in enumerate(flat):
        if not isinstance(m, (bool, np.bool_)):
            raise TypeError(
                "`alignment_mask` leaves must be Python bools (which leaves are scored is static); "
                f"Received: {type(m).__name__} at leaf {k}."
            )
        out.append(bool(m))
    if not any(out):
        raise ValueError("`alignment_mask` selects no parameter to score; Received: a mask of all False.")
    return out


def _expected_shape(batch: int, param: Any) -> tuple[int, ...]:
    return (batch, *tuple(param.shape))


def _check_leaves(paths: list[Any], grads: list[Any], params: list[Any] | None, batch: int) -> None:
    hint = (
        "gradtail takes per-example gradients with the batch axis first (e.g. "
        "jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, x, y)) and must come first in an "
        "optax.chain"
    )
    for k, (path, g) in enumerate(zip(paths, grads, strict=True)):
        name = jax.tree_util.keystr(path) or f"leaf {k}"
        shape = tuple(g.shape)
        if params is not None:
            expected = _expected_shape(batch, params[k])
            if shape == tuple(params[k].shape):
                raise ValueError(
                    f"`updates` leaf {name} has shape {shape}, the parameter's own shape: it lacks the "
                    f"batch axis. Expected per-example gradients of shape {expected}; {hint}."
                )
            if shape != expected:
                raise ValueError(
                    f"`updates` leaf {name} must have shape {expected} (batch_size={batch}, then the "
                    f"parameter's shape {tuple(params[k].shape)}); Received: shape {shape}. "
                    f"Every step needs batch_size examples: drop the last incomplete batch; {hint}."
                )
        elif not shape or shape[0] != batch:
            raise ValueError(
                f"`updates` leaf {name} must have a leading batch axis of size batch_size={batch}; "
                f"Received: shape {shape}. {hint}; pass `params` to update() for a check against "
                "the parameter shapes."
            )


def gradtail(
    *,
    batch_size: int,
    decay: Decay = DEFAULT_DECAY,
    reference: Literal["mean", "direction"] = DEFAULT_REFERENCE,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    kind: Curve = DEFAULT_CURVE.kind,
    max_weight: float = DEFAULT_CURVE.max_weight,
    threshold: float = DEFAULT_CURVE.threshold,
    temperature: float = DEFAULT_CURVE.temperature,
    quantile: float = DEFAULT_CURVE.quantile,
    floor: float = DEFAULT_CURVE.floor,
    normalize: bool = DEFAULT_CURVE.normalize,
    alignment_mask: MaskOrFn = None,
    axis_name: Hashable | None = None,
    eps: float = 0.0,
    memory_size: int | None = None,
    memory_decay: float = 0.5,
    memory_eta: float = 1.0,
    memory_max_weight: float = 3.0,
) -> optax.GradientTransformationExtraArgs:
    """GradTail sample weighting as an optax transformation over per-example gradients.

    ``update`` takes the per-example gradients ``g_i`` (every leaf with a leading batch axis of
    size ``batch_size``), scores each example by the cosine between its gradient on the scored
    leaves and a running reference gradient, maps low alignment to a higher weight, and
    returns the weighted mean ``(1/B) sum_i w_i g_i`` with the parameters' shapes, so later
    transformations see an ordinary gradient (Chen et al., 2022, "GradTail",
    arXiv:2201.05938; formulation and defaults in docs/method.md). The math is
    `gradtail_ops.score_and_update`.

    It must come **first** in an ``optax.chain`` (like
    ``optax.contrib.differentially_private_aggregate``): nothing before it may reduce or
    reshape the per-example gradients. Wrappers that re-feed their inner transformation
    (``optax.MultiSteps``, ``optax.apply_if_finite``) go around what follows it, not around it.

    For large models, materialising per-example gradients of every parameter costs ``B`` times
    the parameter memory; the efficient path `head_weights` scores dense layers from their
    inputs and output gradients instead and is the recommended way when it applies.

    Parameters
    ----------
    batch_size : int
        Examples per step (per device under ``pmap``/``shard_map``). Fixes the shapes of the
        state's ``weights`` and ``alignment``, so a jitted step never retraces. Every step must
        have this batch size.
    decay : float or callable, optional
        EMA decay of the reference in [0, 1], or an optax-style schedule ``count -> decay``
        evaluated at the state's step count. Defaults to ``gradtail_ops.DEFAULT_DECAY``.
    reference : {"direction", "mean"}, optional
        EMA of the plain batch-mean gradient, or of the batch mean of unit-normalised
        per-example gradients. Defaults to ``gradtail_ops.DEFAULT_REFERENCE`` ("direction").
    warmup_steps : int, optional
        Reference updates with weight 1 before weighting starts (the first step always has
        weight 1). Defaults to ``gradtail_ops.DEFAULT_WARMUP_STEPS``.
    kind, max_weight, threshold, temperature, quantile, floor, normalize
        The weighting curve (`gradtail_ops.weight_curve`). Defaults to
        ``gradtail_ops.DEFAULT_CURVE``: ``kind="rank"``, ``quantile=0.3``, ``max_weight=3.0``,
        ``normalize=True``.
    alignment_mask : pytree of bool, or callable, optional
        Which leaves are scored (jointly: one cosine over all of them): a pytree of Python
        bools with the parameters' structure (or a prefix of it), or a callable returning one
        from the parameters (called with ``params``, or, when ``update`` gets no ``params``,
        with ``jax.ShapeDtypeStruct`` leaves shaped like them). Every leaf is weighted; only
        the scored ones are compared with the reference (and held in the state). Defaults to
        scoring every leaf.
    axis_name : hashable, optional
        Under ``pmap``/``shard_map``: the mapped axis over which the batch reference is averaged
        (``jax.lax.pmean``) before the EMA update, so every device holds one state equal to a
        single-device run on the whole batch, and over which the weighted gradient is averaged,
        so later transformations see the global-batch gradient.
    eps : float, optional
        Gradient norms at or below ``eps`` count as zero. Defaults to 0.0.
    memory_size : int, optional
        Turn on the persistent per-example memory for a training set of this many examples
        (`gradtail_ops.memory_update`; the same option as `gradtail_torch.GradTail`'s): each
        example keeps an EMA, over its visits, of its batch-standardised alignment, and the
        weights come from that running score,
        ``clip(exp(-memory_eta * m_i), 1/memory_max_weight, memory_max_weight)`` normalised
        to batch mean 1, instead of the per-batch curve. Every ``update`` then needs the extra
        argument ``index=``, shape (batch_size,), each example's row in
        ``[0, memory_size)`` (e.g. its position in the data set). The memory lives in the
        state (8 bytes per example); under ``jax.jit`` with the state donated its update
        writes only the batch's rows. It is not updated on the first step (no reference yet)
        and gives weight 1 until ``max(1, warmup_steps)`` reference updates. With
        ``axis_name``, every device folds the global batch in, so all copies stay equal.
        Out-of-range indices raise in eager calls; under ``jax.jit`` their rows are left
        alone and they get weight 1. Off (None) by default (docs/tail_mining.md).
    memory_decay : float, optional
        Per-visit decay of the running score, in [0, 1). Defaults to 0.5.
    memory_eta : float, optional
        Log-weight per standard deviation of running score, >= 0. Defaults to 1.0.
    memory_max_weight : float, optional
        Cap of the memory weights (before normalisation), >= 1. Defaults to 3.0.

    Returns
    -------
    optax.GradientTransformationExtraArgs
        ``init(params) -> GradTailState``; ``update(per_example_grads, state, params=None, *,
        index=None) -> (weighted_mean_grads, state)``. Inside ``optax.chain`` pass ``index``
        to the chain's ``update``; it reaches this transformation as an extra argument.

    Raises
    ------
    ValueError
        For options out of range (at construction); in ``update``, for gradients without the
        leading batch axis, of another batch size, or whose structure differs from ``params``
        or from the state's; for ``index`` missing with the memory on, given with it off, or
        not of shape (batch_size,).
    TypeError
        When ``update`` runs inside ``optax.MultiSteps`` or ``optax.apply_if_finite``; for an
        ``index`` without an integer dtype.
    IndexError
        For ``index`` entries outside ``[0, memory_size)`` in an eager (not jitted) call.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> def loss(p, x, y):
    ...     return jnp.sum((x @ p["w"] + p["b"] - y) ** 2)
    >>> x, y = jnp.ones((4, 3)), jnp.ones((4, 2))
    >>> tx = optax.chain(gradtail(batch_size=4, decay=0.9), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    >>> updates, state = tx.update(per_example, state, params)
    >>> updates["w"].shape, optax.tree.get(state, "weights").shape
    ((3, 2), (4,))

    With the per-example memory (``index``: the examples' rows in a training set of 10):

    >>> tx = optax.chain(gradtail(batch_size=4, memory_size=10), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(per_example, state, params, index=jnp.array([0, 3, 5, 9]))
    >>> optax.tree.get(state, "memory").score.shape
    (10,)
    """
    batch = check_batch_size(batch_size)
    memory_rows = check_memory_size(memory_size)
    opts = make_options(
        decay=decay,
        reference=reference,
        warmup_steps=warmup_steps,
        kind=kind,
        max_weight=max_weight,
        threshold=threshold,
        temperature=temperature,
        quantile=quantile,
        floor=floor,
        normalize=normalize,
        eps=eps,
        axis_name=axis_name,
        memory_decay=memory_decay,
        memory_eta=memory_eta,
        memory_max_weight=memory_max_weight,
    )
    if alignment_mask is not None and not callable(alignment_mask):
        # Fail at construction for masks that cannot be one (a mask of arrays, say).
        for k, m in enumerate(jax.tree.leaves(alignment_mask)):
            if not isinstance(m, (bool, np.bool_)):
                raise TypeError(
                    "`alignment_mask` leaves must be Python bools (which leaves are scored is static); "
                    f"Received: {type(m).__name__} at leaf {k}."
                )

    def init_fn(params: Any) -> GradTailState:
        leaves, treedef = jax.tree.flatten(params)
        if not leaves:
            raise ValueError("`params` must hold at least one array; Received: an empty pytree.")
        mask = _resolve_mask(alignment_mask, params, treedef)
        paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        scored = []
        for path, leaf, m in zip(paths, leaves, mask, strict=True):
            if m and not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(
                    f"Scored parameter {jax.tree_util.keystr(path)} must have a floating-point dtype; "
                    f"Received: dtype={leaf.dtype} with shape {tuple(leaf.shape)}. Leave it out with "
                    "`alignment_mask`."
                )
            if m:
                scored.append(leaf)
        return init_state(scored, batch, memory_rows)

    def update_fn(
        updates: Any, state: GradTailState, params: Any = None, *, index: Any = None, **extra_args: Any
    ) -> tuple[Any, GradTailState]:
        del extra_args
        check_not_wrapped("gradtail_optax.gradtail")
        if not isinstance(state, GradTailState):
            raise TypeError(
                f"`state` must be the GradTailState from init(); Received: {type(state).__name__}."
            )
        rows = check_index(index, state.memory, int(state.weights.shape[0]), "gradtail's update()")
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        paths = [p for p, _ in flat]
        grads = [g for _, g in flat]
        if not grads:
            raise ValueError("`updates` must hold at least one array; Received: an empty pytree.")
        param_leaves = None
        if params is not None:
            param_def: Any
            param_leaves, param_def = jax.tree.flatten(params)
            if param_def != treedef:
                raise ValueError(
                    "`updates` (per-example gradients) must have the structure of `params`; Received: "
                    f"{treedef} for params {param_def}."
                )
        state_batch = int(state.weights.shape[0])
        _check_leaves(paths, grads, param_leaves, state_batch)
        if params is not None:
            params_like = params
        else:
            params_like = jax.tree.unflatten(
                treedef,
                [jax.ShapeDtypeStruct(tuple(g.shape[1:]), g.dtype) for g in grads],  # type: ignore[no-untyped-call]
            )
        mask = _resolve_mask(alignment_mask, params_like, treedef)
        scored = [g for g, m in zip(grads, mask, strict=True) if m]
        names = [jax.tree_util.keystr(p) for p, m in zip(paths, mask, strict=True) if m]
        means = state.ema.mean
        if len(means) != len(scored) or any(
            tuple(g.shape[1:]) != tuple(m.shape) for g, m in zip(scored, means, strict=False)
        ):
            raise ValueError(
                "The scored gradients do not match the state: init() saw scored leaves of shapes "
                f"{[tuple(m.shape) for m in means]}; Received: per-example gradients "
                f"{dict(zip(names, [tuple(g.shape) for g in scored], strict=True))} "
                "(batch axis first). Was the state made by init() of this transformation, for these "
                "parameters and alignment_mask?"
            )
        reduce_mean = None
        if opts.axis_name is not None:
            axis = opts.axis_name
            check_device_local(scored, axis)

            def reduce_mean(tree: Any) -> Any:
                return jax.lax.pmean(tree, axis)  # type: ignore[no-untyped-call]

        out = score_and_update(
            state.ema,
            scored,
            decay=resolve_decay(opts.decay, state.count),
            reference=opts.reference,
            curve=opts.curve,
            warmup_steps=opts.warmup_steps,
            eps=opts.eps,
            reduce_mean=reduce_mean,
        )
        weights = jax.lax.stop_gradient(out.weights)
        memory = state.memory
        if memory is not None and rows is not None:
            weights, memory = memory_step(memory, rows, out.alignment, state.ema.count, opts)
        means_out = weighted_batch_mean(grads, weights)
        means_out = [m.astype(g.dtype) for m, g in zip(means_out, grads, strict=True)]
        if opts.axis_name is not None:
            means_out = jax.lax.pmean(means_out, opts.axis_name)  # type: ignore[no-untyped-call]
        new_state = next_state(state, out.state, weights, out.alignment, memory)
        return jax.tree.unflatten(treedef, means_out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

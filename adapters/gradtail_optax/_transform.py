"""`gradtail`: per-example gradients to their GradTail-weighted mean, as an optax transformation."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtail_ops import GradTailConfig, coerce_config, tail_step, weighted_batch_mean

from ._checks import check_batch_size, check_device_local, check_placement
from ._collectives import collectives
from ._state import GradTailState, after_step, init_state, to_tail

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradtail_ops import GradTailOptions

__all__ = ["gradtail"]

MaskOrFn = Any | Callable[[Any], Any] | None
_HINT = (
    "gradtail takes per-example gradients with the batch axis first (e.g. "
    "jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, x, y)) and must come first in an "
    "optax.chain, or wrap the optimiser: gradtail(optax.adam(1e-3), batch_size=B)"
)


def _check_mask_leaves(mask: Any) -> None:
    for k, m in enumerate(jax.tree.leaves(mask)):
        if not isinstance(m, (bool, np.bool_)):
            raise TypeError(
                "`alignment_mask` leaves must be Python bools (which leaves are scored is static); "
                f"Received: {type(m).__name__} at leaf {k}."
            )


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
    _check_mask_leaves(flat)
    out = [bool(m) for m in flat]
    if not any(out):
        raise ValueError("`alignment_mask` selects no parameter to score; Received: a mask of all False.")
    return out


def _check_leaves(names: list[str], grads: list[Any], params: list[Any] | None, batch: int) -> None:
    for k, (name, g) in enumerate(zip(names, grads, strict=True)):
        shape = tuple(g.shape)
        if params is not None:
            expected = (batch, *tuple(params[k].shape))
            if shape == tuple(params[k].shape):
                raise ValueError(
                    f"`updates` leaf {name} has shape {shape}, the parameter's own shape: it lacks the "
                    f"batch axis. Expected per-example gradients of shape {expected}; {_HINT}."
                )
            if shape != expected:
                raise ValueError(
                    f"`updates` leaf {name} must have shape {expected} (batch_size={batch}, then the "
                    f"parameter's shape {tuple(params[k].shape)}); Received: shape {shape}. "
                    f"Every step needs batch_size examples: drop the last incomplete batch; {_HINT}."
                )
        elif not shape or shape[0] != batch:
            raise ValueError(
                f"`updates` leaf {name} must have a leading batch axis of size batch_size={batch}; "
                f"Received: shape {shape}. {_HINT}; pass `params` to update() for a check against "
                "the parameter shapes."
            )


def _is_real_floating(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _weighted_means(
    names: list[str], grads: list[Any], params: list[Any] | None, weights: jax.Array
) -> list[Any]:
    """``(1/B) sum_i w_i g_i`` per leaf, in the leaf's dtype.

    Leaves without a real floating dtype (``float0`` from ``jax.grad(..., allow_int=True)``,
    integers, booleans: parameters left out by ``alignment_mask``) carry no gradient: their
    update is zeros in the parameter's dtype (which ``optax.apply_updates`` and the optax
    optimisers accept), or the gradient's dtype without ``params``. An empty batch (B = 0)
    gives zeros everywhere.
    """
    out = []
    for k, (name, g) in enumerate(zip(names, grads, strict=True)):
        shape = tuple(g.shape[1:])
        if jnp.issubdtype(g.dtype, jnp.complexfloating):
            raise TypeError(
                f"`updates` leaf {name} must have a real dtype (complex gradients are not supported); "
                f"Received: dtype={g.dtype} with shape {tuple(g.shape)}."
            )
        if _is_real_floating(g.dtype) and g.shape[0]:
            out.append(weighted_batch_mean(g, weights).astype(g.dtype))
        elif params is not None:
            out.append(jnp.zeros(shape, params[k].dtype))
        elif g.dtype == jax.dtypes.float0:
            out.append(np.zeros(shape, jax.dtypes.float0))
        else:
            out.append(jnp.zeros(shape, g.dtype))
    return out


def _wrap(gt: optax.GradientTransformationExtraArgs, inner: Any) -> optax.GradientTransformationExtraArgs:
    """``gt`` feeding ``inner`` its weighted mean gradient, with ``optax.chain(gt, inner)``'s state.

    Unlike the chain, an empty batch skips ``inner`` (its state stays), and the order cannot
    be wrong.
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(
            "The positional argument of gradtail must be the optax GradientTransformation it feeds "
            f"(e.g. optax.adam(1e-3)); Received: {type(inner).__name__}."
        )
    wrapped = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> tuple[GradTailState, Any]:
        return gt.init(params), wrapped.init(params)

    def update_fn(
        updates: Any, state: tuple[GradTailState, Any], params: Any = None, **extra_args: Any
    ) -> tuple[Any, tuple[GradTailState, Any]]:
        if not (isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], GradTailState)):
            raise TypeError(
                "`state` must be the (GradTailState, inner state) pair from init(); Received: "
                f"{type(state).__name__}."
            )
        gt_state, inner_state = state
        mean, gt_state = gt.update(updates, gt_state, params, **extra_args)
        leaves = jax.tree.leaves(updates)
        if leaves[0].shape[0] == 0:
            return mean, (gt_state, inner_state)
        out, inner_state = wrapped.update(mean, inner_state, params, **extra_args)
        return out, (gt_state, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gradtail(
    inner: optax.GradientTransformation | optax.MultiSteps | None = None,
    /,
    *,
    batch_size: int,
    alignment_mask: MaskOrFn = None,
    axis_name: Hashable | None = None,
    config: GradTailConfig | None = None,
    **options: Unpack[GradTailOptions],
) -> optax.GradientTransformationExtraArgs:
    """GradTail sample weighting as an optax transformation over per-example gradients.

    ``update`` takes the per-example gradients ``g_i`` (every leaf with a leading batch axis of
    size ``batch_size``), scores each example by the cosine between its gradient on the scored
    leaves and a running reference gradient, maps low alignment to a higher weight, and
    returns the weighted mean ``(1/B) sum_i w_i g_i`` with the parameters' shapes (Chen et al.,
    2022, "GradTail", arXiv:2201.05938; formulation and defaults in docs/method.md). The
    policy (warm-up, memory, empty batches, decay schedules) is the core's
    `gradtail_ops.tail_step`, under a `gradtail_ops.GradTailConfig`.

    Two forms:

    - ``gradtail(optax.adam(1e-3), batch_size=B, ...)`` **wraps** the optimiser (as
      ``optax.MultiSteps`` does), which receives the weighted mean gradient: the order cannot
      be wrong. The state is ``(GradTailState, inner_state)``, the state of the chain form.
    - ``optax.chain(gradtail(batch_size=B, ...), optax.adam(1e-3))``, the 0.1 form: it must
      come **first** (nothing before it may see the per-example gradients); a chain that runs
      another transformation before it raises a TypeError.

    Wrappers that re-feed their inner transformation (``optax.MultiSteps``,
    ``optax.apply_if_finite``) go inside it (``gradtail(optax.MultiSteps(...), ...)``), never
    around it. For large models, the efficient path `head` scores dense layers from their
    inputs and output gradients instead of materialising per-example gradients.

    Parameters
    ----------
    inner : optax.GradientTransformation, optional
        The transformation (optimiser) fed the weighted mean gradient. Without it, the
        transformation returns that gradient (the chain form).
    batch_size : int
        Examples per step (per device under ``pmap``/``shard_map``). Fixes the shapes of the
        state's ``weights`` and ``alignment``, so a jitted step never retraces. Every step must
        have this batch size, or none at all (an empty batch changes nothing and returns zeros;
        in the wrapped form, ``inner`` is not called).
    alignment_mask : pytree of bool, or callable, optional
        Which leaves are scored (jointly: one cosine over all of them): a pytree of Python
        bools with the parameters' structure (or a prefix of it), or a callable returning one
        from the parameters (called with ``params``, or, when ``update`` gets no ``params``,
        with ``jax.ShapeDtypeStruct`` leaves shaped like them). Every floating leaf is
        weighted; only the scored ones are compared with the reference (and held in the
        state). Leaves left out may be integers: their gradients (e.g. ``float0`` from
        ``jax.grad(..., allow_int=True)``) become zero updates in the parameter's dtype.
        Defaults to scoring every leaf.
    axis_name : hashable, optional
        Under ``pmap``/``shard_map``: the mapped axis over which the batch reference is averaged
        (``jax.lax.pmean``) before the EMA update, so every device holds one state equal to a
        single-device run on the whole batch, and over which the weighted gradient is averaged.
        With the memory, every device folds the global batch in, so all copies stay equal.
    config : gradtail_ops.GradTailConfig, optional
        The policy, built once; or give its flat keyword ``**options`` instead (not both).
    **options
        The GradTail options, as keywords (`gradtail_ops.GradTailOptions`, documented once in
        `gradtail_ops.GradTailConfig` and its ``from_options``): ``decay`` (float or schedule
        ``steps -> decay``), ``reference``, ``warmup_steps``, the curve's ``kind``,
        ``max_weight``, ``threshold``, ``temperature``, ``quantile``, ``floor``, ``normalize``,
        ``eps``, ``method``, and the per-example memory's ``memory_size`` (then every
        ``update`` needs ``index=``, shape (batch_size,), each example's row in
        ``[0, memory_size)``), ``memory_decay``, ``memory_eta``, ``memory_max_weight``. Every
        value is validated here, once (finite, in range; NumPy scalars accepted).

    Returns
    -------
    optax.GradientTransformationExtraArgs
        ``init(params)``; ``update(per_example_grads, state, params=None, *, index=None)
        -> (updates, state)``. Inside ``optax.chain`` pass ``index`` to the chain's ``update``;
        it reaches this transformation as an extra argument.

    Raises
    ------
    ValueError, TypeError
        For options that are not finite or out of range (at construction, naming the option);
        in ``update``, for gradients without the leading batch axis, of another batch size, or
        whose structure differs from ``params`` or from the state's (naming the leaf); for
        ``index`` missing with the memory on, given with it off, not of shape (batch_size,) or
        not integer; when run after another transformation of a chain or inside
        ``optax.MultiSteps`` / ``optax.apply_if_finite``.
    IndexError
        For ``index`` entries outside ``[0, memory_size)`` in an eager (not jitted) call.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> def loss(p, x, y):
    ...     return jnp.sum((x @ p["w"] + p["b"] - y) ** 2)
    >>> x, y = jnp.ones((4, 3)), jnp.ones((4, 2))
    >>> tx = gradtail(optax.sgd(0.1), batch_size=4, decay=0.9)
    >>> state = tx.init(params)
    >>> per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    >>> updates, state = tx.update(per_example, state, params)
    >>> updates["w"].shape, optax.tree.get(state, "weights").shape
    ((3, 2), (4,))

    With the per-example memory (``index``: the examples' rows in a training set of 10):

    >>> tx = gradtail(optax.sgd(0.1), batch_size=4, memory_size=10)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(per_example, state, params, index=jnp.array([0, 3, 5, 9]))
    >>> optax.tree.get(state, "memory").score.shape
    (10,)
    """
    cfg = coerce_config(config, options)
    batch = check_batch_size(batch_size)
    hooks = collectives(axis_name)
    if alignment_mask is not None and not callable(alignment_mask):
        _check_mask_leaves(alignment_mask)  # at construction, for masks that cannot be one

    def init_fn(params: Any) -> GradTailState:
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        if not flat:
            raise ValueError("`params` must hold at least one array; Received: an empty pytree.")
        mask = _resolve_mask(alignment_mask, params, jax.tree.structure(params))
        scored = []
        for (path, leaf), m in zip(flat, mask, strict=True):
            if m and not _is_real_floating(leaf.dtype):
                raise TypeError(
                    f"Scored parameter {jax.tree_util.keystr(path)} must have a floating-point dtype; "
                    f"Received: dtype={leaf.dtype} with shape {tuple(leaf.shape)}. Leave it out with "
                    "`alignment_mask`."
                )
            if m:
                scored.append(leaf)
        return init_state(scored, batch, cfg)

    def update_fn(
        updates: Any, state: GradTailState, params: Any = None, *, index: Any = None, **extra_args: Any
    ) -> tuple[Any, GradTailState]:
        del extra_args
        check_placement("gradtail_optax.gradtail")
        if not isinstance(state, GradTailState):
            raise TypeError(
                f"`state` must be the GradTailState from init(); Received: {type(state).__name__}."
            )
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        if not flat:
            raise ValueError("`updates` must hold at least one array; Received: an empty pytree.")
        names = [jax.tree_util.keystr(p) or f"leaf {k}" for k, (p, _) in enumerate(flat)]
        grads = [g for _, g in flat]
        param_leaves = None
        if params is not None:
            param_def: Any
            param_leaves, param_def = jax.tree.flatten(params)
            if param_def != treedef:
                raise ValueError(
                    "`updates` (per-example gradients) must have the structure of `params`; Received: "
                    f"{treedef} for params {param_def}."
                )
        # An empty batch (B = 0) changes nothing; any other batch must have batch_size examples.
        n = 0 if grads[0].ndim and grads[0].shape[0] == 0 else int(state.weights.shape[0])
        _check_leaves(names, grads, param_leaves, n)
        params_like = params
        if params is None:
            params_like = jax.tree.unflatten(
                treedef,
                [jax.ShapeDtypeStruct(tuple(g.shape[1:]), g.dtype) for g in grads],  # type: ignore[no-untyped-call]
            )
        mask = _resolve_mask(alignment_mask, params_like, treedef)
        scored = [g for g, m in zip(grads, mask, strict=True) if m]
        for name, g, m in zip(names, grads, mask, strict=True):
            if m and not _is_real_floating(g.dtype):
                raise TypeError(
                    f"`updates` leaf {name} is scored and must have a floating-point dtype; Received: "
                    f"dtype={g.dtype} with shape {tuple(g.shape)}. Leave it out with `alignment_mask`."
                )
        means = state.ema.mean
        if len(means) != len(scored) or any(
            tuple(g.shape[1:]) != tuple(m.shape) for g, m in zip(scored, means, strict=False)
        ):
            scored_names = [k for k, m in zip(names, mask, strict=True) if m]
            raise ValueError(
                "The scored gradients do not match the state: init() saw scored leaves of shapes "
                f"{[tuple(m.shape) for m in means]}; Received: per-example gradients "
                f"{dict(zip(scored_names, [tuple(g.shape) for g in scored], strict=True))} "
                "(batch axis first). Was the state made by init() of this transformation, for these "
                "parameters and alignment_mask?"
            )
        if axis_name is not None:
            check_device_local(scored, axis_name)
        rows = None if index is None else jnp.asarray(index)
        out = tail_step(to_tail(state), scored, config=cfg, index=rows, collectives=hooks, copy_memory=False)
        mean = _weighted_means(names, grads, param_leaves, jax.lax.stop_gradient(out.weights))
        if axis_name is not None and n:
            mean = [jax.lax.pmean(m, axis_name) if _is_real_floating(m.dtype) else m for m in mean]  # type: ignore[no-untyped-call]
        return jax.tree.unflatten(treedef, mean), after_step(state, out)

    transform = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return transform if inner is None else _wrap(transform, inner)

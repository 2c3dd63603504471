"""The efficient path: GradTail weights of dense layers from inputs and output gradients."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtail_ops import Collectives, GradTailConfig, coerce_config, linear_tail_step

from ._checks import check_batch_size
from ._collectives import collectives
from ._state import GradTailState, after_step, init_state, to_tail

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradtail_ops import GradTailOptions

__all__ = ["HeadOutput", "HeadTransform", "head", "head_init", "head_weights", "loss_and_output_grads"]


def _layer(spec: Any, k: int) -> tuple[Any, Any | None]:
    """(kernel, bias or None) from a {"kernel", "bias"} mapping, a (kernel, bias) tuple or a kernel."""
    if isinstance(spec, Mapping):
        if "kernel" not in spec:
            raise ValueError(
                f"A dense layer given as a mapping needs a 'kernel' entry (and optionally 'bias'); "
                f"Received: keys {sorted(spec)} for layer {k}."
            )
        kernel, bias = spec["kernel"], spec.get("bias")
    elif isinstance(spec, tuple):
        if len(spec) not in (1, 2):
            raise ValueError(
                f"A dense layer given as a tuple must be (kernel,) or (kernel, bias); Received: "
                f"{len(spec)} items for layer {k}."
            )
        kernel, bias = spec[0], spec[1] if len(spec) == 2 else None
    else:
        kernel, bias = spec, None
    kshape = tuple(getattr(kernel, "shape", ()))
    if len(kshape) != 2:
        raise ValueError(
            f"A dense kernel must have shape (d_in, d_out) (JAX/Flax layout); Received: shape {kshape} "
            f"for layer {k}."
        )
    if bias is not None and tuple(bias.shape) != (kshape[1],):
        raise ValueError(
            f"The bias of a kernel of shape {kshape} must have shape ({kshape[1]},); Received: shape "
            f"{tuple(bias.shape)} for layer {k}."
        )
    return kernel, bias


def _pairs(head_inputs: Any, head_output_grads: Any) -> list[tuple[Any, Any]]:
    several = isinstance(head_inputs, (list, tuple))
    if several != isinstance(head_output_grads, (list, tuple)) or (
        several and len(head_inputs) != len(head_output_grads)
    ):
        raise ValueError(
            "`head_inputs` and `head_output_grads` must both be arrays (one layer) or sequences of "
            f"equal length (one entry per layer); Received: {type(head_inputs).__name__} and "
            f"{type(head_output_grads).__name__}."
        )
    if not several:
        return [(head_inputs, head_output_grads)]
    return list(zip(head_inputs, head_output_grads, strict=True))


def _template(head_params: Any) -> list[tuple[Any, ...]]:
    """The core's template for dense layers given in JAX layout: ``(kernel.T[, bias])`` per layer."""
    specs = head_params if isinstance(head_params, list) else [head_params]
    if not specs:
        raise ValueError("`head` must hold at least one dense layer; Received: an empty list.")
    template = []
    for k, spec in enumerate(specs):
        kernel, bias = _layer(spec, k)
        # The reference is kept in the core's (d_out, d_in) layout, the kernel's transpose: the
        # factored products then need no transpose each step (measured: ~1 ms a step for a
        # 512x1000 head on one CPU thread, when XLA does not fold it).
        ref_kernel = jax.ShapeDtypeStruct((kernel.shape[1], kernel.shape[0]), kernel.dtype)  # type: ignore[no-untyped-call]
        template.append((ref_kernel,) if bias is None else (ref_kernel, bias))
    return template


class HeadOutput(NamedTuple):
    """What `HeadTransform.update` returns.

    Attributes
    ----------
    weights : jax.Array, shape (B,)
        Loss weights (gradients stopped); ones on the first step and during warm-up; with the
        memory, the memory's weights.
    alignment : jax.Array, shape (B,)
        ``cos(g_i, G)`` of each example's head gradient with the reference of previous steps.
    state : GradTailState
        The new state.
    """

    weights: jax.Array
    alignment: jax.Array
    state: GradTailState


class HeadTransform(NamedTuple):
    """The efficient path as a pair of pure functions, its config bound at construction.

    Attributes
    ----------
    init : callable
        ``init(head_params) -> GradTailState``: dense layers in JAX layout, as
        ``{"kernel": (d_in, d_out), "bias": (d_out,)}`` (Flax's ``Dense``), ``(kernel, bias)``,
        ``(kernel,)`` or a bare kernel; a list of them scores the layers jointly (one cosine
        over all their parameters). Arrays or ``jax.ShapeDtypeStruct`` (only shapes and dtypes
        are used). The state keeps each kernel's reference in the core's ``(d_out, d_in)``
        layout, the transpose.
    update : callable
        ``update(state, head_inputs, head_output_grads, /, *, index=None) -> HeadOutput``:
        ``head_inputs`` of shape (B, d_in) or (B, T, d_in) (a list, one per layer, for several
        layers), ``head_output_grads`` each example's loss gradient with respect to the layer
        output, (B, d_out) or (B, T, d_out) (see `loss_and_output_grads`); ``index`` (B,) the
        examples' rows when the memory is on. jit-friendly. An empty batch (B = 0) changes
        nothing and gives arrays of shape (0,).
    config : gradtail_ops.GradTailConfig
        The policy (for `state_to_dict` / `state_from_dict`).
    """

    init: Callable[[Any], GradTailState]
    update: Callable[..., HeadOutput]
    config: GradTailConfig


def _head_update(
    config: GradTailConfig,
    hooks: Collectives | None,
    state: GradTailState,
    head_inputs: Any,
    head_output_grads: Any,
    index: Any,
) -> HeadOutput:
    if not isinstance(state, GradTailState):
        raise TypeError(f"`state` must be a GradTailState from init(); Received: {type(state).__name__}.")
    layers = _pairs(head_inputs, head_output_grads)
    means = state.ema.mean
    if len(layers) != len(means):
        raise ValueError(
            f"The state holds {len(means)} dense layer(s) but {len(layers)} (inputs, output_grads) "
            "pair(s) were given; Received: one per layer is needed."
        )
    batch = int(state.weights.shape[0])
    sketched = state.sketch or (None,) * len(means)
    for k, ((a, d), mean, f) in enumerate(zip(layers, means, sketched, strict=True)):
        # The core's layout, the kernel's transpose; a sketched layer holds Y (d_out, k), W (l, d_in).
        d_out, d_in = tuple(mean[0].shape) if f is None else (mean[0].shape[0], mean[1].shape[1])
        if a.ndim not in (2, 3) or a.shape[0] not in (batch, 0) or a.shape[-1] != d_in:
            raise ValueError(
                f"`head_inputs` of layer {k} must have shape ({batch}, d_in={d_in}) or ({batch}, T, {d_in}) "
                f"for a kernel of shape {(d_in, d_out)} and batch_size={batch}; Received: shape "
                f"{tuple(a.shape)}."
            )
        if tuple(d.shape) != (*tuple(a.shape[:-1]), d_out):
            raise ValueError(
                f"`head_output_grads` of layer {k} must have shape {(*tuple(a.shape[:-1]), d_out)} (the "
                f"inputs' leading axes, then d_out={d_out}); Received: shape {tuple(d.shape)}."
            )
    rows = None if index is None else jnp.asarray(index)
    out = linear_tail_step(
        to_tail(state), layers, config=config, index=rows, collectives=hooks, copy_memory=False
    )
    weights = jax.lax.stop_gradient(out.weights)
    return HeadOutput(weights, jax.lax.stop_gradient(out.alignment), after_step(state, out))


def head(
    *,
    batch_size: int,
    axis_name: Hashable | None = None,
    config: GradTailConfig | None = None,
    **options: Unpack[GradTailOptions],
) -> HeadTransform:
    """The efficient path: GradTail weights of dense layers from their inputs and output gradients.

    For ``z = a @ kernel + bias``, example ``i``'s gradient of the head is ``(a_i^T d_i, d_i)``
    with ``d_i = dL_i/dz_i``, and every quantity GradTail needs has a factored form in ``a``
    and ``d`` (`gradtail_ops.linear_tail_step`): no per-example gradient is built. Same
    weights as `gradtail` scoring the head's leaves. Use the weights as constants in the loss,
    ``mean_i(w_i L_i)``, and differentiate the network once (see `loss_and_output_grads` and
    docs/optax.md). Recommended for large models.

    Parameters
    ----------
    batch_size : int
        Examples per step (per device under ``pmap``/``shard_map``).
    axis_name : hashable, optional
        Under ``pmap``/``shard_map``: averages the batch reference across devices (and, with
        the memory, gathers the batch's indices and alignments so every device's memory stays
        the same); average the gradients as usual.
    config : gradtail_ops.GradTailConfig, optional
        The policy, built once; or give its flat keyword ``**options`` instead (not both).
    **options
        The GradTail options (`gradtail_ops.GradTailOptions`, documented once in
        `gradtail_ops.GradTailConfig`), as for `gradtail`; ``method`` chooses how sequence
        norms are computed, ``memory_size`` turns on the per-example memory (every ``update``
        then needs ``index=``). Validated here, once.

    Returns
    -------
    HeadTransform
        ``init(head_params) -> GradTailState``, ``update(state, head_inputs,
        head_output_grads, *, index=None) -> HeadOutput(weights, alignment, state)``, and the
        ``config``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> ht = head(batch_size=2, decay=0.9)
    >>> state = ht.init({"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)})
    >>> [m.shape for m in state.ema.mean[0]]  # reference in (d_out, d_in)
    [(3, 4), (3,)]
    >>> a = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    >>> d = jnp.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    >>> w, align, state = jax.jit(ht.update)(state, a, d)
    >>> w.tolist(), int(state.ema.count)
    ([1.0, 1.0], 1)

    With the per-example memory of a training set of 100 examples:

    >>> ht = head(batch_size=2, memory_size=100)
    >>> state = ht.init({"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)})
    >>> w, align, state = jax.jit(ht.update)(state, a, d, index=jnp.array([7, 42]))
    >>> state.memory.score.shape
    (100,)
    """
    cfg = coerce_config(config, options)
    batch = check_batch_size(batch_size)
    hooks = collectives(axis_name)

    def init_fn(head_params: Any) -> GradTailState:
        return init_state(_template(head_params), batch, cfg)

    def update_fn(
        state: GradTailState, head_inputs: Any, head_output_grads: Any, /, *, index: Any = None
    ) -> HeadOutput:
        return _head_update(cfg, hooks, state, head_inputs, head_output_grads, index)

    return HeadTransform(init_fn, update_fn, cfg)


def _deprecated(name: str, instead: str) -> None:
    warnings.warn(
        f"gradtail_optax.{name} is deprecated since 0.2 and will be removed in 0.3: use {instead} "
        "(gradtail_optax.head binds the options to the state's transformation once).",
        DeprecationWarning,
        stacklevel=3,
    )


def head_init(layers: Any, /, *, batch_size: int, memory_size: int | None = None) -> GradTailState:
    """A fresh `GradTailState` for `head_weights` (deprecated: use ``head(...).init``).

    Parameters
    ----------
    layers : mapping, tuple, array, or list of those
        Dense layers in JAX layout, as for `HeadTransform.init`.
    batch_size : int
        Examples per step.
    memory_size : int, optional
        The per-example memory's size; off (None) by default.

    Returns
    -------
    GradTailState

    Examples
    --------
    >>> import warnings, jax.numpy as jnp
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     state = head_init({"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}, batch_size=8)
    >>> [m.shape for m in state.ema.mean[0]], state.weights.shape
    ([(3, 4), (3,)], (8,))
    """
    _deprecated("head_init", "gradtail_optax.head(batch_size=..., **options).init(head)")
    return head(batch_size=batch_size, memory_size=memory_size).init(layers)


def head_weights(
    state: GradTailState,
    head_inputs: Any,
    head_output_grads: Any,
    /,
    *,
    axis_name: Hashable | None = None,
    index: Any = None,
    config: GradTailConfig | None = None,
    **options: Unpack[GradTailOptions],
) -> HeadOutput:
    """GradTail weights of a dense head (deprecated: use ``head(...).update``).

    The 0.1 form, which takes the options on every call: the same results as
    ``head(batch_size=B, **options).update(state, head_inputs, head_output_grads, index=index)``
    with the memory's size taken from ``state``.

    Parameters
    ----------
    state : GradTailState
        From `head_init` (or the previous call).
    head_inputs, head_output_grads, index
        As for `HeadTransform.update`.
    axis_name : hashable, optional
        As for `head`.
    config, **options
        As for `head` (``memory_size`` comes from the state).

    Returns
    -------
    HeadOutput
        ``(weights, alignment, state)``.

    Examples
    --------
    >>> import warnings, jax.numpy as jnp
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     state = head_init({"kernel": jnp.zeros((4, 3))}, batch_size=2)
    ...     w, align, state = head_weights(state, jnp.eye(2, 4), jnp.eye(2, 3), decay=0.9)
    >>> w.tolist()
    [1.0, 1.0]
    """
    _deprecated("head_weights", "gradtail_optax.head(batch_size=..., **options).update")
    if not isinstance(state, GradTailState):
        raise TypeError(
            f"`state` must be a GradTailState from head_init(); Received: {type(state).__name__}."
        )
    if config is None and state.memory is not None:
        options = {**options, "memory_size": int(state.memory.score.shape[0])}
    cfg = coerce_config(config, options)
    return _head_update(cfg, collectives(axis_name), state, head_inputs, head_output_grads, index)


def loss_and_output_grads(
    per_example_loss_fn: Callable[..., Any], outputs: Any, /, *args: Any
) -> tuple[jax.Array, Any]:
    """Per-example losses and each example's own gradient with respect to the outputs.

    One ``jax.vjp`` of ``per_example_loss_fn(outputs, *args)`` (shape (B,)) with a cotangent
    of ones: exact per example because loss ``i`` depends only on ``outputs[i]``, as for
    cross-entropy on logits. The outputs are usually the head's output (the logits).

    Parameters
    ----------
    per_example_loss_fn : callable
        ``(outputs, *args) -> (B,)`` losses.
    outputs : array of shape (B, ..., d_out)
        The head's output.
    *args
        Further arguments of the loss (labels, ...), not differentiated.

    Returns
    -------
    losses : jax.Array, shape (B,)
    output_grads : array, shape of ``outputs``
        ``dL_i / d outputs_i`` for each example.

    Examples
    --------
    >>> import jax.numpy as jnp, optax
    >>> logits, labels = jnp.zeros((2, 3)), jnp.array([0, 2])
    >>> losses, d = loss_and_output_grads(optax.softmax_cross_entropy_with_integer_labels, logits, labels)
    >>> d.shape, bool(jnp.allclose(d.sum(1), 0.0, atol=1e-6))
    ((2, 3), True)
    """
    losses, vjp = jax.vjp(lambda z: per_example_loss_fn(z, *args), outputs)
    if getattr(losses, "ndim", None) != 1 or losses.shape[0] != jax.tree.leaves(outputs)[0].shape[0]:
        raise ValueError(
            "`per_example_loss_fn` must return one loss per example, shape (B,); Received: shape "
            f"{tuple(getattr(losses, 'shape', ()))} for outputs of shape "
            f"{tuple(jax.tree.leaves(outputs)[0].shape)}."
        )
    (grads,) = vjp(jnp.ones_like(losses))
    return losses, grads

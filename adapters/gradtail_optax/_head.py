"""The efficient path: GradTail weights of dense layers from inputs and output gradients."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp

from gradtail_ops import (
    DEFAULT_CURVE,
    DEFAULT_DECAY,
    DEFAULT_REFERENCE,
    DEFAULT_WARMUP_STEPS,
    linear_score_and_update,
)
from gradtail_ops.curves import Curve

from ._memory import check_index, memory_step
from ._options import Decay, check_memory_size, make_options, resolve_decay
from ._transform import GradTailState, check_batch_size, init_state, next_state

__all__ = ["head_init", "head_weights", "loss_and_output_grads"]

_options = functools.lru_cache(maxsize=64)(make_options)


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


def head_init(head: Any, /, *, batch_size: int, memory_size: int | None = None) -> GradTailState:
    """A fresh `GradTailState` for `head_weights` on one dense layer (or several, scored jointly).

    Parameters
    ----------
    head : mapping, tuple, array, or list of those
        One dense layer ``z = a @ kernel + bias`` as ``{"kernel": ..., "bias": ...}`` (Flax's
        ``Dense`` parameters), ``(kernel, bias)``, ``(kernel,)`` or a bare kernel (no bias);
        ``kernel`` has JAX's layout ``(d_in, d_out)``. A list of layers scores them jointly
        (one cosine over all their parameters). Arrays or ``jax.ShapeDtypeStruct`` (only the
        shapes and dtypes are used).
    batch_size : int
        Examples per step (per device under ``pmap``/``shard_map``).
    memory_size : int, optional
        Keep a persistent per-example memory for a training set of this many examples (see
        `gradtail`'s ``memory_size``); every `head_weights` call then needs ``index=``. Off
        (None) by default.

    Returns
    -------
    GradTailState
        ``ema.mean`` is a list with one ``(kernel_ref, bias_ref)`` (or ``(kernel_ref,)``) tuple of
        zeros per layer, ``kernel_ref`` in the core's ``(d_out, d_in)`` layout (the transpose of
        the kernel, as in PyTorch); weights 1 and alignments 0 of shape ``(batch_size,)``;
        ``memory`` zeros of shape ``(memory_size,)`` when asked for, else None.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> state = head_init({"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}, batch_size=8)
    >>> [m.shape for m in state.ema.mean[0]], state.weights.shape  # reference in (d_out, d_in)
    ([(3, 4), (3,)], (8,))
    """
    batch = check_batch_size(batch_size)
    memory_rows = check_memory_size(memory_size)
    specs = head if isinstance(head, list) else [head]
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
    return init_state(template, batch, memory_rows)


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


def head_weights(
    state: GradTailState,
    head_inputs: Any,
    head_output_grads: Any,
    /,
    *,
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
    axis_name: Hashable | None = None,
    eps: float = 0.0,
    method: Literal["auto", "ghost", "materialize"] = "auto",
    index: Any = None,
    memory_decay: float = 0.5,
    memory_eta: float = 1.0,
    memory_max_weight: float = 3.0,
) -> tuple[jax.Array, jax.Array, GradTailState]:
    """GradTail weights of a dense head from its inputs and per-example output gradients.

    The efficient path (recommended for large models): for ``z = a @ kernel + bias``, example
    ``i``'s gradient of the head is ``(a_i^T d_i, d_i)`` with ``d_i = dL_i/dz_i``, and every
    quantity GradTail needs has a factored form in ``a`` and ``d``
    (`gradtail_ops.linear_score_and_update`): no per-example gradient is built. Same weights
    as `gradtail` scoring the head's leaves. Use the weights as constants in the loss,
    ``mean_i(w_i L_i)``, and differentiate the network once (see `loss_and_output_grads` and
    docs/optax.md). jit-friendly; the options are static Python values.

    Parameters
    ----------
    state : GradTailState
        From `head_init` (or the previous call).
    head_inputs : array of shape (B, d_in) or (B, T, d_in), or a sequence of them
        The head's inputs ``a`` (one per layer for several layers).
    head_output_grads : array of shape (B, d_out) or (B, T, d_out), or a sequence of them
        Each example's own loss gradient with respect to the head's output, e.g. from
        `loss_and_output_grads` (``jax.vjp`` of the per-example losses to the logits).
    decay, reference, warmup_steps, kind, max_weight, threshold, temperature, quantile, floor,
    normalize, axis_name, eps
        As in `gradtail` (the same defaults). ``axis_name`` averages only the batch reference
        across devices (and, with the memory, gathers the batch's indices and alignments so
        every device's memory stays the same); average the gradients as usual.
    method : {"auto", "ghost", "materialize"}, optional
        Norm computation for (B, T, d) inputs (`gradtail_ops.linear_sq_norms`). Defaults to
        "auto".
    index : array of shape (B,), integer, optional
        Each example's row in the per-example memory, in ``[0, memory_size)``. Required when
        the state was made by ``head_init(..., memory_size=N)``; an error otherwise.
    memory_decay, memory_eta, memory_max_weight
        The memory's options, as in `gradtail` (defaults 0.5, 1.0, 3.0); unused without it.

    Returns
    -------
    weights : jax.Array, shape (B,)
        Loss weights (gradients stopped); ones on the first step and during warm-up. With the
        memory, the memory's weights (see `gradtail`'s ``memory_size``).
    alignment : jax.Array, shape (B,)
        ``cos(g_i, G)`` of each example's head gradient with the reference of previous steps.
    state : GradTailState
        The new state (reference updated with this batch; ``weights``/``alignment`` stored).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> head = {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}
    >>> state = head_init(head, batch_size=2)
    >>> a = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    >>> d = jnp.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    >>> w, align, state = jax.jit(head_weights)(state, a, d)
    >>> w.tolist(), int(state.ema.count)
    ([1.0, 1.0], 1)

    With the per-example memory of a training set of 100 examples:

    >>> state = head_init(head, batch_size=2, memory_size=100)
    >>> w, align, state = jax.jit(head_weights)(state, a, d, index=jnp.array([7, 42]))
    >>> state.memory.score.shape
    (100,)
    """
    if not isinstance(state, GradTailState):
        raise TypeError(
            f"`state` must be a GradTailState from head_init(); Received: {type(state).__name__}."
        )
    opts = _options(
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
    layers = _pairs(head_inputs, head_output_grads)
    means = state.ema.mean
    if len(layers) != len(means):
        raise ValueError(
            f"The state holds {len(means)} dense layer(s) but {len(layers)} (inputs, output_grads) "
            "pair(s) were given; Received: one per layer is needed."
        )
    batch = int(state.weights.shape[0])
    rows = check_index(index, state.memory, batch, "head_weights()")
    for k, ((a, d), mean) in enumerate(zip(layers, means, strict=True)):
        d_out, d_in = tuple(mean[0].shape)  # the core's layout: the kernel's transpose
        if a.ndim not in (2, 3) or a.shape[0] != batch or a.shape[-1] != d_in:
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
    reduce_mean: Callable[[Any], Any] | None = None
    if opts.axis_name is not None:
        axis = opts.axis_name

        def reduce_mean(tree: Any) -> Any:
            return jax.lax.pmean(tree, axis)  # type: ignore[no-untyped-call]

    out = linear_score_and_update(
        state.ema,
        layers,
        decay=resolve_decay(opts.decay, state.count),
        reference=opts.reference,
        curve=opts.curve,
        warmup_steps=opts.warmup_steps,
        eps=opts.eps,
        reduce_mean=reduce_mean,
        method=method,
    )
    weights = jax.lax.stop_gradient(out.weights)
    alignment = jax.lax.stop_gradient(out.alignment)
    memory = state.memory
    if memory is not None and rows is not None:
        weights, memory = memory_step(memory, rows, alignment, state.ema.count, opts)
    return weights, alignment, next_state(state, out.state, weights, alignment, memory)


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

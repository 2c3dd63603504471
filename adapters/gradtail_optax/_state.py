"""`GradTailState`: the optax view of the core's `TailState`, and its interchange format."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import gradtail_ops
from gradtail_ops import (
    EMAState,
    GradTailConfig,
    MemoryState,
    SketchFactors,
    TailOutput,
    TailState,
    coerce_config,
)
from gradtail_ops.sketch import sketch_factors

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradtail_ops import GradTailOptions

__all__ = ["GradTailState", "after_step", "init_state", "state_from_dict", "state_to_dict", "to_tail"]


class GradTailState(NamedTuple):
    """State of `gradtail` and of the efficient head path (a NamedTuple, hence a pytree).

    The core's `gradtail_ops.TailState` (``ema``, ``memory``, ``steps`` as ``count``) plus the
    latest step's weights and alignments, so they can be read from anywhere in a chain.

    Attributes
    ----------
    ema : gradtail_ops.EMAState
        The running reference gradient of the scored parameters: ``ema.mean`` is a list with
        one array per scored leaf (flattening order of the parameters) for `gradtail`, and a
        list of ``(kernel_ref, bias_ref)`` tuples for `head`, the kernel's reference in the
        core's ``(d_out, d_in)`` layout (the transpose of a JAX kernel). ``ema.count`` counts
        reference updates (a batch with a non-finite gradient does not update the reference).
    count : jax.Array, shape (), int32
        Steps taken on non-empty batches, including skipped reference updates: the core's
        ``TailState.steps``, at which a decay schedule is evaluated (the steps taken before).
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
    sketch : tuple or None
        With ``sketch_rank`` (the head path only), the fixed test matrices of each sketched
        layer (`gradtail_ops.SketchFactors`, None for an exact layer); their ``ema.mean``
        entries then hold the sketches. None without a sketch.
    """

    ema: EMAState
    count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count, as in optax's states
    weights: jax.Array
    alignment: jax.Array
    memory: MemoryState | None = None
    sketch: tuple[SketchFactors | None, ...] | None = None


def _zeros_like(leaf: Any, dtype: Any) -> jax.Array:
    # zeros_like keeps a JAX array's sharding (and leaves an uncommitted one uncommitted), like
    # optax's own states; other leaves (NumPy, ShapeDtypeStruct) get fresh uncommitted zeros.
    if isinstance(leaf, jax.Array):
        return jnp.zeros_like(leaf, dtype=dtype)
    return jnp.zeros(tuple(leaf.shape), dtype)


def init_state(template: Any, batch_size: int, config: GradTailConfig) -> GradTailState:
    """A fresh state for ``gradtail_ops.tail_init(template, config=config)``; (batch_size,) fields.

    ``template`` is a list of arrays (or of tuples of arrays); only shapes and dtypes are used.
    The core's `tail_init` runs under ``jax.eval_shape``, for its structure and dtype rule (at
    least float32) without allocating; the zeros are then made like the template leaves.
    (Called eagerly, `tail_init` would place its arrays with an explicit ``device=``, which
    commits them: a jitted step would then compile twice, once for the uncommitted arrays of
    the first call and once for the committed ones it returns.)
    """
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype), template)  # type: ignore[no-untyped-call]
    shapes = jax.eval_shape(functools.partial(gradtail_ops.tail_init, config=config), spec)
    dtype = shapes.ema.total.dtype

    def zeros(s: Any) -> jax.Array:
        return jnp.zeros(s.shape, s.dtype)

    def zeros_like_template(a: Any, s: Any) -> jax.Array:
        return _zeros_like(a, s.dtype)

    if shapes.sketch is None:
        sketch = None
        mean = jax.tree.map(zeros_like_template, template, shapes.ema.mean)
    else:  # a sketched layer's mean holds sketches, not the template's shapes
        sketch = _test_matrices(template, shapes.sketch, config, dtype)
        mean = [
            tuple(map(zeros, means)) if f is not None else jax.tree.map(zeros_like_template, layer, means)
            for layer, means, f in zip(template, shapes.ema.mean, shapes.sketch, strict=True)
        ]
    ema = EMAState(mean=mean, total=zeros(shapes.ema.total), count=zeros(shapes.ema.count))
    return GradTailState(
        ema=ema,
        count=zeros(shapes.steps),
        weights=jnp.ones((batch_size,), dtype),
        alignment=jnp.zeros((batch_size,), dtype),
        memory=None if shapes.memory is None else MemoryState(*map(zeros, shapes.memory)),
        sketch=sketch,
    )


def _test_matrices(
    template: Any, plan: Any, config: GradTailConfig, dtype: Any
) -> tuple[SketchFactors | None, ...]:
    """The sketched layers' test matrices, concrete (made with NumPy) and uncommitted."""
    sketch = config.sketch
    assert sketch is not None
    assert sketch.size is not None
    out: list[SketchFactors | None] = []
    for layer, f in zip(template, plan, strict=True):
        if f is None:
            out.append(None)
            continue
        d_out, d_in = (int(n) for n in layer[0].shape)
        made = sketch_factors(
            d_out, d_in, sketch.rank, sketch.size, seed=sketch.seed, like=np.zeros((), dtype)
        )
        out.append(SketchFactors(omega=jnp.asarray(made.omega), psi=jnp.asarray(made.psi)))
    return tuple(out)


def to_tail(state: GradTailState) -> TailState:
    """The core's view of the state (no copy)."""
    return TailState(ema=state.ema, memory=state.memory, steps=state.count, sketch=state.sketch)


def after_step(state: GradTailState, out: TailOutput) -> GradTailState:
    """The state after a core step, in the dtypes of ``state`` (a jitted step never retraces).

    An empty batch changes nothing, not even the stored weights of the previous step.
    """
    if out.weights.shape[0] == 0:
        return state
    return GradTailState(
        ema=out.state.ema,
        count=out.state.steps,
        weights=jax.lax.stop_gradient(out.weights).astype(state.weights.dtype),
        alignment=jax.lax.stop_gradient(out.alignment).astype(state.alignment.dtype),
        memory=out.state.memory,
        sketch=state.sketch,
    )


def _is_state(x: Any) -> bool:
    return isinstance(x, GradTailState)


def _find(opt_state: Any) -> GradTailState:
    """The one `GradTailState` in an optimiser state (or the state itself)."""
    found: list[GradTailState] = [
        s for s in jax.tree.leaves(opt_state, is_leaf=_is_state) if isinstance(s, GradTailState)
    ]
    if len(found) != 1:
        raise ValueError(
            "`state` must be a GradTailState or an optimiser state holding exactly one; Received: "
            f"{type(opt_state).__name__} holding {len(found)}."
        )
    return found[0]


def _placed(new: Any, like: Any) -> jax.Array:
    # Committed like `like` (its sharding), or uncommitted as `init` makes them: a jitted step
    # then compiles once for the loaded state as for a fresh one.
    if isinstance(like, jax.Array) and like.committed:
        placed: jax.Array = jax.device_put(new, like.sharding)
        return placed
    return jnp.asarray(np.asarray(new))


def state_to_dict(
    state: Any, config: GradTailConfig | None = None, /, **options: Unpack[GradTailOptions]
) -> dict[str, Any]:
    """The GradTail state as the library's interchange dict (`gradtail_ops.state_to_dict`).

    The same format as every adapter's: ``mean`` (nested lists of arrays), ``total``,
    ``count`` (reference updates), ``steps`` (this state's ``count``), ``decay`` (None for a
    schedule), ``reference`` and, with the memory, ``memory_score``, ``memory_visits``,
    ``memory_decay``. The latest weights and alignments are not part of it.

    Parameters
    ----------
    state : GradTailState or optimiser state
        A `GradTailState`, or an optimiser state holding exactly one (``opt_state`` of
        ``optax.chain(gradtail(...), ...)`` or of ``gradtail(inner, ...)``).
    config : gradtail_ops.GradTailConfig, optional
        The config the state was built with; or pass the same keyword options instead
        (``decay=...``, see `gradtail_ops.GradTailConfig.from_options`).

    Returns
    -------
    dict

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from gradtail_optax import gradtail
    >>> tx = gradtail(batch_size=2, decay=0.9)
    >>> saved = state_to_dict(tx.init({"w": jnp.zeros(3)}), decay=0.9)
    >>> sorted(saved), saved["decay"]
    (['count', 'decay', 'mean', 'reference', 'steps', 'total'], 0.9)
    """
    return gradtail_ops.state_to_dict(to_tail(_find(state)), config=coerce_config(config, options))


def state_from_dict(
    state_dict: Any,
    /,
    *,
    like: Any,
    config: GradTailConfig | None = None,
    **options: Unpack[GradTailOptions],
) -> tuple[Any, GradTailConfig]:
    """Load an interchange dict into a state shaped like ``like``, after validating all of it.

    `gradtail_ops.state_from_dict` checks everything before anything is built: unknown keys,
    the reference kind, shapes against ``like``, dtypes, finiteness, ``0 <= total <= 1``,
    ``count >= 0``, ``steps >= count``, the memory present exactly when configured. Nothing
    of ``like`` is changed.

    Parameters
    ----------
    state_dict : mapping
        From `state_to_dict` (or any adapter's, for the same scored layers).
    like : GradTailState or optimiser state
        The destination, e.g. ``tx.init(params)``: its structure, dtypes and placement are
        the result's. The latest weights and alignments are kept from it.
    config : gradtail_ops.GradTailConfig, optional
        The destination's config; or the same keyword options instead.

    Returns
    -------
    state : same type as ``like``
        ``like`` with its `GradTailState` replaced by the loaded one.
    config : gradtail_ops.GradTailConfig
        The config with the saved decay and memory decay: build the transformation from it
        (``gradtail(..., config=config)``) to continue exactly.

    Raises
    ------
    ValueError, TypeError
        From the core's checks, each naming the offending key ("Received: ..."); or when
        ``like`` holds no `GradTailState`, or several.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from gradtail_optax import gradtail
    >>> tx = gradtail(batch_size=2, decay=0.9)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> saved = state_to_dict(state, decay=0.9)
    >>> restored, config = state_from_dict(saved, like=state, decay=0.9)
    >>> int(restored.count), config.decay
    (0, 0.9)
    """
    current = _find(like)
    tail, config = gradtail_ops.state_from_dict(
        state_dict, like=to_tail(current), config=coerce_config(config, options)
    )
    placed = jax.tree.map(_placed, tail, to_tail(current))
    loaded = current._replace(ema=placed.ema, count=placed.steps, memory=placed.memory, sketch=placed.sketch)
    out = jax.tree.map(lambda s: loaded if _is_state(s) else s, like, is_leaf=_is_state)
    return out, config

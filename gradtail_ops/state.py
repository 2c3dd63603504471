"""The state of a GradTail step (reference EMA, optional memory, step count) and its interchange format.

Every adapter keeps one `TailState` and saves it through `state_to_dict` /
`state_from_dict`: one format, validated in one place before anything is assigned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

from array_api_compat import device as array_device

from ._checks import namespace
from ._tree import is_sequence, leaves, map_leaves, structure_repr
from .config import GradTailConfig
from .ema import EMAState, ema_init
from .memory import MemoryState, memory_init
from .sketch import SketchFactors, sketch_factors, use_sketch
from .validation import check_real

__all__ = ["STATE_KEYS", "TailState", "state_from_dict", "state_to_dict", "tail_init"]

Array = Any

#: The keys of the interchange format (`state_to_dict`); "steps" and the memory's are optional.
STATE_KEYS: tuple[str, ...] = (
    "mean",
    "total",
    "count",
    "steps",
    "decay",
    "reference",
    "memory_score",
    "memory_visits",
    "memory_decay",
    "sketch",
)
_INT32_MAX = 2**31 - 1


class TailState(NamedTuple):
    """Everything a GradTail step carries from one batch to the next (a JAX pytree).

    Attributes
    ----------
    ema : EMAState
        The running reference gradient (`ema_update`); ``ema.count`` counts reference
        updates, which gate warm-up and the memory.
    memory : MemoryState or None
        The per-example memory when the config has one (shape (N,) arrays), else None.
    steps : array, shape (), int32
        Steps taken on non-empty batches, including those whose reference update was
        skipped for non-finite input: the argument of a decay schedule.
    sketch : tuple of (SketchFactors or None), or None
        With ``config.sketch``, one entry per layer of a factored state: the test matrices
        of a sketched layer (whose ``ema.mean`` entry then holds the sketches
        ``(Y (d_out, k), W (l, d_in)[, bias])`` instead of the weight's reference), None for
        an exact one. None without a sketch.
    """

    ema: EMAState
    memory: MemoryState | None
    steps: Array
    sketch: tuple[SketchFactors | None, ...] | None = None


def tail_init(template: Any, /, *, config: GradTailConfig) -> TailState:
    """An empty state for gradients shaped like ``template``, under ``config``.

    Parameters
    ----------
    template : array or nested list/tuple of arrays
        Arrays with the scored gradients' shapes (values ignored): for the factored linear
        step, one tuple per layer, ``(weight (d_out, d_in),)`` or ``(weight, bias (d_out,))``.
        The state takes their floating dtype (at least float32) and device.
    config : GradTailConfig
        With ``config.memory``, an empty memory of ``config.memory.size`` rows is included.

    Returns
    -------
    TailState

    Examples
    --------
    >>> import numpy as np
    >>> from gradtail_ops import GradTailConfig
    >>> state = tail_init([(np.zeros((2, 3)),)], config=GradTailConfig.from_options(memory_size=5))
    >>> state.memory.score.shape, int(state.steps)
    ((5,), 0)
    """
    _check_config(config)
    factors = _sketch_plan(template, config)
    if factors is not None:
        template = [
            layer if f is None else (*_sketch_shapes(layer[0], f), *layer[1:])
            for layer, f in zip(template, factors, strict=True)
        ]
    ema = ema_init(template)
    first = leaves(ema.mean)[0]
    memory = None if config.memory is None else memory_init(config.memory.size, like=first)
    xp = namespace(first)
    steps = xp.zeros((), dtype=xp.int32, device=array_device(first))
    return TailState(ema=ema, memory=memory, steps=steps, sketch=factors)


def _sketch_shapes(weight: Array, factors: SketchFactors) -> tuple[Array, Array]:
    """Zero sketches ``Y`` (d_out, k) and ``W`` (l, d_in), templates for the EMA."""
    xp = namespace(factors.omega)
    (d_out, d_in), k, size = weight.shape, factors.omega.shape[1], factors.psi.shape[0]
    dev = array_device(factors.omega)
    return (
        xp.zeros((d_out, k), dtype=factors.omega.dtype, device=dev),
        xp.zeros((size, d_in), dtype=factors.omega.dtype, device=dev),
    )


def _sketch_plan(template: Any, config: GradTailConfig) -> tuple[SketchFactors | None, ...] | None:
    """Per layer, the test matrices where the config's sketch pays, for a layer template.

    A layer template is a list/tuple of tuples whose first array is a 2-D weight (the
    factored steps' layout); with a sketch configured, anything else is refused.
    """
    sketch = config.sketch
    if sketch is None:
        return None
    layered = is_sequence(template) and all(
        is_sequence(layer) and layer and getattr(layer[0], "ndim", 0) == 2 for layer in template
    )
    if not layered:
        raise ValueError(
            "`sketch_rank` sketches linear layers of the factored step: the template must be a list of "
            "(weight (d_out, d_in),) or (weight, bias) tuples; Received: "
            f"{structure_repr(template)}. Materialised per-example gradients use the exact reference."
        )
    assert sketch.size is not None
    plan: list[SketchFactors | None] = []
    for layer in template:
        d_out, d_in = (int(n) for n in layer[0].shape)
        if use_sketch(d_out, d_in, sketch.rank, sketch.size):
            like = ema_init(layer[0]).mean  # the state's dtype (at least float32) and device
            plan.append(sketch_factors(d_out, d_in, sketch.rank, sketch.size, seed=sketch.seed, like=like))
        else:
            plan.append(None)
    return tuple(plan) if any(f is not None for f in plan) else None


def next_steps(xp: Any, steps: Array) -> Array:
    """``steps + 1``, saturating at the int32 maximum (a long run never wraps to negative)."""
    return xp.where(steps < _INT32_MAX, steps + 1, steps)


def state_to_dict(state: TailState, /, *, config: GradTailConfig) -> dict[str, Any]:
    """The state as a plain dict of arrays and numbers: the library's interchange format.

    The arrays stay in the state's library and device (copies), so ``torch.save``, NumPy's
    ``savez`` or a Keras/orbax checkpoint can store them; `state_from_dict` reads it back
    into any adapter of the same layers.

    Parameters
    ----------
    state : TailState
    config : GradTailConfig
        The config the state was built with; its ``decay`` (None for a schedule),
        ``reference`` and memory decay are recorded.

    Returns
    -------
    dict
        ``mean`` (nested lists of arrays, the template's nesting), ``total`` (shape ()),
        ``count`` and ``steps`` (shape (), int32), ``decay``, ``reference``; with a memory,
        ``memory_score``, ``memory_visits`` (shape (N,)) and ``memory_decay``; with sketched
        layers, ``sketch``: per layer None or ``[omega, psi]`` (their ``mean`` entry holds
        the sketches).

    Examples
    --------
    >>> import numpy as np
    >>> from gradtail_ops import GradTailConfig
    >>> config = GradTailConfig()
    >>> d = state_to_dict(tail_init([(np.zeros((2, 3)),)], config=config), config=config)
    >>> sorted(d)
    ['count', 'decay', 'mean', 'reference', 'steps', 'total']
    """
    _check_state(state)

    def copy(a: Array) -> Array:
        return namespace(a).asarray(a, copy=True)

    out: dict[str, Any] = {
        "mean": _as_lists(map_leaves(copy, state.ema.mean)),
        "total": copy(state.ema.total),
        "count": copy(state.ema.count),
        "steps": copy(state.steps),
        "decay": None if callable(config.decay) else config.decay,
        "reference": config.reference,
    }
    if state.memory is not None:
        out["memory_score"] = copy(state.memory.score)
        out["memory_visits"] = copy(state.memory.visits)
        out["memory_decay"] = None if config.memory is None else config.memory.decay
    if state.sketch is not None:
        out["sketch"] = [None if f is None else [copy(f.omega), copy(f.psi)] for f in state.sketch]
    return out


def state_from_dict(
    state_dict: Mapping[str, Any], /, *, like: TailState, config: GradTailConfig
) -> tuple[TailState, GradTailConfig]:
    """Read a saved state back, after validating all of it; nothing is half-loaded.

    Checks, before building anything: no unknown keys; the reference kind matches;
    ``mean`` has the layers and shapes of ``like`` (the nesting may differ: lists or
    tuples); floating arrays are floating and finite, counts are integers; ``total`` lies in
    [0, 1], ``count >= 0``, ``steps >= count``, visits ``>= 0``; the memory is present exactly
    when ``config`` has one, with ``like``'s shape. A 0.1.0 dict without ``steps`` loads
    with ``steps = count``.

    Parameters
    ----------
    state_dict : mapping
        From `state_to_dict` (arrays of any Array-API library, or Python numbers).
    like : TailState
        A state of the destination (e.g. a fresh `tail_init`): its structure, dtypes and
        device are the result's.
    config : GradTailConfig
        The destination's config.

    Returns
    -------
    state : TailState
        New arrays in ``like``'s library, dtypes and device.
    config : GradTailConfig
        ``config`` with the saved decay (when a number was saved and ``config.decay`` is
        not a schedule) and the saved memory decay: the options that shaped the state.

    Raises
    ------
    ValueError, TypeError
        Naming the offending key ("Received: ...").

    Examples
    --------
    >>> import numpy as np
    >>> from gradtail_ops import GradTailConfig
    >>> config = GradTailConfig(decay=0.9)
    >>> state = tail_init([(np.zeros((2, 3)),)], config=config)
    >>> saved = state_to_dict(state, config=config)
    >>> saved["total"] = np.float64(-1.0)
    >>> state_from_dict(saved, like=state, config=config)
    Traceback (most recent call last):
    ...
    ValueError: `total` must be a finite number in [0.0, 1.0]; Received: total=-1.0.
    """
    _check_state(like)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping; Received: {type(state_dict).__name__}.")
    unknown = sorted(set(state_dict) - set(STATE_KEYS))
    missing = [k for k in ("mean", "total", "count") if k not in state_dict]
    if unknown or missing:
        raise ValueError(
            f"The state must have the keys {list(STATE_KEYS[:3])} and may have {list(STATE_KEYS[3:])}; "
            f"Received: unknown {unknown}, missing {missing}."
        )
    reference = state_dict.get("reference", config.reference)
    if reference != config.reference:
        raise ValueError(
            f"The state was built with reference={reference!r} but this config uses "
            f"reference={config.reference!r}; Received: reference={reference!r}."
        )
    saved_decay = state_dict.get("decay")
    if saved_decay is not None and not callable(config.decay):
        config = config.replace(decay=check_real("decay", saved_decay, low=0.0, high=1.0))
    has_memory = "memory_score" in state_dict or "memory_visits" in state_dict
    if (config.memory is None) != (not has_memory) or (like.memory is None) != (config.memory is None):
        want = "none" if config.memory is None else f"one of size {config.memory.size}"
        raise ValueError(
            f"The destination keeps {want} per-example memory but the state "
            f"{'holds one' if has_memory else 'has none'}; Received: keys {sorted(state_dict)}."
        )
    if config.memory is not None and state_dict.get("memory_decay") is not None:
        memory_decay = check_real(
            "memory_decay", state_dict["memory_decay"], low=0.0, high=1.0, open_high=True
        )
        config = config.replace(memory=dataclasses.replace(config.memory, decay=memory_decay))

    # The sketch first: a sketched state and an exact destination (or the reverse) differ in
    # their mean shapes too, and the sketch is what names the cause.
    sketch = _load_sketch(state_dict.get("sketch"), like.sketch)
    mean = _load_mean(state_dict["mean"], like.ema.mean)
    total = _load_array("total", state_dict["total"], like.ema.total, floating=True)
    count = _load_array("count", state_dict["count"], like.ema.count, floating=False)
    steps = _load_array("steps", state_dict.get("steps", state_dict["count"]), like.steps, floating=False)
    check_real("total", float(total), low=0.0, high=1.0)
    if int(count) < 0 or int(steps) < int(count):
        raise ValueError(
            "`count` must be >= 0 and `steps` >= `count` (steps include skipped updates); "
            f"Received: count={int(count)}, steps={int(steps)}."
        )
    memory = None
    if like.memory is not None:
        if "memory_score" not in state_dict or "memory_visits" not in state_dict:
            raise ValueError(
                "A saved memory needs both `memory_score` and `memory_visits`; "
                f"Received: keys {sorted(state_dict)}."
            )
        score = _load_array("memory_score", state_dict["memory_score"], like.memory.score, floating=True)
        visits = _load_array("memory_visits", state_dict["memory_visits"], like.memory.visits, floating=False)
        xp = namespace(visits)
        if not bool(xp.all(visits >= 0)):
            raise ValueError(f"`memory_visits` must be >= 0; Received: a minimum of {int(xp.min(visits))}.")
        memory = MemoryState(score=score, visits=visits)
    ema = EMAState(mean=mean, total=total, count=count)
    return TailState(ema=ema, memory=memory, steps=steps, sketch=sketch), config


# --------------------------------------------------------------------------- helpers
def _check_config(config: Any) -> None:
    if not isinstance(config, GradTailConfig):
        raise TypeError(f"`config` must be a GradTailConfig; Received: {type(config).__name__}.")


def _check_state(state: Any) -> None:
    if not isinstance(state, TailState):
        raise TypeError(f"`state` must be a TailState (from tail_init); Received: {type(state).__name__}.")


def _as_lists(tree: Any) -> Any:
    return [_as_lists(item) for item in tree] if is_sequence(tree) else tree


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    name = str(getattr(value, "dtype", type(value).__name__)).rsplit(".", 1)[-1]
    for kind in ("bool", "complex", "int", "float"):
        if kind in name:
            return "int" if kind == "int" else kind
    return name


def _load_array(name: str, value: Any, target: Array, *, floating: bool) -> Array:
    """``value`` as a copy in ``target``'s library, dtype and device, after the checks."""
    kind = _kind(value)
    if kind != ("float" if floating else "int"):
        raise TypeError(
            f"`{name}` must hold {'real floating' if floating else 'integer'} values; Received: "
            f"dtype {getattr(value, 'dtype', type(value).__name__)}."
        )
    shape = tuple(getattr(value, "shape", ()))
    if shape != tuple(target.shape):
        raise ValueError(f"`{name}` must have shape {tuple(target.shape)}; Received: shape {shape}.")
    xp = namespace(target)
    if not floating:  # an integer that the target dtype cannot hold must not wrap to another value
        if shape == ():
            low = high = int(value)
        else:
            src = namespace(value)
            low, high = int(src.min(value)), int(src.max(value))
        info = xp.iinfo(target.dtype)
        if low < info.min or high > info.max:
            raise ValueError(
                f"`{name}` must fit {target.dtype} ([{info.min}, {info.max}]); Received: values from "
                f"{low} to {high}."
            )
    out = xp.asarray(value, dtype=target.dtype, device=array_device(target), copy=True)
    if floating and not bool(xp.all(xp.isfinite(out))):
        raise ValueError(f"`{name}` must be finite (in {target.dtype}); Received: non-finite entries.")
    return out


def _load_sketch(value: Any, like: tuple[SketchFactors | None, ...] | None) -> Any:
    """The saved test matrices, where ``like`` sketches the same layers."""
    plan = None if like is None else [f is not None for f in like]
    if value is not None and not is_sequence(value):
        raise TypeError(
            "`sketch` must be a list with one entry per layer (None, or [omega, psi]); "
            f"Received: {type(value).__name__}."
        )
    saved = None if value is None else [f is not None for f in value]
    if plan != saved:
        raise ValueError(
            f"`sketch` must mark the sketched layers {plan} of the destination (None: no sketch); "
            f"Received: {saved}."
        )
    if like is None:
        return None
    out: list[SketchFactors | None] = []
    for k, (f, want) in enumerate(zip(value, like, strict=True)):
        if want is None:
            out.append(None)
            continue
        omega = _load_array(f"sketch[{k}].omega", f[0], want.omega, floating=True)
        psi = _load_array(f"sketch[{k}].psi", f[1], want.psi, floating=True)
        out.append(SketchFactors(omega=omega, psi=psi))
    return tuple(out)


def _load_mean(value: Any, like: Any) -> Any:
    got, want = leaves(value) if is_sequence(value) else [value], leaves(like)
    if len(got) != len(want) or any(
        tuple(getattr(g, "shape", ())) != tuple(w.shape) for g, w in zip(got, want, strict=False)
    ):
        raise ValueError(
            f"`mean` must match the tracked layers: expected {structure_repr(like)}; "
            f"Received: {structure_repr(value)}."
        )
    loaded = iter(
        [
            _load_array(f"mean[{k}]", g, w, floating=True)
            for k, (g, w) in enumerate(zip(got, want, strict=True))
        ]
    )
    return map_leaves(lambda _: next(loaded), like)

"""The GradTail policy: every option of a step, validated once, frozen and hashable.

`GradTailConfig` is the one place where the options of a GradTail step (Chen et al., 2022,
"GradTail", arXiv:2201.05938; the formulation is ours, docs/method.md) are checked. The
adapters take flat keyword options, as their ecosystems expect, and turn them into a config
with `GradTailConfig.from_options`; the core's `tail_step` / `linear_tail_step` then apply the
whole policy (warm-up, memory gating, empty batches) from it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, get_args

from .curves import WeightCurve
from .defaults import (
    DEFAULT_CURVE,
    DEFAULT_DECAY,
    DEFAULT_EPS,
    DEFAULT_MEMORY_DECAY,
    DEFAULT_MEMORY_ETA,
    DEFAULT_MEMORY_MAX_WEIGHT,
    DEFAULT_METHOD,
    DEFAULT_REFERENCE,
    DEFAULT_WARMUP_STEPS,
)
from .validation import check_choice, check_int, check_real

__all__ = [
    "METHODS",
    "OPTION_NAMES",
    "REFERENCES",
    "CurveKind",
    "DecaySchedule",
    "GradTailConfig",
    "GradTailOptions",
    "MemoryConfig",
    "SketchConfig",
    "Method",
    "Reference",
    "coerce_config",
    "option_attributes",
]

#: What the reference EMA averages: plain batch-mean gradients or unit-normalised ones.
Reference = Literal["mean", "direction"]
#: How the factored ops compute sequence norms (see `linear_sq_norms`).
Method = Literal["auto", "ghost", "materialize"]
#: The weighting curves of `weight_curve`.
CurveKind = Literal["sigmoid", "spare_negative", "rank", "zscore"]
#: An optax-style schedule: ``steps -> decay`` (steps: the number of steps taken before).
DecaySchedule = Callable[[Any], Any]

REFERENCES: tuple[str, ...] = get_args(Reference)
METHODS: tuple[str, ...] = get_args(Method)


class GradTailOptions(TypedDict, total=False):
    """The flat keyword options every adapter accepts (``**options``); see `GradTailConfig`."""

    decay: float | DecaySchedule
    reference: Reference
    warmup_steps: int
    kind: CurveKind
    max_weight: float
    threshold: float
    temperature: float
    quantile: float
    floor: float
    normalize: bool
    eps: float
    method: Method
    memory_size: int | None
    memory_decay: float
    memory_eta: float
    memory_max_weight: float
    sketch_rank: int | None
    sketch_size: int | None
    sketch_seed: int


#: The names of the flat options, in documentation order.
OPTION_NAMES: tuple[str, ...] = tuple(GradTailOptions.__annotations__)
_FIELDS = ("decay", "reference", "warmup_steps", "curve", "eps", "method", "memory", "sketch")
_CURVE_FIELDS = ("kind", "max_weight", "threshold", "temperature", "quantile", "floor", "normalize")


@dataclass(frozen=True)
class MemoryConfig:
    """Options of the persistent per-example memory (`memory_update`, `memory_weights`).

    Parameters
    ----------
    size : int
        N, the number of training examples (rows of the memory), >= 1.
    decay : float, optional
        Per-visit decay of each example's running score, in [0, 1).
        Defaults to ``DEFAULT_MEMORY_DECAY`` (0.5).
    eta : float, optional
        Log-weight per standard deviation of running score, finite and >= 0.
        Defaults to ``DEFAULT_MEMORY_ETA`` (1.0).
    max_weight : float, optional
        Cap of the memory's weights before normalisation, finite and >= 1.
        Defaults to ``DEFAULT_MEMORY_MAX_WEIGHT`` (3.0).

    Examples
    --------
    >>> MemoryConfig(1000, decay=0.9)
    MemoryConfig(size=1000, decay=0.9, eta=1.0, max_weight=3.0)
    """

    size: int
    decay: float = DEFAULT_MEMORY_DECAY
    eta: float = DEFAULT_MEMORY_ETA
    max_weight: float = DEFAULT_MEMORY_MAX_WEIGHT

    def __post_init__(self) -> None:
        _set(self, "size", check_int("memory_size", self.size, low=1))
        _set(self, "decay", check_real("memory_decay", self.decay, low=0.0, high=1.0, open_high=True))
        _set(self, "eta", check_real("memory_eta", self.eta, low=0.0))
        _set(self, "max_weight", check_real("memory_max_weight", self.max_weight, low=1.0))


@dataclass(frozen=True)
class SketchConfig:
    """Options of the sketched reference for large linear layers (`gradtail_ops.sketch`).

    Parameters
    ----------
    rank : int
        k, the rank of the reconstructed reference (columns of ``Y = G Ω``), >= 1.
    size : int, optional
        l, rows of ``W = Ψ G``, >= k. Defaults to ``2 k + 1`` (Tropp et al., 2017).
    seed : int, optional
        Seed of the random test matrices (with the layer's shape). Defaults to 0.

    Examples
    --------
    >>> SketchConfig(16)
    SketchConfig(rank=16, size=33, seed=0)
    """

    rank: int
    size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        rank = check_int("sketch_rank", self.rank, low=1)
        _set(self, "rank", rank)
        size = 2 * rank + 1 if self.size is None else check_int("sketch_size", self.size, low=rank)
        _set(self, "size", size)
        _set(self, "seed", check_int("sketch_seed", self.seed, low=0))


@dataclass(frozen=True)
class GradTailConfig:
    """Every option of a GradTail step, validated on construction (frozen and hashable).

    Build it directly, or from the flat keyword options the adapters take with
    `from_options`. Hashable, so it can be a static argument under ``jax.jit``.

    Parameters
    ----------
    decay : float or callable, optional
        EMA decay of the reference gradient, in [0, 1], or a schedule ``steps -> decay``
        evaluated at the number of steps taken before (optax style). Defaults to
        ``DEFAULT_DECAY`` (0.999).
    reference : {"direction", "mean"}, optional
        What the EMA averages: the batch mean of unit-normalised per-example gradients
        (counts examples, not gradient mass), or the plain batch-mean gradient. Defaults
        to ``DEFAULT_REFERENCE`` ("direction").
    warmup_steps : int, optional
        Reference updates during which the weights are 1 (the first step always gives ones:
        no reference exists yet). Defaults to ``DEFAULT_WARMUP_STEPS`` (0).
    curve : WeightCurve, optional
        Maps alignments (B,) to weights (B,); any callable doing so is accepted.
        Defaults to ``DEFAULT_CURVE`` (batch rank, lowest 30% weighted 3x, normalised to mean 1).
    eps : float, optional
        Gradient norms at or below ``eps`` count as zero; finite and >= 0. Defaults to 0.0.
    method : {"auto", "ghost", "materialize"}, optional
        How the factored ops compute sequence norms. Defaults to "auto".
    memory : MemoryConfig, optional
        Turns on the persistent per-example memory: the weights then come from each
        example's running score, and every step needs the examples' indices. Defaults to
        None (off).
    sketch : SketchConfig, optional
        Hold the reference of large linear layers as a rank-k sketch (factored steps only;
        layers whose sketch would not be 4x smaller stay exact). Defaults to None (exact).

    Raises
    ------
    ValueError, TypeError
        Naming the first invalid option ("Received: ..."): every number must be finite and
        in range (Python, NumPy and 0-d array scalars alike), every choice one of its values.

    Examples
    --------
    >>> config = GradTailConfig.from_options(decay=0.99, max_weight=2.0, memory_size=100)
    >>> config.decay, config.curve.max_weight, config.memory.size
    (0.99, 2.0, 100)
    >>> GradTailConfig.from_options(max_weight=float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: `max_weight` must be a finite number >= 1.0; Received: max_weight=nan.
    """

    decay: float | DecaySchedule = DEFAULT_DECAY
    reference: Reference = DEFAULT_REFERENCE
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    curve: WeightCurve = DEFAULT_CURVE
    eps: float = DEFAULT_EPS
    method: Method = DEFAULT_METHOD
    memory: MemoryConfig | None = None
    sketch: SketchConfig | None = None

    def __post_init__(self) -> None:
        if not callable(self.decay):
            _set(self, "decay", check_real("decay", self.decay, low=0.0, high=1.0))
        check_choice("reference", self.reference, REFERENCES)
        _set(self, "warmup_steps", check_int("warmup_steps", self.warmup_steps, low=0))
        curve: Any = self.curve
        if not callable(curve):
            raise TypeError(
                "`curve` must be a WeightCurve (or a callable `alignment -> weights`); "
                f"Received: {type(self.curve).__name__}."
            )
        _set(self, "eps", check_real("eps", self.eps, low=0.0))
        check_choice("method", self.method, METHODS)
        if self.memory is not None and not isinstance(self.memory, MemoryConfig):
            raise TypeError(
                f"`memory` must be a MemoryConfig or None; Received: {type(self.memory).__name__}."
            )
        if self.sketch is not None and not isinstance(self.sketch, SketchConfig):
            raise TypeError(
                f"`sketch` must be a SketchConfig or None; Received: {type(self.sketch).__name__}."
            )

    @classmethod
    def from_options(cls, **options: Any) -> GradTailConfig:
        """A config from the flat keyword options of the adapters (`GradTailOptions`).

        Parameters
        ----------
        **options
            Any of ``decay``, ``reference``, ``warmup_steps``, ``eps``, ``method``; the
            curve's ``kind``, ``max_weight``, ``threshold``, ``temperature``, ``quantile``,
            ``floor``, ``normalize`` (unset ones take ``DEFAULT_CURVE``'s values); the
            memory's ``memory_size`` (None: off), ``memory_decay``, ``memory_eta``,
            ``memory_max_weight``; and the sketch's ``sketch_rank`` (None: exact),
            ``sketch_size``, ``sketch_seed``.

        Returns
        -------
        GradTailConfig

        Raises
        ------
        TypeError
            For an option name that does not exist (with the valid names).

        Examples
        --------
        >>> GradTailConfig.from_options(kind="sigmoid", normalize=False).curve.kind
        'sigmoid'
        """
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"Unknown GradTail option(s) {unknown}; valid options are {list(OPTION_NAMES)}. "
                f"Received: {sorted(options)}."
            )
        curve_options = {k: options[k] for k in _CURVE_FIELDS if k in options}
        curve = dataclasses.replace(DEFAULT_CURVE, **curve_options) if curve_options else DEFAULT_CURVE
        size = options.get("memory_size")
        memory_options = {
            k: options[f"memory_{k}"] for k in ("decay", "eta", "max_weight") if f"memory_{k}" in options
        }
        if size is None:
            # Validated even while the memory is off: a typo should not wait for memory_size.
            MemoryConfig(1, **memory_options)
            memory = None
        else:
            memory = MemoryConfig(size, **memory_options)
        rank = options.get("sketch_rank")
        size, seed = options.get("sketch_size"), options.get("sketch_seed", 0)
        if rank is None and (size is not None or seed != 0):
            raise ValueError(
                "`sketch_size` and `sketch_seed` need `sketch_rank` (the sketch is off without it); "
                f"Received: sketch_rank=None, sketch_size={size!r}, sketch_seed={seed!r}."
            )
        sketch = None if rank is None else SketchConfig(rank, size=size, seed=seed)
        return cls(
            decay=options.get("decay", DEFAULT_DECAY),
            reference=options.get("reference", DEFAULT_REFERENCE),
            warmup_steps=options.get("warmup_steps", DEFAULT_WARMUP_STEPS),
            curve=curve,
            eps=options.get("eps", DEFAULT_EPS),
            method=options.get("method", DEFAULT_METHOD),
            memory=memory,
            sketch=sketch,
        )

    def to_options(self) -> dict[str, Any]:
        """The flat keyword options that rebuild this config with `from_options`.

        Examples
        --------
        >>> config = GradTailConfig.from_options(quantile=0.2, memory_size=10)
        >>> GradTailConfig.from_options(**config.to_options()) == config
        True
        """
        memory = self.memory or MemoryConfig(1)
        return {
            "decay": self.decay,
            "reference": self.reference,
            "warmup_steps": self.warmup_steps,
            **{k: getattr(self.curve, k) for k in _CURVE_FIELDS},
            "eps": self.eps,
            "method": self.method,
            "memory_size": None if self.memory is None else self.memory.size,
            "memory_decay": memory.decay,
            "memory_eta": memory.eta,
            "memory_max_weight": memory.max_weight,
            "sketch_rank": None if self.sketch is None else self.sketch.rank,
            "sketch_size": None if self.sketch is None else self.sketch.size,
            "sketch_seed": 0 if self.sketch is None else self.sketch.seed,
        }

    def decay_at(self, steps: Any, /) -> Any:
        """The decay of the step after ``steps`` steps: the float, or the schedule's value.

        Examples
        --------
        >>> GradTailConfig(decay=lambda steps: 0.9).decay_at(3)
        0.9
        """
        return self.decay(steps) if callable(self.decay) else self.decay

    def replace(self, **changes: Any) -> GradTailConfig:
        """A copy with some fields changed, validated again (``dataclasses.replace``).

        Examples
        --------
        >>> GradTailConfig().replace(decay=0.9).decay
        0.9
        """
        return dataclasses.replace(self, **changes)


def coerce_config(config: GradTailConfig | None, options: Mapping[str, Any]) -> GradTailConfig:
    """``config``, or one built from ``options``; both at once is an error.

    The one line with which every adapter turns its keyword options into the policy.

    Examples
    --------
    >>> coerce_config(None, {"decay": 0.9}).decay
    0.9
    """
    if config is None:
        return GradTailConfig.from_options(**options)
    if not isinstance(config, GradTailConfig):
        raise TypeError(f"`config` must be a GradTailConfig; Received: {type(config).__name__}.")
    if options:
        raise TypeError(
            f"Pass either `config=` or keyword options, not both; Received: config and {sorted(options)}."
        )
    return config


def _set(obj: object, name: str, value: Any) -> None:
    # Frozen dataclasses normalise their fields (e.g. np.float32 -> float) in __post_init__.
    object.__setattr__(obj, name, value)


def option_attributes(*names: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: 0.1's option attributes (``obj.decay``, ...) as views of ``obj.config``.

    Reading gives the config's field (``curve``, ``decay``, ...) or flat option
    (``memory_decay``, ...); setting, which 0.1 allowed, warns (DeprecationWarning) and
    replaces ``obj.config`` with a validated copy. For adapter classes with a ``config``
    attribute holding a `GradTailConfig`.

    Examples
    --------
    >>> @option_attributes("decay")
    ... class Holder:
    ...     config = GradTailConfig(decay=0.9)
    >>> Holder().decay
    0.9
    """

    def attribute(name: str) -> property:
        def get(self: Any) -> Any:
            config: GradTailConfig = self.config
            return getattr(config, name) if name in _FIELDS else config.to_options()[name]

        def set_(self: Any, value: Any) -> None:
            warnings.warn(
                f"Setting {type(self).__name__}.{name} is deprecated: the options live in `.config`, a "
                "GradTailConfig; build a new object (or pass config=) instead.",
                DeprecationWarning,
                stacklevel=2,
            )
            config: GradTailConfig = self.config
            if name in _FIELDS:
                self.config = config.replace(**{name: value})
            else:
                self.config = GradTailConfig.from_options(**{**config.to_options(), name: value})

        return property(
            get, set_, doc=f"The ``{name}`` option, read from ``config`` (setting it is deprecated)."
        )

    def decorate(cls: type[Any]) -> type[Any]:
        for name in names:
            setattr(cls, name, attribute(name))
        return cls

    return decorate

"""The weighting curves: map alignments to per-example loss weights."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, cast

from ._checks import compute_dtype, namespace
from .validation import check_choice, check_real

__all__ = ["CURVES", "WeightCurve", "weight_curve"]

Array = Any
Curve = Literal["sigmoid", "spare_negative", "rank", "zscore"]
CURVES: tuple[str, ...] = ("sigmoid", "spare_negative", "rank", "zscore")
# WeightCurve() without kind= (the 0.1 sigmoid default, deprecated): told apart from kind="sigmoid".
_UNSET_KIND: Curve = cast("Curve", None)


def _sigmoid(xp: Any, x: Array) -> Array:
    # exp of a non-positive argument only: no overflow for any finite x.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _finite_or(xp: Any, a: Array, finite: Array, fill: float) -> Array:
    """``a`` where ``finite`` (``isfinite(a)``, computed once by the caller), else ``fill``."""
    return xp.where(finite, a, xp.full_like(a, fill))


def _check_options(
    *, max_weight: Any, threshold: Any, temperature: Any, quantile: Any, floor: Any
) -> tuple[Any, Any, Any, Any, Any]:
    """Concrete options checked (finite, in range) and made Python floats; traced ones kept.

    Arrays of shape () that cannot be read (traced under ``jax.jit``) are the caller's
    responsibility; every concrete number, Python, NumPy or 0-d array, is checked.
    """

    def one(name: str, value: Any, **bounds: Any) -> Any:
        try:
            return check_real(name, value, **bounds)
        except TypeError:
            if getattr(value, "shape", None) == () and not isinstance(value, (bool, str)):
                return value  # traced
            raise

    return (
        one("max_weight", max_weight, low=1.0),
        one("threshold", threshold),
        one("temperature", temperature, low=0.0, open_low=True),
        one("quantile", quantile, low=0.0, high=1.0),
        one("floor", floor),
    )


def weight_curve(
    alignment: Array,
    /,
    *,
    kind: Curve = "sigmoid",
    max_weight: float = 3.0,
    threshold: float = 0.0,
    temperature: float = 0.1,
    quantile: float = 0.3,
    floor: float = -0.5,
    normalize: bool = False,
) -> Array:
    """Per-example loss weights from alignments: low alignment, higher weight.

    GradTail (Chen et al., 2022, arXiv:2201.05938) upweights examples whose gradient
    disagrees with the running reference. The curve family is ours (see docs/method.md):

    - ``"sigmoid"``: ``1 + (max_weight - 1) * sigmoid((threshold - a) / temperature)``.
    - ``"spare_negative"``: the sigmoid times ``sigmoid((a - floor) / temperature)``, so
      strongly negative alignments (often label noise) fall back towards weight 1. The
      only member that is not monotone, by design.
    - ``"rank"``: batch-relative; weight ``max_weight`` for the examples whose alignment
      is below that of at least a ``1 - quantile`` share of the batch (strictly fewer than
      ``quantile * n`` finite alignments lie below theirs), 1 otherwise. Ties share a
      weight.
    - ``"zscore"``: batch-relative; the sigmoid applied to the alignment standardised
      over the batch's finite entries, ``threshold`` in standard deviations.

    All but ``"spare_negative"`` are non-increasing in the alignment; all lie in
    [1, max_weight] before normalisation.

    Parameters
    ----------
    alignment : array, shape (B,)
        Alignments, usually in [-1, 1]. Non-finite entries get weight 1 and are left out
        of the batch statistics of the batch-relative curves.
    kind : {"sigmoid", "spare_negative", "rank", "zscore"}, optional
        The curve. Defaults to "sigmoid".
    max_weight : float, optional
        Largest weight, >= 1; 1 turns weighting off. Defaults to 3.0.
    threshold : float, optional
        Alignment (or z-score for "zscore") at the sigmoid's midpoint. Defaults to 0.0.
    temperature : float, optional
        Width of the sigmoid transitions, > 0. Defaults to 0.1.
    quantile : float, optional
        Share of the batch upweighted by "rank", in [0, 1]. Defaults to 0.3.
    floor : float, optional
        Alignment below which "spare_negative" stops upweighting. Defaults to -0.5.
    normalize : bool, optional
        Divide by the batch mean weight so the weights average 1 (keeps the loss scale and
        the effective learning rate). Defaults to False.

    Returns
    -------
    array, shape (B,)
        Finite weights in the alignment's dtype (at least float32), on its device.

    Examples
    --------
    >>> import numpy as np
    >>> weight_curve(np.array([-1.0, 0.0, 1.0]), max_weight=3.0)
    array([2.9999092, 2.       , 1.0000908])
    >>> weight_curve(np.array([0.1, 0.5, 0.9, 0.2]), kind="rank", quantile=0.5)
    array([3., 1., 1., 3.])
    """
    xp = namespace(alignment)
    dtype = compute_dtype(xp, alignment=alignment)
    if alignment.ndim != 1:
        raise ValueError(f"`alignment` must have shape (B,); Received: shape {tuple(alignment.shape)}.")
    check_choice("kind", kind, CURVES)
    max_weight, threshold, temperature, quantile, floor = _check_options(
        max_weight=max_weight, threshold=threshold, temperature=temperature, quantile=quantile, floor=floor
    )
    a = xp.astype(alignment, dtype, copy=False)
    finite = xp.isfinite(a)
    # Bounded so batch statistics of huge finite scores cannot overflow (cosines are in [-1, 1]).
    bound = float(xp.finfo(dtype).max) ** 0.25
    safe = xp.clip(_finite_or(xp, a, finite, 0.0), -bound, bound)
    if kind == "sigmoid":
        bump = _sigmoid(xp, (threshold - safe) / temperature)
    elif kind == "spare_negative":
        bump = _sigmoid(xp, (threshold - safe) / temperature) * _sigmoid(xp, (safe - floor) / temperature)
    elif kind == "rank":
        # Number of finite alignments strictly below each one: ties share a rank, so the
        # curve stays non-increasing; non-finite entries sort last as +inf.
        keyed = _finite_or(xp, a, finite, float("inf"))
        below = xp.searchsorted(xp.sort(keyed), keyed, side="left")
        count = xp.sum(xp.astype(finite, dtype))
        bump = xp.astype(xp.astype(below, dtype) < quantile * count, dtype)
    else:
        n = xp.maximum(xp.sum(xp.astype(finite, dtype)), xp.asarray(1.0, dtype=dtype))
        mu = xp.sum(safe * xp.astype(finite, dtype)) / n
        var = xp.sum(xp.where(finite, (safe - mu) ** 2, xp.zeros_like(safe))) / n
        z = (safe - mu) / xp.sqrt(var + xp.finfo(dtype).eps)
        bump = _sigmoid(xp, (threshold - z) / temperature)
    weights = 1.0 + (max_weight - 1.0) * bump
    weights = xp.where(finite, weights, xp.ones_like(weights))
    if normalize:
        weights = weights / xp.mean(weights)
    return weights


@dataclass(frozen=True)
class WeightCurve:
    """A weighting curve with its options bound: ``WeightCurve(...)(alignment)``.

    Frozen and hashable, so it can be a static argument under ``jax.jit``. The fields are
    the keyword options of `weight_curve`; every number is checked finite and in range on
    construction (NumPy and 0-d array scalars are accepted and stored as Python floats).

    ``kind`` should be given: ``WeightCurve()`` without it is the sigmoid, unnormalised, as
    in 0.1.0, which is *not* the library's default curve, and warns (FutureWarning). The
    library's default is ``DEFAULT_CURVE`` (rank, ``normalize=True``); from 0.3 a bare
    ``WeightCurve()`` will equal it.

    Examples
    --------
    >>> import numpy as np
    >>> WeightCurve(kind="rank", quantile=0.5)(np.array([0.1, 0.9]))
    array([3., 1.])
    """

    kind: Curve = _UNSET_KIND
    max_weight: float = 3.0
    threshold: float = 0.0
    temperature: float = 0.1
    quantile: float = 0.3
    floor: float = -0.5
    normalize: bool = False

    def __post_init__(self) -> None:
        # Fail at construction (e.g. in an adapter's constructor), not at the first step.
        if self.kind is _UNSET_KIND:
            warnings.warn(
                "WeightCurve() without kind= is the sigmoid without normalisation (its 0.1 default), "
                "not the library's default curve gradtail_ops.DEFAULT_CURVE (kind='rank', "
                "normalize=True); from 0.3 a bare WeightCurve() will equal DEFAULT_CURVE. Pass kind= "
                "(and normalize=) explicitly.",
                FutureWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "kind", "sigmoid")
        check_choice("kind", self.kind, CURVES)
        checked = _check_options(
            max_weight=self.max_weight,
            threshold=self.threshold,
            temperature=self.temperature,
            quantile=self.quantile,
            floor=self.floor,
        )
        for name, value in zip(
            ("max_weight", "threshold", "temperature", "quantile", "floor"), checked, strict=True
        ):
            if not isinstance(value, float):
                raise TypeError(f"`{name}` must be a concrete number; Received: {type(value).__name__}.")
            object.__setattr__(self, name, value)
        normalize: Any = self.normalize
        if not isinstance(normalize, bool) and type(normalize).__name__ != "bool_":
            raise TypeError(f"`normalize` must be a bool; Received: normalize={self.normalize!r}.")
        object.__setattr__(self, "normalize", bool(self.normalize))

    def __call__(self, alignment: Array, /) -> Array:
        """Weights for ``alignment`` (shape (B,)); see `weight_curve`."""
        return weight_curve(
            alignment,
            kind=self.kind,
            max_weight=self.max_weight,
            threshold=self.threshold,
            temperature=self.temperature,
            quantile=self.quantile,
            floor=self.floor,
            normalize=self.normalize,
        )

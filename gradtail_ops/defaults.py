"""The library's default formulation, in one place for the core and every adapter.

Chosen from measurements, not by taste: the evidence behind each value, and the command
that regenerates it, is in docs/method.md ("Defaults and their evidence").
"""

from __future__ import annotations

from typing import Final

from .curves import WeightCurve

__all__ = [
    "DEFAULT_CURVE",
    "DEFAULT_DECAY",
    "DEFAULT_EPS",
    "DEFAULT_MEMORY_DECAY",
    "DEFAULT_MEMORY_ETA",
    "DEFAULT_MEMORY_MAX_WEIGHT",
    "DEFAULT_METHOD",
    "DEFAULT_REFERENCE",
    "DEFAULT_WARMUP_STEPS",
]

#: EMA decay of the reference gradient (a horizon of about 1000 steps).
DEFAULT_DECAY: float = 0.999
#: Reference kind: the EMA of the batch mean of unit-normalised per-example gradients.
DEFAULT_REFERENCE: Final = "direction"
#: Lowest 30% of each batch by alignment weighted 3x, then normalised to batch mean 1.
DEFAULT_CURVE = WeightCurve(kind="rank", max_weight=3.0, quantile=0.3, normalize=True)
#: Reference updates with weight 1 before weighting starts (the first call is always 1).
#: The measured formulation warms up for one epoch, which only the caller knows: pass
#: ``warmup_steps=steps_per_epoch`` (docs/method.md, "Defaults and their evidence").
DEFAULT_WARMUP_STEPS: int = 0
#: Gradient norms at or below this count as zero.
DEFAULT_EPS: float = 0.0
#: Sequence norms: the cheaper of the ghost and materialised forms, per layer.
DEFAULT_METHOD: Final = "auto"
#: Per-visit decay of the per-example memory's running score (docs/tail_mining.md).
DEFAULT_MEMORY_DECAY: float = 0.5
#: Log-weight per standard deviation of the memory's running score.
DEFAULT_MEMORY_ETA: float = 1.0
#: Cap of the memory's weights, before normalisation.
DEFAULT_MEMORY_MAX_WEIGHT: float = 3.0

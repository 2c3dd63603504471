"""The callback's state as a Keras metric: the EMA reference plus the per-epoch log sums.

A metric is the one kind of Keras object whose variables every trainer threads through its
compiled train step and may update inside ``compute_loss`` (on JAX, through the trainer's
``StatelessScope``, with no host round trip per batch). ``reset_state`` (called by Keras at each
epoch start) clears only the log sums; the reference persists across epochs and ``fit`` calls.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from gradtail_ops import EMAState

__all__ = ["GradTailState"]

# Relative margin above the batch mean weight for an example to count as upweighted.
_UPWEIGHT_MARGIN = 1e-6


class GradTailState(keras.metrics.Metric):  # type: ignore[misc]
    """The reference gradient of one ``Dense`` layer and the running log values.

    Parameters
    ----------
    units, input_dim : int
        The tracked layer's output and input sizes.
    use_bias : bool
        Whether the layer has a bias (its gradient is part of the score).
    name : str, optional
        The metric name. Defaults to "gradtail".

    Notes
    -----
    The reference kernel is stored as (units, input_dim), the layout of ``gradtail_ops`` and of
    ``gradtail_torch``'s state, so states move between the adapters unchanged.

    Examples
    --------
    >>> state = GradTailState(3, 4, True)
    >>> sorted(state.result())
    ['gradtail_alignment', 'gradtail_upweighted', 'gradtail_weight_mean']
    """

    def __init__(self, units: int, input_dim: int, use_bias: bool, name: str = "gradtail") -> None:
        super().__init__(name=name, dtype="float32")
        self.units, self.input_dim, self.use_bias = units, input_dim, use_bias
        add = self.add_variable
        self.reference_kernel = add((units, input_dim), "zeros", name="reference_kernel")
        self.reference_bias = add((units,), "zeros", name="reference_bias") if use_bias else None
        self.total = add((), "zeros", name="total")
        self.count = add((), "zeros", dtype="int32", name="count")
        # Epoch sums in one variable (one update per step): weights, upweighted, alignments, examples.
        self.log_sums = add((4,), "zeros", name="log_sums")

    # ------------------------------------------------------------------------ reference
    def ema_state(self) -> EMAState:
        """The reference as the core's ``EMAState`` (current values, also inside a train step)."""
        mean: tuple[Any, ...] = (self.reference_kernel.value,)
        if self.reference_bias is not None:
            mean = (self.reference_kernel.value, self.reference_bias.value)
        return EMAState(mean=[mean], total=self.total.value, count=self.count.value)

    def assign_ema_state(self, state: EMAState) -> None:
        """Store the core's updated ``EMAState`` (shapes as built)."""
        (mean,) = state.mean
        self.reference_kernel.assign(mean[0])
        if self.reference_bias is not None:
            self.reference_bias.assign(mean[1])
        self.total.assign(state.total)
        self.count.assign(state.count)

    # ----------------------------------------------------------------------------- logs
    def update_state(self, weights: Any, alignment: Any) -> None:
        """Add one batch's weights and alignments (shape (B,)) to the epoch's log sums."""
        weights = ops.cast(weights, "float32")
        alignment = ops.cast(alignment, "float32")
        above = ops.cast(weights > ops.mean(weights) * (1.0 + _UPWEIGHT_MARGIN), "float32")
        # Non-finite alignments count as 0: one fused pass (isfinite + where is six on torch).
        alignment = ops.nan_to_num(alignment, nan=0.0, posinf=0.0, neginf=0.0)
        rows = ops.stack([weights, above, alignment, ops.ones_like(weights)])  # (4, B)
        self.log_sums.assign_add(ops.sum(rows, axis=1))

    def reset_state(self) -> None:
        """Clear the log sums (each epoch); the reference is kept."""
        self.log_sums.assign(ops.zeros((4,), dtype=self.log_sums.dtype))

    def reset_reference(self) -> None:
        """Forget the reference: zero mean, ``total = 0``, ``count = 0``."""
        for variable in (self.reference_kernel, self.reference_bias, self.total, self.count):
            if variable is not None:
                variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def result(self) -> dict[str, Any]:
        """Mean weight, share of upweighted examples and mean alignment since the epoch began."""
        # Called after every train step. The sums are all 0 while the count is 0, so dividing
        # by max(count, 1) gives divide_no_nan's 0 there in fewer operations.
        sums = self.log_sums.value
        weight_mean, upweighted, alignment = ops.unstack(sums[:3] / ops.maximum(sums[3], 1.0))
        return {
            "gradtail_weight_mean": weight_mean,
            "gradtail_upweighted": upweighted,
            "gradtail_alignment": alignment,
        }

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments."""
        return {
            "units": self.units,
            "input_dim": self.input_dim,
            "use_bias": self.use_bias,
            "name": self.name,
        }

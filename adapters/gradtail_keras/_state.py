"""The callback's state as a Keras metric: the core's `TailState` plus the per-epoch log sums.

A metric is the one kind of Keras object whose variables every trainer threads through its
compiled train step and may update inside ``compute_loss`` (on JAX, through the trainer's
``StatelessScope``, with no host round trip per batch). ``reset_state`` (called by Keras at each
epoch start) clears only the log sums; the reference and the memory persist across epochs and
``fit`` calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from gradtail_ops import (
    EMAState,
    GradTailConfig,
    MemoryState,
    SketchConfig,
    SketchFactors,
    TailState,
    tail_init,
)
from gradtail_ops.sketch import sketch_factors, use_sketch

__all__ = ["GradTailState", "numpy_template"]

# Relative margin above the batch mean weight for an example to count as upweighted: weights
# that tie at the mean (all ones, or all equal) differ from their float32 mean by rounding only.
_UPWEIGHT_MARGIN = 1e-6


def numpy_template(units: int, input_dim: int, use_bias: bool, *, config: GradTailConfig) -> TailState:
    """An empty float32 NumPy `TailState` for a Dense layer: the ``like`` of `state_from_dict`.

    Examples
    --------
    >>> state = numpy_template(2, 3, True, config=GradTailConfig())
    >>> [a.shape for a in state.ema.mean[0]], state.memory
    ([(2, 3), (2,)], None)
    """
    kernel = np.zeros((units, input_dim), np.float32)
    layer = (kernel, np.zeros((units,), np.float32)) if use_bias else (kernel,)
    return tail_init([layer], config=config)


class GradTailState(keras.metrics.Metric):  # type: ignore[misc]
    """The GradTail state of one ``Dense`` layer (reference, memory, steps) and the log values.

    Parameters
    ----------
    units, input_dim : int
        The tracked layer's output and input sizes.
    use_bias : bool
        Whether the layer has a bias (its gradient is part of the score).
    name : str, optional
        The metric name. Defaults to "gradtail".
    memory_size : int, optional
        Rows of the per-example memory (``GradTailConfig.memory.size``). Defaults to None (no
        memory).
    sketch : gradtail_ops.SketchConfig or dict, optional
        The sketched reference's options (or a dict of them, as `get_config` gives): the
        reference kernel is then held as the two sketches of `gradtail_ops.sketch` (range
        (units, k) and co-range (l, input_dim), with their fixed test matrices) when that is
        at least 4x smaller than the kernel (`gradtail_ops.use_sketch`); the bias stays exact.
        Defaults to None (the exact kernel).

    Notes
    -----
    The reference kernel is stored as (units, input_dim), the layout of ``gradtail_ops`` and of
    ``gradtail_torch``'s state, so states move between the adapters unchanged; so are the
    sketches.

    Examples
    --------
    >>> state = GradTailState(3, 4, True)
    >>> sorted(state.result())
    ['gradtail_alignment', 'gradtail_upweighted', 'gradtail_weight_mean']
    """

    def __init__(
        self,
        units: int,
        input_dim: int,
        use_bias: bool,
        name: str = "gradtail",
        *,
        memory_size: int | None = None,
        sketch: SketchConfig | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name=name, dtype="float32")
        if isinstance(sketch, Mapping):
            sketch = SketchConfig(**sketch)
        self.units, self.input_dim, self.use_bias = units, input_dim, use_bias
        self.memory_size = memory_size
        self.sketch = sketch
        add = self.add_variable
        factors = _factors(units, input_dim, sketch)
        # The exact kernel, or its two sketches and their test matrices (constants of the run,
        # drawn from the config's seed, kept as variables so that states save and load whole).
        self.reference_kernel = self.sketch_range = self.sketch_corange = None
        self.sketch_omega = self.sketch_psi = None
        if factors is None:
            self.reference_kernel = add((units, input_dim), "zeros", name="reference_kernel")
        else:
            k, size = factors.omega.shape[1], factors.psi.shape[0]
            self.sketch_range = add((units, k), "zeros", name="sketch_range")
            self.sketch_corange = add((size, input_dim), "zeros", name="sketch_corange")
            self.sketch_omega = add(factors.omega.shape, "zeros", name="sketch_omega")
            self.sketch_psi = add(factors.psi.shape, "zeros", name="sketch_psi")
            self.sketch_omega.assign(factors.omega)
            self.sketch_psi.assign(factors.psi)
        self.reference_bias = add((units,), "zeros", name="reference_bias") if use_bias else None
        self.total = add((), "zeros", name="total")
        self.count = add((), "zeros", dtype="int32", name="count")
        self.steps = add((), "zeros", dtype="int32", name="steps")
        self.memory_score = self.memory_visits = None
        if memory_size is not None:
            self.memory_score = add((memory_size,), "zeros", name="memory_score")
            self.memory_visits = add((memory_size,), "zeros", dtype="int32", name="memory_visits")
        # Epoch sums in one variable (one update per step): weights, upweighted, alignments, examples.
        self.log_sums = add((4,), "zeros", name="log_sums")

    def _mean_variables(self) -> list[Any]:
        """The reference of the layer: ``[kernel, bias]`` or ``[range, co-range, bias]``."""
        layer = (self.reference_kernel, self.sketch_range, self.sketch_corange, self.reference_bias)
        return [v for v in layer if v is not None]

    def _tail_variables(self) -> list[Any]:
        """The variables of the `TailState` that steps change, in a fixed order (None left out)."""
        variables = [*self._mean_variables(), self.total, self.count, self.steps]
        return [v for v in (*variables, self.memory_score, self.memory_visits) if v is not None]

    def _factor_variables(self) -> list[Any]:
        """The sketch's test matrices ``[omega, psi]`` (empty for the exact kernel)."""
        return [v for v in (self.sketch_omega, self.sketch_psi) if v is not None]

    # ------------------------------------------------------------------------ state
    def tail_state(self, *, numpy: bool = False) -> TailState:
        """The core's `TailState` from the current values (also inside a train step).

        With ``numpy``, float32/int32 NumPy copies (for saving and validation).
        """
        read = (lambda v: np.array(ops.convert_to_numpy(v))) if numpy else (lambda v: v.value)
        mean = tuple(read(v) for v in self._mean_variables())
        memory = None
        if self.memory_score is not None and self.memory_visits is not None:
            memory = MemoryState(score=read(self.memory_score), visits=read(self.memory_visits))
        sketch = None
        if self.sketch_omega is not None and self.sketch_psi is not None:
            sketch = (SketchFactors(omega=read(self.sketch_omega), psi=read(self.sketch_psi)),)
        ema = EMAState(mean=[mean], total=read(self.total), count=read(self.count))
        return TailState(ema=ema, memory=memory, steps=read(self.steps), sketch=sketch)

    def assign_tail_state(self, state: TailState, *, factors: bool = True) -> None:
        """Store a `TailState` of this layout (tensors of the backend, or NumPy arrays).

        ``factors=False`` leaves the sketch's test matrices as they are (a train step, which
        never changes them, skips the copy).
        """
        (mean,) = state.ema.mean
        values = [*mean, state.ema.total, state.ema.count, state.steps]
        if state.memory is not None:
            values += [state.memory.score, state.memory.visits]
        variables = self._tail_variables()
        if factors and state.sketch is not None:
            (layer,) = state.sketch
            if layer is not None:
                values += [layer.omega, layer.psi]
                variables += self._factor_variables()
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)

    def reset_reference(self) -> None:
        """Forget the state: zero reference, ``total = count = steps = 0``, an empty memory.

        A sketch keeps its test matrices (constants of the configuration).
        """
        for variable in self._tail_variables():
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

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
        """Clear the log sums (each epoch); the reference and the memory are kept."""
        self.log_sums.assign(ops.zeros((4,), dtype=self.log_sums.dtype))

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
            "memory_size": self.memory_size,
            "sketch": None if self.sketch is None else dataclasses.asdict(self.sketch),
        }


def _factors(units: int, input_dim: int, sketch: SketchConfig | None) -> SketchFactors | None:
    """The test matrices of a sketched (units, input_dim) kernel, as float32 NumPy; None: exact."""
    if sketch is None or sketch.size is None or not use_sketch(units, input_dim, sketch.rank, sketch.size):
        return None
    like = np.zeros((1,), np.float32)
    return sketch_factors(units, input_dim, sketch.rank, sketch.size, seed=sketch.seed, like=like)

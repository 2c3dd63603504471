"""gradtail_ops: backend-neutral GradTail math on the Python Array API.

GradTail (Chen, Casser, Kretzschmar, Anguelov, 2022, arXiv:2201.05938) weights each
training example by how little its gradient agrees with a running reference gradient. This
package holds the math once, for any Array-API library (NumPy, PyTorch, JAX, CuPy, ...);
it imports no framework.
"""

from .alignment import alignment, cosine_from_dots, dense_dots_and_sq_norms
from .curves import CURVES, WeightCurve, weight_curve
from .defaults import DEFAULT_CURVE, DEFAULT_DECAY, DEFAULT_REFERENCE, DEFAULT_WARMUP_STEPS
from .ema import EMAState, ema_init, ema_mean, ema_update
from .linear import (
    linear_alignment,
    linear_dots_and_sq_norms,
    linear_mean_grad,
    linear_sq_norms,
    multi_linear_alignment,
    multi_linear_dots_and_sq_norms,
)
from .memory import MemoryState, memory_init, memory_update, memory_weights, validate_memory_options
from .step import (
    REFERENCES,
    GradTailOutput,
    inverse_norms,
    linear_score_and_update,
    score_and_update,
    validate_step_options,
    weighted_batch_mean,
)

__version__ = "0.1.0"

__all__ = [
    "CURVES",
    "DEFAULT_CURVE",
    "DEFAULT_DECAY",
    "DEFAULT_REFERENCE",
    "DEFAULT_WARMUP_STEPS",
    "REFERENCES",
    "EMAState",
    "GradTailOutput",
    "MemoryState",
    "WeightCurve",
    "__version__",
    "alignment",
    "cosine_from_dots",
    "dense_dots_and_sq_norms",
    "ema_init",
    "ema_mean",
    "ema_update",
    "inverse_norms",
    "linear_alignment",
    "linear_dots_and_sq_norms",
    "linear_mean_grad",
    "linear_sq_norms",
    "multi_linear_alignment",
    "multi_linear_dots_and_sq_norms",
    "linear_score_and_update",
    "memory_init",
    "memory_update",
    "memory_weights",
    "validate_memory_options",
    "score_and_update",
    "validate_step_options",
    "weight_curve",
    "weighted_batch_mean",
]

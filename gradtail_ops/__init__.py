"""gradtail_ops: backend-neutral GradTail math on the Python Array API.

GradTail (Chen, Casser, Kretzschmar, Anguelov, 2022, arXiv:2201.05938) weights each
training example by how little its gradient agrees with a running reference gradient. This
package holds the math once, for any Array-API library (NumPy, PyTorch, JAX, CuPy, ...);
it imports no framework.
"""

from .alignment import alignment, cosine_from_dots, dense_dots_and_sq_norms
from .config import (
    METHODS,
    OPTION_NAMES,
    CurveKind,
    DecaySchedule,
    GradTailConfig,
    GradTailOptions,
    MemoryConfig,
    Method,
    Reference,
    SketchConfig,
    coerce_config,
    option_attributes,
)
from .curves import CURVES, WeightCurve, weight_curve
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
from .sketch import SketchFactors
from .state import STATE_KEYS, TailState, state_from_dict, state_to_dict, tail_init
from .step import (
    REFERENCES,
    Collectives,
    GradTailOutput,
    TailOutput,
    inverse_norms,
    linear_score_and_update,
    linear_tail_step,
    score_and_update,
    tail_step,
    validate_step_options,
    weighted_batch_mean,
)
from .validation import check_choice, check_int, check_real

__version__ = "0.1.0"

__all__ = [
    "CURVES",
    "Collectives",
    "CurveKind",
    "DEFAULT_CURVE",
    "DEFAULT_DECAY",
    "DEFAULT_EPS",
    "DEFAULT_MEMORY_DECAY",
    "DEFAULT_MEMORY_ETA",
    "DEFAULT_MEMORY_MAX_WEIGHT",
    "DEFAULT_METHOD",
    "DEFAULT_REFERENCE",
    "DEFAULT_WARMUP_STEPS",
    "DecaySchedule",
    "EMAState",
    "GradTailConfig",
    "GradTailOptions",
    "GradTailOutput",
    "METHODS",
    "MemoryConfig",
    "MemoryState",
    "Method",
    "OPTION_NAMES",
    "REFERENCES",
    "Reference",
    "STATE_KEYS",
    "SketchConfig",
    "SketchFactors",
    "TailOutput",
    "TailState",
    "WeightCurve",
    "__version__",
    "alignment",
    "check_choice",
    "check_int",
    "check_real",
    "coerce_config",
    "cosine_from_dots",
    "dense_dots_and_sq_norms",
    "ema_init",
    "ema_mean",
    "ema_update",
    "inverse_norms",
    "linear_alignment",
    "linear_dots_and_sq_norms",
    "linear_mean_grad",
    "linear_score_and_update",
    "linear_sq_norms",
    "linear_tail_step",
    "memory_init",
    "memory_update",
    "memory_weights",
    "option_attributes",
    "multi_linear_alignment",
    "multi_linear_dots_and_sq_norms",
    "score_and_update",
    "state_from_dict",
    "state_to_dict",
    "tail_init",
    "tail_step",
    "validate_memory_options",
    "validate_step_options",
    "weight_curve",
    "weighted_batch_mean",
]

"""gradtail_optax: GradTail sample weighting for JAX and optax.

Two ways in (see docs/optax.md):

- `gradtail`, an optax gradient transformation that takes **per-example** gradients
  (batch axis first, e.g. from ``jax.vmap(jax.grad(loss))``) and returns their GradTail-weighted
  mean. It must come first in an ``optax.chain``.
- `head_init` / `head_weights`, the efficient path for big models: the weights of a dense head
  from its inputs and per-example output gradients, in factored form; the train step then
  differentiates the weighted loss once. Recommended whenever the scored parameters are dense
  layers.
- `score_batches` / `score_head_batches`: every example's alignment over a data set, for tail
  mining (from per-example gradients, or from a dense head's factors).

>>> from gradtail_optax import gradtail, head_weights
"""

try:
    import jax  # noqa: F401
    import optax  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(f"gradtail_optax needs JAX and optax: pip install 'gradtail[optax]' ({exc})") from exc

from ._head import head_init, head_weights, loss_and_output_grads
from ._mining import score_batches, score_head_batches
from ._transform import GradTailState, gradtail

__all__ = [
    "GradTailState",
    "gradtail",
    "head_init",
    "head_weights",
    "loss_and_output_grads",
    "score_batches",
    "score_head_batches",
]

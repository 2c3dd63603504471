"""gradtail_optax: GradTail sample weighting for JAX and optax.

Plumbing over the core policy (`gradtail_ops.GradTailConfig`, `gradtail_ops.tail_step`); two
ways in (see docs/optax.md):

- `gradtail`, an optax gradient transformation that takes **per-example** gradients
  (batch axis first, e.g. from ``jax.vmap(jax.grad(loss))``) and returns their GradTail-weighted
  mean: ``gradtail(optax.adam(1e-3), batch_size=B)`` wraps the optimiser it feeds (the order
  cannot be wrong), or it comes first in an ``optax.chain``.
- `head`, the efficient path for big models: ``init`` / ``update`` giving the weights of dense
  layers from their inputs and per-example output gradients, in factored form; the train step
  then differentiates the weighted loss once. Recommended whenever the scored parameters are
  dense layers.
- `score_batches` / `score_head_batches`: every example's alignment over a data set, for tail
  mining (from per-example gradients, or from a dense head's factors).

`state_to_dict` / `state_from_dict` save and load the state in the library's interchange
format, shared with the other adapters.

>>> from gradtail_optax import gradtail, head
"""

try:
    import jax  # noqa: F401
    import optax  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(f"gradtail_optax needs JAX and optax: pip install 'gradtail[optax]' ({exc})") from exc

from ._head import HeadOutput, HeadTransform, head, head_init, head_weights, loss_and_output_grads
from ._mining import score_batches, score_head_batches
from ._state import GradTailState, state_from_dict, state_to_dict
from ._transform import gradtail

__all__ = [
    "GradTailState",
    "HeadOutput",
    "HeadTransform",
    "gradtail",
    "head",
    "head_init",
    "head_weights",
    "loss_and_output_grads",
    "score_batches",
    "score_head_batches",
    "state_from_dict",
    "state_to_dict",
]

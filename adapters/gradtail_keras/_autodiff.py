"""Per-example gradients of a loss with respect to a layer output, on each Keras backend.

Keras 3 has no backend-neutral ``grad``; each supported backend gets a few lines here. The
function differentiates ``sum_i L_i(z_i)`` once: as each example's loss depends only on its
own row of ``z``, row ``i`` of the result is ``dL_i/dz_i`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

__all__ = ["output_grads"]


def output_grads(per_example_loss: Callable[[Any], Any], z: Any, /) -> Any:
    """``d(sum_i L_i)/dz`` for a constant ``z``: each row is one example's output gradient.

    Parameters
    ----------
    per_example_loss : callable
        ``z -> losses``, any shape with the batch first (e.g. (B,) or (B, T)).
    z : tensor, shape (B, ..., d_out)
        The point to differentiate at, treated as a constant of the surrounding graph.

    Returns
    -------
    tensor, shape of ``z``
        Not connected to any outer gradient computation.

    Examples
    --------
    >>> import keras
    >>> z = keras.ops.convert_to_tensor([[1.0, 2.0]])
    >>> keras.ops.convert_to_numpy(output_grads(lambda t: keras.ops.sum(t**2, axis=-1), z))
    array([[2., 4.]], dtype=float32)
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.grad(lambda t: keras.ops.sum(per_example_loss(t)))(jax.lax.stop_gradient(z))
    if backend == "torch":
        import torch

        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            total = torch.sum(per_example_loss(leaf))
            if not total.requires_grad:  # the loss does not depend on z
                return torch.zeros_like(leaf)
            (grad,) = torch.autograd.grad(total, leaf)
        return grad
    raise RuntimeError(  # unreachable through the callback, which refuses other backends at fit start
        f"Per-example output gradients are implemented for the jax and torch backends; Received: {backend}."
    )

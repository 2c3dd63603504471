"""Small float64 PyTorch models and materialised per-example gradients for the torch tests.

Import after ``pytest.importorskip("torch")``: this module imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def mlp(seed: int = 0, d_in: int = 6, hidden: int = 8, d_out: int = 4) -> nn.Sequential:
    """``Linear(d_in, hidden) -> Tanh -> Linear(hidden, d_out)`` in float64, seeded init.

    Examples
    --------
    >>> mlp(d_in=3, d_out=2)(torch.zeros(5, 3, dtype=torch.float64)).shape
    torch.Size([5, 2])
    """
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).double()


def per_example_grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> np.ndarray:
    """(B, P): each example's gradient of ``loss[i]`` over ``params``, flattened and concatenated.

    One ``torch.autograd.grad`` call per example (the materialised reference); ``loss`` has shape
    (B,) and keeps its graph.

    Examples
    --------
    >>> w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> per_example_grads(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64) @ w, [w])
    array([[1., 2.],
           [3., 4.]])
    """
    rows = []
    for i in range(loss.shape[0]):
        gs = torch.autograd.grad(loss[i], params, retain_graph=True)
        rows.append(np.concatenate([g.detach().numpy().ravel() for g in gs]))
    return np.stack(rows)

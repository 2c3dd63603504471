"""Row reductions that are memory-bound hot spots, with the fastest form per backend."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import is_torch_namespace

__all__ = ["row_sq_norms"]


def row_sq_norms(xp: ModuleType, x: Any, /) -> Any:
    """``sum(x**2, axis=-1)`` without a temporary of ``x``'s size.

    ``vecdot`` is one fused pass on NumPy and JAX, but array-api-compat runs it as a batched
    matmul on PyTorch, ~4x slower than ``vector_norm`` there (benchmarks/core_ops.py) and
    less accurate on long rows.
    """
    if is_torch_namespace(xp):
        return xp.linalg.vector_norm(x, axis=-1) ** 2
    return xp.vecdot(x, x)

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


def lerp(xp: ModuleType, start: Any, end: Any, weight: Any, /) -> Any:
    """``start + weight * (end - start)`` for a scalar ``weight`` in [0, 1].

    Exact at both ends: ``end`` itself for ``weight == 1`` and ``start`` itself where
    ``end == start``. One fused pass (``torch.lerp``) on PyTorch; four elsewhere.
    """
    if is_torch_namespace(xp):
        import torch  # the namespace is torch's, so torch is already imported

        return torch.lerp(start, end, weight)
    moved = start + weight * (end - start)
    return xp.where(weight == 1.0, end, moved)


def sums_finite(xp: ModuleType, arrays: list[Any], /) -> Any:
    """Scalar boolean: every array's sum is finite.

    True implies every entry is finite (an inf or NaN makes the sum inf or NaN); False also
    flags a sum that overflows. One reduction per array, where ``all(isfinite(x))`` costs
    up to three elementwise passes and a boolean temporary on some backends.
    """
    total = xp.stack([xp.sum(a) for a in arrays])
    return xp.all(xp.isfinite(total))


def select_fresh(xp: ModuleType, condition: Any, fresh: Any, other: Any, /) -> Any:
    """``where(condition, fresh, other)``, reusing ``fresh``'s buffer on PyTorch.

    Only for a ``fresh`` array that nothing else references (just computed by the caller):
    PyTorch writes the result into it, sparing a copy of a parameter-sized array.
    """
    if is_torch_namespace(xp):
        import torch

        return torch.where(condition, fresh, other, out=fresh)
    return xp.where(condition, fresh, other)

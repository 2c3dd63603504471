"""Input validation shared by the public functions: namespaces, dtypes and shapes."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import array_namespace

__all__ = [
    "check_batch",
    "check_shape",
    "compute_dtype",
    "namespace",
]


def namespace(*arrays: Any) -> ModuleType:
    """The common array namespace of ``arrays``.

    Raises
    ------
    TypeError
        When the arrays come from different array libraries, or one is not an array.
    """
    try:
        return array_namespace(*arrays)
    except TypeError as exc:
        kinds = sorted({f"{type(a).__module__}.{type(a).__qualname__}" for a in arrays})
        raise TypeError(
            f"All array arguments must come from one array library; Received: {', '.join(kinds)}. ({exc})"
        ) from None


def compute_dtype(xp: ModuleType, /, **named: Any) -> Any:
    """The floating dtype to accumulate in: the promoted input dtype, at least float32.

    Each keyword names an argument (for error messages) and holds its array.

    Raises
    ------
    TypeError
        When an argument is not real floating point (integers, booleans, complex).
    """
    dtypes = []
    for name, array in named.items():
        dtype = array.dtype
        if not _is_real_floating(xp, dtype):
            raise TypeError(
                f"`{name}` must have a real floating-point dtype; "
                f"Received: dtype={dtype} with shape {tuple(array.shape)}."
            )
        dtypes.append(dtype)
    # Half-precision inputs (float16, bfloat16) accumulate in float32: their sums of
    # squares overflow or lose every digit at the sizes of real layers.
    wide = [dt if xp.finfo(dt).bits >= 32 else xp.float32 for dt in dtypes]
    result = wide[0]
    for dt in wide[1:]:
        result = xp.result_type(result, dt)
    return result


def _is_real_floating(xp: ModuleType, dtype: Any) -> bool:
    try:
        if xp.isdtype(dtype, "real floating"):
            return True
    except (TypeError, ValueError):
        pass
    # bfloat16 is outside the standard; the libraries that have it report it via finfo.
    name = str(dtype).rsplit(".", 1)[-1]
    return name == "bfloat16"


def check_shape(name: str, array: Any, expected: tuple[int, ...], what: str) -> None:
    """Raise ValueError unless ``array.shape == expected``."""
    if tuple(array.shape) != tuple(expected):
        raise ValueError(
            f"`{name}` must have shape {tuple(expected)} ({what}); Received: shape {tuple(array.shape)}."
        )


def check_batch(name: str, array: Any, min_ndim: int = 1) -> int:
    """Raise ValueError unless ``array`` has a leading batch axis; return the batch size."""
    if array.ndim < min_ndim:
        raise ValueError(
            f"`{name}` must have a leading batch axis and at least {min_ndim} dimension(s); "
            f"Received: shape {tuple(array.shape)}."
        )
    return int(array.shape[0])

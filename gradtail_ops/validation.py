"""Checks of scalar options: finite numbers in range, integers, choices; one rule for all.

Python numbers, NumPy scalars and 0-d arrays of any Array-API library are accepted and
converted to Python ``float`` / ``int``; booleans, strings, complex numbers, arrays with
more than one element and non-finite values are refused with the option's name.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["check_choice", "check_int", "check_real"]


def _dtype_kind(value: Any) -> str:
    name = str(getattr(value, "dtype", "")).rsplit(".", 1)[-1]
    if "bool" in name:
        return "bool"
    if "complex" in name:
        return "complex"
    if name.startswith(("int", "uint")):
        return "int"
    return "float"


def _scalar(name: str, value: Any, *, integral: bool) -> float | int:
    """``value`` as a Python number, or TypeError naming ``name``."""
    expected = "an int" if integral else "a real number"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise TypeError(f"`{name}` must be {expected}, not a boolean; Received: {name}={value!r}.")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and not integral:
        return float(value)
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) == ():
        kind = _dtype_kind(value)
        if kind in ("bool", "complex") or (integral and kind != "int"):
            raise TypeError(f"`{name}` must be {expected}; Received: a 0-d array of dtype {value.dtype}.")
        try:
            return int(value) if integral else float(value)
        except Exception as exc:  # a traced value (jax.jit) cannot be an option
            raise TypeError(
                f"`{name}` must be a concrete number, known before tracing; Received: "
                f"{type(value).__name__} ({exc.__class__.__name__})."
            ) from None
    received = f"shape {tuple(shape)}" if shape is not None else repr(value)
    raise TypeError(f"`{name}` must be {expected}; Received: {type(value).__name__} {received}.")


def check_real(
    name: str,
    value: Any,
    /,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a finite Python float within the bounds, or an error naming ``name``.

    Parameters
    ----------
    name : str
        The option's name, for the message.
    value : number or 0-d array
        Python, NumPy or 0-d array scalar.
    low, high : float, optional
        Bounds; inclusive unless ``open_low`` / ``open_high``.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        Not a real number (booleans, strings, arrays with elements, traced values).
    ValueError
        Not finite, or out of range.

    Examples
    --------
    >>> import numpy as np
    >>> check_real("max_weight", np.float32(2.5), low=1.0)
    2.5
    >>> check_real("decay", 1.5, low=0.0, high=1.0)
    Traceback (most recent call last):
    ...
    ValueError: `decay` must be a finite number in [0.0, 1.0]; Received: decay=1.5.
    """
    number = float(_scalar(name, value, integral=False))
    ok = math.isfinite(number)
    if low is not None:
        ok = ok and (number > low if open_low else number >= low)
    if high is not None:
        ok = ok and (number < high if open_high else number <= high)
    if not ok:
        if low is not None and high is not None:
            where = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        elif low is not None:
            where = f"{'>' if open_low else '>='} {low}"
        elif high is not None:
            where = f"{'<' if open_high else '<='} {high}"
        else:
            where = ""
        raise ValueError(
            f"`{name}` must be a finite number {where}".rstrip() + f"; Received: {name}={number}."
        )
    return number


def check_int(name: str, value: Any, /, *, low: int | None = None) -> int:
    """``value`` as a Python int, at least ``low``, or an error naming ``name``.

    Examples
    --------
    >>> import numpy as np
    >>> check_int("warmup_steps", np.int64(3), low=0)
    3
    >>> check_int("warmup_steps", 2.0, low=0)
    Traceback (most recent call last):
    ...
    TypeError: `warmup_steps` must be an int; Received: float 2.0.
    """
    number = int(_scalar(name, value, integral=True))
    if low is not None and number < low:
        raise ValueError(f"`{name}` must be an int >= {low}; Received: {name}={number}.")
    return number


def check_choice(name: str, value: Any, choices: Sequence[str], /) -> str:
    """``value`` when it is one of ``choices``, else ValueError naming ``name``.

    Examples
    --------
    >>> check_choice("reference", "mean", ("mean", "direction"))
    'mean'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}; Received: {name}={value!r}.")
    return value

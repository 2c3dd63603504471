"""Minimal nested list/tuple handling, so the core needs no pytree library."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["is_sequence", "leaves", "map_leaves", "same_structure", "structure_repr"]


def is_sequence(obj: object) -> bool:
    """True for the containers the core treats as structure (lists and tuples)."""
    return isinstance(obj, (list, tuple))


def leaves(tree: Any, /) -> list[Any]:
    """The arrays of a nested list/tuple, depth first, left to right."""
    if is_sequence(tree):
        return [leaf for item in tree for leaf in leaves(item)]
    return [tree]


def map_leaves(fn: Callable[..., Any], tree: Any, /, *rest: Any) -> Any:
    """Apply ``fn`` leafwise over trees of identical structure, keeping the structure."""
    if is_sequence(tree):
        mapped = [map_leaves(fn, *items) for items in zip(tree, *rest, strict=True)]
        # NamedTuples are not produced here: the core builds plain tuples and lists.
        return type(tree)(mapped)
    return fn(tree, *rest)


def structure_repr(tree: Any, /) -> str:
    """A compact description of a tree's structure and leaf shapes, for error messages."""
    if is_sequence(tree):
        inner = ", ".join(structure_repr(item) for item in tree)
        return f"[{inner}]" if isinstance(tree, list) else f"({inner}{',' if len(tree) == 1 else ''})"
    shape = getattr(tree, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(tree).__name__


def same_structure(a: Any, b: Any, /) -> bool:
    """True when both trees nest lists/tuples the same way (leaf shapes are not compared)."""
    if is_sequence(a) or is_sequence(b):
        if not (is_sequence(a) and is_sequence(b)) or len(a) != len(b):
            return False
        return all(same_structure(x, y) for x, y in zip(a, b, strict=True))
    return True

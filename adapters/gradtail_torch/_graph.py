"""A walk of the autograd graph from a loss.

It finds which leaves the loss reaches, and whether a train-mode batch norm sits between
the loss and a tracked layer's output.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["GraphFacts", "inspect_graph"]


class GraphFacts(NamedTuple):
    """What the walk found.

    Attributes
    ----------
    leaves : frozenset of int
        ``id`` of every tensor accumulating a gradient (parameters and other leaves that
        require grad) that the loss reaches.
    mixing_batchnorm : bool
        A train-mode batch norm lies above some tracked layer's output: that layer's
        "per-example" output gradient then mixes examples.
    """

    leaves: frozenset[int]
    mixing_batchnorm: bool


def inspect_graph(loss: torch.Tensor, tracked: set[Any]) -> GraphFacts:
    """Walk every node under ``loss.grad_fn`` once (iterative post-order)."""
    reaches: dict[int, bool] = {}
    leaves: set[int] = set()
    mixing = False
    stack: list[tuple[Any, bool]] = [(loss.grad_fn, False)]
    while stack:
        node, expanded = stack.pop()
        if node is None or (not expanded and id(node) in reaches):
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            reaches[id(node)] = False  # placeholder marks "visiting"
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in reaches)
            continue
        below = any(reaches.get(id(child), False) for child in children)
        reaches[id(node)] = node in tracked or below
        if below and getattr(node, "_saved_training", False) is True:
            mixing = True
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
    return GraphFacts(frozenset(leaves), mixing)

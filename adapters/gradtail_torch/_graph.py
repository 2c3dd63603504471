"""Walks of the autograd graph from a loss.

They find which leaves the loss reaches, whether a train-mode batch norm sits between the
loss and a tracked layer's output, which leaves it reaches *around* the tracked layers'
outputs (the preconditions of `GradTail.backward`'s book-keeping path), and whether a
reentrant activation checkpoint hides part of the forward.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["GraphFacts", "inspect_graph", "reentrant_checkpoint", "used_outside_layers"]


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


def _walk(start: Any, stop: set[Any]) -> list[Any]:
    """Every node reachable from ``start``, not entering (nor listing) a ``stop`` node."""
    seen: set[int] = set()
    order: list[Any] = []
    stack = [start]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or node in stop:
            continue
        seen.add(id(node))
        order.append(node)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return order


def used_outside_layers(loss: torch.Tensor, layers: list[tuple[Any, Any]]) -> list[str]:
    """Nodes of the tracked layers' own ops that something outside those ops also uses.

    ``layers`` holds each tracked layer's (output node, input node or None). A layer's own
    op is what lies between its output and its input: the matmul, the bias add, the casts
    and transposes of its parameters, and the parameters' accumulators. When nothing
    outside the layers' own ops feeds into them (other than through their outputs), each
    parameter's gradient is the sum of what flows through its layers' outputs. A tied
    embedding, a functional use of the weight, or a cached autocast copy shared with
    another op break this; their node names are returned (empty when nothing does).
    """
    own: set[int] = set()
    outputs: set[int] = set()
    for output, inputs in layers:
        outputs.add(id(output))
        own.update(id(node) for node in _walk(output, set() if inputs is None else {inputs}))
    outside: list[str] = []
    for node in _walk(loss.grad_fn, set()):
        inside = id(node) in own
        for child, _ in node.next_functions:
            if child is not None and id(child) in own and id(child) not in outputs and not inside:
                outside.append(f"{node.name()} -> {child.name()}")
    return outside


def reentrant_checkpoint(loss: torch.Tensor) -> bool:
    """The loss's graph holds a ``torch.utils.checkpoint(..., use_reentrant=True)`` segment."""
    return any(type(node).__name__ == "CheckpointFunctionBackward" for node in _walk(loss.grad_fn, set()))

"""Averaging the batch reference across ranks under torch.distributed."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["distributed_mean"]


def distributed_mean(tree: Any) -> Any:
    """Average every tensor of a nested list/tuple over all ranks (one all-reduce).

    The tensors are flattened into one buffer so the collective runs once per step.
    """
    flat: list[torch.Tensor] = []

    def collect(node: Any) -> None:
        if isinstance(node, (list, tuple)):
            for item in node:
                collect(item)
        else:
            flat.append(node)

    collect(tree)
    buffer = torch.cat([t.reshape(-1) for t in flat])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    buffer /= dist.get_world_size()
    pieces = iter(torch.split(buffer, [t.numel() for t in flat]))

    def rebuild(node: Any) -> Any:
        if isinstance(node, (list, tuple)):
            return type(node)(rebuild(item) for item in node)
        return next(pieces).reshape(node.shape)

    return rebuild(tree)

"""Worker for test_torch_distributed: one rank of a 2-process gloo run."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gradtail_torch import GradTail

from ._torch_zoo_models import Encoder


def make_model(kind: str = "mlp") -> torch.nn.Module:
    """``"mlp"``: Linear-Tanh-Linear on (B, 5); ``"transformer"``: the zoo's encoder on (B, 4, 4)."""
    if kind == "transformer":
        return Encoder(batch_first=True, seed=0)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def batches(steps: int, batch: int, kind: str = "mlp") -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    shape = (batch, 4, 4) if kind == "transformer" else (batch, 5)
    return [
        (
            torch.randn(*shape, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (batch,), generator=gen),
        )
        for _ in range(steps)
    ]


def run(
    rank: int, world: int, init_file: str, out_dir: str, steps: int, batch: int, kind: str = "mlp"
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model(kind))
        gt = GradTail(model, decay=0.8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        per_rank = batch // world
        alignments, params = [], []
        for x, y in batches(steps, batch, kind):
            params.append([p.detach().clone() for p in model.parameters()])
            xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
            opt.zero_grad()
            loss = F.cross_entropy(model(xs), ys, reduction="none")
            w = gt.weights(loss)
            (w * loss).mean().backward()  # DDP averages the gradients across ranks
            alignments.append(gt.last_alignment.clone())
            opt.step()
        torch.save(
            {"state": gt.state_dict(), "alignments": alignments, "params": params},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()

"""A tiny LightningModule with GradTail (three changed lines), for tests/test_lightning.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gradtail_torch.lightning import GradTailCallback, gradtail_loss


class LitClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, reduction="none")  # changed: reduction="none"
        return gradtail_loss(self, loss)  # changed: the GradTail-weighted mean

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] > 0.8).long() + (x[:, 1] > 1.0).long()  # imbalanced: most examples are class 0
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(max_epochs: int, callback: GradTailCallback, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        callbacks=[callback],  # changed: the callback
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        **kwargs,
    )


def ddp_main(out_dir: str) -> None:
    """Two CPU processes, strategy="ddp" (gloo): each rank writes its state and parameters."""
    callback = GradTailCallback(decay=0.8)
    model = LitClassifier()
    fit = trainer(2, callback, devices=2, strategy="ddp", use_distributed_sampler=True)
    fit.fit(model, loader(n=64, batch_size=8))
    rank = fit.global_rank
    state = callback.gradtail.state_dict()
    torch.save(
        {
            "state": state,
            "params": [p.detach().clone() for p in model.parameters()],
            "world": fit.world_size,
            "metrics": {k: float(v) for k, v in fit.callback_metrics.items()},
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    (Path(out_dir) / f"done{rank}.json").write_text(json.dumps({"rank": rank}))


if __name__ == "__main__":
    ddp_main(sys.argv[1])

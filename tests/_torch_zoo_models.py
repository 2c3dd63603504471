"""Tiny float64 models of the kinds people train, for the GradTail model-zoo tests.

Import after ``pytest.importorskip("torch")``: this module imports torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def cnn(seed: int = 0) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU -> Dropout -> Linear head on (B, 1, 6, 6) images, 3 classes.

    Examples
    --------
    >>> cnn()(torch.zeros(2, 1, 6, 6, dtype=torch.float64)).shape
    torch.Size([2, 3])
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).double()


class Encoder(nn.Module):
    """Linear embedding -> nn.TransformerEncoder (1 layer) -> mean over time -> Linear head.

    ``batch_first=False`` takes (T, B, d_in) like nn.Transformer's default.

    Examples
    --------
    >>> Encoder(batch_first=False)(torch.zeros(5, 2, 4, dtype=torch.float64)).shape
    torch.Size([2, 3])
    """

    def __init__(self, batch_first: bool = True, seed: int = 0, d_in: int = 4, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.batch_first = batch_first
        self.embed = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x))
        return self.head(h.mean(dim=1 if self.batch_first else 0))


class TiedLM(nn.Module):
    """Embedding -> Linear -> tanh -> lm_head whose weight is the embedding's (tied), no norms.

    Every trained parameter belongs to an nn.Embedding or a tracked nn.Linear.
    ``detach_embedding=True`` cuts the embedding's use of the shared weight from autograd
    (the per-example reference of what GradTail scores: the tracked layers' own uses).

    Examples
    --------
    >>> TiedLM()(torch.zeros(2, 5, dtype=torch.int64)).shape
    torch.Size([2, 5, 11])
    """

    def __init__(self, seed: int = 0, vocab: int = 11, d: int = 6, causal: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, d)
        self.attn = (
            nn.TransformerEncoderLayer(d, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
            if causal
            else None
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight
        self.double()

    def forward(self, idx: torch.Tensor, detach_embedding: bool = False) -> torch.Tensor:
        weight = self.emb.weight.detach() if detach_embedding else self.emb.weight
        h = torch.tanh(self.hidden(F.embedding(idx, weight)))
        if self.attn is not None:
            mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], dtype=h.dtype)
            h = self.attn(h, src_mask=mask, is_causal=True)
        return self.lm_head(h)


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,): each sequence's mean next-token cross-entropy."""
    b, t, v = logits.shape
    return (
        F.cross_entropy(logits.reshape(b * t, v), targets.reshape(-1), reduction="none").reshape(b, t).mean(1)
    )


class Checkpointed(nn.Module):
    """Two Linear+Tanh blocks under torch.utils.checkpoint, then a Linear head.

    Examples
    --------
    >>> Checkpointed(use_reentrant=False)(torch.zeros(2, 5, dtype=torch.float64)).shape
    torch.Size([2, 3])
    """

    def __init__(self, use_reentrant: bool, seed: int = 0, active: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.use_reentrant, self.active = use_reentrant, active
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(5, 7), nn.Tanh()), nn.Sequential(nn.Linear(7, 7), nn.Tanh())]
        )
        self.head = nn.Linear(7, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.use_reentrant) if self.active else block(x)
        return self.head(x)


class Tagger(nn.Module):
    """Sequence-first nn.LSTM (T, B, d_in) -> per-step Linear head (T, B, 3).

    Examples
    --------
    >>> Tagger()(torch.zeros(5, 2, 4, dtype=torch.float64)).shape
    torch.Size([5, 2, 3])
    """

    def __init__(self, seed: int = 0, d_in: int = 4, hidden: int = 6) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lstm = nn.LSTM(d_in, hidden)
        self.head = nn.Linear(hidden, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])

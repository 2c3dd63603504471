"""The architectures of the long-tail suites: ``build_model(arch, d_in, n_classes)``.

* ``mlp``: ``d_in -> hidden... -> n_classes``, ReLU between the ``nn.Linear`` layers.
* ``cnn``: 28x28 images, two 3x3 convolutions (16 and 32 channels), each with BatchNorm, ReLU and
  2x2 max-pooling, then Dropout and a two-layer head ``32*7*7 -> 128 -> n_classes``.
* ``vit``: 28x28 images cut into sixteen 7x7 patches, a linear patch embedding (d = 64) plus a
  learned position embedding, ``nn.TransformerEncoder`` (2 layers, 4 heads, batch-first), the mean
  over the patches, then ``nn.Linear(64, n_classes)``.

The inputs stay flat ``(B, 784)`` arrays (the suites' data); the image models reshape them. The
last ``nn.Linear`` of every model is its head (GradTail's ``head_only`` tracks it).
"""

from __future__ import annotations

import torch
from torch import nn

ARCHS = ("mlp", "cnn", "vit")
#: The model of each ``--arch`` (this module), as the JSON states it.
ARCH_TEXT = {
    "mlp": "MLP d_in -> 512 -> 256 -> C (ReLU; C classes or superclasses)",
    "cnn": "CNN on 28x28: 2 x [3x3 conv (16, 32 channels), BatchNorm, ReLU, 2x2 max-pool], Dropout 0.25, "
    "Linear 1568 -> 128, ReLU, Dropout 0.25, Linear 128 -> C",
    "vit": "ViT on 28x28: 16 patches of 7x7, Linear 49 -> 64 patch embedding + learned position "
    "embedding, nn.TransformerEncoder (2 layers, d 64, 4 heads, feed-forward 128, dropout 0.1, "
    "batch_first), mean over patches, Linear 64 -> C",
}
IMAGE = 28
PATCH = 7


def mlp(d_in: int, n_classes: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, n_classes))
    return nn.Sequential(*layers)


def cnn(
    n_classes: int, *, channels: tuple[int, int] = (16, 32), width: int = 128, dropout: float = 0.25
) -> nn.Sequential:
    c1, c2 = channels
    return nn.Sequential(
        nn.Unflatten(1, (1, IMAGE, IMAGE)),
        nn.Conv2d(1, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(c2 * (IMAGE // 4) ** 2, width),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(width, n_classes),
    )


class ViT(nn.Module):
    """A small vision transformer on 28x28 images (see the module docstring)."""

    def __init__(
        self, n_classes: int, *, dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128
    ) -> None:
        super().__init__()
        n_patches = (IMAGE // PATCH) ** 2
        self.embed = nn.Linear(PATCH * PATCH, dim)
        self.position = nn.Parameter(torch.zeros(1, n_patches, dim))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=mlp_dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        g = IMAGE // PATCH
        # (B, 784) -> (B, 16, 49): row-major 7x7 patches
        patches = x.reshape(b, g, PATCH, g, PATCH).permute(0, 1, 3, 2, 4).reshape(b, g * g, PATCH * PATCH)
        tokens = self.encoder(self.embed(patches) + self.position)
        return self.head(tokens.mean(dim=1))


def build_model(arch: str, d_in: int, n_classes: int, hidden: tuple[int, ...] = (512, 256)) -> nn.Module:
    """The model ``arch`` (one of ``ARCHS``) for ``d_in`` features and ``n_classes`` classes;
    ``hidden`` sizes the MLP only. The image models need ``d_in == 784`` (28x28)."""
    if arch == "mlp":
        return mlp(d_in, n_classes, hidden)
    if arch not in ARCHS:
        raise ValueError(f"`arch` must be one of {ARCHS}; Received: arch={arch!r}.")
    if d_in != IMAGE * IMAGE:
        raise ValueError(
            f"arch={arch!r} needs 28x28 images flattened to {IMAGE * IMAGE} features; Received: d_in={d_in}."
        )
    return cnn(n_classes) if arch == "cnn" else ViT(n_classes)

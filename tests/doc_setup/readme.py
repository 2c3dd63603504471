"""Names that README.md's ten-line examples take as given: a PyTorch model with a `.head`, a
loader and an optimiser; optax `params`, `loss_fn`, `B` and `batches`; Keras `x_train`, `y_train`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(1)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 64), nn.ReLU())
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


model = Classifier()
loader = [(torch.randn(32, 20), torch.randint(0, 5, (32,))) for _ in range(4)]
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

B = 32
params = {"w": jnp.zeros((20, 5)), "b": jnp.zeros(5)}


def loss_fn(p, x_i, y_i):
    return optax.softmax_cross_entropy_with_integer_labels(x_i @ p["w"] + p["b"], y_i)


keys = jax.random.split(jax.random.key(0), 4)
batches = [(jax.random.normal(k, (B, 20)), jnp.arange(B) % 5) for k in keys]

rng = np.random.default_rng(0)
x_train = rng.normal(size=(256, 20)).astype("float32")
y_train = rng.integers(0, 5, size=256).astype("int32")

"""GradTail with a Flax NNX model: the optax transformation, the head path, and tail mining.

A small NNX MLP on toy data with a rare subgroup (5% of the examples follow the opposite
rule) is trained two ways with ``gradtail_optax`` (docs/flax.md):

- ``train_transform``: ``gradtail_optax.gradtail`` first in an optax chain, fed per-example
  gradients from ``jax.vmap(jax.grad(...))`` over the NNX parameters (an ``nnx.State``);
- ``train_head``: the efficient path, ``gradtail_optax.head_weights`` on the ``nnx.Linear``
  head, one forward and one backward per step.

``mine`` then ranks every example with ``gradtail_optax.score_batches`` (low = tail-like).

Run: ``python examples/flax_nnx.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradtail_optax

ce = optax.softmax_cross_entropy_with_integer_labels


class MLP(nnx.Module):
    def __init__(self, d_in: int, hidden: int, classes: int, *, rngs: nnx.Rngs) -> None:
        self.body = nnx.Linear(d_in, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.body(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def toy_data(n: int = 640, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes split by x0; a 5% subgroup (shifted on x1) follows the opposite rule."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    rare = np.zeros(n, dtype=bool)
    rare[rng.permutation(n)[: n // 20]] = True
    x[rare, 1] += 3.0
    y = (x[:, 0] > 0).astype(np.int32)
    y[rare] = 1 - y[rare]
    return x, y, rare


def batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> list[tuple[jax.Array, jax.Array]]:
    """Full batches only: gradtail's state has a fixed batch size."""
    n = len(y) - len(y) % batch_size
    return [
        (jnp.asarray(x[i : i + batch_size]), jnp.asarray(y[i : i + batch_size]))
        for i in range(0, n, batch_size)
    ]


def per_example_grads(
    graphdef: nnx.GraphDef, params: nnx.State, batch: tuple[jax.Array, jax.Array]
) -> nnx.State:
    """Each example's gradient of every parameter: a State with a leading batch axis."""

    def loss(p: nnx.State, xi: jax.Array, yi: jax.Array) -> jax.Array:
        return ce(nnx.merge(graphdef, p)(xi[None]), yi[None])[0]

    return jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, *batch)


def train_transform(x: np.ndarray, y: np.ndarray, *, epochs: int = 3, batch_size: int = 32, seed: int = 0):
    """The optax transformation on per-example gradients of the NNX parameters."""
    graphdef, params = nnx.split(MLP(x.shape[1], 32, 2, rngs=nnx.Rngs(seed)), nnx.Param)
    tx = optax.chain(
        gradtail_optax.gradtail(batch_size=batch_size, decay=0.9, warmup_steps=5), optax.adam(1e-2)
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        grads = per_example_grads(graphdef, params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(epochs):
        for batch in batches(x, y, batch_size):
            params, opt_state = step(params, opt_state, batch)
    return graphdef, params, opt_state


def train_head(x: np.ndarray, y: np.ndarray, *, epochs: int = 3, batch_size: int = 32, seed: int = 0):
    """The efficient path: head_weights on the nnx.Linear head, one forward and one backward."""
    graphdef, params = nnx.split(MLP(x.shape[1], 32, 2, rngs=nnx.Rngs(seed)), nnx.Param)
    gt = gradtail_optax.head_init(nnx.to_pure_dict(params)["head"], batch_size=batch_size)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, gt, batch):
        xb, yb = batch

        def forward(p):
            model = nnx.merge(graphdef, p)
            h = model.features(xb)  # (B, hidden): the head's input
            logits = model.head(h)
            return ce(logits, yb), (h, logits)

        _, backward, (h, logits) = jax.vjp(forward, params, has_aux=True)
        _, dlogits = gradtail_optax.loss_and_output_grads(ce, logits, yb)
        w, _, gt = gradtail_optax.head_weights(gt, h, dlogits, decay=0.9, warmup_steps=5)
        (grads,) = backward(w / batch_size)  # the gradient of mean_i(w_i L_i)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, gt

    for _ in range(epochs):
        for batch in batches(x, y, batch_size):
            params, opt_state, gt = step(params, opt_state, gt, batch)
    return graphdef, params, gt


def mine(graphdef: nnx.GraphDef, params: nnx.State, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Every example's alignment with the data's direction reference (low = tail-like)."""
    data = [(jnp.asarray(x[i : i + 128]), jnp.asarray(y[i : i + 128])) for i in range(0, len(y), 128)]
    return gradtail_optax.score_batches(lambda p, b: per_example_grads(graphdef, p, b), params, data)


def main() -> None:
    from gradtail_ops.mining import rank

    x, y, rare = toy_data()
    graphdef, params, opt_state = train_transform(x, y)
    print("transform path: last weights", np.asarray(optax.tree.get(opt_state, "weights"))[:6].round(2))
    graphdef, params, gt = train_head(x, y)
    print("head path: last weights", np.asarray(gt.weights)[:6].round(2))
    scores = mine(graphdef, params, x, y)
    lowest = rank(scores)[: rare.sum()]
    print(f"rare subgroup: {rare.mean():.0%} of the data, {rare[lowest].mean():.0%} of the lowest-ranked")


if __name__ == "__main__":
    main()

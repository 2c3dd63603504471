"""Names that docs/optax.md takes as given: a small MLP's params, `body`, `loss_fn`, a batch, two devices."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # for the shard_map snippet

import jax
import jax.numpy as jnp
import optax

B, n = 16, 2  # batch size, devices
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
params = {
    "body": {"kernel": 0.1 * jax.random.normal(k1, (8, 16)), "bias": jnp.zeros(16)},
    "head": {"kernel": 0.1 * jax.random.normal(k2, (16, 3)), "bias": jnp.zeros(3)},
}
x = jax.random.normal(k3, (B, 8))
y = jnp.arange(B) % 3


def body(p, x):
    return jax.nn.relu(x @ p["body"]["kernel"] + p["body"]["bias"])


def loss_fn(p, x_i, y_i):
    logits = body(p, x_i) @ p["head"]["kernel"] + p["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y_i)

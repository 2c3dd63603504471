"""GradTail with JAX and optax on a long-tailed digits set, end to end, in under a minute on a CPU.

Run: ``.venv/bin/python examples/jax_long_tail.py``. Trains the same pure-JAX MLP three ways and
prints the balanced test accuracy and that of the rarest classes:

* ``uniform``: the plain mean loss;
* ``transform``: ``gradtail_optax.gradtail(optax.adam(...), ...)`` fed per-example
  gradients of every parameter (``jax.vmap(jax.grad(...))``), all layers scored;
* ``efficient``: ``gradtail_optax.head(...).update`` on the head's inputs and output gradients, then
  one backward of the weighted loss (the recommended path for large models).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # small model: one thread

import itertools
import time

import jax
import numpy as np
import optax
from sklearn.datasets import load_digits

import gradtail_optax

BATCH, EPOCHS, LR = 64, 80, 1e-3


def long_tailed_digits(imbalance: float = 10.0, seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:50] for c in range(10)])
    rest = np.setdiff1d(np.arange(len(y)), test)
    counts = np.floor(120 * imbalance ** (-np.arange(10) / 9)).astype(int)  # class c keeps counts[c]
    train = np.concatenate([rng.permutation(rest[y[rest] == c])[: counts[c]] for c in range(10)])
    return x[train], y[train], x[test], y[test], counts


def init_mlp(key, sizes=(64, 128, 10)):
    params = []
    for k, (d_in, d_out) in zip(
        jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes), strict=True
    ):
        bound = 1.0 / np.sqrt(d_in)
        kw, kb = jax.random.split(k)
        params.append(
            {
                "kernel": jax.random.uniform(kw, (d_in, d_out), minval=-bound, maxval=bound),
                "bias": jax.random.uniform(kb, (d_out,), minval=-bound, maxval=bound),
            }
        )
    return params


def body(params, x):
    """Every layer but the head; returns the head's input."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    return x


def logits_fn(params, x):
    return body(params, x) @ params[-1]["kernel"] + params[-1]["bias"]


ce = optax.softmax_cross_entropy_with_integer_labels


def fit(x, y, *, mode: str, seed: int = 0):
    params = init_mlp(jax.random.key(seed))
    warmup = len(y) // BATCH  # one epoch with weight 1 while the reference builds up
    adam = optax.adam(LR)

    if mode == "transform":
        opt = gradtail_optax.gradtail(adam, batch_size=BATCH, warmup_steps=warmup)  # wraps Adam

        def step(params, state, xb, yb):
            def example_loss(p, xi, yi):
                return ce(logits_fn(p, xi[None]), yi[None])[0]

            per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, xb, yb)
            updates, state = opt.update(per_example, state, params)  # weighted mean, then Adam
            return optax.apply_updates(params, updates), state

        state = opt.init(params)

    elif mode == "efficient":
        ht = gradtail_optax.head(batch_size=BATCH, warmup_steps=warmup)

        def step(params, state, xb, yb):
            opt_state, gt = state

            def forward(p):
                h = body(p, xb)
                logits = h @ p[-1]["kernel"] + p[-1]["bias"]
                return ce(logits, yb), (h, logits)

            _, backward, (h, logits) = jax.vjp(forward, params, has_aux=True)  # one forward
            _, dlogits = gradtail_optax.loss_and_output_grads(ce, logits, yb)  # dL_i/dz_i, (B, 10)
            w, _, gt = ht.update(gt, h, dlogits)
            (grads,) = backward(w / BATCH)  # one backward: the gradient of mean_i(w_i L_i)
            updates, opt_state = adam.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), (opt_state, gt)

        state = (adam.init(params), ht.init(params[-1]))

    else:

        def step(params, state, xb, yb):
            grads = jax.grad(lambda p: ce(logits_fn(p, xb), yb).mean())(params)
            updates, state = adam.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        state = adam.init(params)

    step = jax.jit(step)
    rng = np.random.default_rng(seed)
    for _ in range(EPOCHS):
        order = rng.permutation(len(y))
        for lo in range(0, len(y) - BATCH + 1, BATCH):  # every step has BATCH examples
            idx = order[lo : lo + BATCH]
            params, state = step(params, state, x[idx], y[idx])
    assert step._cache_size() == 1  # compiled once
    return params


def main() -> None:
    x, y, x_test, y_test, counts = long_tailed_digits()
    few = np.argsort(counts)[:3]
    print(f"training counts per class: {counts.tolist()}; few-shot classes: {few.tolist()}")
    for mode in ("uniform", "transform", "efficient"):
        start = time.perf_counter()
        params = fit(x, y, mode=mode)
        pred = np.asarray(logits_fn(params, x_test).argmax(1))
        per_class = np.array([(pred[y_test == c] == c).mean() for c in range(10)])
        print(
            f"{mode:9}: balanced accuracy {100 * per_class.mean():.1f}%, few-shot classes "
            f"{100 * per_class[few].mean():.1f}% ({time.perf_counter() - start:.1f} s)"
        )


if __name__ == "__main__":
    main()

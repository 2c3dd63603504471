"""GradTail in Keras 3 on a long-tailed digits set: ``model.fit`` with one callback.

Run: ``KERAS_BACKEND=jax .venv/bin/python examples/keras_long_tail.py`` (or ``KERAS_BACKEND=torch``;
``jax`` is used when the variable is unset). Trains the same MLP twice from the same weights, with
the plain loss and with ``gradtail_keras.GradTailCallback``, and prints the balanced test
accuracy, that of the rarest classes, and what the callback logged. Seconds on a CPU; the
numbers of one seed are noisy: the evidence suite (docs/benchmarks.md) has the paired, multi-seed
comparison.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # small model: one thread

import time

import keras
import numpy as np
from sklearn.datasets import load_digits

from gradtail_keras import GradTailCallback

BATCH, EPOCHS = 64, 60


def long_tailed_digits(imbalance: float = 10.0, seed: int = 0):
    """Digits with class c keeping 120 * imbalance**(-c/9) training images; 50 test images a class."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:50] for c in range(10)])
    rest = np.setdiff1d(np.arange(len(y)), test)
    counts = np.floor(120 * imbalance ** (-np.arange(10) / 9)).astype(int)
    train = np.concatenate([rng.permutation(rest[y[rest] == c])[: counts[c]] for c in range(10)])
    return x[train], y[train], x[test], y[test], counts


def build(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)  # the same initial weights for both runs
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),  # tracked by GradTailCallback
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    return model


def main() -> None:
    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(1)
    x, y, x_test, y_test, counts = long_tailed_digits()
    few = np.argsort(counts)[:3]
    print(f"backend {keras.backend.backend()}; training counts per class: {counts.tolist()}")
    warmup = len(y) // BATCH  # one epoch with weight 1 while the reference builds up
    for name, callbacks in (("uniform", []), ("gradtail", [GradTailCallback(warmup_steps=warmup)])):
        model = build()
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, callbacks=callbacks)
        pred = model.predict(x_test, verbose=0).argmax(1)
        per_class = np.array([(pred[y_test == c] == c).mean() for c in range(10)])
        line = (
            f"{name:8}: balanced accuracy {100 * per_class.mean():.1f}%, few-shot classes "
            f"{few.tolist()} {100 * per_class[few].mean():.1f}% ({time.perf_counter() - start:.1f} s)"
        )
        if callbacks:
            logs = history.history
            line += (
                f"; last epoch: {100 * logs['gradtail_upweighted'][-1]:.0f}% upweighted, mean "
                f"alignment {logs['gradtail_alignment'][-1]:.2f}"
            )
        print(line)


if __name__ == "__main__":
    main()

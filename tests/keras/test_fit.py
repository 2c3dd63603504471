"""The callback inside model.fit: logs, the attach/detach cycle, no host sync on JAX."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from gradtail_keras import GradTailCallback
from tests import reference as ref
from tests.keras._helpers import BACKEND, ReferenceGradTail, flat_mean, long_tail_data, softmax, softmax_head

FIT = {"batch_size": 16, "shuffle": False, "verbose": 0}


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_fit_end_to_end(task: str) -> None:
    x, y = long_tail_data()
    if task == "classification":
        loss, units, activation, targets = "binary_crossentropy", 1, "sigmoid", (y > 0).astype("float32")
    else:
        loss, units, activation = "mse", 1, None
        targets = (x[:, :2] @ np.array([[1.0], [-2.0]], "float32")) ** 2
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(units, activation=activation),
        ]
    )
    model.compile(optimizer="adam", loss=loss)
    cb = GradTailCallback(decay=0.9)
    logs = model.fit(x, targets, batch_size=32, epochs=2, verbose=0, callbacks=[cb]).history
    assert np.all(np.isfinite(logs["loss"]))
    assert int(cb.get_state()["count"]) == 2 * len(x) // 32
    np.testing.assert_allclose(logs["gradtail_weight_mean"], 1.0, rtol=1e-5)
    # Rank curve, quantile 0.3: 10 of 32 examples a batch once a reference exists.
    assert 0.2 < logs["gradtail_upweighted"][-1] < 0.35, logs["gradtail_upweighted"]
    assert -1.0 <= logs["gradtail_alignment"][-1] <= 1.0


def test_logs_gain_the_values_and_validation_logs_do_not() -> None:
    x, y = long_tail_data()
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    synced: list[bool] = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            # self._model (private, test only): on JAX, Callback.model itself syncs the state.
            synced.append(bool(getattr(self._model, "_jax_state_synced", False)))

    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        validation_split=0.25,
        verbose=0,
        class_weight={0: 1.0, 1: 3.0, 2: 5.0},
        callbacks=[GradTailCallback(max_weight=4.0, kind="sigmoid", normalize=False), Probe()],
    )
    keys = set(history.history)
    assert {"gradtail_weight_mean", "gradtail_upweighted", "gradtail_alignment", "val_loss"} <= keys, keys
    assert not any(k.startswith("val_gradtail") for k in keys), keys
    assert history.history["gradtail_weight_mean"][-1] > 1.0  # unnormalised sigmoid: mean above 1
    if BACKEND == "jax":
        assert synced
        assert not any(synced), "the callback forced a JAX state sync between steps"
        # Batch ends stay asynchronous (no host round trip for the logs after every step).
        assert keras.callbacks.CallbackList([GradTailCallback()], model=model)._async_train


def test_detached_after_fit_and_step_function_reused() -> None:
    x, y = long_tail_data()
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)
    plain_fn = model.train_function
    cb = GradTailCallback()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[cb])
    assert "gradtail" not in model.metrics_names
    for name in ("compute_loss", "train_step", "test_step"):
        assert name not in model.__dict__, name
    assert model.train_function is plain_fn
    assert cb._step_cache is not None
    gt_fn = cb._step_cache["functions"]["train_function"]
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[cb])
    assert cb._step_cache["functions"]["train_function"] is gt_fn  # no recompiling
    assert int(cb.get_state()["count"]) == 2 * 6  # 192 examples, batches of 32, two fits
    model.evaluate(x, y, verbose=0)  # the plain model works after fit


def _tied_batch(case: str) -> tuple[np.ndarray, np.ndarray]:
    """Identical examples (every weight ties), or two groups of six and two copies.

    The groups differ in size on purpose: two groups of equal size align *exactly* equally
    with the direction reference (the mean of their two unit gradients), so which one ranks
    lower would be decided by rounding, which XLA does not keep fixed from run to run.
    """
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=5), rng.normal(size=5)
    if case == "two groups":
        return np.stack([a] * 6 + [b] * 2), np.array([0] * 6 + [2] * 2)
    size = 10 if case == "all at 2.9" else 6
    return np.stack([a] * size), np.zeros(size, "int64")


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("all identical", {"kind": "sigmoid", "normalize": False, "max_weight": 3.0, "threshold": 1.5}),
        ("two groups", {"kind": "rank", "quantile": 0.25, "max_weight": 3.0}),
        # Ten float32 2.9s average to just below 2.9 (on torch and JAX): a tie must not count.
        ("all at 2.9", {"kind": "rank", "quantile": 1.0, "max_weight": 2.9, "normalize": False}),
    ],
)
def test_upweighted_share_on_the_first_step_and_with_ties(case: str, options: dict[str, Any]) -> None:
    """One step per epoch: the first (all ones) logs 0; with ties, the share strictly above the
    batch's mean weight, from the float64 policy loop (ties at the mean do not count)."""
    model, kernel, bias = softmax_head(seed=3)
    x, y = _tied_batch(case)
    cb = GradTailCallback(decay=0.5, **options)
    logs = model.fit(x.astype("float32"), y, batch_size=len(x), epochs=2, verbose=0, callbacks=[cb]).history
    gt = ReferenceGradTail(decay=0.5, **options)
    d = softmax(x @ kernel + bias) - np.eye(3)[y]
    want = []
    for _ in range(2):
        w, _ = gt.step(ref.per_example_linear_grads(x, d, bias=True))
        want.append(float(np.mean(w > w.mean() + 1e-9)))
    assert want[0] == 0.0
    assert want[1] == (0.25 if case == "two groups" else 0.0)  # the case is what it claims
    assert not np.allclose(w, 1.0), "the ties must be away from 1"
    np.testing.assert_array_equal(np.asarray(logs["gradtail_upweighted"], np.float64), want)


def test_only_the_train_steps_forward_is_scored() -> None:
    """Inference forwards between steps (another callback's) leave the state as the reference's."""
    model, kernel, bias = softmax_head()
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(64, 5)).astype("float32"), rng.integers(0, 3, 64)
    calls: list[int] = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self.model(x[:4], training=False)
            self.model(x[:4])  # training unset: outside the train step all the same
            calls.append(batch)

    cb = GradTailCallback(decay=0.9)
    model.fit(x, y, callbacks=[cb, Probe()], **FIT)
    assert len(calls) == 4
    gt = ReferenceGradTail(decay=0.9)
    for start in range(0, 64, 16):
        xb, yb = x[start : start + 16].astype(np.float64), y[start : start + 16]
        gt.step(ref.per_example_linear_grads(xb, softmax(xb @ kernel + bias) - np.eye(3)[yb], bias=True))
    np.testing.assert_allclose(flat_mean(cb.get_state()), gt.state(), rtol=1e-4, atol=1e-6)

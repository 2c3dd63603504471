"""Config and state: get_config/from_config, get/set/save/load_state, resuming, empty batches."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from gradtail_keras import GradTailCallback
from gradtail_ops import GradTailConfig
from tests import reference as ref
from tests.keras._helpers import (
    ReferenceGradTail,
    assert_raises,
    flat_mean,
    softmax,
    softmax_head,
    tiny_model,
    tiny_problem,
)

FIT = {"batch_size": 16, "epochs": 1, "shuffle": False, "verbose": 0}
ZERO = {"mean": [[np.zeros((3, 5)), np.zeros(3)]], "total": 0.0, "count": 0}


def test_get_config_round_trips_through_json() -> None:
    options = {
        "decay": 0.8,
        "reference": "mean",
        "warmup_steps": 2,
        "kind": "zscore",
        "max_weight": 2.0,
        "threshold": -0.5,
        "temperature": 0.2,
        "quantile": 0.1,
        "floor": -0.3,
        "normalize": False,
        "eps": 1e-8,
        "method": "ghost",
        "memory_size": 10,
        "memory_decay": 0.7,
        "memory_eta": 2.0,
        "memory_max_weight": 4.0,
    }
    cb = GradTailCallback(layer="head", **options)
    config = cb.get_config()
    assert config == {"layer": "head", **options, "sketch_rank": None, "sketch_size": None, "sketch_seed": 0}
    again = GradTailCallback.from_config(json.loads(json.dumps(config)))
    assert again.get_config() == config
    assert again.config == cb.config == GradTailConfig.from_options(**options)


def test_config_object_and_0_1_0_attributes() -> None:
    config = GradTailConfig.from_options(decay=0.7, max_weight=2.0)
    cb = GradTailCallback(config=config)
    assert cb.config is config
    assert (cb.decay, cb.curve.max_weight, cb.reference) == (0.7, 2.0, "direction")  # 0.1.0 attributes
    with pytest.warns(DeprecationWarning, match="decay"):
        cb.decay = 0.5
    assert cb.config.decay == 0.5
    with pytest.warns(DeprecationWarning, match="decay"), pytest.raises(ValueError, match="decay"):
        cb.decay = 1.5  # still validated by the core


def test_get_config_refuses_a_decay_schedule() -> None:
    cb = GradTailCallback(decay=lambda steps: 0.9)
    assert_raises(cb.get_config, (ValueError,), "decay schedule", "Received:")


@pytest.fixture(scope="module")
def fitted() -> GradTailCallback:
    """A callback after two steps of a fit (shared: the tests that use it must not change it)."""
    model, _, _ = softmax_head()
    x, y = np.random.default_rng(0).normal(size=(32, 5)).astype("float32"), np.arange(32) % 3
    cb = GradTailCallback(decay=0.9)
    model.fit(x, y, callbacks=[cb], **FIT)
    return cb


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"count": -1}, "count"),
        ({"total": -0.5}, "total"),
        ({"total": 1.5}, "total"),
        ({"total": float("nan")}, "total"),
        ({"mean": [[np.full((3, 5), np.nan), np.zeros(3)]]}, "mean[0]"),
        ({"mean": [[np.zeros((3, 5)), np.array([0.0, np.inf, 0.0])]]}, "mean[1]"),
        ({"steps": 0, "count": 2}, "steps"),
        ({"reference": "mean"}, "reference"),
        ({"decay": 1.5}, "decay"),
        ({"extra": 1}, "extra"),
        ({"memory_score": np.zeros(8), "memory_visits": np.zeros(8, "int32")}, "memory"),
        ({"mean": [[np.zeros((3, 4)), np.zeros(3)]]}, "mean"),
        ({"mean": [[np.zeros(3)]]}, "mean"),
    ],
)
def test_set_state_validates_everything_before_assigning(
    fitted: GradTailCallback, change: dict[str, Any], fragment: str
) -> None:
    """Refused with a message naming the key, and the state (after fit, or pending) is unchanged."""
    good = {"mean": [[np.ones((3, 5)), np.ones(3)]], "total": 0.5, "count": 3, "steps": 3}
    before = fitted.get_state()
    assert_raises(
        lambda: fitted.set_state({**good, **change}), (ValueError, TypeError), fragment, "Received:"
    )
    after = fitted.get_state()
    np.testing.assert_array_equal(flat_mean(after), flat_mean(before))
    assert int(after["count"]) == int(before["count"]) == 2
    assert fitted.config.decay == 0.9
    # Before fit the layer is unknown: a well-formed mean of other shapes waits for fit start.
    if not ("mean" in change and np.shape(change["mean"][0][0]) == (3, 4)):
        fresh = GradTailCallback(decay=0.9)
        assert_raises(
            lambda: fresh.set_state({**good, **change}), (ValueError, TypeError), fragment, "Received:"
        )
        assert fresh._pending is None
        assert_raises(fresh.get_state, (RuntimeError,), "no state yet")
        assert fresh.config.decay == 0.9


def test_pending_state_that_does_not_fit_the_layer_is_refused_at_fit_start() -> None:
    model, _, _ = softmax_head()
    cb = GradTailCallback()
    cb.set_state({"mean": [[np.zeros((2, 2))]], "total": 0.0, "count": 0})
    x, y = np.zeros((16, 5), "float32"), np.zeros(16, "int64")
    assert_raises(lambda: model.fit(x, y, callbacks=[cb], **FIT), (ValueError,), "does not fit", "Received:")


def test_resume_through_keras_checkpoint_and_save_state(tmp_path: Path) -> None:
    """Model weights through a .keras file plus the state through save/load_state resume exactly
    (the resumed callback continues the saved count: a fresh state would not)."""
    params, x, y = tiny_problem(seed=4, steps=8)
    xb = x.astype("float32")
    first, second = slice(0, 64), slice(64, 128)

    def run(model: keras.Model, cb: GradTailCallback, part: slice) -> None:
        model.fit(xb[part], y[part], callbacks=[cb], **FIT)

    straight_model, straight = tiny_model(params), GradTailCallback(decay=0.8)
    run(straight_model, straight, first)
    run(straight_model, straight, second)
    a_model, a_cb = tiny_model(params), GradTailCallback(decay=0.8)
    run(a_model, a_cb, first)
    a_model.save(tmp_path / "m.keras")
    a_cb.save_state(tmp_path / "gradtail.npz")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    b_cb = GradTailCallback(decay=0.8)
    b_cb.load_state(tmp_path / "gradtail.npz")
    run(restored, b_cb, second)
    for got, want in zip(restored.get_weights(), straight_model.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for key in ("count", "steps"):
        assert int(b_cb.get_state()[key]) == int(straight.get_state()[key]) == 8
    np.testing.assert_allclose(flat_mean(b_cb.get_state()), flat_mean(straight.get_state()), rtol=1e-6)


def test_load_state_reads_a_0_1_0_file(tmp_path: Path) -> None:
    """0.1.0's .npz (no steps): loads with steps = count."""
    path = os.fspath(tmp_path / "old.npz")
    kernel = np.arange(15, dtype=np.float32).reshape(3, 5) / 15
    np.savez(
        path,
        mean_0=kernel,
        mean_1=np.ones(3, np.float32),
        total=np.float32(0.5),
        count=np.int32(4),
        decay=np.asarray(0.8),
        reference=np.asarray("direction"),
    )
    cb = GradTailCallback()
    cb.load_state(path)
    state = cb.get_state()
    np.testing.assert_array_equal(state["mean"][0][0], kernel)
    assert (int(state["count"]), int(state["steps"]), state["decay"]) == (4, 4, 0.8)
    assert cb.config.decay == 0.8


def test_decay_adopted_by_set_state_reaches_the_rebuilt_step() -> None:
    """With decay 0 adopted between fits (JAX caches traces), the state is the last batch's
    direction mean, from materialised per-example gradients (lr 0: the weights stay put)."""
    model, kernel, bias = softmax_head()
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(64, 5)).astype("float32"), rng.integers(0, 3, 64)
    cb = GradTailCallback(decay=0.9)
    model.fit(x, y, callbacks=[cb], **FIT)
    state = cb.get_state()
    state["decay"] = 0.0
    cb.set_state(state)
    assert cb.config.decay == 0.0
    model.fit(x, y, callbacks=[cb], **FIT)
    gt = ReferenceGradTail(decay=0.0)
    xl = x[48:].astype(np.float64)
    gt.step(ref.per_example_linear_grads(xl, softmax(xl @ kernel + bias) - np.eye(3)[y[48:]], bias=True))
    got = cb.get_state()
    assert int(got["count"]) == 8
    np.testing.assert_allclose(flat_mean(got), gt.state(), rtol=1e-4, atol=1e-6)


def test_set_state_from_a_callback_mid_fit_sticks() -> None:
    """The reset after step 2 of 4 leaves 2 counted steps (on JAX: after a state sync)."""
    model, _, _ = softmax_head()
    x, y = np.random.default_rng(1).normal(size=(64, 5)).astype("float32"), np.arange(64) % 3
    cb = GradTailCallback(decay=0.9)
    reset = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: cb.set_state(ZERO) if batch == 1 else None
    )
    model.fit(x, y, callbacks=[cb, reset], **FIT)
    assert int(cb.get_state()["count"]) == 2


def test_empty_batch_changes_nothing() -> None:
    model, _, _ = softmax_head()
    cb = GradTailCallback(decay=0.9)
    cb.set_model(model)
    x, y = np.random.default_rng(2).normal(size=(16, 5)).astype("float32"), np.arange(16) % 3
    cb.batch_weights(x, y)
    cb.batch_weights(x, y)
    before = cb.get_state()
    weights = cb.batch_weights(x[:0], y[:0])
    assert weights.shape == (0,)
    after = cb.get_state()
    for key in ("total", "count", "steps"):
        np.testing.assert_array_equal(after[key], before[key])
    np.testing.assert_array_equal(flat_mean(after), flat_mean(before))

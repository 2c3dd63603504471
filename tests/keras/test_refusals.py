"""What the callback refuses, and when: options at construction, models at fit start."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from gradtail_keras import GradTailCallback
from gradtail_ops import GradTailConfig
from tests.keras._helpers import assert_raises, long_tail_data


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"decay": 2.0}, "decay"),
        ({"decay": float("nan")}, "decay"),
        ({"max_weight": 0.5}, "max_weight"),
        ({"max_weight": float("inf")}, "max_weight"),
        ({"quantile": 1.5}, "quantile"),
        ({"temperature": float("nan")}, "temperature"),
        ({"eps": -1.0}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"reference": "x"}, "reference"),
        ({"method": "x"}, "method"),
        ({"memory_size": 0}, "memory_size"),
        ({"memory_size": 8, "memory_decay": 1.0}, "memory_decay"),
        ({"memory_eta": float("nan")}, "memory_eta"),
        ({"memory_size": 8, "memory_max_weight": 0.5}, "memory_max_weight"),
        ({"layer": 3}, "layer"),
        ({"decays": 0.9}, "decays"),
    ],
)
def test_invalid_options_are_refused_at_construction(options: dict[str, Any], name: str) -> None:
    assert_raises(lambda: GradTailCallback(**options), (ValueError, TypeError), name, "Received:")


def test_config_and_flat_options_together_are_refused() -> None:
    assert_raises(
        lambda: GradTailCallback(config=GradTailConfig(), decay=0.9), (TypeError,), "config", "Received:"
    )


def _refused_at_fit(
    model: keras.Model, y: Any, fragment: str, error: Any = ValueError, **options: Any
) -> None:
    """``fit`` with the callback raises ``error`` naming ``fragment``; the model is unwrapped."""
    x, _ = long_tail_data(64)
    assert_raises(
        lambda: model.fit(x, y, batch_size=16, verbose=0, callbacks=[GradTailCallback(**options)]),
        error,
        fragment,
        "Received:",
    )
    for name in ("compute_loss", "train_step", "test_step"):
        assert name not in model.__dict__, name


def _functional(outputs_from: Any) -> tuple[keras.Model, Any]:
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4)(inputs)
    return keras.Model(inputs, outputs_from(hidden)), hidden


class _OwnDense(keras.layers.Dense):
    def call(self, x: Any, training: Any = None) -> Any:
        return super().call(x) * 1.0


@pytest.mark.parametrize(
    "case", ["activation after the layer", "unknown layer name", "inner layer", "dense subclass"]
)
def test_unsupported_model_fails_at_fit_start(case: str) -> None:
    """Refused before any step (weights unchanged), with a "Received:" message, and unwrapped."""
    softmax_head = lambda h: keras.layers.Dense(3, activation="softmax")(h)  # noqa: E731
    if case == "activation after the layer":
        model, _ = _functional(lambda h: keras.layers.Activation("softmax")(keras.layers.Dense(3)(h)))
        kwargs, message = {}, "output comes from Activation"
    elif case == "unknown layer name":
        model, _ = _functional(softmax_head)
        kwargs, message = {"layer": "nope"}, "names no layer"
    elif case == "inner layer":
        model, _ = _functional(softmax_head)
        inner = next(m for m in model.layers if isinstance(m, keras.layers.Dense))
        kwargs, message = {"layer": inner.name}, "produce the model's output"
    else:
        model, _ = _functional(lambda h: _OwnDense(3, activation="softmax")(h))
        kwargs, message = {}, "a Dense subclass with its own call"
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    _refused_at_fit(model, long_tail_data(64)[1], message, (ValueError, TypeError), **kwargs)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_model_overriding_compute_loss_is_refused() -> None:
    class OwnLoss(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):  # type: ignore[no-untyped-def]
            return keras.ops.mean(y_pred)

    inputs = keras.Input((6,))
    model = OwnLoss(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(optimizer="sgd")
    _refused_at_fit(model, long_tail_data(64)[1], "overriding compute_loss")


def test_two_outputs_are_refused() -> None:
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4)(inputs)
    two = keras.Model(
        inputs, [keras.layers.Dense(3, activation="softmax")(hidden), keras.layers.Dense(1)(hidden)]
    )
    two.compile(optimizer="sgd", loss=["sparse_categorical_crossentropy", "mse"])
    x, y = long_tail_data(64)
    assert_raises(
        lambda: two.fit(x, [y, x[:, :1]], epochs=1, verbose=0, callbacks=[GradTailCallback()]),
        (ValueError,),
        "one output",
        "Received:",
    )


def test_subclassed_model_output_is_checked_in_the_first_step() -> None:
    class Subclassed(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.head = keras.layers.Dense(3)

        def call(self, x: Any) -> Any:
            return keras.ops.softmax(self.head(x))

    sub = Subclassed()
    sub.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    # Restored although fit never reached on_train_end.
    _refused_at_fit(sub, long_tail_data(64)[1], "produce the model's output")


def test_train_step_bypassing_compute_loss_is_detected() -> None:
    class Bypass(keras.Sequential):  # a train step that never calls compute_loss
        def _compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):  # type: ignore[no-untyped-def]
            return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, y_pred))

    bypass = Bypass([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    bypass.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    _refused_at_fit(bypass, long_tail_data(64)[1], "did not call it", RuntimeError)


def test_batch_level_loss_is_refused() -> None:
    """A loss whose call() returns one value per batch (Dice, axis=None): refused, model restored."""
    dice = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="sigmoid")])
    dice.compile(optimizer="sgd", loss=keras.losses.Dice())
    y_multi = (np.random.default_rng(0).random((64, 3)) > 0.5).astype("float32")
    _refused_at_fit(dice, y_multi, "Dice")

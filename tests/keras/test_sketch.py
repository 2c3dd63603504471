"""The sketched reference (``sketch_rank``) in the Keras callback: exact on low-rank gradient
streams (against the float64 policy loop), saved and restored whole, refused where it does
not fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from gradtail_keras import GradTailCallback
from tests import reference as ref
from tests.keras._helpers import ReferenceGradTail, assert_raises

D_IN, UNITS, RANK, BATCH = 96, 80, 2, 10
OPTIONS: dict[str, Any] = {"decay": 0.7, "kind": "sigmoid", "threshold": 0.3, "temperature": 0.2}
SKETCH = {"sketch_rank": 3, "sketch_size": 7}  # 4 * (3 + 7) * (96 + 80) <= 96 * 80: sketched


class LinearLoss(keras.losses.Loss):  # type: ignore[misc]
    """``sum(y_true * y_pred)`` per example: the gradient at the output is ``y_true`` itself."""

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return keras.ops.sum(y_true * y_pred, axis=-1)


def _low_rank_batches(steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and output gradients in fixed rank-2 subspaces: every reference has rank <= 2."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(UNITS, RANK)), rng.normal(size=(D_IN, RANK))
    x = rng.normal(size=(steps * BATCH, RANK)) @ v.T
    d = rng.normal(size=(steps * BATCH, RANK)) @ u.T
    d[::BATCH] += 0.5 * u[:, 0]  # one example per batch leans away from the rest
    return x.astype("float32"), d.astype("float32")


def _model() -> keras.Model:
    model = keras.Sequential([keras.Input((D_IN,)), keras.layers.Dense(UNITS, name="head")])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=LinearLoss())
    return model


def test_sketched_callback_matches_the_float64_loop_on_a_low_rank_stream() -> None:
    steps = 4
    x, d = _low_rank_batches(steps)
    sketched, exact = GradTailCallback(**OPTIONS, **SKETCH), GradTailCallback(**OPTIONS)
    logs = {}
    for name, cb in (("sketch", sketched), ("exact", exact)):
        model = _model()
        history = model.fit(x, d, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
        logs[name] = history.history
    state = sketched.get_state()
    omega, psi = state["sketch"][0]
    assert [np.shape(t) for t in state["mean"][0]] == [(UNITS, 3), (7, D_IN), (UNITS,)]
    assert (np.shape(omega), np.shape(psi)) == ((D_IN, 3), (7, UNITS))
    assert "sketch" not in exact.get_state()
    gt = ReferenceGradTail(**OPTIONS)
    weights, alignments = [], []
    for k in range(steps):
        part = slice(k * BATCH, (k + 1) * BATCH)
        w, a = gt.step(ref.per_example_linear_grads(x[part], d[part], bias=True))
        weights.append(w)
        alignments.append(np.nan_to_num(a))
    assert np.ptp(np.concatenate(weights)) > 0.1, "the weights must differ for the check to bite"
    for name in ("sketch", "exact"):
        np.testing.assert_allclose(logs[name]["gradtail_weight_mean"], np.mean(weights), rtol=1e-5)
        np.testing.assert_allclose(logs[name]["gradtail_alignment"], np.mean(alignments), atol=1e-5)
    # After the fit, the next batch's weights from both callbacks and from the loop.
    xb, db = _low_rank_batches(1, seed=1)
    want, _ = gt.step(ref.per_example_linear_grads(xb, db, bias=True))
    for cb in (sketched, exact):
        np.testing.assert_allclose(cb.batch_weights(xb, db), want, rtol=1e-4)


def test_sketched_state_saves_and_loads_whole(tmp_path: Path) -> None:
    x, d = _low_rank_batches(3)
    cb = GradTailCallback(**OPTIONS, **SKETCH)
    _model().fit(x, d, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    path = tmp_path / "gradtail.npz"
    cb.save_state(path)
    restored = GradTailCallback(**OPTIONS, **SKETCH)
    restored.load_state(path)  # before fit: kept, and checked against the layer at fit start
    model = _model()
    restored.set_model(model)
    xb, db = _low_rank_batches(1, seed=2)
    np.testing.assert_array_equal(restored.batch_weights(xb, db), cb.batch_weights(xb, db))
    saved, loaded = cb.get_state(), restored.get_state()
    pairs = zip(saved["sketch"][0] + saved["mean"][0], loaded["sketch"][0] + loaded["mean"][0], strict=True)
    for a, b in pairs:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_small_layer_stays_exact_and_an_exact_state_is_refused_by_a_sketch() -> None:
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    cb = GradTailCallback(sketch_rank=4)
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(32, 6)), rng.integers(0, 3, 32), verbose=0, callbacks=[cb])
    assert "sketch" not in cb.get_state()  # 3 x 6: a sketch would not be smaller
    exact = GradTailCallback(**OPTIONS)
    _model().fit(*_low_rank_batches(1), batch_size=BATCH, verbose=0, callbacks=[exact])
    sketched = GradTailCallback(**OPTIONS, **SKETCH)
    _model().fit(*_low_rank_batches(1), batch_size=BATCH, verbose=0, callbacks=[sketched])
    assert_raises(lambda: sketched.set_state(exact.get_state()), (ValueError, TypeError), "sketch")
    assert_raises(lambda: exact.set_state(sketched.get_state()), (ValueError, TypeError), "sketch")


def test_state_metric_config_is_plain_data_and_round_trips() -> None:
    from gradtail_keras._state import GradTailState

    state = GradTailState(UNITS, D_IN, True, sketch=gt_sketch_config())
    config = state.get_config()
    assert config["sketch"] == {"rank": 3, "size": 7, "seed": 0}
    again = GradTailState.from_config(config)
    assert again.sketch == state.sketch
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(again.sketch_omega), keras.ops.convert_to_numpy(state.sketch_omega)
    )


def gt_sketch_config() -> Any:
    from gradtail_ops import SketchConfig

    return SketchConfig(rank=SKETCH["sketch_rank"], size=SKETCH["sketch_size"])


@pytest.mark.parametrize("sketch_rank", [0, 2.5])
def test_sketch_options_are_validated_at_construction(sketch_rank: Any) -> None:
    assert_raises(lambda: GradTailCallback(sketch_rank=sketch_rank), (ValueError, TypeError), "sketch_rank")

"""Worker for tests/test_keras_adapter.py: one Keras backend per process.

Run as ``KERAS_BACKEND=<backend> python -m tests._keras_worker <group>`` (``numerics``, ``api``
or ``all``) from the repository root. It runs every check of the group, catching each
failure, and prints one JSON line ``{"check name": "ok" | traceback}``; the test asserts that
all are "ok". The references are
float64 NumPy (tests/reference.py: materialised per-example gradients), never the code under test.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from tests import reference as ref

CHECKS: dict[str, dict[str, Callable[[], None]]] = {"numerics": {}, "api": {}}


def check(group: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        CHECKS[group][fn.__name__] = fn
        return fn

    return register


def expect_error(fn: Callable[[], Any], types: tuple[type[Exception], ...], *fragments: str) -> None:
    """Run ``fn``; it must raise one of ``types`` with every fragment in its message."""
    try:
        fn()
    except types as exc:
        missing = [f for f in fragments if f not in str(exc)]
        if missing:
            raise AssertionError(f"{missing} not in the message: {exc}") from exc
    else:
        raise AssertionError(f"no error; expected one with {fragments}")


def keras_mod() -> Any:
    import keras

    return keras


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class ReferenceGradTail:
    """GradTail from its definition, in float64: cosine against the bias-corrected EMA of
    earlier batches' references, rank or sigmoid curve, optional normalisation."""

    def __init__(
        self,
        *,
        decay: float,
        reference: str,
        kind: str,
        max_weight: float,
        quantile: float = 0.3,
        normalize: bool = True,
    ) -> None:
        self.decay, self.reference, self.kind = decay, reference, kind
        self.max_weight, self.quantile, self.normalize = max_weight, quantile, normalize
        self.history: list[np.ndarray] = []

    def step(self, per_example: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        flat = ref.flatten_examples(per_example)
        if self.history:
            mean = ref.ema(self.history, [self.decay] * len(self.history))
            align = ref.cosine_rows(flat, mean)
            if self.kind == "rank":
                w = ref.rank_weights(align, self.quantile, self.max_weight)
            else:
                w = np.array([1 + (self.max_weight - 1) * ref.sigmoid(-a / 0.1) for a in align])
            if self.normalize:
                w = w / w.mean()
        else:
            align, w = np.zeros(flat.shape[0]), np.ones(flat.shape[0])
        norms = np.sqrt((flat**2).sum(axis=1))
        coef = (
            np.where(norms > 0, 1 / np.where(norms > 0, norms, 1), 0) if self.reference == "direction" else 1
        )
        self.history.append((coef * flat.T).T.mean(axis=0) if self.reference == "direction" else flat.mean(0))
        return w, align

    def state(self) -> np.ndarray:
        return ref.ema(self.history, [self.decay] * len(self.history))


def tiny_problem(
    seed: int = 0, batch: int = 16, steps: int = 4, d_in: int = 5, hidden: int = 6, classes: int = 3
):
    rng = np.random.default_rng(seed)
    params = [
        rng.normal(size=(d_in, hidden)) * 0.8,
        0.1 * rng.normal(size=hidden),
        rng.normal(size=(hidden, classes)),
        0.1 * rng.normal(size=classes),
    ]
    x = rng.normal(size=(batch * steps, d_in))
    y = rng.integers(0, classes, batch * steps)
    return params, x, y


def tiny_model(params: list[np.ndarray], *, lr: float = 0.5) -> Any:
    keras = keras_mod()
    d_in, hidden = params[0].shape
    classes = params[2].shape[1]
    model = keras.Sequential(
        [
            keras.Input((d_in,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(classes, activation="softmax", name="head"),
        ]
    )
    model.set_weights([p.astype("float32") for p in params])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="sparse_categorical_crossentropy")
    return model


def simulate_sgd(params, x, y, sw, batch, lr, gt: ReferenceGradTail | None):
    """Float64 SGD on mean_i(s_i w_i L_i) for the tanh -> softmax model, per-example head
    gradients materialised for the GradTail reference."""
    w1, b1, w2, b2 = (np.asarray(p, np.float64) for p in params)
    for start in range(0, len(x), batch):
        xb, yb, sb = x[start : start + batch], y[start : start + batch], sw[start : start + batch]
        h = np.tanh(xb @ w1 + b1)
        p = softmax(h @ w2 + b2)
        d = p - np.eye(w2.shape[1])[yb]  # dL_i/dz_i of each example's own loss
        if gt is None:
            w = np.ones(len(xb))
        else:
            w, _ = gt.step(ref.per_example_linear_grads(h, d, bias=True))
        dz = (sb * w)[:, None] * d / len(xb)
        dh = (dz @ w2.T) * (1 - h**2)
        w2, b2 = w2 - lr * h.T @ dz, b2 - lr * dz.sum(0)
        w1, b1 = w1 - lr * xb.T @ dh, b1 - lr * dh.sum(0)
    return [w1, b1, w2, b2]


# ------------------------------------------------------------------------------ numerics
@check("numerics")
def fit_matches_float64_reference_with_sample_weights() -> None:
    """In-step weights: fit (SGD) equals float64 SGD on mean(s_i w_i L_i), with w from the
    materialised per-example gradients; and differs from the unweighted run."""
    from gradtail_keras import GradTailCallback

    params, x, y = tiny_problem()
    batch, lr = 16, 0.5
    sw = np.random.default_rng(1).uniform(0.5, 2.0, len(x))
    for kind, reference in (("rank", "direction"), ("sigmoid", "mean")):
        options = {
            "decay": 0.8,
            "reference": reference,
            "kind": kind,
            "max_weight": 3.0,
            "normalize": kind == "rank",
        }
        model = tiny_model(params, lr=lr)
        cb = GradTailCallback(**options)
        model.fit(
            x.astype("float32"),
            y,
            sample_weight=sw.astype("float32"),
            batch_size=batch,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[cb],
        )
        gt = ReferenceGradTail(**options)
        expected = simulate_sgd(params, x, y, sw, batch, lr, gt)
        for got, want in zip(model.get_weights(), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=f"{kind}/{reference}")
        unweighted = simulate_sgd(params, x, y, sw, batch, lr, None)
        assert np.abs(unweighted[2] - expected[2]).max() > 1e-3, "the problem cannot tell weighting apart"
        state = cb.get_state()
        assert int(state["count"]) == len(x) // batch
        want_w2 = gt.state()  # flattened (W (classes, hidden), b)
        got_flat = np.concatenate([state["mean"][0][0].ravel(), state["mean"][0][1].ravel()])
        np.testing.assert_allclose(got_flat, want_w2, rtol=1e-4, atol=1e-6)


@check("numerics")
def max_weight_one_is_bitwise_identical() -> None:
    from gradtail_keras import GradTailCallback

    params, x, y = tiny_problem(seed=3)
    keras = keras_mod()
    runs = []
    for callbacks in ([], [GradTailCallback(max_weight=1.0, decay=0.5)]):
        model = tiny_model(params)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
        model.fit(
            x.astype("float32"), y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=callbacks
        )
        runs.append(model.get_weights())
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


@check("numerics")
def sequence_regression_batch_weights_match_reference() -> None:
    """(B, T, d) inputs, linear Dense, MSE: per-example gradients summed over T, materialised."""
    from gradtail_keras import GradTailCallback

    keras = keras_mod()
    rng = np.random.default_rng(5)
    batch, steps, d_in, d_out = 8, 4, 3, 2
    kernel, bias = rng.normal(size=(d_in, d_out)), rng.normal(size=d_out)
    model = keras.Sequential([keras.Input((steps, d_in)), keras.layers.Dense(d_out)])
    model.set_weights([kernel.astype("float32"), bias.astype("float32")])
    model.compile(optimizer="sgd", loss="mse")
    cb = GradTailCallback(decay=0.7, reference="direction", kind="rank", max_weight=2.5, normalize=True)
    cb.set_model(model)
    gt = ReferenceGradTail(decay=0.7, reference="direction", kind="rank", max_weight=2.5)
    for _ in range(3):
        x, y = rng.normal(size=(batch, steps, d_in)), rng.normal(size=(batch, steps, d_out))
        got = cb.batch_weights(x.astype("float32"), y.astype("float32"))
        z = x @ kernel + bias
        d = 2 * (z - y) / d_out  # d(mean over the last axis of squared errors)/dz
        want, _ = gt.step(ref.per_example_linear_grads(x, d, bias=True))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(cb.get_state()["count"]) == 3


@check("numerics")
def same_weights_as_gradtail_torch() -> None:
    """Same tiny model, weights and batches: the callback's weights and state equal GradTail's."""
    import torch
    import torch.nn.functional as F

    from gradtail_keras import GradTailCallback
    from gradtail_torch import GradTail

    params, x, y = tiny_problem(seed=11, batch=12, steps=3)
    options = {"decay": 0.9, "reference": "direction", "max_weight": 3.0}
    model = tiny_model(params)
    cb = GradTailCallback(**options)
    cb.set_model(model)
    torch_model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for layer, (k, b) in ((torch_model[0], params[:2]), (torch_model[2], params[2:])):
            layer.weight.copy_(torch.tensor(k.T, dtype=torch.float32))
            layer.bias.copy_(torch.tensor(b, dtype=torch.float32))
    gt = GradTail(torch_model[2], **options)
    for start in range(0, len(x), 12):
        xb, yb = x[start : start + 12].astype("float32"), y[start : start + 12]
        got = cb.batch_weights(xb, yb)
        logits = torch_model(torch.tensor(xb))
        want = gt.weights(F.cross_entropy(logits, torch.tensor(yb), reduction="none"))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    state, torch_state = cb.get_state(), gt.state_dict()
    for a, b in zip(state["mean"][0], torch_state["mean"][0], strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)
    assert int(state["count"]) == int(torch_state["count"]) == 3
    # States move between the adapters.
    cb2 = GradTailCallback(**options)
    cb2.set_state(torch_state)
    np.testing.assert_allclose(cb2.get_state()["mean"][0][0], torch_state["mean"][0][0].numpy())


# ----------------------------------------------------------------------------------- api
def long_tail_data(n: int = 192, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = ((x[:, 0] > 0.9).astype("int32") + (x[:, 1] > 1.4).astype("int32")).astype("int32")
    return x, y


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


@check("api")
def common_losses_match_analytic_output_gradients() -> None:
    """One Dense (inputs = x): weights equal the reference from each loss's analytic
    per-example output gradient (float64), for the common Keras losses."""
    from gradtail_keras import GradTailCallback

    keras = keras_mod()
    rng = np.random.default_rng(2)
    batch, d_in = 16, 4
    delta = 0.5
    huber = lambda e: np.where(np.abs(e) <= delta, e, delta * np.sign(e))  # noqa: E731
    cases = [  # loss, units, activation, targets(rng), d(z, y)
        (
            "sparse_categorical_crossentropy",
            3,
            "softmax",
            lambda: rng.integers(0, 3, batch),
            lambda z, y: softmax(z) - np.eye(3)[y],
        ),
        (
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            3,
            None,
            lambda: rng.integers(0, 3, batch),
            lambda z, y: softmax(z) - np.eye(3)[y],
        ),
        (
            "categorical_crossentropy",
            3,
            "softmax",
            lambda: np.eye(3)[rng.integers(0, 3, batch)],
            lambda z, y: softmax(z) - y,
        ),
        (
            "binary_crossentropy",
            1,
            "sigmoid",
            lambda: rng.integers(0, 2, (batch, 1)).astype(float),
            lambda z, y: sigmoid(z) - y,
        ),
        ("mse", 2, None, lambda: rng.normal(size=(batch, 2)), lambda z, y: 2 * (z - y) / 2),
        ("mae", 2, None, lambda: rng.normal(size=(batch, 2)), lambda z, y: np.sign(z - y) / 2),
        (
            keras.losses.Huber(delta=delta),
            2,
            None,
            lambda: rng.normal(size=(batch, 2)),
            lambda z, y: huber(z - y) / 2,
        ),
    ]
    for loss, units, activation, targets, grad in cases:
        name = loss if isinstance(loss, str) else type(loss).__name__
        kernel, bias = rng.normal(size=(d_in, units)), 0.1 * rng.normal(size=units)
        model = keras.Sequential([keras.Input((d_in,)), keras.layers.Dense(units, activation=activation)])
        model.set_weights([kernel.astype("float32"), bias.astype("float32")])
        model.compile(optimizer="sgd", loss=loss)
        cb = GradTailCallback(decay=0.6, kind="sigmoid", max_weight=3.0, normalize=False)
        cb.set_model(model)
        gt = ReferenceGradTail(
            decay=0.6, reference="direction", kind="sigmoid", max_weight=3.0, normalize=False
        )
        for _ in range(2):
            x, y = rng.normal(size=(batch, d_in)), targets()
            got = cb.batch_weights(x.astype("float32"), y.astype("float32"))
            want, _ = gt.step(ref.per_example_linear_grads(x, grad(x @ kernel + bias, y), bias=True))
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)


@check("api")
def classification_and_regression_fit_end_to_end() -> None:
    from gradtail_keras import GradTailCallback

    keras = keras_mod()
    x, y = long_tail_data()
    target = (x[:, :2] @ np.array([[1.0], [-2.0]], "float32")) ** 2
    for loss, units, activation, targets in (
        ("binary_crossentropy", 1, "sigmoid", (y > 0).astype("float32")),
        ("mse", 1, None, target),
    ):
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
        assert np.all(np.isfinite(logs["loss"])), loss
        assert int(cb.get_state()["count"]) == 2 * len(x) // 32, loss
        np.testing.assert_allclose(logs["gradtail_weight_mean"], 1.0, rtol=1e-5, err_msg=loss)
        # Rank curve, quantile 0.3: 10 of 32 examples a batch once a reference exists.
        assert 0.2 < logs["gradtail_upweighted"][-1] < 0.35, (loss, logs["gradtail_upweighted"])
        assert -1.0 <= logs["gradtail_alignment"][-1] <= 1.0, loss


@check("api")
def logs_history_validation_and_no_jax_sync() -> None:
    from gradtail_keras import GradTailCallback

    keras = keras_mod()
    x, y = long_tail_data()
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    synced: list[bool] = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            # self._model: on JAX, Callback.model itself syncs the state.
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
    if keras.backend.backend() == "jax":
        assert synced
        assert not any(synced), "the callback forced a JAX state sync between steps"
        # Batch ends stay asynchronous (no host round trip for the logs after every step).
        callbacks = keras.callbacks.CallbackList([GradTailCallback()], model=model)
        assert callbacks._async_train
    # Detached after fit: no metric left, plain evaluate/predict and a later fit without it work.
    assert "gradtail" not in model.metrics_names
    model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=1, verbose=0)
    # Repeated fits reuse the callback's step function (no recompiling) and restore the plain one.
    plain_fn = model.train_function
    cb = GradTailCallback()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[cb])
    assert cb._step_cache is not None
    gt_fn = cb._step_cache["functions"]["train_function"]
    assert model.train_function is plain_fn
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[cb])
    assert cb._step_cache["functions"]["train_function"] is gt_fn
    assert int(cb.get_state()["count"]) == 2 * 6  # 192 examples, batches of 32, two fits


@check("api")
def unsupported_models_fail_at_fit_start() -> None:
    from gradtail_keras import GradTailCallback

    keras = keras_mod()
    x, y = long_tail_data(64)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4)(inputs)

    def build(outputs: Any, loss: Any = "sparse_categorical_crossentropy") -> Any:
        model = keras.Model(inputs, outputs)
        model.compile(optimizer="sgd", loss=loss)
        return model

    class OwnLoss(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return keras.ops.mean(y_pred)

    class OwnDense(keras.layers.Dense):
        def call(self, x, training=None):
            return super().call(x) * 1.0

    own = OwnLoss(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    own.compile(optimizer="sgd")
    cases = [
        (
            build(keras.layers.Activation("softmax")(keras.layers.Dense(3)(hidden))),
            {},
            "output comes from Activation",
        ),
        (build(keras.layers.Dense(3, activation="softmax")(hidden)), {"layer": "nope"}, "names no layer"),
        (
            build(keras.layers.Dense(3, activation="softmax")(hidden)),
            {"layer": hidden._keras_history.operation.name},
            "produce the model's output",
        ),
        (own, {}, "overriding compute_loss"),
        (build(OwnDense(3, activation="softmax")(hidden)), {}, "a Dense subclass with its own call"),
    ]
    two = keras.Model(
        inputs, [keras.layers.Dense(3, activation="softmax")(hidden), keras.layers.Dense(1)(hidden)]
    )
    two.compile(optimizer="sgd", loss=["sparse_categorical_crossentropy", "mse"])
    for model, kwargs, message in cases:
        before = [w.copy() for w in model.get_weights()]
        expect_error(
            lambda m=model, k=kwargs: m.fit(x, y, epochs=1, verbose=0, callbacks=[GradTailCallback(**k)]),
            (ValueError, TypeError),
            message,
            "Received:",
        )
        for a, b in zip(before, model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)  # failed before any step
        assert "compute_loss" not in model.__dict__ or message == "overriding compute_loss"
    expect_error(
        lambda: two.fit(x, [y, x[:, :1]], epochs=1, verbose=0, callbacks=[GradTailCallback()]),
        (ValueError,),
        "one output",
        "Received:",
    )

    class Subclassed(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.head = keras.layers.Dense(3)

        def call(self, x: Any) -> Any:
            return keras.ops.softmax(self.head(x))

    sub = Subclassed()
    sub.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    expect_error(  # subclassed: caught inside the first step
        lambda: sub.fit(x, y, epochs=1, verbose=0, callbacks=[GradTailCallback()]),
        (ValueError,),
        "produce the model's output",
        "Received:",
    )
    assert "compute_loss" not in sub.__dict__  # restored although fit never reached on_train_end

    class Bypass(keras.Sequential):  # a train step that never calls compute_loss
        def _compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, y_pred))

    bypass = Bypass([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    bypass.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    expect_error(
        lambda: bypass.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[GradTailCallback()]),
        (RuntimeError,),
        "did not call it",
        "Received:",
    )
    assert "compute_loss" not in bypass.__dict__
    for bad, message in (
        ({"decay": 2.0}, "decay"),
        ({"max_weight": 0.5}, "max_weight"),
        ({"layer": 3}, "layer"),
        ({"reference": "x"}, "reference"),
        ({"method": "x"}, "method"),
    ):
        expect_error(lambda b=bad: GradTailCallback(**b), (ValueError, TypeError), message, "Received:")


@check("api")
def config_and_state_round_trips() -> None:
    from gradtail_keras import GradTailCallback

    keras = keras_mod()
    cb = GradTailCallback(
        layer="head",
        decay=0.8,
        reference="mean",
        warmup_steps=2,
        kind="zscore",
        max_weight=2.0,
        threshold=-0.5,
        temperature=0.2,
        quantile=0.1,
        floor=-0.3,
        normalize=False,
        eps=1e-8,
        method="ghost",
    )
    config = cb.get_config()
    again = GradTailCallback.from_config(json.loads(json.dumps(config)))
    assert again.get_config() == config
    assert again.curve == cb.curve

    params, x, y = tiny_problem(seed=4, steps=8)
    xb = x.astype("float32")
    first, second = slice(0, 64), slice(64, 128)

    def run(model: Any, cb: GradTailCallback, part: slice) -> None:
        model.fit(xb[part], y[part], batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])

    straight_model, straight = tiny_model(params), GradTailCallback(decay=0.8)
    run(straight_model, straight, first)
    run(straight_model, straight, second)
    # Resume: the model's weights through a .keras checkpoint, the state through save/load_state.
    a_model, a_cb = tiny_model(params), GradTailCallback(decay=0.8)
    run(a_model, a_cb, first)
    folder = tempfile.mkdtemp()
    a_model.save(os.path.join(folder, "m.keras"))
    a_cb.save_state(os.path.join(folder, "gradtail.npz"))
    restored = keras.saving.load_model(os.path.join(folder, "m.keras"))
    b_cb = GradTailCallback(decay=0.8)
    b_cb.load_state(os.path.join(folder, "gradtail.npz"))
    run(restored, b_cb, second)
    for got, want in zip(restored.get_weights(), straight_model.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # Without the state the resumed run differs (the test can fail).
    fresh_model = keras.saving.load_model(os.path.join(folder, "m.keras"))
    run(fresh_model, GradTailCallback(decay=0.8), second)
    assert np.abs(fresh_model.get_weights()[2] - straight_model.get_weights()[2]).max() > 1e-5
    expect_error(
        lambda: b_cb.set_state({"mean": [[np.zeros((2, 2))]], "total": 0.0, "count": 0}),
        (ValueError,),
        "does not fit the tracked layer",
        "Received:",
    )


@check("api")
def review_regressions() -> None:
    """Fixed review findings: a decay adopted between fits reaches the (JAX-cached) step; an
    inference forward between steps is not scored; set_state mid-fit sticks (JAX); memory keys
    and batch-level losses are refused; Keras masks are honoured by the scoring."""
    from gradtail_keras import GradTailCallback

    keras = keras_mod()
    rng = np.random.default_rng(11)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.integers(0, 3, 64)
    kernel, bias = rng.normal(size=(5, 3)), 0.1 * rng.normal(size=3)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
    model.set_weights([kernel.astype("float32"), bias.astype("float32")])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    fit = {"batch_size": 16, "epochs": 1, "shuffle": False, "verbose": 0}

    # Decay adopted by set_state between fits: with decay 0 the state is the last batch's
    # direction mean, from materialised per-example gradients (lr 0: the weights stay put).
    cb = GradTailCallback(decay=0.9)
    model.fit(x, y, callbacks=[cb], **fit)
    state = cb.get_state()
    state["decay"] = 0.0
    cb.set_state(state)
    probe_calls: list[int] = []

    class Probe(keras.callbacks.Callback):  # an inference forward before every step
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self.model(x[:4], training=False)
            self.model(x[:4])  # training unset: outside the train step all the same
            probe_calls.append(batch)

    model.fit(x, y, callbacks=[cb, Probe()], **fit)
    assert len(probe_calls) == 4
    p = softmax(x[48:].astype(np.float64) @ kernel + bias)
    gt = ReferenceGradTail(decay=0.0, reference="direction", kind="rank", max_weight=3.0)
    gt.step(ref.per_example_linear_grads(x[48:], p - np.eye(3)[y[48:]], bias=True))
    got = cb.get_state()
    assert int(got["count"]) == 8
    got_flat = np.concatenate([got["mean"][0][0].ravel(), got["mean"][0][1].ravel()])
    np.testing.assert_allclose(got_flat, gt.state(), rtol=1e-4, atol=1e-6)

    # set_state from another callback mid-fit: the reset after step 2 of 4 leaves 2 counted steps.
    zero = {"mean": [[np.zeros((3, 5)), np.zeros(3)]], "total": 0.0, "count": 0}
    reset = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: cb.set_state(zero) if batch == 1 else None
    )
    model.fit(x, y, callbacks=[cb, reset], **fit)
    assert int(cb.get_state()["count"]) == 2, cb.get_state()["count"]

    # A gradtail_torch state with a per-example memory: refused, naming the keys.
    with_memory = dict(zero, memory_score=np.zeros(8), memory_visits=np.zeros(8), memory_decay=0.9)
    expect_error(
        lambda: cb.set_state(with_memory), (ValueError,), "memory_score", "memory_visits", "Received:"
    )

    # A loss whose call() returns one value per batch (Dice, axis=None): refused, model restored.
    dice = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="sigmoid")])
    dice.compile(optimizer="sgd", loss=keras.losses.Dice())
    y_multi = (rng.random((64, 3)) > 0.5).astype("float32")
    expect_error(
        lambda: dice.fit(x, y_multi, callbacks=[GradTailCallback()], **fit),
        (ValueError,),
        "Dice",
        "Received:",
    )
    assert "compute_loss" not in dice.__dict__
    assert "train_step" not in dice.__dict__

    # Masked (padded) timesteps: weights equal the reference built with masked steps' output
    # gradients zeroed, so targets that differ only there give the same weights.
    steps, vocab = 6, 10
    inp = keras.Input((steps,), dtype="int32")
    out = keras.layers.Dense(3, activation="softmax", name="head")(
        keras.layers.Embedding(vocab, 4, mask_zero=True, name="emb")(inp)
    )
    seq = keras.Model(inp, out)
    seq.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    emb = seq.get_layer("emb").get_weights()[0].astype(np.float64)
    w_head, b_head = (v.astype(np.float64) for v in seq.get_layer("head").get_weights())
    cb = GradTailCallback(decay=0.9)
    cb.set_model(seq)
    gt = ReferenceGradTail(decay=0.9, reference="direction", kind="rank", max_weight=3.0)
    for _ in range(2):
        xs = rng.integers(1, vocab, (8, steps))
        xs[:, 3:] = 0
        xs[0, 1:] = 0  # lengths 1 and 3
        ys = rng.integers(0, 3, (8, steps))
        mask = (xs != 0).astype(np.float64)
        h = emb[xs]
        ps = np.exp(h @ w_head + b_head)
        ps /= ps.sum(axis=-1, keepdims=True)
        want, _ = gt.step(ref.per_example_linear_grads(h, (ps - np.eye(3)[ys]) * mask[..., None], bias=True))
        other = np.where(mask > 0, ys, (ys + 1) % 3)
        np.testing.assert_allclose(cb.batch_weights(xs, other, update=False), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cb.batch_weights(xs, ys), want, rtol=1e-5, atol=1e-6)


def main() -> None:
    group = sys.argv[1]
    import torch

    torch.set_num_threads(1)  # the machine is shared; the models are tiny
    results: dict[str, str] = {}
    groups = list(CHECKS) if group == "all" else [group]
    for name, fn in [item for g in groups for item in CHECKS[g].items()]:
        start = time.perf_counter()
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()

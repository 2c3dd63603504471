"""The weights and the state against float64 references (materialised per-example gradients)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from gradtail_keras import GradTailCallback
from tests import reference as ref
from tests.keras._helpers import (
    ReferenceGradTail,
    flat_mean,
    sigmoid,
    simulate_sgd,
    softmax,
    softmax_head,
    tiny_model,
    tiny_problem,
    torch_twin,
)


@pytest.mark.parametrize(("kind", "reference"), [("rank", "direction"), ("sigmoid", "mean")])
def test_fit_matches_float64_sgd_with_sample_weights(kind: str, reference: str) -> None:
    """fit (SGD) equals float64 SGD on mean(s_i w_i L_i), w from the policy loop; the EMA too."""
    params, x, y = tiny_problem()
    batch, lr = 16, 0.5
    sw = np.random.default_rng(1).uniform(0.5, 2.0, len(x))
    options = {
        "decay": 0.8,
        "reference": reference,
        "kind": kind,
        "max_weight": 3.0,
        "normalize": kind == "rank",
    }
    model, cb = tiny_model(params, lr=lr), GradTailCallback(**options)
    model.fit(
        x.astype("float32"),
        y,
        sample_weight=sw.astype("float32"),
        batch_size=batch,
        shuffle=False,
        verbose=0,
        callbacks=[cb],
    )
    gt = ReferenceGradTail(**options)
    expected = simulate_sgd(params, x, y, sw, batch, lr, gt)
    for got, want in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    unweighted = simulate_sgd(params, x, y, sw, batch, lr, None)
    assert np.abs(unweighted[2] - expected[2]).max() > 1e-3, "the problem cannot tell weighting apart"
    state = cb.get_state()
    assert int(state["count"]) == int(state["steps"]) == len(x) // batch
    np.testing.assert_allclose(flat_mean(state), gt.state(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(state["total"]), gt.final["total"], rtol=1e-6)


def test_max_weight_one_trains_bit_for_bit_like_no_callback() -> None:
    params, x, y = tiny_problem(seed=3)
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


def test_sequence_regression_weights_match_reference() -> None:
    """(B, T, d) inputs, linear Dense, MSE: per-example gradients summed over T, materialised."""
    rng = np.random.default_rng(5)
    batch, steps, d_in, d_out = 8, 4, 3, 2
    kernel, bias = rng.normal(size=(d_in, d_out)), rng.normal(size=d_out)
    model = keras.Sequential([keras.Input((steps, d_in)), keras.layers.Dense(d_out)])
    model.set_weights([kernel.astype("float32"), bias.astype("float32")])
    model.compile(optimizer="sgd", loss="mse")
    options = {"decay": 0.7, "max_weight": 2.5}
    cb = GradTailCallback(**options)
    cb.set_model(model)
    gt = ReferenceGradTail(**options)
    for _ in range(3):
        x, y = rng.normal(size=(batch, steps, d_in)), rng.normal(size=(batch, steps, d_out))
        got = cb.batch_weights(x.astype("float32"), y.astype("float32"))
        d = 2 * ((x @ kernel + bias) - y) / d_out  # d(mean over the last axis of squared errors)/dz
        want, _ = gt.step(ref.per_example_linear_grads(x, d, bias=True))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(cb.get_state()["count"]) == 3


def test_same_weights_and_state_as_gradtail_torch() -> None:
    """Same model, weights and batches: the callback's weights and state equal GradTail's."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional

    from gradtail_torch import GradTail

    params, x, y = tiny_problem(seed=11, batch=12, steps=3)
    options = {"decay": 0.9, "reference": "direction", "max_weight": 3.0}
    cb = GradTailCallback(**options)
    cb.set_model(tiny_model(params))
    torch_model = torch_twin(params)
    gt = GradTail(torch_model[2], **options)
    for start in range(0, len(x), 12):
        xb, yb = x[start : start + 12].astype("float32"), y[start : start + 12]
        got = cb.batch_weights(xb, yb)
        want = gt.weights(
            functional.cross_entropy(torch_model(torch.tensor(xb)), torch.tensor(yb), reduction="none")
        )
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    state, torch_state = cb.get_state(), gt.state_dict()
    for a, b in zip(state["mean"][0], torch_state["mean"][0], strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)
    assert int(state["count"]) == int(torch_state["count"]) == 3
    moved = GradTailCallback(**options)
    moved.set_state(torch_state)  # states move between the adapters
    np.testing.assert_allclose(moved.get_state()["mean"][0][0], torch_state["mean"][0][0].numpy())


_DELTA = 0.5
# loss, units, activation, targets(rng, batch), dL/dz(z, y): each loss's analytic output gradient
_LOSSES = {
    "sparse_categorical_crossentropy": (
        "sparse_categorical_crossentropy",
        3,
        "softmax",
        lambda rng, b: rng.integers(0, 3, b),
        lambda z, y: softmax(z) - np.eye(3)[y],
    ),
    "sparse_from_logits": (
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        3,
        None,
        lambda rng, b: rng.integers(0, 3, b),
        lambda z, y: softmax(z) - np.eye(3)[y],
    ),
    "categorical_crossentropy": (
        "categorical_crossentropy",
        3,
        "softmax",
        lambda rng, b: np.eye(3)[rng.integers(0, 3, b)],
        lambda z, y: softmax(z) - y,
    ),
    "binary_crossentropy": (
        "binary_crossentropy",
        1,
        "sigmoid",
        lambda rng, b: rng.integers(0, 2, (b, 1)).astype(float),
        lambda z, y: sigmoid(z) - y,
    ),
    "mse": ("mse", 2, None, lambda rng, b: rng.normal(size=(b, 2)), lambda z, y: 2 * (z - y) / 2),
    "mae": ("mae", 2, None, lambda rng, b: rng.normal(size=(b, 2)), lambda z, y: np.sign(z - y) / 2),
    "huber": (
        lambda: keras.losses.Huber(delta=_DELTA),
        2,
        None,
        lambda rng, b: rng.normal(size=(b, 2)),
        lambda z, y: np.where(np.abs(z - y) <= _DELTA, z - y, _DELTA * np.sign(z - y)) / 2,
    ),
}


@pytest.mark.parametrize("name", list(_LOSSES))
def test_common_losses_match_analytic_output_gradients(name: str) -> None:
    """One Dense (inputs = x): weights from each loss's analytic per-example output gradient."""
    loss, units, activation, targets, grad = _LOSSES[name]
    rng = np.random.default_rng(2)
    batch, d_in = 16, 4
    kernel, bias = rng.normal(size=(d_in, units)), 0.1 * rng.normal(size=units)
    model = keras.Sequential([keras.Input((d_in,)), keras.layers.Dense(units, activation=activation)])
    model.set_weights([kernel.astype("float32"), bias.astype("float32")])
    model.compile(optimizer="sgd", loss=loss if isinstance(loss, str) else loss())
    options = {"decay": 0.6, "kind": "sigmoid", "max_weight": 3.0, "normalize": False}
    cb = GradTailCallback(**options)
    cb.set_model(model)
    gt = ReferenceGradTail(**options)
    for _ in range(2):
        x, y = rng.normal(size=(batch, d_in)), targets(rng, batch)
        got = cb.batch_weights(x.astype("float32"), y.astype("float32"))
        want, _ = gt.step(ref.per_example_linear_grads(x, grad(x @ kernel + bias, y), bias=True))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_keras_mask_zeroes_padded_timesteps() -> None:
    """Weights equal the reference with masked steps' output gradients zeroed, so targets that
    differ only there give the same weights."""
    rng = np.random.default_rng(11)
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
    gt = ReferenceGradTail(decay=0.9)
    for _ in range(2):
        xs = rng.integers(1, vocab, (8, steps))
        xs[:, 3:] = 0
        xs[0, 1:] = 0  # lengths 1 and 3
        ys = rng.integers(0, 3, (8, steps))
        mask = (xs != 0).astype(np.float64)
        h = emb[xs]
        d = (softmax(h @ w_head + b_head) - np.eye(3)[ys]) * mask[..., None]
        want, _ = gt.step(ref.per_example_linear_grads(h, d, bias=True))
        other = np.where(mask > 0, ys, (ys + 1) % 3)
        np.testing.assert_allclose(cb.batch_weights(xs, other, update=False), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cb.batch_weights(xs, ys), want, rtol=1e-5, atol=1e-6)


def test_decay_schedule_is_evaluated_at_the_steps_taken() -> None:
    """``decay=schedule(steps)`` inside the (jitted) step equals the policy loop's schedule."""
    model, kernel, bias = softmax_head(seed=5)
    cb = GradTailCallback(decay=lambda steps: keras.ops.where(steps < 2, 0.2, 0.9))
    cb.set_model(model)
    gt = ReferenceGradTail(decay=lambda steps: 0.2 if steps < 2 else 0.9)
    rng = np.random.default_rng(6)
    for _ in range(4):
        x, y = rng.normal(size=(12, 5)), rng.integers(0, 3, 12)
        got = cb.batch_weights(x.astype("float32"), y)
        want, _ = gt.step(
            ref.per_example_linear_grads(x, softmax(x @ kernel + bias) - np.eye(3)[y], bias=True)
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    state = cb.get_state()
    assert state["decay"] is None
    assert int(state["steps"]) == 4
    np.testing.assert_allclose(flat_mean(state), gt.state(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(state["total"]), gt.final["total"], rtol=1e-6)

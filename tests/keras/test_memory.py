"""The per-example memory (memory_size=), its index carried through fit in sample_weight."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from gradtail_keras import GradTailCallback
from tests.keras._helpers import (
    ReferenceGradTail,
    assert_raises,
    simulate_sgd,
    tiny_model,
    tiny_problem,
    torch_twin,
)

MEMORY = {"memory_decay": 0.6, "memory_eta": 1.5, "memory_max_weight": 2.5}


def _reference_memory(size: int) -> dict[str, float]:
    return {"size": size, "decay": 0.6, "eta": 1.5, "max_weight": 2.5}


def test_fit_with_memory_matches_float64_sgd() -> None:
    """Two epochs (revisits), the index through indexed(): fit equals float64 SGD with the
    weights of the policy loop `gradtail_loop`, and the memory equals the loop's."""
    params, x, y = tiny_problem(seed=5)
    n, batch, lr = len(x), 16, 0.5
    sw = np.ones(n)
    index = np.arange(n)
    model, cb = tiny_model(params, lr=lr), GradTailCallback(decay=0.8, memory_size=n, **MEMORY)
    model.fit(
        x.astype("float32"),
        y,
        sample_weight=GradTailCallback.indexed(index),
        batch_size=batch,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[cb],
    )
    gt = ReferenceGradTail(decay=0.8, memory=_reference_memory(n))
    expected = simulate_sgd(params, x, y, sw, batch, lr, gt, epochs=2, index=index)
    for got, want in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    plain = simulate_sgd(params, x, y, sw, batch, lr, ReferenceGradTail(decay=0.8), epochs=2)
    assert np.abs(plain[2] - expected[2]).max() > 1e-3, "the memory's weights must differ from the curve's"
    state = cb.get_state()
    np.testing.assert_allclose(state["memory_score"], gt.final["memory_score"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(state["memory_visits"], gt.final["memory_visits"])
    assert state["memory_decay"] == 0.6


def test_memory_weights_and_state_equal_gradtail_torch() -> None:
    """Same model, batches and indices (with revisits): batch_weights equals GradTail's memory
    weights, and the memory moves between the adapters."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional

    from gradtail_torch import GradTail

    params, x, y = tiny_problem(seed=12, batch=12, steps=2)
    n = len(x)
    options = {"decay": 0.9, "memory_size": n, **MEMORY}
    cb = GradTailCallback(**options)
    cb.set_model(tiny_model(params))
    torch_model = torch_twin(params)
    gt = GradTail(torch_model[2], **options)
    order = np.random.default_rng(0).permutation(np.tile(np.arange(n), 3))
    for start in range(0, len(order), 12):
        rows = order[start : start + 12]
        xb, yb = x[rows].astype("float32"), y[rows]
        got = cb.batch_weights(xb, yb, index=rows)
        losses = functional.cross_entropy(torch_model(torch.tensor(xb)), torch.tensor(yb), reduction="none")
        want = gt.weights(losses, index=torch.tensor(rows))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, 1.0)
    state, torch_state = cb.get_state(), gt.state_dict()
    np.testing.assert_allclose(
        state["memory_score"], torch_state["memory_score"].numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(state["memory_visits"], torch_state["memory_visits"].numpy())
    moved = GradTailCallback(**options)
    moved.set_state(torch_state)
    np.testing.assert_array_equal(moved.get_state()["memory_visits"], state["memory_visits"])


def test_index_follows_shuffled_examples_and_validation_split() -> None:
    """Shuffled batches: each example's running score lands in its own row (the minority, whose
    labels oppose the majority's, scores low; identical majority examples score 0 or above);
    validation rows are never visited."""
    rng = np.random.default_rng(4)
    n = 96
    x = np.tile(np.array([1.0, 0.5, -0.5, 0.2, 0.1], "float32"), (n, 1))
    minority = rng.permutation(n)[:12]
    y = np.zeros(n, "int64")
    y[minority] = 1
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    cb = GradTailCallback(decay=0.9, memory_size=n)
    history = model.fit(
        x,
        y,
        sample_weight=GradTailCallback.indexed(np.arange(n)),
        validation_split=0.25,
        batch_size=12,
        epochs=2,
        shuffle=True,
        verbose=0,
        callbacks=[cb],
    )
    assert "val_loss" in history.history
    state = cb.get_state()
    train = np.arange(72)
    visits, score = state["memory_visits"], state["memory_score"]
    assert np.all(visits[72:] == 0)
    assert visits.sum() == 2 * 72 - 12  # the first batch has no reference to score against
    seen = train[visits[train] > 0]
    is_minority = np.isin(seen, minority)
    assert is_minority.any()
    assert (~is_minority).any()
    assert np.all(score[seen[is_minority]] < -1.0), score[seen[is_minority]]
    assert np.all(score[seen[~is_minority]] > -1e-2), score[seen[~is_minority]].min()


def test_memory_without_an_index_is_refused() -> None:
    """Refused in the first step, saying how to pass the index; the model is unwrapped. (A fresh
    model each time: on JAX an error inside fit's first step leaves Keras' purged variables.)"""
    params, x, y = tiny_problem(seed=1, steps=1)
    for sample_weight in (None, np.ones(len(x), "float32")):
        model = tiny_model(params)
        assert_raises(
            lambda m=model, sw=sample_weight: m.fit(
                x.astype("float32"),
                y,
                sample_weight=sw,
                verbose=0,
                callbacks=[GradTailCallback(memory_size=len(x))],
            ),
            (ValueError,),
            "GradTailCallback.indexed",
            "Received:",
        )
        for name in ("compute_loss", "train_step", "test_step"):
            assert name not in model.__dict__, name


def test_indexed_batches_lose_nothing() -> None:
    """The index passes through fit's data pipeline exactly (int32), on JAX and torch."""
    from gradtail_keras._index import split_index

    rows = np.array([0, 1, 2**24 + 1, 2**31 - 1])
    data, index = split_index(
        (np.zeros((4, 2)), np.zeros(4), keras.ops.convert_to_tensor(GradTailCallback.indexed(rows)))
    )
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(index), rows)
    assert len(data) == 2  # (x, y): Keras' own step sees no sample weights
    weights = keras.ops.convert_to_tensor(np.ones(4, "float32"))
    assert split_index((np.zeros((4, 2)), np.zeros(4), weights))[1] is None

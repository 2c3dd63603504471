"""Shared pieces of the Keras tests: tiny problems, and float64 references built on
tests/reference.py (materialised per-example gradients, the policy loop `gradtail_loop`),
never on the code under test."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from tests import reference as ref

BACKEND = keras.backend.backend()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def assert_raises(fn: Any, types: Any, *fragments: str) -> None:
    """``fn()`` raises one of ``types`` with every fragment in its message."""
    with pytest.raises(types) as info:
        fn()
    missing = [f for f in fragments if f not in str(info.value)]
    assert not missing, f"{missing} not in the message: {info.value}"


class ReferenceGradTail:
    """GradTail step by step from the shared float64 policy loop (`ref.gradtail_loop`).

    Every call replays the loop over all batches so far: the loop is the definition, and the
    problems are tiny.
    """

    def __init__(
        self,
        *,
        decay: float,
        reference: str = "direction",
        kind: str = "rank",
        max_weight: float = 3.0,
        quantile: float = 0.3,
        normalize: bool = True,
        threshold: float = 0.0,
        temperature: float = 0.1,
        warmup_steps: int = 0,
        memory: dict[str, Any] | None = None,
    ) -> None:
        curve = {"kind": kind, "max_weight": max_weight, "normalize": normalize}
        curve |= (
            {"quantile": quantile} if kind == "rank" else {"threshold": threshold, "temperature": temperature}
        )
        self.options = {
            "decay": decay,
            "reference": reference,
            "warmup": warmup_steps,
            "curve": curve,
            "memory": memory,
        }
        self.batches: list[tuple[np.ndarray, Any]] = []
        self.final: dict[str, Any] = {}

    def step(self, per_example: list[np.ndarray], index: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(weights, alignment) of this batch; ``per_example`` as `ref.per_example_linear_grads`."""
        self.batches.append((ref.flatten_examples(per_example), index))
        out, self.final = ref.gradtail_loop(self.batches, **self.options)
        return out[-1]

    def state(self) -> np.ndarray:
        """The reference, flattened (kernel (units, input_dim), then bias)."""
        return np.asarray(self.final["mean"])


def flat_mean(state: dict[str, Any]) -> np.ndarray:
    """A callback state's reference, flattened like `ReferenceGradTail.state`."""
    return np.concatenate([np.asarray(t).ravel() for t in state["mean"][0]])


def tiny_problem(
    seed: int = 0, batch: int = 16, steps: int = 4, d_in: int = 5, hidden: int = 6, classes: int = 3
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
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


def tiny_model(params: list[np.ndarray], *, lr: float = 0.5) -> keras.Model:
    """tanh hidden layer, then the tracked softmax head ("head"), SGD, sparse cross-entropy."""
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


def simulate_sgd(
    params: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    sw: np.ndarray,
    batch: int,
    lr: float,
    gt: ReferenceGradTail | None,
    *,
    epochs: int = 1,
    index: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Float64 SGD on mean_i(s_i w_i L_i) for the tanh -> softmax model (no shuffling), with
    the head's per-example gradients materialised for the GradTail reference."""
    w1, b1, w2, b2 = (np.asarray(p, np.float64) for p in params)
    for _ in range(epochs):
        for start in range(0, len(x), batch):
            part = slice(start, start + batch)
            xb, yb, sb = x[part], y[part], sw[part]
            h = np.tanh(xb @ w1 + b1)
            p = softmax(h @ w2 + b2)
            d = p - np.eye(w2.shape[1])[yb]  # dL_i/dz_i of each example's own loss
            if gt is None:
                w = np.ones(len(xb))
            else:
                rows = None if index is None else index[part]
                w, _ = gt.step(ref.per_example_linear_grads(h, d, bias=True), rows)
            dz = (sb * w)[:, None] * d / len(xb)
            dh = (dz @ w2.T) * (1 - h**2)
            w2, b2 = w2 - lr * h.T @ dz, b2 - lr * dz.sum(0)
            w1, b1 = w1 - lr * xb.T @ dh, b1 - lr * dh.sum(0)
    return [w1, b1, w2, b2]


def torch_twin(params: list[np.ndarray]) -> Any:
    """The tiny model in PyTorch (Linear, Tanh, Linear) with the same float32 weights."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for layer, (k, b) in ((model[0], params[:2]), (model[2], params[2:])):
            layer.weight.copy_(torch.tensor(k.T, dtype=torch.float32))
            layer.bias.copy_(torch.tensor(b, dtype=torch.float32))
    return model


def head_grads(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """The head's per-example gradients of the tiny model, materialised in float64."""
    h = np.tanh(x @ params[0] + params[1])
    d = softmax(h @ params[2] + params[3]) - np.eye(params[2].shape[1])[y]
    return ref.per_example_linear_grads(h, d, bias=True)


def long_tail_data(n: int = 192, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = ((x[:, 0] > 0.9).astype("int32") + (x[:, 1] > 1.4).astype("int32")).astype("int32")
    return x, y


def softmax_head(d_in: int = 5, units: int = 3, seed: int = 11) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """One softmax Dense with known float64 weights (kernel (d_in, units), bias), SGD lr 0."""
    rng = np.random.default_rng(seed)
    kernel, bias = rng.normal(size=(d_in, units)), 0.1 * rng.normal(size=units)
    model = keras.Sequential([keras.Input((d_in,)), keras.layers.Dense(units, activation="softmax")])
    model.set_weights([kernel.astype("float32"), bias.astype("float32")])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    return model, kernel, bias

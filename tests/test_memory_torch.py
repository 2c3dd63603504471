"""gradtail_torch.GradTail with the per-example memory, against float64 loops."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

from gradtail_torch import GradTail  # noqa: E402

from . import reference as ref  # noqa: E402
from ._torch_models import mlp, per_example_grads  # noqa: E402
from .reference import memory_scores as ref_memory  # noqa: E402
from .reference import memory_weights as ref_weights  # noqa: E402


def _data(n=20, d_in=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("use_backward", [False, True])
def test_memory_weights_match_reference(warmup, use_backward):
    model = mlp()
    params = list(model.parameters())
    x, y = _data()
    decay, mem_decay, eta, cap = 0.8, 0.6, 1.5, 2.5
    gt = GradTail(
        model,
        decay=decay,
        warmup_steps=warmup,
        memory_size=20,
        memory_decay=mem_decay,
        memory_eta=eta,
        memory_max_weight=cap,
    )
    rng = np.random.default_rng(0)
    history, batches = [], []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(7):
        index = rng.integers(0, 20, size=8)  # with replacement: duplicates happen
        loss = F.cross_entropy(model(x[index]), y[index], reduction="none")
        flat = per_example_grads(loss, params)
        opt.zero_grad()
        if use_backward:
            w = gt.backward(loss, index=torch.as_tensor(index))
        else:
            w = gt.weights(loss, index=torch.as_tensor(index))
            (w * loss).mean().backward()
        if history:
            align = ref.cosine_rows(flat, ref.ema(history, [decay] * len(history)))
            np.testing.assert_allclose(gt.last_alignment.numpy(), align, rtol=1e-9, atol=1e-12)
            batches.append((index, align))
        score, visits = ref_memory(20, batches, mem_decay)
        got_score, got_visits = gt.memory_scores()
        np.testing.assert_allclose(got_score.numpy(), score, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(got_visits.numpy(), visits)
        expected = ref_weights(score, visits, index, eta, cap) if step >= max(1, warmup) else np.ones(8)
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-9)
        history.append((flat / np.linalg.norm(flat, axis=1)[:, None]).mean(axis=0))
        opt.step()


def test_backward_with_memory_accumulates_the_weighted_gradient():
    model, twin = mlp(1), mlp(1)
    x, y = _data(seed=1)
    gt = GradTail(model, memory_size=20)
    gt_twin = GradTail(twin, memory_size=20)
    for step in range(3):
        index = torch.arange(step * 6, step * 6 + 8) % 20
        model.zero_grad()
        twin.zero_grad()
        w = gt.backward(F.cross_entropy(model(x[index]), y[index], reduction="none"), index=index)
        loss = F.cross_entropy(twin(x[index]), y[index], reduction="none")
        w_twin = gt_twin.weights(loss, index=index)
        (w_twin * loss).mean().backward()
        np.testing.assert_allclose(w.numpy(), w_twin.numpy(), rtol=1e-12)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-10, atol=1e-14)
    assert gt.last_backward == "book-keeping"


def test_index_errors():
    model = mlp()
    x, y = _data()

    def loss():
        return F.cross_entropy(model(x[:5]), y[:5], reduction="none")

    plain = GradTail(model)
    with pytest.raises(ValueError, match=r"`index`.*memory_size"):
        plain.weights(loss(), index=torch.arange(5))
    plain.remove()
    gt = GradTail(model, memory_size=20)
    with pytest.raises(ValueError, match=r"pass index=.*Received: index=None"):
        gt.weights(loss())
    gt.discard()
    with pytest.raises(ValueError, match=r"`index`.*\(5,\).*Received: shape \(4,\)"):
        gt.weights(loss(), index=torch.arange(4))
    gt.discard()
    with pytest.raises(TypeError, match=r"`index`.*integer.*float"):
        gt.backward(loss(), index=torch.zeros(5))
    gt.discard()
    with pytest.raises(IndexError, match=r"`index`.*\[0, 20\).*Received.*25"):
        gt.weights(loss(), index=torch.tensor([0, 1, 2, 3, 25]))
    gt.discard()
    w = gt.weights(loss(), index=[0, 1, 2, 3, 4])  # sequences are accepted
    assert w.shape == (5,)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"memory_size": 0}, "memory_size"),
        ({"memory_size": 3.5}, "memory_size"),
        ({"memory_size": 5, "memory_decay": 1.0}, "memory_decay"),
        ({"memory_size": 5, "memory_eta": -1.0}, "memory_eta"),
        ({"memory_size": 5, "memory_max_weight": 0.5}, "memory_max_weight"),
    ],
)
def test_constructor_errors(options, match):
    with pytest.raises((ValueError, TypeError), match=rf"`{match}`.*Received"):
        GradTail(nn.Linear(3, 2), **options)


def test_memory_scores_needs_memory():
    with pytest.raises(RuntimeError, match="memory_size"):
        GradTail(nn.Linear(3, 2)).memory_scores()


def test_state_dict_round_trip_includes_memory():
    model = mlp()
    x, y = _data()
    gt = GradTail(model, memory_size=20, memory_decay=0.3)
    for step in range(4):
        index = torch.arange(step * 5, step * 5 + 5)
        gt.backward(F.cross_entropy(model(x[index]), y[index], reduction="none"), index=index)
    saved = gt.state_dict()
    assert {"memory_score", "memory_visits", "memory_decay"} <= set(saved)
    fresh = GradTail(mlp(), memory_size=20)
    fresh.load_state_dict(saved)
    for a, b in zip(fresh.memory_scores(), gt.memory_scores(), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert fresh.memory_decay == 0.3
    saved["memory_score"].fill_(7.0)  # the loaded memory is a copy
    assert float(fresh.memory_scores()[0].max()) != 7.0
    with pytest.raises(ValueError, match="keeps none per-example memory but the state holds one"):
        GradTail(mlp()).load_state_dict(gt.state_dict())
    with pytest.raises(ValueError, match=r"shape \(30,\); Received: shape \(20,\)"):
        GradTail(mlp(), memory_size=30).load_state_dict(gt.state_dict())
    with pytest.raises(ValueError, match="state has none"):
        GradTail(mlp(), memory_size=20).load_state_dict(GradTail(mlp()).state_dict())


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (
            "memory_decay",
            1.0,
            r"`memory_decay` must be a finite number in \[0.0, 1.0\); Received: memory_decay=1.0",
        ),
        ("decay", float("nan"), r"`decay` must be a finite number in \[0.0, 1.0\]"),
        ("memory_score", float("nan"), r"`memory_score` must be finite"),
        ("total", float("inf"), r"`total` must be finite"),
        ("total", -0.5, r"`total` must be a finite number in \[0.0, 1.0\]; Received: total=-0.5"),
        ("count", -3, r"`count` must be >= 0"),
        ("mean", float("nan"), r"`mean\[0\]` must be finite"),
        ("memory_visits", -1, r"`memory_visits` must be >= 0"),
    ],
)
def test_load_state_dict_rejects_a_bad_state_and_keeps_its_own(key, value, match):
    model = mlp()
    x, y = _data()
    gt = GradTail(model, memory_size=20, memory_decay=0.3)
    for step in range(2):
        index = torch.arange(step * 5, step * 5 + 5)
        gt.backward(F.cross_entropy(model(x[index]), y[index], reduction="none"), index=index)
    before = gt.state_dict()
    bad = gt.state_dict()
    if key == "mean":
        bad[key] = [[t.clone() for t in layer] for layer in bad[key]]
        bad[key][0][0].view(-1)[0] = value
    elif isinstance(bad[key], torch.Tensor):
        bad[key] = bad[key].clone()
        bad[key].view(-1)[0] = value
    else:
        bad[key] = value
    with pytest.raises(ValueError, match=match):
        gt.load_state_dict(bad)
    after = gt.state_dict()  # nothing was assigned
    assert after["memory_decay"] == before["memory_decay"]
    assert after["decay"] == before["decay"]
    for name in ("total", "count", "memory_score", "memory_visits"):
        np.testing.assert_array_equal(after[name].numpy(), before[name].numpy())


def test_memory_follows_the_tracked_layers_dtype():
    gt = GradTail(nn.Linear(3, 2).double(), memory_size=4)
    assert gt.memory_scores()[0].dtype == torch.float64
    gt = GradTail(nn.Linear(3, 2).half(), memory_size=4)
    assert gt.memory_scores()[0].dtype == torch.float32

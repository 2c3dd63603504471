"""gradtail_torch.GradTail as plumbing over the core policy: the shared float64 loop reference,
option validation, the interchange format, empty batches and gradient accumulation."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

import gradtail_ops  # noqa: E402
from gradtail_torch import GradTail  # noqa: E402

from . import reference as ref  # noqa: E402
from ._torch_models import mlp, per_example_grads  # noqa: E402

DEFAULT_CURVE = {"kind": "rank", "max_weight": 3.0, "quantile": 0.3, "normalize": True}


def _data(n=24, d_in=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("memory", [False, True])
def test_training_loop_matches_the_shared_float64_reference(memory):
    """Defaults, warm-up 2 and (optionally) the memory, against tests/reference.gradtail_loop."""
    model = mlp()
    params = list(model.parameters())
    x, y = _data()
    options = {"decay": 0.7, "warmup_steps": 2}
    if memory:
        options.update(memory_size=24, memory_decay=0.4, memory_eta=1.2, memory_max_weight=2.0)
    gt = GradTail(model, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(1)
    batches, got = [], []
    for _ in range(6):
        index = rng.integers(0, 24, size=8)
        loss = F.cross_entropy(model(x[index]), y[index], reduction="none")
        batches.append((per_example_grads(loss, params), index))
        opt.zero_grad()
        w = gt.backward(loss, index=torch.as_tensor(index) if memory else None)
        got.append((w.numpy(), gt.last_alignment.numpy()))
        opt.step()
    memory_ref = {"size": 24, "decay": 0.4, "eta": 1.2, "max_weight": 2.0} if memory else None
    expected, final = ref.gradtail_loop(
        batches, decay=0.7, reference="direction", warmup=2, curve=DEFAULT_CURVE, memory=memory_ref
    )
    for (w, a), (w_ref, a_ref) in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, a_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(w, w_ref, rtol=1e-9, atol=1e-12)
    flat_mean = np.concatenate([t.numpy().ravel() for layer in gt.state.mean for t in layer])
    np.testing.assert_allclose(flat_mean, final["mean"], rtol=1e-9, atol=1e-12)
    assert float(gt.state.total) == pytest.approx(final["total"], rel=1e-12)
    if memory:
        score, visits = gt.memory_scores()
        np.testing.assert_allclose(score.numpy(), final["memory_score"], atol=1e-12)
        np.testing.assert_array_equal(visits.numpy(), final["memory_visits"])


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("eps", float("nan")),
        ("eps", -1.0),
        ("max_weight", float("inf")),
        ("max_weight", np.float32(0.5)),
        ("threshold", float("nan")),
        ("floor", float("inf")),
        ("temperature", float("nan")),
        ("quantile", float("nan")),
        ("decay", float("nan")),
        ("decay", np.float64(1.5)),
        ("memory_eta", float("inf")),
    ],
)
def test_non_finite_or_out_of_range_options_are_refused_at_construction(option, value):
    with pytest.raises(ValueError, match=rf"`{option}` must be a finite number.*Received: {option}="):
        GradTail(nn.Linear(3, 2), **{option: value})


@pytest.mark.parametrize(
    ("option", "value"), [("max_weight", np.float32(2.5)), ("decay", np.float64(0.5)), ("quantile", 0)]
)
def test_numpy_and_int_scalars_are_accepted_as_floats(option, value):
    gt = GradTail(nn.Linear(3, 2), **{option: value})
    assert type(gt.config.to_options()[option]) is float
    assert gt.config.to_options()[option] == float(value)


def test_unknown_option_and_config_plus_options_are_refused():
    with pytest.raises(TypeError, match=r"Unknown GradTail option\(s\) \['max_wieght'\]"):
        GradTail(nn.Linear(3, 2), max_wieght=2.0)
    with pytest.raises(TypeError, match="either `config=` or keyword options"):
        GradTail(nn.Linear(3, 2), config=gradtail_ops.GradTailConfig(), decay=0.9)


def test_config_and_options_build_the_same_policy():
    config = gradtail_ops.GradTailConfig.from_options(decay=0.9, quantile=0.2)
    assert (
        GradTail(nn.Linear(3, 2), config=config).config
        == GradTail(nn.Linear(3, 2), decay=0.9, quantile=0.2).config
    )


def test_backward_twice_without_zeroing_adds_to_grad():
    """Gradient accumulation: the book-keeping path adds to an existing .grad, as autograd does."""
    model, twin = mlp(), mlp()
    x, y = _data()
    gt = GradTail(model, decay=0.5)
    for step in range(3):  # from the second step on the weights are not all ones
        part = slice(8 * step, 8 * step + 8)
        model.zero_grad()
        twin.zero_grad()
        w = gt.backward(F.cross_entropy(model(x[part]), y[part], reduction="none"))
        assert gt.last_backward == "book-keeping"
        (w * F.cross_entropy(twin(x[part]), y[part], reduction="none")).mean().backward()
        w2 = gt.backward(F.cross_entropy(model(x[part]), y[part], reduction="none"))
        (w2 * F.cross_entropy(twin(x[part]), y[part], reduction="none")).mean().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_loaded_state_equals_the_saved_one_and_steps_on_identically():
    """The loaded state itself (total included), and after one more step, not only the cosines."""
    x, y = _data()
    source = mlp()
    gt = GradTail(source, decay=0.6)
    for step in range(3):
        part = slice(8 * step, 8 * step + 8)
        gt.backward(F.cross_entropy(source(x[part]), y[part], reduction="none"))
    target = mlp()
    target.load_state_dict(source.state_dict())
    loaded = GradTail(target, decay=0.9)
    loaded.load_state_dict(gt.state_dict())
    assert loaded.decay == 0.6  # the saved decay shaped the state, and wins

    def assert_same_state():
        for name in ("total", "count", "steps"):
            assert torch.equal(loaded.state_dict()[name], gt.state_dict()[name]), name
        for a, b in zip(loaded.state_dict()["mean"], gt.state_dict()["mean"], strict=True):
            for s, t in zip(a, b, strict=True):
                assert torch.equal(s, t)

    assert_same_state()
    loss_a = F.cross_entropy(source(x[:8]), y[:8], reduction="none")
    loss_b = F.cross_entropy(target(x[:8]), y[:8], reduction="none")
    assert torch.equal(gt.weights(loss_a), loaded.weights(loss_b))
    assert_same_state()


def test_a_0_1_state_dict_without_steps_loads():
    gt = GradTail(nn.Linear(3, 2).double(), decay=0.5)
    saved = gt.state_dict()
    del saved["steps"]
    saved["count"] = torch.tensor(4, dtype=torch.int32)
    saved["total"] = torch.tensor(1 - 0.5**4, dtype=torch.float64)
    gt.load_state_dict(saved)
    assert int(gt.state_dict()["steps"]) == 4


def test_empty_batch_changes_nothing():
    model = mlp()
    x, y = _data()
    gt = GradTail(model, decay=0.5)
    gt.weights(F.cross_entropy(model(x[:8]), y[:8], reduction="none"))
    before = gt.state_dict()
    w = gt.weights(F.cross_entropy(model(x[:0]), y[:0], reduction="none"))
    assert tuple(w.shape) == (0,)
    after = gt.state_dict()
    for name in ("total", "count", "steps"):
        assert torch.equal(after[name], before[name])

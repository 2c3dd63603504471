"""The sketched reference (`sketch_rank`): exact on low-rank streams, refused where it cannot apply."""

from __future__ import annotations

import numpy as np
import pytest

import gradtail_ops as gt

from . import reference as ref
from .conftest import assert_array_like, to_numpy

D_OUT, D_IN, RANK = 40, 48, 3


def _config(**options):
    return gt.GradTailConfig.from_options(decay=0.7, sketch_rank=8, sketch_size=12, **options)


def test_small_layers_stay_exact_and_large_ones_are_sketched(xp):
    config = _config()
    small = (xp.asarray(np.zeros((4, 6))), xp.asarray(np.zeros(4)))
    large = (xp.asarray(np.zeros((400, 300))),)
    state = gt.tail_init([small, large], config=config)
    assert state.sketch[0] is None
    omega, psi = state.sketch[1]
    assert_array_like(omega, large[0], shape=(300, 8), dtype=large[0].dtype)
    assert_array_like(psi, large[0], shape=(12, 400), dtype=large[0].dtype)
    assert [tuple(m.shape) for m in state.ema.mean[1]] == [(400, 8), (12, 300)]
    assert gt.tail_init([large], config=gt.GradTailConfig()).sketch is None


@pytest.mark.parametrize("seq", [None, 3])
def test_sketch_is_exact_when_the_reference_has_rank_at_most_k(backend, seq):
    """Rank(G) <= k: the reconstruction Q (Psi Q)^+ W equals G, so every alignment is exact."""
    config = _config()
    exact_config = gt.GradTailConfig(decay=0.7)
    big = (D_OUT * 10, D_IN * 10)  # large enough to be sketched
    rng = np.random.default_rng(7)
    u, v = rng.normal(size=(big[0], RANK)), rng.normal(size=(big[1], RANK))
    template = [(backend.asarray(np.zeros(big)), backend.asarray(np.zeros(big[0])))]
    sketched, exact = gt.tail_init(template, config=config), gt.tail_init(template, config=exact_config)
    assert sketched.sketch[0] is not None
    shape = (6,) if seq is None else (6, seq)
    history = []
    for step in range(5):
        a = rng.normal(size=(*shape, RANK)) @ v.T
        d = rng.normal(size=(*shape, RANK)) @ u.T
        d[:2] += 0.3 * u[:, 0]
        layer = [(backend.asarray(a), backend.asarray(d))]
        out_s = backend.run(lambda s, ly: gt.linear_tail_step(s, ly, config=config), sketched, layer)
        out_e = backend.run(lambda s, ly: gt.linear_tail_step(s, ly, config=exact_config), exact, layer)
        sketched, exact = out_s.state, out_e.state
        per = ref.per_example_linear_grads(a, d, True)
        flat = ref.flatten_examples(per)
        if history:
            want = ref.cosine_rows(flat, ref.ema(history, [0.7] * len(history)))
            np.testing.assert_allclose(to_numpy(out_s.alignment), want, atol=1e-8)
            np.testing.assert_allclose(to_numpy(out_e.alignment), want, atol=1e-8)
            assert step > 0
        norms = np.sqrt((flat**2).sum(axis=1))
        history.append((flat / norms[:, None]).mean(axis=0))
        np.testing.assert_allclose(to_numpy(out_s.weights), to_numpy(out_e.weights), atol=1e-8)


def test_sketch_error_is_small_on_a_noisy_stream():
    """Not low rank (noise in every direction): the alignment error stays small, not zero."""
    rng = np.random.default_rng(3)
    d_out, d_in, r = 300, 400, 6
    u, v = rng.normal(size=(d_out, r)), rng.normal(size=(d_in, r))
    config = gt.GradTailConfig(decay=0.9, sketch=gt.SketchConfig(16))
    exact_config = gt.GradTailConfig(decay=0.9)
    template = [(np.zeros((d_out, d_in)),)]
    s, e = gt.tail_init(template, config=config), gt.tail_init(template, config=exact_config)
    errors = []
    for _ in range(20):
        z = rng.normal(size=(32, r))
        a = z @ v.T + 0.3 * rng.normal(size=(32, d_in))
        d = z @ u.T * 0.1 + 0.05 * rng.normal(size=(32, d_out))
        os_, oe = (
            gt.linear_tail_step(s, [(a, d)], config=config),
            gt.linear_tail_step(e, [(a, d)], config=exact_config),
        )
        s, e = os_.state, oe.state
        errors.append(np.abs(os_.alignment - oe.alignment).max())
    assert max(errors[1:]) < 0.02


def test_materialised_step_refuses_a_sketched_state():
    config = _config()
    state = gt.tail_init([(np.zeros((400, 300)),)], config=config)
    with pytest.raises(ValueError, match="only the factored step"):
        gt.tail_step(state, [(np.zeros((2, 400, 300)),)], config=config)


def test_sketched_state_round_trips_through_the_interchange_format(xp):
    config = _config()
    rng = np.random.default_rng(0)
    state = gt.tail_init([(xp.asarray(np.zeros((400, 300))), xp.asarray(np.zeros(400)))], config=config)
    for _ in range(2):
        layer = [(xp.asarray(rng.normal(size=(4, 300))), xp.asarray(rng.normal(size=(4, 400))))]
        state = gt.linear_tail_step(state, layer, config=config).state
    saved = gt.state_to_dict(state, config=config)
    assert len(saved["sketch"]) == 1
    fresh = gt.tail_init([(xp.asarray(np.zeros((400, 300))), xp.asarray(np.zeros(400)))], config=config)
    loaded, _ = gt.state_from_dict(saved, like=fresh, config=config)
    for got, want in zip(loaded.ema.mean[0], state.ema.mean[0], strict=True):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    np.testing.assert_array_equal(to_numpy(loaded.sketch[0].psi), to_numpy(state.sketch[0].psi))
    exact = gt.tail_init(
        [(xp.asarray(np.zeros((400, 300))), xp.asarray(np.zeros(400)))], config=gt.GradTailConfig()
    )
    with pytest.raises(ValueError, match=r"must match the tracked layers|sketched layers"):
        gt.state_from_dict(saved, like=exact, config=gt.GradTailConfig())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"sketch_rank": 0}, ValueError, "sketch_rank"),
        ({"sketch_rank": 4, "sketch_size": 3}, ValueError, "sketch_size"),
        ({"sketch_size": 9}, ValueError, "need `sketch_rank`"),
        ({"sketch_rank": 2.5}, TypeError, "sketch_rank"),
    ],
)
def test_sketch_options_are_validated(options, error, match):
    with pytest.raises(error, match=match):
        gt.GradTailConfig.from_options(**options)


def _structured_batch(rng, u, v, batch=6):
    a = rng.normal(size=(batch, u.shape[1])) @ v.T
    d = rng.normal(size=(batch, u.shape[1])) @ u.T
    d[:2] += 0.3 * u[:, 0]
    return a, d


def test_optax_head_path_with_a_sketch_equals_the_exact_head_on_low_rank_streams():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    go = pytest.importorskip("gradtail_optax")
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(400, RANK)), rng.normal(size=(300, RANK))
    params = [{"kernel": jnp.zeros((300, 400), jnp.float32), "bias": jnp.zeros(400, jnp.float32)}]
    sketched, exact = go.head(batch_size=6, decay=0.7, sketch_rank=8), go.head(batch_size=6, decay=0.7)
    s_state, e_state = sketched.init(params), exact.init(params)
    assert s_state.sketch[0] is not None
    step_s, step_e = jax.jit(sketched.update), jax.jit(exact.update)
    for _ in range(4):
        a, d = (jnp.asarray(x, jnp.float32) for x in _structured_batch(rng, u, v))
        out_s, out_e = step_s(s_state, [a], [d]), step_e(e_state, [a], [d])
        s_state, e_state = out_s.state, out_e.state
        np.testing.assert_allclose(np.asarray(out_s.alignment), np.asarray(out_e.alignment), atol=2e-4)
    saved = go.state_to_dict(s_state, sketched.config)
    loaded, _ = go.state_from_dict(saved, like=sketched.init(params), config=sketched.config)
    np.testing.assert_array_equal(np.asarray(loaded.sketch[0].psi), np.asarray(s_state.sketch[0].psi))
    with pytest.raises(ValueError, match="sketches linear layers of the factored step"):
        go.gradtail(batch_size=6, sketch_rank=8).init({"w": jnp.zeros((300, 400))})


def test_torch_gradtail_with_a_sketch_trains_and_round_trips():
    torch = pytest.importorskip("torch")
    from gradtail_torch import GradTail

    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(400, RANK)), rng.normal(size=(300, RANK))
    torch.manual_seed(0)
    sketched_layer = torch.nn.Linear(300, 400).double()
    exact_layer = torch.nn.Linear(300, 400).double()
    exact_layer.load_state_dict(sketched_layer.state_dict())
    sketched, exact = GradTail(sketched_layer, decay=0.7, sketch_rank=8), GradTail(exact_layer, decay=0.7)
    for _ in range(4):
        a, d = (torch.as_tensor(x) for x in _structured_batch(rng, u, v))
        ws = sketched.backward((sketched_layer(a) * d).sum(1))
        we = exact.backward((exact_layer(a) * d).sum(1))
        np.testing.assert_allclose(sketched.last_alignment.numpy(), exact.last_alignment.numpy(), atol=1e-8)
        assert torch.equal(ws, we)
    np.testing.assert_allclose(
        sketched_layer.weight.grad.numpy(), exact_layer.weight.grad.numpy(), rtol=1e-12
    )
    fresh = GradTail(torch.nn.Linear(300, 400).double(), decay=0.7, sketch_rank=8)
    fresh.load_state_dict(sketched.state_dict())
    assert torch.equal(fresh.state_dict()["sketch"][0][1], sketched.state_dict()["sketch"][0][1])


def _zoo_models(torch):
    nn = torch.nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 32)
            layer = nn.TransformerEncoderLayer(32, 2, dim_feedforward=128, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)).mean(1))

    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.ReLU(),
        nn.Linear(64, 5),
    )  # fmt: skip
    return {"transformer": (Encoder, (8, 7, 6)), "cnn": (lambda: cnn, (8, 1, 8, 8))}


@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_sketch_on_the_model_zoo_trains_with_exact_weighted_gradients(name):
    """A CNN and a transformer with sketched layers: gt.backward's .grad equals the weighted
    backward of a twin model with the same weights, and the saved state loads back."""
    torch = pytest.importorskip("torch")
    import warnings

    from gradtail_torch import GradTail

    build, shape = _zoo_models(torch)[name]
    torch.manual_seed(0)
    model = build().double()
    twin = copy_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention's out_proj is skipped with a warning
        gt = GradTail(model, decay=0.8, sketch_rank=1, sketch_size=3)
    assert any(f is not None for f in gt._state.sketch)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (shape[0],), generator=g)
        model.zero_grad()
        twin.zero_grad()
        w = gt.backward(torch.nn.functional.cross_entropy(model(x), y, reduction="none"))
        (w * torch.nn.functional.cross_entropy(twin(x), y, reduction="none")).mean().backward()
        assert bool(torch.isfinite(gt.last_alignment).all())
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = GradTail(copy_model(model), decay=0.8, sketch_rank=1, sketch_size=3)
    fresh.load_state_dict(gt.state_dict())
    for a, b in zip(fresh.state_dict()["mean"], gt.state_dict()["mean"], strict=True):
        for s, t in zip(a, b, strict=True):
            assert torch.equal(s, t)


def copy_model(model):
    import copy

    return copy.deepcopy(model)

"""The core's whole policy (`tail_step`, `linear_tail_step`) against the float64 loop reference."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace

import gradtail_ops as gt

from . import reference as ref
from .conftest import assert_array_like, to_numpy

N = 10  # memory rows
CURVES = {
    "rank": {"kind": "rank", "max_weight": 3.0, "quantile": 0.3, "normalize": True},
    "sigmoid": {
        "kind": "sigmoid",
        "max_weight": 2.5,
        "threshold": 0.1,
        "temperature": 0.4,
        "normalize": False,
    },
}


def _config(curve, *, decay=0.8, warmup=0, memory=False, reference="direction"):
    options = dict(CURVES[curve], decay=decay, warmup_steps=warmup, reference=reference)
    if memory:
        options.update(memory_size=N, memory_decay=0.6, memory_eta=1.5, memory_max_weight=2.5)
    return gt.GradTailConfig.from_options(**options)


def _memory_ref(config):
    if config.memory is None:
        return None
    m = config.memory
    return {"size": m.size, "decay": m.decay, "eta": m.eta, "max_weight": m.max_weight}


def _batches(seed, steps=6, batch=6, shape=(3, 4)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        g = rng.normal(size=(batch, *shape))
        g[:2] += 1.5  # a shared direction, so the alignments spread
        out.append((g, rng.integers(0, N, size=batch)))
    return out


def _run(backend, config, batches, template_shape=(3, 4)):
    state = gt.tail_init(backend.asarray(np.zeros(template_shape)), config=config)
    outs = []
    for g, index in batches:
        rows = None if config.memory is None else backend.asarray(index)

        def step(st, grads, idx):
            return gt.tail_step(st, grads, config=config, index=idx)

        out = backend.run(step, state, backend.asarray(g), rows)
        outs.append(out)
        state = out.state
    return outs, state


@pytest.mark.parametrize("curve", ["rank", "sigmoid"])
@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("memory", [False, True])
def test_tail_step_matches_the_loop_reference(backend, curve, warmup, memory):
    config = _config(curve, warmup=warmup, memory=memory)
    batches = _batches(1)
    outs, state = _run(backend, config, batches)
    expected, final = ref.gradtail_loop(
        [(g.reshape(len(g), -1), i) for g, i in batches],
        decay=0.8,
        reference="direction",
        warmup=warmup,
        curve=CURVES[curve],
        memory=_memory_ref(config),
    )
    like = backend.asarray(np.zeros(1))
    for out, (w, a) in zip(outs, expected, strict=True):
        assert_array_like(out.weights, like, shape=(6,), dtype=like.dtype)
        np.testing.assert_allclose(to_numpy(out.alignment), a, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(to_numpy(out.weights), w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(state.ema.mean).ravel(), final["mean"], rtol=1e-9, atol=1e-12)
    assert float(to_numpy(state.ema.total)) == pytest.approx(final["total"], rel=1e-12)
    assert int(to_numpy(state.ema.count)) == final["count"] == int(to_numpy(state.steps))
    if memory:
        np.testing.assert_allclose(to_numpy(state.memory.score), final["memory_score"], atol=1e-12)
        np.testing.assert_array_equal(to_numpy(state.memory.visits), final["memory_visits"])


def test_decay_schedule_gets_the_steps_taken_before(backend):
    """The schedule's argument is the number of earlier steps (0 at the first)."""

    def schedule(steps):
        xp = array_namespace(steps)
        return 0.5 + 0.1 * xp.astype(steps % 3, xp.float64)

    config = gt.GradTailConfig(decay=schedule, curve=gt.WeightCurve(**CURVES["sigmoid"]))
    batches = _batches(2, steps=5)
    outs, state = _run(backend, config, batches)
    expected, final = ref.gradtail_loop(
        [(g.reshape(len(g), -1), i) for g, i in batches],
        decay=lambda k: 0.5 + 0.1 * (k % 3),
        reference="direction",
        warmup=0,
        curve=CURVES["sigmoid"],
    )
    for out, (_, a) in zip(outs, expected, strict=True):
        np.testing.assert_allclose(to_numpy(out.alignment), a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(state.ema.mean).ravel(), final["mean"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("memory", [False, True])
def test_empty_batch_changes_nothing(backend, memory):
    config = _config("rank", memory=memory)
    batches = _batches(3, steps=2)
    _, state = _run(backend, config, batches)
    index = backend.asarray(np.zeros(0, dtype=np.int64)) if memory else None
    out = gt.tail_step(state, backend.asarray(np.zeros((0, 3, 4))), config=config, index=index)
    assert out.state is state
    like = backend.asarray(np.zeros(1))
    for arr in (out.weights, out.alignment, out.sq_norms):
        assert_array_like(arr, like, shape=(0,), dtype=like.dtype)
    layer_state = gt.tail_init([(backend.asarray(np.zeros((2, 3))),)], config=config)
    empty = (backend.asarray(np.zeros((0, 3))), backend.asarray(np.zeros((0, 2))))
    out = gt.linear_tail_step(layer_state, [empty], config=config, index=index)
    assert out.state is layer_state
    assert tuple(out.weights.shape) == (0,)


def test_linear_tail_step_matches_materialised(backend):
    """The factored step and the dense step agree, memory and warm-up included."""
    config = _config("rank", warmup=1, memory=True)
    rng = np.random.default_rng(4)
    lin = gt.tail_init([(backend.asarray(np.zeros((3, 5))), backend.asarray(np.zeros(3)))], config=config)
    steps = []
    for _ in range(4):
        a, d = rng.normal(size=(6, 5)), rng.normal(size=(6, 3))
        d[:3] += 1.0
        index = rng.integers(0, N, size=6)
        flat = ref.flatten_examples(ref.per_example_linear_grads(a, d, True))
        out = backend.run(
            lambda st, x, y, i: gt.linear_tail_step(st, [(x, y)], config=config, index=i),
            lin,
            backend.asarray(a),
            backend.asarray(d),
            backend.asarray(index),
        )
        lin = out.state
        steps.append((flat, index, out))
    expected, _ = ref.gradtail_loop(
        [(f, i) for f, i, _ in steps],
        decay=0.8,
        reference="direction",
        warmup=1,
        curve=CURVES["rank"],
        memory=_memory_ref(config),
    )
    for (_, _, out), (w, a) in zip(steps, expected, strict=True):
        np.testing.assert_allclose(to_numpy(out.alignment), a, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(to_numpy(out.weights), w, rtol=1e-9, atol=1e-12)


def test_index_is_required_exactly_with_a_memory(xp):
    g = xp.asarray(np.ones((2, 3)))
    with_memory = _config("rank", memory=True)
    state = gt.tail_init(xp.asarray(np.zeros(3)), config=with_memory)
    with pytest.raises(ValueError, match=r"index=None"):
        gt.tail_step(state, g, config=with_memory)
    with pytest.raises(ValueError, match=r"shape \(2,\).*Received: shape \(3,\)"):
        gt.tail_step(state, g, config=with_memory, index=xp.asarray(np.array([0, 1, 2])))
    plain = _config("rank")
    state = gt.tail_init(xp.asarray(np.zeros(3)), config=plain)
    with pytest.raises(ValueError, match="no per-example memory"):
        gt.tail_step(state, g, config=plain, index=xp.asarray(np.array([0, 1])))


def test_collectives_mean_is_applied_to_the_batch_reference():
    config = _config("rank", reference="mean")
    state = gt.tail_init(np.zeros(2), config=config)
    g = np.array([[1.0, 0.0], [3.0, 2.0]])
    out = gt.tail_step(state, g, config=config, collectives=gt.Collectives(mean=lambda t: t * 0.5))
    np.testing.assert_allclose(out.state.ema.mean, g.mean(axis=0) * 0.5)


def test_legacy_functions_equal_the_config_form(backend):
    """score_and_update (0.1 API) gives what tail_step gives for the same options."""
    curve = gt.WeightCurve(**CURVES["sigmoid"])
    config = gt.GradTailConfig(decay=0.7, reference="mean", curve=curve, warmup_steps=1)
    batches = _batches(5, steps=4)
    outs, _ = _run(backend, config, batches)
    legacy = gt.ema_init(backend.asarray(np.zeros((3, 4))))
    for (g, _), out in zip(batches, outs, strict=True):
        old = gt.score_and_update(
            legacy, backend.asarray(g), decay=0.7, reference="mean", curve=curve, warmup_steps=1
        )
        legacy = old.state
        np.testing.assert_allclose(to_numpy(old.weights), to_numpy(out.weights), rtol=1e-12)
        np.testing.assert_allclose(to_numpy(old.alignment), to_numpy(out.alignment), rtol=1e-12, atol=1e-15)

"""EMA state on every backend against the definition sum_t w_t g_t / sum_t w_t."""

from __future__ import annotations

import numpy as np
import pytest

import gradtail_ops as gt

from . import reference as ref
from .conftest import assert_array_like, to_numpy


def _run_schedule(backend, values, decays):
    template = backend.asarray(np.zeros_like(values[0]))
    state = gt.ema_init(template)
    for v, d in zip(values, decays, strict=True):
        state = backend.run(lambda s, g, dd: gt.ema_update(s, g, decay=dd), state, backend.asarray(v), d)
    return state


def test_schedule_matches_definition(backend):
    rng = np.random.default_rng(0)
    values = [rng.normal(size=(3, 2)) for _ in range(6)]
    decays = [0.9, 0.5, 0.99, 0.0, 0.7, 0.95]
    state = _run_schedule(backend, values, decays)
    np.testing.assert_allclose(to_numpy(gt.ema_mean(state)), ref.ema(values[3:], decays[3:]), rtol=1e-12)
    assert int(to_numpy(state.count)) == 6
    expected_total = 1 - np.prod(decays)
    np.testing.assert_allclose(to_numpy(state.total), expected_total, rtol=1e-12)


def test_schedule_without_reset_matches_definition(backend):
    rng = np.random.default_rng(1)
    values = [rng.normal(size=(4,)) for _ in range(5)]
    decays = [0.3, 0.8, 0.95, 0.6, 0.9]
    state = _run_schedule(backend, values, decays)
    np.testing.assert_allclose(to_numpy(gt.ema_mean(state)), ref.ema(values, decays), rtol=1e-12)


def test_first_update_is_exact(backend):
    g = np.array([0.1, 0.3, 1e-7, -2.5])
    state = _run_schedule(backend, [g], [0.999])
    np.testing.assert_array_equal(to_numpy(gt.ema_mean(state)), g)


def test_init_structure_dtype_device(backend):
    w, b = backend.asarray(np.ones((3, 2)), "float32"), backend.asarray(np.ones(3), "float32")
    state = gt.ema_init([(w, b), (w,)])
    assert isinstance(state.mean, list)
    assert len(state.mean[0]) == 2
    assert len(state.mean[1]) == 1
    assert_array_like(state.mean[0][0], w, shape=(3, 2), dtype=backend.dtype("float32"))
    assert_array_like(state.total, w, shape=(), dtype=backend.dtype("float32"))
    assert_array_like(state.count, w, shape=(), dtype=backend.dtype("int32"))
    assert float(to_numpy(state.total)) == 0.0
    np.testing.assert_array_equal(to_numpy(gt.ema_mean(state)[0][0]), 0.0)


def test_half_template_gives_float32_state(backend):
    if backend.name == "array_api_strict":
        pytest.skip("array_api_strict has no float16")
    state = gt.ema_init(backend.asarray(np.ones(3), "float16"))
    assert state.mean.dtype == backend.dtype("float32")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batch_leaves_state_unchanged(backend, bad):
    state = _run_schedule(backend, [np.array([1.0, 2.0])], [0.9])
    g = backend.asarray(np.array([bad, 0.0]))
    new = backend.run(lambda s, x: gt.ema_update(s, x, decay=0.5), state, g)
    np.testing.assert_array_equal(to_numpy(new.mean), [1.0, 2.0])
    assert float(to_numpy(new.total)) == pytest.approx(0.1)
    assert int(to_numpy(new.count)) == 1


def test_traced_decay_is_clipped(backend):
    state = _run_schedule(backend, [np.array([1.0])], [0.5])
    d = backend.asarray(np.array(1.7))
    new = backend.run(
        lambda s, x, dd: gt.ema_update(s, x, decay=dd), state, backend.asarray(np.array([5.0])), d
    )
    np.testing.assert_array_equal(to_numpy(new.mean), [1.0])  # clipped to 1: no change
    assert np.isfinite(to_numpy(new.total))


def test_decay_one_before_any_update_keeps_zero_state(xp):
    state = gt.ema_update(gt.ema_init(xp.asarray(np.zeros(2))), xp.asarray(np.ones(2)), decay=1.0)
    assert float(to_numpy(state.total)) == 0.0
    np.testing.assert_array_equal(to_numpy(state.mean), 0.0)


def test_python_decay_out_of_range(xp):
    state = gt.ema_init(xp.asarray(np.zeros(2)))
    with pytest.raises(ValueError, match=r"decay.*\[0, 1\].*1.5"):
        gt.ema_update(state, xp.asarray(np.ones(2)), decay=1.5)


def test_structure_and_shape_mismatch(xp):
    state = gt.ema_init([xp.asarray(np.zeros((2, 3))), xp.asarray(np.zeros(2))])
    with pytest.raises(ValueError, match="structure"):
        gt.ema_update(state, xp.asarray(np.zeros((2, 3))), decay=0.9)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        gt.ema_update(state, [xp.asarray(np.zeros((3, 2))), xp.asarray(np.zeros(2))], decay=0.9)


def test_state_is_a_jax_pytree():
    jax = pytest.importorskip("jax")
    state = gt.ema_init((jax.numpy.zeros((2, 3)), jax.numpy.zeros(2)))
    assert len(jax.tree_util.tree_leaves(state)) == 4
    step = jax.jit(lambda s, g: gt.ema_update(s, g, decay=0.9))
    g = (jax.numpy.ones((2, 3)), jax.numpy.ones(2))
    for _ in range(4):
        state = step(state, g)
    assert step._cache_size() == 1, "ema_update recompiled between steps"

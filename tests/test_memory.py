"""Per-example memory on every backend against a float64 NumPy loop over the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtail_ops as gt

from .conftest import assert_array_like, to_numpy
from .reference import memory_scores as ref_memory
from .reference import memory_weights as ref_weights


def _batches(seed, n=12, b=6, steps=7, dup=True):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        index = rng.integers(0, n, size=b) if dup else rng.permutation(n)[:b]
        out.append((index.astype(np.int64), rng.normal(size=b)))
    return out


def _run(backend, n, batches, decay, **static):
    state = gt.memory_init(n, like=backend.asarray(np.zeros(1)))
    for index, s in batches:
        state = backend.run(
            lambda st_, i, x: gt.memory_update(st_, i, x, decay=decay, **static),
            state,
            backend.asarray(index),
            backend.asarray(s),
        )
    return state


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_update_matches_reference_with_duplicates(backend, decay):
    batches = _batches(0)
    assert any(len(set(i.tolist())) < len(i) for i, _ in batches), "the batches must hold duplicates"
    state = _run(backend, 12, batches, decay)
    score, visits = ref_memory(12, batches, decay)
    np.testing.assert_allclose(to_numpy(state.score), score, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(to_numpy(state.visits), visits)


def test_update_without_standardisation(backend):
    batches = _batches(1, dup=False)
    state = _run(backend, 12, batches, 0.8, standardize=False)
    score, visits = ref_memory(12, batches, 0.8, standardize=False)
    np.testing.assert_allclose(to_numpy(state.score), score, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(to_numpy(state.visits), visits)


def test_first_visit_stores_the_standardised_score(backend):
    s = np.array([0.3, -0.2, 0.7, 0.1])
    state = _run(backend, 5, [(np.array([4, 0, 2, 1]), s)], 0.9)
    z = (s - s.mean()) / s.std()
    np.testing.assert_allclose(to_numpy(state.score)[[4, 0, 2, 1]], z, rtol=1e-12)
    assert to_numpy(state.score)[3] == 0.0
    np.testing.assert_array_equal(to_numpy(state.visits), [1, 1, 1, 0, 1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_never_touch_the_state(backend, bad):
    first = (np.array([0, 1, 2, 3]), np.array([0.1, 0.5, -0.3, 0.2]))
    second = (np.array([1, 2, 3, 2]), np.array([bad, 0.4, 1.0, bad]))
    state = _run(backend, 5, [first, second], 0.5)
    score, visits = ref_memory(5, [first, second], 0.5)
    out = to_numpy(state.score)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, score, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(to_numpy(state.visits), visits)
    assert to_numpy(state.visits)[1] == 1  # its only score this batch was not finite


def test_weights_match_reference(backend):
    batches = _batches(2)
    state = _run(backend, 12, batches, 0.6)
    score, visits = ref_memory(12, batches, 0.6)
    index = np.array([0, 3, 3, 11, 5, 7, 9, 2])
    for normalize in (True, False):
        w = backend.run(
            lambda st_, i, nz=normalize: gt.memory_weights(st_, i, eta=1.3, max_weight=2.5, normalize=nz),
            state,
            backend.asarray(index),
        )
        assert_array_like(w, state.score, shape=(8,), dtype=state.score.dtype)
        expected = ref_weights(score, visits, index, 1.3, 2.5, normalize)
        np.testing.assert_allclose(to_numpy(w), expected, rtol=1e-10)


def test_unvisited_examples_weigh_one(backend):
    state = gt.memory_init(6, like=backend.asarray(np.zeros(1)))
    w = gt.memory_weights(state, backend.asarray(np.array([0, 5, 2])), eta=2.0, max_weight=4.0)
    np.testing.assert_array_equal(to_numpy(w), 1.0)


def test_init_namespace_dtype_device(backend):
    like = backend.asarray(np.zeros(3), "float32")
    state = gt.memory_init(7, like=like)
    assert_array_like(state.score, like, shape=(7,), dtype=backend.dtype("float32"))
    assert_array_like(state.visits, like, shape=(7,), dtype=backend.dtype("int32"))
    state = gt.memory_update(
        state, backend.asarray(np.array([1, 2])), backend.asarray(np.array([0.0, 1.0])), decay=0.5
    )
    assert_array_like(state.score, like, shape=(7,), dtype=backend.dtype("float32"))
    assert_array_like(state.visits, like, shape=(7,), dtype=backend.dtype("int32"))


def test_half_scores_update_a_float32_memory(backend):
    if backend.name == "array_api_strict":
        pytest.skip("array_api_strict has no float16")
    state = gt.memory_init(3, like=backend.asarray(np.zeros(1), "float16"))
    assert state.score.dtype == backend.dtype("float32")
    s = backend.asarray(np.array([0.5, -0.5]), "float16")
    state = gt.memory_update(state, backend.asarray(np.array([0, 2])), s, decay=0.5)
    np.testing.assert_allclose(to_numpy(state.score), [1.0, 0.0, -1.0], rtol=1e-6)


def test_init_defaults_and_errors():
    state = gt.memory_init(3)
    assert state.score.shape == (3,)
    assert state.score.dtype == np.float32
    for bad in (0, -2, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"num_examples.*Received"):
            gt.memory_init(bad)
    with pytest.raises(TypeError, match=r"dtype.*Received"):
        gt.memory_init(3, dtype=np.int32)


def test_argument_errors(xp):
    state = gt.memory_init(4, like=xp.asarray(np.zeros(1)))
    s = xp.asarray(np.array([0.1, 0.2]))
    with pytest.raises(IndexError, match=r"`index`.*\[0, 4\).*Received.*4"):
        gt.memory_update(state, xp.asarray(np.array([0, 4])), s, decay=0.5)
    with pytest.raises(IndexError, match=r"`index`.*Received.*-1"):
        gt.memory_update(state, xp.asarray(np.array([-1, 2])), s, decay=0.5)
    with pytest.raises(IndexError, match=r"`index`"):
        gt.memory_weights(state, xp.asarray(np.array([7])))
    with pytest.raises(TypeError, match=r"`index`.*integer.*Received"):
        gt.memory_update(state, xp.asarray(np.array([0.0, 1.0])), s, decay=0.5)
    with pytest.raises(ValueError, match=r"`index`.*\(B,\).*Received.*\(1, 2\)"):
        gt.memory_update(state, xp.asarray(np.array([[0, 1]])), s, decay=0.5)
    with pytest.raises(ValueError, match=r"`score`.*\(2,\).*Received.*\(3,\)"):
        gt.memory_update(state, xp.asarray(np.array([0, 1])), xp.asarray(np.zeros(3)), decay=0.5)
    with pytest.raises(TypeError, match=r"`score`.*floating"):
        gt.memory_update(state, xp.asarray(np.array([0, 1])), xp.asarray(np.array([0, 1])), decay=0.5)
    with pytest.raises(ValueError, match=r"`decay`.*Received.*1"):
        gt.memory_update(state, xp.asarray(np.array([0, 1])), s, decay=1.0)
    with pytest.raises(ValueError, match=r"`eta`"):
        gt.memory_weights(state, xp.asarray(np.array([0])), eta=-1.0)
    with pytest.raises(ValueError, match=r"`max_weight`"):
        gt.memory_weights(state, xp.asarray(np.array([0])), max_weight=0.5)
    with pytest.raises(TypeError, match=r"`state`.*MemoryState"):
        gt.memory_weights((state.score, state.visits), xp.asarray(np.array([0])))


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_copy_true_leaves_the_input_state_alone(name):
    xp = np if name == "numpy" else pytest.importorskip("torch")
    state = gt.memory_init(5, like=xp.asarray(np.zeros(1)))
    index, s = xp.asarray(np.array([1, 3])), xp.asarray(np.array([0.0, 1.0]))
    new = gt.memory_update(state, index, s, decay=0.5)
    np.testing.assert_array_equal(to_numpy(state.score), 0.0)
    np.testing.assert_array_equal(to_numpy(state.visits), 0)
    in_place = gt.memory_update(state, index, s, decay=0.5, copy=False)
    np.testing.assert_array_equal(to_numpy(in_place.score), to_numpy(new.score))
    np.testing.assert_array_equal(to_numpy(state.score), to_numpy(new.score))  # written in place


def test_jit_ignores_out_of_range_rows_and_does_not_recompile():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    state = gt.memory_init(4, like=jnp.zeros(1))
    step = jax.jit(lambda st_, i, s: gt.memory_update(st_, i, s, decay=0.5))
    state = step(state, jnp.asarray([0, 1, 9, -1]), jnp.asarray([0.0, 1.0, 5.0, 5.0]))
    index, s = np.array([0, 1, 9, -1]), np.array([0.0, 1.0, 5.0, 5.0])
    # Traced out-of-range entries: no row written, and they do not enter the batch statistics.
    score, visits = ref_memory(4, [(index[:2], s[:2])], 0.5)
    np.testing.assert_allclose(np.asarray(state.score), score, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(state.visits), visits)
    for _ in range(3):
        state = step(state, jnp.asarray([2, 3, 0, 1]), jnp.asarray([0.3, 0.1, 0.2, 0.4]))
    assert step._cache_size() == 1
    assert len(jax.tree_util.tree_leaves(state)) == 2


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 7), st.floats(-1e3, 1e3, allow_nan=False)), min_size=1, max_size=12
    ),
    decay=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_property_batch_order_does_not_matter(data, decay, seed):
    index = np.array([i for i, _ in data])
    s = np.array([v for _, v in data])
    perm = np.random.default_rng(seed).permutation(len(data))
    base = gt.memory_init(8, like=np.zeros(1))
    base = gt.memory_update(base, np.arange(8), np.linspace(-1, 1, 8), decay=0.5)
    a = gt.memory_update(base, index, s, decay=decay)
    b = gt.memory_update(base, index[perm], s[perm], decay=decay)
    np.testing.assert_allclose(a.score, b.score, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(a.visits, b.visits)
    expected, visits = ref_memory(8, [(np.arange(8), np.linspace(-1, 1, 8)), (index, s)], decay)
    np.testing.assert_allclose(a.score, expected, rtol=1e-8, atol=1e-8)
    np.testing.assert_array_equal(a.visits, visits)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=2, max_size=16),
    eta=st.floats(0.0, 5.0),
    cap=st.floats(1.0, 10.0),
)
def test_property_state_finite_and_weights_bounded(scores, eta, cap):
    b = len(scores)
    s = np.asarray(scores, dtype=np.float32)
    state = gt.memory_init(b, like=s)
    state = gt.memory_update(state, np.arange(b), s, decay=0.3)
    state = gt.memory_update(state, np.arange(b)[::-1].copy(), s, decay=0.3)
    assert np.all(np.isfinite(state.score))
    # Standardised scores of a batch of B lie within sqrt(B - 1) standard deviations.
    assert np.all(np.abs(state.score) <= math.sqrt(b - 1) + 1e-3)
    raw = gt.memory_weights(state, np.arange(b), eta=eta, max_weight=cap, normalize=False)
    assert np.all(raw >= 1 / cap * (1 - 1e-6))
    assert np.all(raw <= cap * (1 + 1e-6))
    w = gt.memory_weights(state, np.arange(b), eta=eta, max_weight=cap)
    assert np.all(np.isfinite(w))
    assert float(np.mean(w)) == pytest.approx(1.0, rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(z=st.lists(st.floats(-3, 3), min_size=2, max_size=10))
def test_property_weights_non_increasing_in_running_score(z):
    score = np.asarray(z)
    state = gt.MemoryState(score, np.ones(len(z), dtype=np.int32))
    w = gt.memory_weights(state, np.arange(len(z)), eta=1.0, max_weight=3.0, normalize=False)
    order = np.argsort(score)
    assert np.all(np.diff(w[order]) <= 1e-12)

"""Whole-step functions against a float64 reference run of the same semantics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import gradtail_ops as gt

from . import reference as ref
from .conftest import assert_array_like, to_numpy

CURVE = gt.WeightCurve(kind="sigmoid", max_weight=3.0, threshold=0.2, temperature=0.3)


def _reference_run(batches, reference, decay, warmup):
    """Score each batch against the EMA of previous batches' references (materialised)."""
    history, out = [], []
    for step, (a, d) in enumerate(batches):
        per = ref.per_example_linear_grads(a, d, True)
        flat = ref.flatten_examples(per)
        if history:
            mean = ref.ema(history, [decay] * len(history))
            align = ref.cosine_rows(flat, mean)
        else:
            align = np.zeros(len(flat))
        if step == 0 or step < warmup:
            weights = np.ones(len(flat))
        else:
            weights = np.array([1 + 2 * ref.sigmoid((0.2 - x) / 0.3) for x in align])
        norms = np.sqrt(np.sum(flat**2, axis=1))
        coef = 1 / norms if reference == "direction" else np.ones(len(flat))
        history.append((coef[:, None] * flat).mean(axis=0))
        out.append((weights, align))
    return out


def _batches(seed, n=4, batch=6, d_in=5, d_out=3):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(batch, d_in)), rng.normal(size=(batch, d_out))) for _ in range(n)]


@pytest.mark.parametrize("reference", gt.REFERENCES)
@pytest.mark.parametrize("warmup", [0, 2])
def test_linear_step_matches_reference(backend, reference, warmup):
    batches = _batches(0)
    expected = _reference_run(batches, reference, 0.8, warmup)
    state = gt.ema_init([(backend.asarray(np.zeros((3, 5))), backend.asarray(np.zeros(3)))])
    for (a, d), (w_ref, a_ref) in zip(batches, expected, strict=True):
        out = backend.run(
            gt.linear_score_and_update,
            state,
            [(backend.asarray(a), backend.asarray(d))],
            decay=0.8,
            reference=reference,
            curve=CURVE,
            warmup_steps=warmup,
        )
        state = out.state
        assert_array_like(out.weights, backend.asarray(a), shape=(6,), dtype=backend.dtype("float64"))
        np.testing.assert_allclose(to_numpy(out.alignment), a_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(to_numpy(out.weights), w_ref, rtol=1e-9)
    assert int(to_numpy(state.count)) == len(batches)


@pytest.mark.parametrize("reference", gt.REFERENCES)
def test_dense_step_matches_reference(backend, reference):
    batches = _batches(1)
    expected = _reference_run(batches, reference, 0.8, 0)
    state = gt.ema_init([backend.asarray(np.zeros((3, 5))), backend.asarray(np.zeros(3))])
    for (a, d), (w_ref, a_ref) in zip(batches, expected, strict=True):
        per = [backend.asarray(g) for g in ref.per_example_linear_grads(a, d, True)]
        out = backend.run(gt.score_and_update, state, per, decay=0.8, reference=reference, curve=CURVE)
        state = out.state
        np.testing.assert_allclose(to_numpy(out.alignment), a_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(to_numpy(out.weights), w_ref, rtol=1e-9)


def test_reduce_mean_sees_batch_reference(xp):
    seen = []

    def reduce_mean(tree):
        seen.append(tree)
        return tree

    a, d = _batches(2, n=1)[0]
    state = gt.ema_init([(xp.asarray(np.zeros((3, 5))), xp.asarray(np.zeros(3)))])
    gt.linear_score_and_update(
        state, [(xp.asarray(a), xp.asarray(d))], reference="mean", reduce_mean=reduce_mean
    )
    per = ref.per_example_linear_grads(a, d, True)
    np.testing.assert_allclose(to_numpy(seen[0][0][0]), per[0].mean(axis=0), rtol=1e-12)


def test_defaults_are_the_documented_formulation(xp):
    a, d = _batches(3, n=1, batch=10)[0]
    state = gt.ema_init([(xp.asarray(np.zeros((3, 5))), xp.asarray(np.zeros(3)))])
    layers = [(xp.asarray(a), xp.asarray(d))]
    out = gt.linear_score_and_update(gt.linear_score_and_update(state, layers).state, layers)
    w = to_numpy(out.weights)
    assert w.mean() == pytest.approx(1.0)  # normalised
    assert len(np.unique(np.round(w, 12))) == 2  # rank curve: two levels
    assert gt.DEFAULT_REFERENCE == "direction"
    assert gt.DEFAULT_CURVE.kind == "rank"


def test_linear_step_does_not_recompile():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    step = jax.jit(lambda s, layers: gt.linear_score_and_update(s, layers, decay=0.9))
    state = gt.ema_init([(jnp.zeros((3, 5)), jnp.zeros(3))])
    for a, d in _batches(4, n=4):
        state = step(state, [(jnp.asarray(a), jnp.asarray(d))]).state
    assert step._cache_size() == 1
    assert int(state.count) == 4


@pytest.mark.parametrize(
    ("option", "match"), [({"reference": "median"}, "reference"), ({"warmup_steps": -1}, "warmup")]
)
def test_bad_options(xp, option, match):
    state = gt.ema_init(xp.asarray(np.zeros(3)))
    with pytest.raises(ValueError, match=match):
        gt.score_and_update(state, xp.asarray(np.zeros((2, 3))), **option)


def test_weighted_batch_mean(backend):
    g = np.random.default_rng(5).normal(size=(4, 3, 2))
    c = np.array([0.5, 1.0, 2.0, 0.0])
    out = backend.run(gt.weighted_batch_mean, backend.asarray(g), backend.asarray(c))
    np.testing.assert_allclose(to_numpy(out), np.einsum("i,ijk->jk", c, g) / 4, rtol=1e-12)


def test_core_imports_no_framework():
    code = (
        "import sys, numpy as np, gradtail_ops as gt\n"
        "s = gt.ema_init([(np.zeros((3, 4)), np.zeros(3))])\n"
        "o = gt.linear_score_and_update(s, [(np.ones((2, 4)), np.ones((2, 3)))])\n"
        "gt.alignment(np.ones((2, 3)), np.ones(3)); gt.weight_curve(o.alignment, kind='rank')\n"
        "bad = [m for m in ('torch', 'jax', 'jaxlib', 'keras', 'tensorflow', 'cupy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_custom_score_replaces_cosine(xp):
    # A magnitude-aware score: -(1 - cos) * ||g||, low for large disagreeing gradients.
    def magnitude(dots, sq, ref_sq):
        cos = gt.cosine_from_dots(dots, sq, ref_sq)
        return -(1.0 - cos) * sq**0.5

    batches = _batches(6, n=2)
    state = gt.ema_init([(xp.asarray(np.zeros((3, 5))), xp.asarray(np.zeros(3)))])
    for a, d in batches:
        out = gt.linear_score_and_update(
            state, [(xp.asarray(a), xp.asarray(d))], reference="mean", score=magnitude
        )
        previous, state = state, out.state
    per = ref.per_example_linear_grads(*batches[1], True)
    flat = ref.flatten_examples(per)
    mean = ref.flatten_examples(ref.per_example_linear_grads(*batches[0], True)).mean(axis=0)
    expected = -(1 - ref.cosine_rows(flat, mean)) * np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(to_numpy(out.alignment), expected, rtol=1e-9)
    assert int(to_numpy(previous.count)) == 1


def test_vmap_over_independent_problems():
    jax = pytest.importorskip("jax")
    # As the `backend` fixture does: without it this test ran in float32 when run alone.
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(7)
    g, m = rng.normal(size=(4, 6, 5)), rng.normal(size=(4, 5))  # 4 problems of B=6
    out = jax.vmap(gt.alignment)(jax.numpy.asarray(g), jax.numpy.asarray(m))
    expected = np.stack([ref.alignment([g[k]], [m[k]]) for k in range(4)])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-10)

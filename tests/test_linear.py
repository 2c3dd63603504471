"""Factored linear-layer ops on every backend against materialised per-example gradients."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import gradtail_ops as gt

from . import reference as ref
from .conftest import assert_array_like, to_numpy

SHAPES = {
    "2d": ((6, 5), (6, 4)),
    "3d": ((4, 3, 5), (4, 3, 2)),
}


def _layer(shape_key, seed=0):
    rng = np.random.default_rng(seed)
    a_shape, d_shape = SHAPES[shape_key]
    a, d = rng.normal(size=a_shape), rng.normal(size=d_shape)
    gw, gb = rng.normal(size=(d_shape[-1], a_shape[-1])), rng.normal(size=(d_shape[-1],))
    return a, d, gw, gb


@pytest.mark.parametrize("shape_key", ["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_linear_alignment_matches_materialised(backend, shape_key, bias, method):
    a, d, gw, gb = _layer(shape_key)
    args = [backend.asarray(a), backend.asarray(d), backend.asarray(gw)]
    if bias:
        args.append(backend.asarray(gb))
    out = backend.run(gt.linear_alignment, *args, method=method)
    assert_array_like(out, args[0], shape=(a.shape[0],), dtype=backend.dtype("float64"))
    expected = ref.alignment(ref.per_example_linear_grads(a, d, bias), [gw, gb] if bias else [gw])
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape_key", ["2d", "3d"])
@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_linear_sq_norms(backend, shape_key, method):
    a, d, _, _ = _layer(shape_key, seed=3)
    out = backend.run(gt.linear_sq_norms, backend.asarray(a), backend.asarray(d), method=method)
    flat = ref.flatten_examples(ref.per_example_linear_grads(a, d, True))
    np.testing.assert_allclose(to_numpy(out), np.sum(flat**2, axis=1), rtol=1e-10)


@pytest.mark.parametrize("shape_key", ["2d", "3d"])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_mean_grad(backend, shape_key, weighted):
    a, d, _, _ = _layer(shape_key, seed=4)
    coef = np.random.default_rng(5).uniform(0.1, 2.0, size=a.shape[0])
    kwargs = {"example_weights": backend.asarray(coef)} if weighted else {}
    fn = gt.linear_mean_grad
    gw, gb = backend.run(lambda x, y, **kw: fn(x, y, **kw), backend.asarray(a), backend.asarray(d), **kwargs)
    per = ref.per_example_linear_grads(a, d, True)
    c = coef if weighted else np.ones(a.shape[0])
    np.testing.assert_allclose(to_numpy(gw), np.einsum("i,ijk->jk", c, per[0]) / a.shape[0], rtol=1e-10)
    np.testing.assert_allclose(to_numpy(gb), np.einsum("i,ij->j", c, per[1]) / a.shape[0], rtol=1e-10)
    assert_array_like(gw, backend.asarray(a), shape=per[0].shape[1:], dtype=backend.dtype("float64"))


def test_linear_mean_grad_without_bias(xp):
    gw, gb = gt.linear_mean_grad(xp.asarray(np.ones((2, 3))), xp.asarray(np.ones((2, 4))), bias=False)
    assert gb is None
    assert tuple(gw.shape) == (4, 3)


def test_multi_layer_is_one_cosine(backend):
    a1, d1, gw1, gb1 = _layer("2d", seed=6)
    a2, d2, gw2, _ = _layer("2d", seed=7)
    d2 = d2[: a2.shape[0]]
    layers = [(backend.asarray(a1), backend.asarray(d1)), (backend.asarray(a2), backend.asarray(d2))]
    means = [(backend.asarray(gw1), backend.asarray(gb1)), (backend.asarray(gw2),)]
    out = backend.run(gt.multi_linear_alignment, layers, means)
    per = ref.per_example_linear_grads(a1, d1, True) + ref.per_example_linear_grads(a2, d2, False)
    expected = ref.alignment(per, [gw1, gb1, gw2])
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-10, atol=1e-12)


def test_bfloat16_layer_accumulates_in_float32(backend):
    if backend.name not in ("torch", "jax", "jax-jit"):
        pytest.skip("bfloat16 exists only in torch and JAX")
    a, d, gw, gb = _layer("2d", seed=8)
    ax, dx = backend.asarray(a, "bfloat16"), backend.asarray(d, "bfloat16")
    out = backend.run(
        gt.linear_alignment, ax, dx, backend.asarray(gw, "float32"), backend.asarray(gb, "float32")
    )
    assert_array_like(out, ax, shape=(a.shape[0],), dtype=backend.dtype("float32"))
    expected = ref.alignment(ref.per_example_linear_grads(to_numpy(ax), to_numpy(dx), True), [gw, gb])
    np.testing.assert_allclose(to_numpy(out), expected, atol=1e-5)


def test_2d_never_materialises_per_example_grads():
    # numpy reports its allocations to tracemalloc; (B, d_out, d_in) would be 64 MiB here.
    rng = np.random.default_rng(9)
    batch, d_in, d_out = 64, 512, 256
    a, d = rng.normal(size=(batch, d_in)), rng.normal(size=(batch, d_out))
    gw, gb = rng.normal(size=(d_out, d_in)), rng.normal(size=d_out)
    tracemalloc.start()
    gt.linear_alignment(a, d, gw, gb)
    gt.linear_mean_grad(a, d)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < batch * d_in * d_out * 8 / 20, peak


def test_sequence_materialised_path_is_chunked(monkeypatch):
    import gradtail_ops.linear as linear

    monkeypatch.setattr(linear, "_CHUNK_ELEMENTS", 2 * 5 * 3)  # two examples per chunk
    a, d, gw, _ = _layer("3d", seed=10)
    d = d[..., :2]
    a = a[..., :3]
    gw = gw[:2, :3]
    out = gt.linear_alignment(a, d, gw, method="materialize")
    expected = ref.alignment(ref.per_example_linear_grads(a, d, False), [gw])
    np.testing.assert_allclose(out, expected, rtol=1e-10)


def test_auto_method_picks_cheaper_formula():
    import gradtail_ops.linear as linear

    assert linear._use_ghost("auto", steps=4, d_in=512, d_out=512, with_dots=True)  # T^2 tiny vs d^2
    assert not linear._use_ghost("auto", steps=128, d_in=16, d_out=16, with_dots=True)  # T^2 dominates
    # Measured crossover (benchmarks/core_ops.py): T=128, 1024->1000 is ghost, 256->256 is not.
    assert linear._use_ghost("auto", steps=128, d_in=1024, d_out=1000, with_dots=True)
    assert not linear._use_ghost("auto", steps=128, d_in=256, d_out=256, with_dots=True)
    assert linear._use_ghost("auto", steps=128, d_in=512, d_out=512, with_dots=False)


@pytest.mark.parametrize(
    ("a_shape", "d_shape", "match"),
    [
        ((4,), (4, 2), r"\(B, d_in\) or \(B, T, d_in\).*\(4,\)"),
        ((4, 3), (5, 2), r"inputs shape \(4, 3\) and output_grads shape \(5, 2\)"),
        ((4, 2, 3), (4, 2), r"inputs shape \(4, 2, 3\) and output_grads shape \(4, 2\)"),
    ],
)
def test_bad_shapes(xp, a_shape, d_shape, match):
    a, d = xp.asarray(np.zeros(a_shape)), xp.asarray(np.zeros(d_shape))
    with pytest.raises(ValueError, match=match):
        gt.linear_alignment(a, d, xp.asarray(np.zeros((2, 3))))


def test_bad_reference_shapes(xp):
    a, d = xp.asarray(np.zeros((4, 3))), xp.asarray(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"mean_weight_grad.*\(2, 3\).*\(3, 2\)"):
        gt.linear_alignment(a, d, xp.asarray(np.zeros((3, 2))))
    with pytest.raises(ValueError, match=r"mean_bias_grad.*\(2,\).*\(3,\)"):
        gt.linear_alignment(a, d, xp.asarray(np.zeros((2, 3))), xp.asarray(np.zeros(3)))


def test_bad_method(xp):
    a, d = xp.asarray(np.zeros((4, 3))), xp.asarray(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="method"):
        gt.linear_sq_norms(a, d, method="fast")

"""`alignment` and `cosine_from_dots` on every backend against the float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

import gradtail_ops as gt

from . import reference as ref
from .conftest import assert_array_like, to_numpy


def test_single_array_matches_reference(backend):
    rng = np.random.default_rng(0)
    g = rng.normal(size=(7, 3, 4))
    m = rng.normal(size=(3, 4))
    out = backend.run(gt.alignment, backend.asarray(g), backend.asarray(m))
    assert_array_like(out, backend.asarray(g), shape=(7,), dtype=backend.dtype("float64"))
    np.testing.assert_allclose(to_numpy(out), ref.alignment([g], [m]), rtol=1e-12, atol=1e-12)


def test_list_of_parameters_is_one_cosine(backend):
    rng = np.random.default_rng(1)
    gs = [rng.normal(size=(5, 4, 3)), rng.normal(size=(5, 4))]
    ms = [rng.normal(size=(4, 3)), rng.normal(size=(4,))]
    out = backend.run(gt.alignment, [backend.asarray(g) for g in gs], [backend.asarray(m) for m in ms])
    np.testing.assert_allclose(to_numpy(out), ref.alignment(gs, ms), rtol=1e-12, atol=1e-12)
    # Not the mean of per-parameter cosines: the parts are concatenated.
    separate = np.mean([ref.alignment([g], [m]) for g, m in zip(gs, ms, strict=True)], axis=0)
    assert not np.allclose(to_numpy(out), separate)


def test_zero_example_and_zero_reference_give_zero(backend):
    g = np.array([[0.0, 0.0], [1.0, 2.0]])
    out = to_numpy(backend.run(gt.alignment, backend.asarray(g), backend.asarray(np.array([1.0, 0.0]))))
    np.testing.assert_allclose(out, [0.0, 1 / np.sqrt(5)], rtol=1e-12)
    out = to_numpy(backend.run(gt.alignment, backend.asarray(g), backend.asarray(np.zeros(2))))
    np.testing.assert_array_equal(out, [0.0, 0.0])


def test_non_finite_example_is_isolated(backend):
    g = np.array([[1.0, 0.0], [np.nan, 1.0], [np.inf, 0.0], [0.0, 1.0]])
    out = to_numpy(backend.run(gt.alignment, backend.asarray(g), backend.asarray(np.array([1.0, 1.0]))))
    assert np.isnan(out[1])
    assert np.isnan(out[2])
    np.testing.assert_allclose(out[[0, 3]], [1 / np.sqrt(2)] * 2, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_low_precision_accumulates_in_float32(backend, dtype):
    if dtype == "bfloat16" and backend.name not in ("torch", "jax", "jax-jit"):
        pytest.skip("bfloat16 exists only in torch and JAX")
    if dtype == "float16" and backend.name == "array_api_strict":
        pytest.skip("array_api_strict has no float16")
    rng = np.random.default_rng(2)
    g = rng.normal(size=(6, 50)).astype(np.float32)
    m = rng.normal(size=(50,)).astype(np.float32)
    gx, mx = backend.asarray(g, dtype), backend.asarray(m, dtype)
    out = backend.run(gt.alignment, gx, mx)
    assert_array_like(out, gx, shape=(6,), dtype=backend.dtype("float32"))
    expected = ref.alignment([to_numpy(gx)], [to_numpy(mx)])  # the rounded inputs, in float64
    np.testing.assert_allclose(to_numpy(out), expected, atol=1e-5)


def test_cosine_from_dots_clips_and_guards(backend):
    dots = backend.asarray(np.array([2.0, 1.0, 0.0]))
    sq = backend.asarray(np.array([1.0, 0.0, np.inf]))
    out = to_numpy(backend.run(gt.cosine_from_dots, dots, sq, backend.asarray(np.array(1.0))))
    assert out[0] == 1.0
    assert out[1] == 0.0
    assert np.isnan(out[2])


def test_shape_mismatch_names_both_shapes(xp):
    g, m = xp.asarray(np.zeros((4, 3))), xp.asarray(np.zeros((2,)))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        gt.alignment(g, m)


def test_structure_mismatch(xp):
    g = xp.asarray(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="same structure"):
        gt.alignment([g, g], [xp.asarray(np.zeros(3))])


def test_integer_input_rejected(xp):
    with pytest.raises(TypeError, match="real floating-point dtype"):
        gt.alignment(xp.asarray(np.zeros((2, 3), dtype=np.int64)), xp.asarray(np.zeros(3)))


def test_mixing_libraries_raises_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="one array library"):
        gt.alignment(torch.zeros(2, 3), np.zeros(3))

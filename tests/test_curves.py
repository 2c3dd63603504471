"""Weight curves on every backend against scalar float64 references."""

from __future__ import annotations

import numpy as np
import pytest

import gradtail_ops as gt

from . import reference as ref
from .conftest import assert_array_like, to_numpy

ALIGN = np.array([-1.0, -0.6, -0.2, 0.0, 0.05, 0.3, 0.8, 1.0])


def _curve(backend, a, **options):
    return backend.run(lambda x, **kw: gt.weight_curve(x, **kw), backend.asarray(a), **options)


def test_sigmoid_matches_scalar_formula(backend):
    out = _curve(backend, ALIGN, kind="sigmoid", max_weight=4.0, threshold=0.1, temperature=0.2)
    assert_array_like(out, backend.asarray(ALIGN), shape=ALIGN.shape, dtype=backend.dtype("float64"))
    expected = [1 + 3 * ref.sigmoid((0.1 - a) / 0.2) for a in ALIGN]
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-12)


def test_spare_negative_falls_back_for_strongly_negative(backend):
    out = to_numpy(
        _curve(backend, ALIGN, kind="spare_negative", max_weight=3.0, floor=-0.5, temperature=0.05)
    )
    expected = [1 + 2 * ref.sigmoid(-a / 0.05) * ref.sigmoid((a + 0.5) / 0.05) for a in ALIGN]
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert out[0] < 1.01
    assert out[2] > 2.9


def test_rank_matches_counting_reference(backend):
    a = np.array([0.3, -0.1, 0.3, 0.9, np.nan, -0.5, 0.3, 0.2])
    out = to_numpy(_curve(backend, a, kind="rank", quantile=0.5, max_weight=2.5))
    np.testing.assert_array_equal(out, ref.rank_weights(a, 0.5, 2.5))


def test_zscore_standardises_over_finite_entries(backend):
    a = np.array([0.1, 0.2, 0.3, np.inf, 0.6])
    out = to_numpy(_curve(backend, a, kind="zscore", threshold=0.0, temperature=1.0, max_weight=3.0))
    fin = a[np.isfinite(a)]
    z = (a - fin.mean()) / np.sqrt(fin.var() + np.finfo(np.float64).eps)
    expected = [1 + 2 * ref.sigmoid(-zi) if np.isfinite(zi) else 1.0 for zi in z]
    np.testing.assert_allclose(out, expected, rtol=1e-9)


@pytest.mark.parametrize("kind", gt.CURVES)
def test_non_finite_alignment_gets_weight_one(backend, kind):
    a = np.array([np.nan, np.inf, -np.inf, -0.9, 0.9])
    out = to_numpy(_curve(backend, a, kind=kind))
    np.testing.assert_array_equal(out[:3], 1.0)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("kind", gt.CURVES)
def test_normalize_gives_mean_one(backend, kind):
    out = to_numpy(_curve(backend, ALIGN, kind=kind, normalize=True))
    assert out.mean() == pytest.approx(1.0, rel=1e-12)


def test_max_weight_one_is_identity(backend):
    out = to_numpy(_curve(backend, ALIGN, kind="rank", max_weight=1.0, normalize=True))
    np.testing.assert_array_equal(out, 1.0)


def test_default_curve_upweights_low_alignment(xp):
    out = to_numpy(gt.weight_curve(xp.asarray(np.array([-0.5, 0.5]))))
    assert out[0] > 2.9
    assert out[1] < 1.02


def test_weight_curve_object_forwards_options(xp):
    a = xp.asarray(ALIGN)
    curve = gt.WeightCurve(kind="sigmoid", max_weight=2.0, temperature=0.3)
    np.testing.assert_array_equal(
        to_numpy(curve(a)), to_numpy(gt.weight_curve(a, max_weight=2.0, temperature=0.3))
    )
    assert hash(curve) == hash(gt.WeightCurve(kind="sigmoid", max_weight=2.0, temperature=0.3))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kind": "cubic"}, "kind"),
        ({"max_weight": 0.5}, "max_weight"),
        ({"temperature": 0.0}, "temperature"),
        ({"quantile": 1.5}, "quantile"),
    ],
)
def test_bad_options(xp, options, match):
    with pytest.raises(ValueError, match=match):
        gt.weight_curve(xp.asarray(ALIGN), **options)


def test_bad_shape_and_dtype(xp):
    with pytest.raises(ValueError, match=r"\(B,\).*\(2, 2\)"):
        gt.weight_curve(xp.asarray(np.zeros((2, 2))))
    with pytest.raises(TypeError, match="floating"):
        gt.weight_curve(xp.asarray(np.zeros(3, dtype=np.int32)))


def test_weight_curve_object_validates_at_construction():
    with pytest.raises(ValueError, match="max_weight"):
        gt.WeightCurve(max_weight=0.5)
    with pytest.raises(ValueError, match="kind"):
        gt.WeightCurve(kind="cubic")

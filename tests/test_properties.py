"""Hypothesis property tests of the GradTail math and state, in float64 NumPy.

Every expected value comes from the independent references in ``tests/reference.py`` (or
from NumPy directly), never from gradtail_ops itself. Backend coverage is the business of
the other test files; these are about the math.

Tolerances: inputs are drawn with bounded magnitudes (no values below 1e-3 in absolute
value except exact zeros, none above 1e3) so that no product underflows, and the
comparisons of factored against materialised quantities use a tolerance scaled by the
size of the terms that can cancel (an ill-conditioned cosine is not a wrong one).
"""

from __future__ import annotations

import math
import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradtail_ops as gt

try:
    from . import reference as ref
except ImportError:  # tests/ collected as a plain directory, not a package
    import reference as ref  # type: ignore[no-redef]

# GRADTAIL_PROPERTY_EXAMPLES=2000 runs a deeper search locally; 50 keeps the suite fast.
PROPERTY = settings(max_examples=int(os.environ.get("GRADTAIL_PROPERTY_EXAMPLES", "50")), deadline=None)
F64 = np.float64
CURVE_KINDS = ("sigmoid", "spare_negative", "rank", "zscore")
MONOTONE_KINDS = ("sigmoid", "rank", "zscore")

# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------

#: Bounded, well-scaled finite values: exact zero or 1e-3 <= |x| <= 1e3.
BOUNDED = st.one_of(
    st.just(0.0),
    st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False),
    st.floats(-1e3, -1e-3, allow_nan=False, allow_infinity=False),
)
#: Positive scale factors.
SCALES = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)
#: Any finite value whose square (times a few hundred) cannot overflow.
WIDE_FINITE = st.floats(-1e100, 1e100, allow_nan=False, allow_infinity=False)
#: Adversarial values: non-finite, huge (up to 1e300, so that sums of a few dozen cannot
#: overflow), tiny, subnormal, signed zeros, and ordinary values.
ADVERSARIAL = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e300, -1e300, 5e-324, -5e-324]),
    st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False),
    st.floats(-1.0, 1.0),
)
#: Quantiles, with the exact fractions at which ``below < quantile * n`` is a tie.
QUANTILES = st.one_of(st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0))
DECAYS = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]), st.floats(0.0, 1.0))


def bounded_arrays(shape, elements=BOUNDED):
    return hnp.arrays(F64, shape, elements=elements)


@st.composite
def dense_case(draw, elements=BOUNDED):
    """Per-example gradients (B, *S) and a reference of shape S."""
    batch = draw(st.integers(1, 6))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4))
    grads = draw(bounded_arrays((batch, *shape), elements))
    mean = draw(bounded_arrays(shape, elements))
    return grads, mean


@st.composite
def linear_layer(draw, batch=None, elements=BOUNDED):
    """One linear layer: inputs (B, [T,] d_in), output grads (B, [T,] d_out), references."""
    batch = draw(st.integers(1, 5)) if batch is None else batch
    seq = draw(st.booleans())
    steps = draw(st.integers(1, 4))
    d_in, d_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    lead = (batch, steps) if seq else (batch,)
    a = draw(bounded_arrays((*lead, d_in), elements))
    d = draw(bounded_arrays((*lead, d_out), elements))
    bias = draw(st.booleans())
    gw = draw(bounded_arrays((d_out, d_in), elements))
    gb = draw(bounded_arrays((d_out,), elements)) if bias else None
    return a, d, gw, gb


def assert_close(got, want, *, atol, rtol=0.0, what=""):
    """``|got - want| <= atol + rtol * |want|`` elementwise; ``atol`` may be an array."""
    got, want = np.asarray(got, F64), np.asarray(want, F64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want)
    bound = np.broadcast_to(np.asarray(atol, F64) + rtol * np.abs(want), err.shape)
    bad = ~(err <= bound)
    assert not np.any(bad), (
        f"{what}: {int(np.sum(bad))} of {err.size} elements off; got {got[bad]}, want {want[bad]}, "
        f"error {err[bad]}, allowed {bound[bad]}"
    )


def _abs_scale(a, d, bias):
    """Per example, the squared norm of the gradient built from |a| and |d|.

    It bounds every term that can cancel in ``<g_i, G>`` or ``||g_i||^2``, so rounding
    errors of any summation order are a small multiple of ``eps * scale``.
    """
    return np.sum(ref.flatten_examples(ref.per_example_linear_grads(np.abs(a), np.abs(d), bias)) ** 2, axis=1)


def _cos_tolerance(flat, flat_abs, mean_vec):
    """Absolute tolerance on each cosine: 1e-9 times the conditioning of that cosine.

    The error of a cosine computed in any order is about ``eps * ||g_abs|| / ||g||``
    (cancellation in the gradient itself) plus ``eps * sqrt(P)`` (in the inner product).
    """
    norms = np.sqrt(np.sum(flat**2, axis=1))
    abs_norms = np.sqrt(np.sum(flat_abs**2, axis=1))
    ratio = np.where(norms > 0, abs_norms / np.where(norms > 0, norms, 1.0), 0.0)
    return 1e-9 * (1.0 + ratio + math.sqrt(flat.shape[1] + mean_vec.size))


def _finite_state(state):
    leaves = []

    def walk(x):
        if isinstance(x, (list, tuple)):
            for item in x:
                walk(item)
        else:
            leaves.append(np.asarray(x))

    walk(state.mean)
    return all(np.all(np.isfinite(x)) for x in leaves) and bool(np.isfinite(state.total))


# ---------------------------------------------------------------------------------------
# Alignment (cosine)
# ---------------------------------------------------------------------------------------


@PROPERTY
@given(dense_case(WIDE_FINITE))
def test_alignment_in_unit_interval_and_finite(case):
    grads, mean = case
    cos = gt.alignment(grads, mean)
    assert cos.shape == (grads.shape[0],)
    assert np.all(np.isfinite(cos)), cos
    assert np.all((cos >= -1.0) & (cos <= 1.0)), cos


@PROPERTY
@given(bounded_arrays(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=5)), st.data())
def test_alignment_of_parallel_gradients_is_plus_or_minus_one(mean, data):
    # Rounding pushes |dot| / (|g| |G|) past 1 for parallel vectors: the cosine must clip.
    factors = data.draw(
        hnp.arrays(F64, st.integers(1, 8), elements=st.one_of(SCALES, SCALES.map(lambda x: -x))),
        label="factors",
    )
    grads = factors.reshape((-1,) + (1,) * mean.ndim) * mean
    cos = gt.alignment(grads, mean)
    assert np.all((cos >= -1.0) & (cos <= 1.0)), cos
    want = np.sign(factors) if np.any(mean != 0) else np.zeros_like(factors)
    assert_close(cos, want, atol=1e-12)


@PROPERTY
@given(dense_case(), st.data())
def test_alignment_matches_reference_and_zero_cases(case, data):
    grads, mean = case
    batch = grads.shape[0]
    zero_rows = data.draw(hnp.arrays(np.bool_, (batch,)), label="zero_rows")
    grads = grads.copy()
    grads[zero_rows] = 0.0
    cos = gt.alignment(grads, mean)
    flat = grads.reshape(batch, -1)
    tol = _cos_tolerance(flat, np.abs(flat), mean.ravel())
    assert_close(cos, ref.alignment([grads], [mean]), rtol=0, atol=tol)
    assert np.all(cos[zero_rows] == 0.0)
    np.testing.assert_array_equal(gt.alignment(grads, np.zeros_like(mean)), np.zeros(batch))


@PROPERTY
@given(dense_case(), st.data())
def test_alignment_of_parameter_list_is_one_cosine(case, data):
    grads, mean = case
    batch = grads.shape[0]
    extra = data.draw(bounded_arrays((batch, data.draw(st.integers(1, 3)))), label="extra")
    extra_mean = data.draw(bounded_arrays(extra.shape[1:]), label="extra_mean")
    cos = gt.alignment([grads, extra], [mean, extra_mean])
    flat = ref.flatten_examples([grads, extra])
    vec = np.concatenate([mean.ravel(), extra_mean.ravel()])
    tol = _cos_tolerance(flat, np.abs(flat), vec)
    assert_close(cos, ref.alignment([grads, extra], [mean, extra_mean]), rtol=0, atol=tol)


@PROPERTY
@given(dense_case(), st.data(), SCALES)
def test_alignment_invariant_to_positive_scaling(case, data, ref_scale):
    grads, mean = case
    batch = grads.shape[0]
    scales = data.draw(hnp.arrays(F64, (batch,), elements=SCALES), label="example_scales")
    expand = (batch,) + (1,) * (grads.ndim - 1)
    scaled = gt.alignment(grads * scales.reshape(expand), mean * ref_scale)
    flat = grads.reshape(batch, -1)
    tol = 4 * _cos_tolerance(flat, np.abs(flat), mean.ravel())
    assert_close(scaled, gt.alignment(grads, mean), rtol=0, atol=tol)
    # And both against the reference, so a scale-invariant but wrong cosine cannot pass.
    assert_close(scaled, ref.alignment([grads], [mean]), rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------
# Factored linear-layer ops == materialised per-example gradients
# ---------------------------------------------------------------------------------------


@PROPERTY
@given(linear_layer(), st.sampled_from(["auto", "ghost", "materialize"]))
def test_linear_alignment_matches_materialised(layer, method):
    a, d, gw, gb = layer
    bias = gb is not None
    per_example = ref.per_example_linear_grads(a, d, bias)
    mean = [gw] if gb is None else [gw, gb]
    want = ref.alignment(per_example, mean)
    got = gt.linear_alignment(a, d, gw, gb, method=method)
    flat = ref.flatten_examples(per_example)
    flat_abs = ref.flatten_examples(ref.per_example_linear_grads(np.abs(a), np.abs(d), bias))
    vec = np.concatenate([m.ravel() for m in mean])
    assert got.shape == want.shape
    assert_close(got, want, rtol=0, atol=_cos_tolerance(flat, flat_abs, vec))


@PROPERTY
@given(st.data())
def test_multi_linear_alignment_matches_materialised(data):
    batch = data.draw(st.integers(1, 4), label="batch")
    n_layers = data.draw(st.integers(1, 3), label="n_layers")
    layers = [data.draw(linear_layer(batch=batch), label=f"layer{k}") for k in range(n_layers)]
    method = data.draw(st.sampled_from(["auto", "ghost", "materialize"]), label="method")
    per_example, per_example_abs, means = [], [], []
    for a, d, gw, gb in layers:
        bias = gb is not None
        per_example += ref.per_example_linear_grads(a, d, bias)
        per_example_abs += ref.per_example_linear_grads(np.abs(a), np.abs(d), bias)
        means.append((gw,) if gb is None else (gw, gb))
    flat_means = [m for mean in means for m in mean]
    want = ref.alignment(per_example, flat_means)
    got = gt.multi_linear_alignment([(a, d) for a, d, _, _ in layers], means, method=method)
    vec = np.concatenate([m.ravel() for m in flat_means])
    tol = _cos_tolerance(ref.flatten_examples(per_example), ref.flatten_examples(per_example_abs), vec)
    assert_close(got, want, rtol=0, atol=tol)


@PROPERTY
@given(linear_layer(), st.booleans())
def test_linear_sq_norms_ghost_and_materialize_match_materialised(layer, bias):
    a, d, _, _ = layer
    want = np.sum(ref.flatten_examples(ref.per_example_linear_grads(a, d, bias)) ** 2, axis=1)
    atol = 1e-12 * _abs_scale(a, d, bias)
    for method in ("ghost", "materialize", "auto"):
        got = gt.linear_sq_norms(a, d, bias=bias, method=method)
        assert_close(got, want, rtol=1e-12, atol=atol, what=method)


@PROPERTY
@given(linear_layer(), st.booleans(), st.data())
def test_linear_mean_grad_matches_materialised(layer, weighted, data):
    a, d, _, gb = layer
    bias = gb is not None
    batch = a.shape[0]
    coef = data.draw(bounded_arrays((batch,)), label="example_weights") if weighted else None
    c = np.ones(batch) if coef is None else coef
    per_example = ref.per_example_linear_grads(a, d, bias)
    per_example_abs = ref.per_example_linear_grads(np.abs(a), np.abs(d), bias)
    got = gt.linear_mean_grad(a, d, bias=bias, example_weights=coef)
    assert len(got) == 2
    if not bias:
        assert got[1] is None
    for k, g in enumerate(per_example):
        want = np.tensordot(c, g, axes=1) / batch
        atol = 1e-12 * np.tensordot(np.abs(c), per_example_abs[k], axes=1) / batch
        assert_close(got[k], want, rtol=1e-12, atol=atol)


# ---------------------------------------------------------------------------------------
# EMA state
# ---------------------------------------------------------------------------------------


@st.composite
def ema_schedule(draw, elements=BOUNDED):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
    steps = draw(st.integers(1, 8))
    values = [draw(bounded_arrays(shape, elements)) for _ in range(steps)]
    decays = [draw(DECAYS) for _ in range(steps)]
    return values, decays


def _run_ema(values, decays, template=None):
    state = gt.ema_init(np.zeros_like(values[0]) if template is None else template)
    for v, dc in zip(values, decays, strict=True):
        state = gt.ema_update(state, v, decay=dc)
    return state


@PROPERTY
@given(ema_schedule())
def test_ema_decay_zero_is_latest_batch_mean(schedule):
    values, decays = schedule
    state = _run_ema(values, [*decays[:-1], 0.0])
    np.testing.assert_array_equal(gt.ema_mean(state), values[-1])


@PROPERTY
@given(ema_schedule(), BOUNDED)
def test_ema_constant_input_is_fixed_point(schedule, value):
    values, decays = schedule
    const = np.full_like(values[0], value)
    state = _run_ema([const] * len(decays), decays)
    expected = const if any(dc < 1.0 for dc in decays) else np.zeros_like(const)
    np.testing.assert_allclose(gt.ema_mean(state), expected, rtol=1e-14, atol=0)


@PROPERTY
@given(ema_schedule(WIDE_FINITE), st.floats(0.0, 1.0, exclude_max=True))
def test_ema_first_update_is_exact(schedule, decay):
    values, _ = schedule
    state = _run_ema(values[:1], [decay])
    np.testing.assert_array_equal(gt.ema_mean(state), values[0])
    assert int(state.count) == 1


@PROPERTY
@given(ema_schedule())
def test_ema_random_schedule_matches_definition(schedule):
    values, decays = schedule
    if all(dc == 1.0 for dc in decays):
        decays = [*decays[:-1], 0.5]  # the definition needs some weight
    state = _run_ema(values, decays)
    want = ref.ema(values, decays)
    scale = max(float(np.max(np.abs(v), initial=0.0)) for v in values)
    np.testing.assert_allclose(gt.ema_mean(state), want, rtol=1e-9, atol=1e-9 * scale)
    np.testing.assert_allclose(float(state.total), 1.0 - np.prod(decays), rtol=1e-9, atol=1e-15)
    assert int(state.count) == len(values)


@PROPERTY
@given(ema_schedule(), DECAYS, st.data())
def test_ema_non_finite_batch_leaves_state_unchanged(schedule, decay, data):
    values, decays = schedule
    template = (np.zeros_like(values[0]), np.zeros(2))
    second = [np.full(2, float(k)) for k in range(len(values))]
    state = _run_ema(list(zip(values, second, strict=True)), decays, template=template)
    bad = data.draw(bounded_arrays(values[0].shape), label="bad")
    flat = bad.reshape(-1)
    position = data.draw(st.integers(0, flat.size - 1), label="position")
    flat[position] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
    bad = flat.reshape(values[0].shape)
    with np.errstate(all="ignore"):
        new = gt.ema_update(state, (bad, np.ones(2)), decay=decay)
    for old_leaf, new_leaf in zip(state.mean, new.mean, strict=True):
        np.testing.assert_array_equal(new_leaf, old_leaf)
    assert float(new.total) == float(state.total)
    assert int(new.count) == int(state.count)


@PROPERTY
@given(ema_schedule(ADVERSARIAL), st.booleans())
def test_ema_state_stays_finite_under_adversarial_inputs(schedule, array_decay):
    values, decays = schedule
    state = gt.ema_init(np.zeros_like(values[0]))
    # Overflow/invalid warnings are not the property here; the values are.
    with np.errstate(all="ignore"):
        for v, dc in zip(values, decays, strict=True):
            count = int(state.count)
            state = gt.ema_update(state, v, decay=np.asarray(dc) if array_decay else dc)
            assert _finite_state(state), (v, dc, state)
            assert 0.0 <= float(state.total) <= 1.0
            assert int(state.count) == count + bool(np.all(np.isfinite(v)))


def test_ema_state_stays_finite_near_float_max():
    # g - m overflows here: the update is skipped (documented), never applied as inf.
    state = gt.ema_init(np.zeros(1))
    with np.errstate(all="ignore"):
        state = gt.ema_update(state, np.array([-1e308]), decay=0.5)
        after = gt.ema_update(state, np.array([1e308]), decay=0.5)
    assert _finite_state(after), after
    np.testing.assert_array_equal(gt.ema_mean(after), gt.ema_mean(state))
    assert int(after.count) == 1


def test_ema_nan_array_decay_cannot_corrupt_state():
    state = gt.ema_update(gt.ema_init(np.zeros(2)), np.array([1.0, 2.0]), decay=0.9)
    with np.errstate(all="ignore"):
        state = gt.ema_update(state, np.array([3.0, 4.0]), decay=np.asarray(math.nan))
    assert _finite_state(state), state
    state = gt.ema_update(state, np.array([5.0, 6.0]), decay=0.0)
    np.testing.assert_array_equal(gt.ema_mean(state), [5.0, 6.0])


# ---------------------------------------------------------------------------------------
# Weight curves
# ---------------------------------------------------------------------------------------


@st.composite
def curve_options(draw, kinds=CURVE_KINDS):
    return {
        "kind": draw(st.sampled_from(kinds)),
        "max_weight": draw(st.one_of(st.just(1.0), st.floats(1.0, 100.0))),
        "threshold": draw(st.floats(-2.0, 2.0)),
        "temperature": draw(st.one_of(st.just(0.1), st.floats(1e-3, 10.0))),
        "quantile": draw(QUANTILES),
        "floor": draw(st.floats(-2.0, 0.0)),
    }


ALIGNMENTS = hnp.arrays(F64, st.integers(1, 40), elements=st.floats(-1.0, 1.0))
ALIGNMENTS_WIDE = hnp.arrays(F64, st.integers(1, 40), elements=st.floats(-10.0, 10.0))
ALIGNMENTS_ADVERSARIAL = hnp.arrays(F64, st.integers(1, 40), elements=ADVERSARIAL)
#: Few distinct values, so that ties (and ties with the rank cut-off) are common.
ALIGNMENTS_TIED = hnp.arrays(
    F64, st.integers(1, 20), elements=st.sampled_from([-1.0, -0.5, 0.0, -0.0, 0.5, 1.0, math.nan, math.inf])
)


@PROPERTY
@given(
    st.one_of(ALIGNMENTS, ALIGNMENTS_WIDE, ALIGNMENTS_TIED.map(lambda a: a[np.isfinite(a)]).filter(len)),
    curve_options(MONOTONE_KINDS),
)
def test_curve_non_increasing_in_alignment(align, options):
    align = np.sort(align)
    w = gt.weight_curve(align, **options)
    assert np.all(np.diff(w) <= 0.0), (align, w)


@PROPERTY
@given(st.one_of(ALIGNMENTS, ALIGNMENTS_ADVERSARIAL), curve_options())
def test_curve_bounded_finite_and_one_for_non_finite(align, options):
    with np.errstate(all="ignore"):  # overflow of huge finite alignments is harmless here
        w = gt.weight_curve(align, **options)
    assert w.shape == align.shape
    assert w.dtype == np.float64
    assert np.all(np.isfinite(w)), (align, w)
    assert np.all((w >= 1.0) & (w <= options["max_weight"])), (align, w)
    np.testing.assert_array_equal(w[~np.isfinite(align)], 1.0)


@PROPERTY
@given(st.one_of(ALIGNMENTS, ALIGNMENTS_ADVERSARIAL), curve_options())
def test_curve_normalize_gives_batch_mean_one(align, options):
    with np.errstate(all="ignore"):
        w = gt.weight_curve(align, normalize=True, **options)
    assert np.all(np.isfinite(w)), (align, w)
    assert np.all(w > 0.0), (align, w)
    np.testing.assert_allclose(np.mean(w), 1.0, rtol=1e-12)


@PROPERTY
@given(
    st.one_of(ALIGNMENTS, ALIGNMENTS_TIED, ALIGNMENTS_ADVERSARIAL),
    QUANTILES,
    st.floats(1.0, 100.0),
    st.booleans(),
)
def test_rank_curve_matches_reference(align, quantile, max_weight, normalize):
    want = ref.rank_weights(align, quantile, max_weight)
    if normalize:
        want = want / np.mean(want)
    got = gt.weight_curve(align, kind="rank", quantile=quantile, max_weight=max_weight, normalize=normalize)
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


@PROPERTY
@given(ALIGNMENTS_WIDE, curve_options(("sigmoid", "spare_negative")))
def test_sigmoid_curves_match_scalar_formula(align, options):
    mw, th, t, fl = options["max_weight"], options["threshold"], options["temperature"], options["floor"]
    want = []
    for a in align:
        bump = ref.sigmoid((th - a) / t)
        if options["kind"] == "spare_negative":
            bump *= ref.sigmoid((a - fl) / t)
        want.append(1.0 + (mw - 1.0) * bump)
    np.testing.assert_allclose(gt.weight_curve(align, **options), want, rtol=1e-12, atol=1e-12)


@PROPERTY
@given(
    st.one_of(ALIGNMENTS, ALIGNMENTS_TIED, ALIGNMENTS_ADVERSARIAL.map(np.tanh)), curve_options(("zscore",))
)
def test_zscore_curve_matches_formula(align, options):
    # Standardised over the finite entries only (docs: "the batch's finite entries"), with
    # the variance guarded by float64 eps as in the implementation.
    mw, th, t = options["max_weight"], options["threshold"], options["temperature"]
    finite = np.isfinite(align)
    vals = align[finite]
    mu = vals.mean() if vals.size else 0.0
    var = np.mean((vals - mu) ** 2) if vals.size else 0.0
    sd = math.sqrt(var + np.finfo(F64).eps)
    want = np.ones_like(align)
    for i in np.flatnonzero(finite):
        want[i] = 1.0 + (mw - 1.0) * ref.sigmoid((th - (align[i] - mu) / sd) / t)
    # Rounding of (a - mu) is about eps * max|a|; the curve's slope is (mw - 1) / (4 t sd).
    spread = 8 * np.finfo(F64).eps * (np.max(np.abs(vals), initial=0.0) + 1.0)
    atol = (mw - 1.0) / (4.0 * t) * spread / sd + 1e-12 * mw
    assert_close(gt.weight_curve(align, **options), want, atol=atol)


def test_zscore_finite_for_huge_finite_alignments():
    with np.errstate(all="ignore"):
        w = gt.weight_curve(np.array([1e308, 1e308]), kind="zscore")
    assert np.all(np.isfinite(w)), w


# ---------------------------------------------------------------------------------------
# One-call steps
# ---------------------------------------------------------------------------------------


def _curves():
    return st.builds(
        gt.WeightCurve,
        kind=st.sampled_from(CURVE_KINDS),
        max_weight=st.floats(1.0, 10.0),
        quantile=QUANTILES,
        normalize=st.booleans(),
    )


def _unit_rows(flat):
    norms = np.sqrt(np.sum(flat**2, axis=1, keepdims=True))
    return np.where(norms > 0, flat / np.where(norms > 0, norms, 1.0), 0.0)


@PROPERTY
@given(dense_case(), st.sampled_from(["mean", "direction"]), DECAYS, _curves())
def test_score_and_update_first_call(case, reference, decay, curve):
    grads, mean = case
    state = gt.ema_init(np.zeros_like(mean))
    out = gt.score_and_update(state, grads, decay=decay, reference=reference, curve=curve)
    np.testing.assert_array_equal(out.weights, np.ones(grads.shape[0]))
    np.testing.assert_array_equal(out.alignment, np.zeros(grads.shape[0]))  # no reference yet
    flat = grads.reshape(grads.shape[0], -1)
    np.testing.assert_allclose(out.sq_norms, np.sum(flat**2, axis=1), rtol=1e-12)
    assert int(out.state.count) == 1
    assert _finite_state(out.state)
    rows = flat if reference == "mean" else _unit_rows(flat)
    want = rows.mean(axis=0).reshape(mean.shape) if decay < 1.0 else np.zeros_like(mean)
    np.testing.assert_allclose(gt.ema_mean(out.state), want, rtol=1e-9, atol=1e-12 * np.abs(rows).max())


@PROPERTY
@given(
    st.lists(dense_case(ADVERSARIAL), min_size=1, max_size=4),
    st.sampled_from(["mean", "direction"]),
    st.lists(DECAYS, min_size=4, max_size=4),
    _curves(),
)
def test_score_and_update_state_stays_finite(cases, reference, decays, curve):
    shape = cases[0][1].shape
    state = gt.ema_init(np.zeros(shape))
    with np.errstate(all="ignore"):
        for k, (grads, _) in enumerate(cases):
            if grads.shape[1:] != shape:
                continue
            first = int(state.count) == 0
            out = gt.score_and_update(state, grads, decay=decays[k], reference=reference, curve=curve)
            assert np.all(np.isfinite(out.weights)), out.weights
            if first:
                np.testing.assert_array_equal(out.weights, 1.0)
            assert _finite_state(out.state), out.state
            state = out.state


@PROPERTY
@given(st.data(), st.sampled_from(["mean", "direction"]), _curves())
def test_linear_score_and_update(data, reference, curve):
    batch = data.draw(st.integers(1, 4), label="batch")
    n_layers = data.draw(st.integers(1, 2), label="n_layers")
    layers = [data.draw(linear_layer(batch=batch), label=f"layer{k}") for k in range(n_layers)]
    template = [
        (np.zeros_like(gw),) if gb is None else (np.zeros_like(gw), np.zeros_like(gb))
        for _, _, gw, gb in layers
    ]
    state = gt.ema_init(template)
    inputs = [(a, d) for a, d, _, _ in layers]
    decay = data.draw(st.floats(0.0, 0.99), label="decay")
    out = gt.linear_score_and_update(state, inputs, decay=decay, reference=reference, curve=curve)
    np.testing.assert_array_equal(out.weights, np.ones(batch))
    assert int(out.state.count) == 1
    assert _finite_state(out.state)
    # The state is this batch's reference, built from materialised per-example gradients.
    per_example = [g for a, d, _, gb in layers for g in ref.per_example_linear_grads(a, d, gb is not None)]
    flat = ref.flatten_examples(per_example)
    rows = flat if reference == "mean" else _unit_rows(flat)
    flat_abs = ref.flatten_examples(
        [
            g
            for a, d, _, gb in layers
            for g in ref.per_example_linear_grads(np.abs(a), np.abs(d), gb is not None)
        ]
    )
    norms = np.sqrt(np.sum(flat**2, axis=1))
    # Direction rows inherit the relative error of their norm: eps * ||g_abs||^2 / ||g||^2.
    cond = np.where(norms > 0, np.sum(flat_abs**2, axis=1) / np.where(norms > 0, norms**2, 1.0), 0.0)
    scale = np.abs(flat_abs) if reference == "mean" else _unit_rows(flat_abs) * (1.0 + cond[:, None])
    got = np.concatenate([np.ravel(m) for mean in gt.ema_mean(out.state) for m in mean])
    assert_close(got, rows.mean(axis=0), rtol=0, atol=1e-9 * (scale.mean(axis=0) + 1e-300))
    # Second call: scores against that reference, which the NumPy reference reproduces.
    means = [m for mean in gt.ema_mean(out.state) for m in mean]
    second = gt.linear_score_and_update(out.state, inputs, decay=decay, reference=reference, curve=curve)
    vec = np.concatenate([np.ravel(m) for m in means])
    tol = _cos_tolerance(flat, flat_abs, vec)
    assert_close(second.alignment, ref.alignment(per_example, means), rtol=0, atol=tol)
    assert np.all(np.isfinite(second.weights))
    assert _finite_state(second.state)

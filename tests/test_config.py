"""GradTailConfig and the interchange format: properties over every option and corrupted states."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtail_ops as gt

from .conftest import to_numpy

PROPERTY = settings(max_examples=int(os.environ.get("GRADTAIL_PROPERTY_EXAMPLES", "50")), deadline=None)

# Each float option: (low, high, open_low, open_high); None is unbounded.
FLOAT_RANGES = {
    "decay": (0.0, 1.0, False, False),
    "max_weight": (1.0, None, False, False),
    "threshold": (None, None, False, False),
    "temperature": (0.0, None, True, False),
    "quantile": (0.0, 1.0, False, False),
    "floor": (None, None, False, False),
    "eps": (0.0, None, False, False),
    "memory_decay": (0.0, 1.0, False, True),
    "memory_eta": (0.0, None, False, False),
    "memory_max_weight": (1.0, None, False, False),
}


def _in_range(option):
    low, high, open_low, open_high = FLOAT_RANGES[option]
    return st.floats(
        min_value=-1e6 if low is None else low,
        max_value=1e6 if high is None else high,
        exclude_min=open_low,
        exclude_max=open_high,
        allow_nan=False,
    )


def _out_of_range(option):
    low, high, open_low, open_high = FLOAT_RANGES[option]
    parts = [st.sampled_from([math.nan, math.inf, -math.inf])]
    if low is not None:
        parts.append(
            st.floats(max_value=low, exclude_max=not open_low, allow_nan=False, allow_infinity=False)
        )
    if high is not None:
        parts.append(
            st.floats(min_value=high, exclude_min=not open_high, allow_nan=False, allow_infinity=False)
        )
    return st.one_of(*parts)


SCALAR_KINDS = st.sampled_from([float, np.float32, np.float64, lambda v: np.asarray(v, dtype=np.float64)])


@PROPERTY
@given(st.sampled_from(sorted(FLOAT_RANGES)), st.data(), SCALAR_KINDS)
def test_any_finite_in_range_option_is_accepted_as_a_python_float(option, data, kind):
    value = data.draw(_in_range(option))
    wrapped = kind(value)
    if float(wrapped) != value or not math.isfinite(float(wrapped)):  # float32 rounding may leave the range
        return
    options = {option: wrapped, "memory_size": 3}
    config = gt.GradTailConfig.from_options(**options)
    got = config.to_options()[option]
    assert type(got) is float
    assert got == float(wrapped)
    assert gt.GradTailConfig.from_options(**config.to_options()) == config


@PROPERTY
@given(st.sampled_from(sorted(FLOAT_RANGES)), st.data())
def test_any_non_finite_or_out_of_range_option_is_refused_with_its_name(option, data):
    value = data.draw(_out_of_range(option))
    with pytest.raises(ValueError, match=rf"`{option}` must be a finite number.*Received: {option}="):
        gt.GradTailConfig.from_options(**{option: value, "memory_size": 3})


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"warmup_steps": 1.5}, TypeError, "warmup_steps"),
        ({"warmup_steps": True}, TypeError, "not a boolean"),
        ({"memory_size": 0}, ValueError, "memory_size"),
        ({"reference": "median"}, ValueError, "reference"),
        ({"method": "fast"}, ValueError, "method"),
        ({"kind": "cubic"}, ValueError, "kind"),
        ({"normalize": "yes"}, TypeError, "normalize"),
        ({"max_weight": True}, TypeError, "not a boolean"),
        ({"max_weight": np.ones(2)}, TypeError, r"shape \(2,\)"),
        ({"decay": "0.9"}, TypeError, "decay"),
        ({"colour": 1}, TypeError, r"Unknown GradTail option\(s\) \['colour'\]"),
    ],
)
def test_invalid_choices_and_types_are_named(options, error, match):
    with pytest.raises(error, match=match):
        gt.GradTailConfig.from_options(**options)


def test_config_is_hashable_and_takes_a_schedule():
    config = gt.GradTailConfig(decay=lambda steps: 0.9)
    assert hash(config) == hash(config)
    assert config.decay_at(0) == 0.9
    assert config.to_options()["memory_size"] is None


def test_bare_weight_curve_warns_that_it_is_not_the_default():
    with pytest.warns(FutureWarning, match="DEFAULT_CURVE"):
        curve = gt.WeightCurve()
    assert curve.kind == "sigmoid"
    assert gt.WeightCurve(kind="rank", normalize=True, quantile=0.3) == gt.DEFAULT_CURVE


# --------------------------------------------------------------------- interchange format
def _trained_state(backend, memory=True):
    config = gt.GradTailConfig.from_options(decay=0.7, memory_size=6 if memory else None)
    state = gt.tail_init([(backend.asarray(np.zeros((2, 3))), backend.asarray(np.zeros(2)))], config=config)
    rng = np.random.default_rng(0)
    for _ in range(3):
        a, d = backend.asarray(rng.normal(size=(4, 3))), backend.asarray(rng.normal(size=(4, 2)))
        index = backend.asarray(rng.integers(0, 6, size=4)) if memory else None
        state = gt.linear_tail_step(state, [(a, d)], config=config, index=index).state
    return state, config


def _flat(state):
    parts = [to_numpy(x).ravel() for layer in state.ema.mean for x in layer]
    parts += [
        to_numpy(state.ema.total).ravel(),
        to_numpy(state.ema.count).ravel(),
        to_numpy(state.steps).ravel(),
    ]
    if state.memory is not None:
        parts += [to_numpy(state.memory.score), to_numpy(state.memory.visits)]
    return np.concatenate(parts)


def test_round_trip_is_exact_and_keeps_namespace_dtype_device(backend):
    if backend.jit:
        pytest.skip("the interchange format is read eagerly")
    state, config = _trained_state(backend)
    saved = gt.state_to_dict(state, config=config)
    fresh = gt.tail_init([(backend.asarray(np.zeros((2, 3))), backend.asarray(np.zeros(2)))], config=config)
    loaded, loaded_config = gt.state_from_dict(saved, like=fresh, config=config)
    assert loaded_config == config
    np.testing.assert_array_equal(_flat(loaded), _flat(state))
    for got, like in zip(
        [loaded.ema.total, loaded.ema.count, loaded.steps, loaded.memory.score, loaded.memory.visits],
        [fresh.ema.total, fresh.ema.count, fresh.steps, fresh.memory.score, fresh.memory.visits],
        strict=True,
    ):
        assert type(got) is type(like)
        assert got.dtype == like.dtype


def test_state_saved_as_numpy_loads_into_another_library(backend):
    if backend.jit:
        pytest.skip("the interchange format is read eagerly")
    state, config = _trained_state(backend)
    as_numpy = {
        k: (to_numpy(v) if hasattr(v, "shape") else v)
        for k, v in gt.state_to_dict(state, config=config).items()
    }
    as_numpy["mean"] = [
        [to_numpy(x) for x in layer] for layer in gt.state_to_dict(state, config=config)["mean"]
    ]
    as_numpy["count"] = as_numpy["count"].astype(np.int32)
    loaded, _ = gt.state_from_dict(as_numpy, like=state, config=config)
    np.testing.assert_allclose(_flat(loaded), _flat(state), rtol=1e-15)


CORRUPTIONS = [
    ("total", lambda v: v * 0 - 1.0, r"`total` must be a finite number in \[0.0, 1.0\]"),
    ("total", lambda v: v * math.inf, r"`total` must be finite"),
    ("count", lambda v: v * 0 - 2, r"`count` must be >= 0"),
    ("steps", lambda v: v * 0, r"`steps` >= `count`"),
    ("memory_visits", lambda v: v - 5, r"`memory_visits` must be >= 0"),
    ("memory_score", lambda v: v * math.nan, r"`memory_score` must be finite"),
    ("count", lambda v: np.asarray(1.5), r"`count` must hold integer values"),
    ("memory_score", lambda v: v[:3], r"`memory_score` must have shape \(6,\)"),
    ("reference", lambda v: "mean", r"reference='mean'"),
    ("decay", lambda v: 2.0, r"`decay` must be a finite number in \[0.0, 1.0\]"),
    ("extra", lambda v: 1, r"unknown \['extra'\]"),
]


@pytest.mark.parametrize(("key", "corrupt", "match"), CORRUPTIONS)
def test_corrupted_states_are_refused(xp, key, corrupt, match):
    backend_state, config = _trained_state(type("B", (), {"asarray": staticmethod(lambda v: xp.asarray(v))}))
    saved = gt.state_to_dict(backend_state, config=config)
    saved[key] = corrupt(saved.get(key))
    with pytest.raises((ValueError, TypeError), match=match):
        gt.state_from_dict(saved, like=backend_state, config=config)


def test_a_reference_with_a_nan_is_refused(xp):
    state, config = _trained_state(
        type("B", (), {"asarray": staticmethod(lambda v: xp.asarray(v))}), memory=False
    )
    saved = gt.state_to_dict(state, config=config)
    saved["mean"][0][1] = saved["mean"][0][1] * math.nan
    with pytest.raises(ValueError, match=r"`mean\[1\]` must be finite"):
        gt.state_from_dict(saved, like=state, config=config)
    saved = gt.state_to_dict(state, config=config)
    saved["mean"] = saved["mean"][:0]
    with pytest.raises(ValueError, match="must match the tracked layers"):
        gt.state_from_dict(saved, like=state, config=config)

"""Every option's bounds, at the bounds themselves (the property tests of test_config.py reach
them only by chance): a closed bound is accepted, an open one refused, by the option's name."""

from __future__ import annotations

import numpy as np
import pytest

import gradtail_ops as gt

from .test_config import FLOAT_RANGES

AT_BOUNDS = [
    (option, bound, is_open)
    for option, (low, high, open_low, open_high) in sorted(FLOAT_RANGES.items())
    for bound, is_open in ((low, open_low), (high, open_high))
    if bound is not None
]


@pytest.mark.parametrize(("option", "bound", "is_open"), AT_BOUNDS)
def test_each_bound_is_closed_or_open_as_documented(option, bound, is_open):
    options = {option: bound, "memory_size": 3}
    if is_open:
        with pytest.raises(ValueError, match=rf"`{option}` must be a finite number.*Received: {option}="):
            gt.GradTailConfig.from_options(**options)
    else:
        config = gt.GradTailConfig.from_options(**options)
        assert config.to_options()[option] == bound


@pytest.mark.parametrize(("option", "bound", "is_open"), AT_BOUNDS)
def test_one_ulp_beyond_each_bound_is_refused_and_one_within_accepted(option, bound, is_open):
    low, _, _, _ = FLOAT_RANGES[option]
    outward = -np.inf if bound == low else np.inf
    beyond, within = float(np.nextafter(bound, outward)), float(np.nextafter(bound, -outward))
    with pytest.raises(ValueError, match=rf"`{option}` must be a finite number.*Received: {option}="):
        gt.GradTailConfig.from_options(**{option: beyond, "memory_size": 3})
    config = gt.GradTailConfig.from_options(**{option: within, "memory_size": 3})
    assert config.to_options()[option] == within


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int8])
def test_integer_options_accept_0d_arrays_of_any_integer_dtype(dtype):
    """0-d arrays of unsigned integer dtypes are integers too (NumPy, and torch's uint8)."""
    assert gt.check_int("warmup_steps", np.asarray(3, dtype=dtype), low=0) == 3
    config = gt.GradTailConfig(warmup_steps=np.asarray(2, dtype=dtype), curve=gt.DEFAULT_CURVE)
    assert config.warmup_steps == 2
    assert type(config.warmup_steps) is int


def test_integer_options_accept_a_torch_uint8_scalar_tensor():
    torch = pytest.importorskip("torch")
    assert gt.check_int("memory_size", torch.tensor(5, dtype=torch.uint8), low=1) == 5

"""Library bugs found by the mutation audit, fixed: each test states the documented behaviour
that the bug broke (it failed before the fix)."""

from __future__ import annotations

import numpy as np
import pytest

import gradtail_ops as gt


@pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
def test_saved_counts_beyond_int32_are_refused_not_wrapped(name):
    """`state_from_dict` "validates everything first"; an int64 count that int32 cannot hold must
    be refused (or saturated like `steps` in a step), never wrapped to another valid-looking value."""
    xp = pytest.importorskip(name)
    config = gt.GradTailConfig(decay=0.9, curve=gt.DEFAULT_CURVE)
    state = gt.tail_init(xp.asarray(np.zeros(3)), config=config)
    saved = gt.state_to_dict(state, config=config)
    saved["count"] = np.int64(2**32 + 3)
    saved["steps"] = np.int64(2**32 + 3)
    saved["total"] = np.float64(0.5)
    with pytest.raises(ValueError, match=r"`count` must fit .*int32.*Received: values from 4294967299"):
        gt.state_from_dict(saved, like=state, config=config)

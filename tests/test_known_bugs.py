"""Library bugs found by the mutation audit (/work/notes/mutation-audit.md), pinned as strict
xfails: each test states the documented behaviour and fails today. When the bug is fixed the
test passes, strict=True turns that into a failure, and the marker must be removed."""

from __future__ import annotations

import numpy as np
import pytest

import gradtail_ops as gt


@pytest.mark.xfail(
    strict=True,
    reason="BUG: state_from_dict casts saved counts to int32 without a range check; "
    "count = steps = 2**32 + 3 (int64) loads silently as 3 into a NumPy state (torch raises)",
)
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
    try:
        loaded, _ = gt.state_from_dict(saved, like=state, config=config)
    except (ValueError, OverflowError):
        return
    assert int(loaded.ema.count) == 2**31 - 1, f"count loaded as {int(loaded.ema.count)}"

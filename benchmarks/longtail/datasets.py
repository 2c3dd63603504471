"""The suite's data sets, by name, with the balanced test pool split into validation and test.

Each run's long-tailed training set is drawn with the run's seed (``data.py``); the balanced
test pool is split, per class, into a validation half and a test half with a fixed seed, the
same for every run, so selection happens on validation and results are reported on test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .data import FASHION_DIR, LongTailData, digits_lt, fashion_hidden_strata, fashion_mnist_lt

SPLIT_SEED = 20240601


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    load: Callable[[int], LongTailData]
    epochs: int
    quick_epochs: int
    needs_fashion: bool = False
    #: The seeds of the full run (each seed draws its own long-tailed subsample and init).
    seeds: tuple[int, ...] = (0, 1, 2)
    #: True for a data set whose tail is hidden subclasses (its metrics are per subclass).
    hidden: bool = False


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "fashion_lt100",
            "Fashion-MNIST-LT, imbalance 100",
            lambda seed: fashion_mnist_lt(imbalance=100.0, seed=seed),
            epochs=12,
            quick_epochs=2,
            needs_fashion=True,
            seeds=(0, 1, 2, 3, 4),
        ),
        DatasetSpec(
            "fashion_lt10",
            "Fashion-MNIST-LT, imbalance 10",
            lambda seed: fashion_mnist_lt(imbalance=10.0, seed=seed),
            epochs=8,
            quick_epochs=1,
            needs_fashion=True,
        ),
        DatasetSpec(
            "fashion_hidden",
            "Fashion-MNIST hidden stratification: 5 superclasses (classes k and k + 5), the second "
            "subclass of each kept at 2%",
            lambda seed: fashion_hidden_strata(seed=seed),
            epochs=5,
            quick_epochs=1,
            needs_fashion=True,
            hidden=True,
        ),
        DatasetSpec(
            "digits_lt10",
            "scikit-learn digits-LT, imbalance 10 (smoke test)",
            lambda seed: digits_lt(imbalance=10.0, seed=seed),
            epochs=60,
            quick_epochs=20,
        ),
    )
}


@dataclass(frozen=True)
class SplitData:
    """``data`` with its test set replaced by the test half; the validation half beside it."""

    data: LongTailData
    x_val: np.ndarray
    y_val: np.ndarray
    sub_val: np.ndarray | None = None


def split_validation(data: LongTailData, seed: int = SPLIT_SEED) -> SplitData:
    """Split the balanced test pool per class (per subclass, when there are subclasses) into a
    validation half and a test half."""
    rng = np.random.default_rng(seed)
    strata = data.y_test if data.sub_test is None else data.sub_test
    val, test = [], []
    for c in range(int(strata.max()) + 1):
        idx = rng.permutation(np.flatnonzero(strata == c))
        half = len(idx) // 2
        val.append(idx[:half])
        test.append(idx[half : 2 * half])
    v, t = np.sort(np.concatenate(val)), np.sort(np.concatenate(test))
    sub_test = None if data.sub_test is None else data.sub_test[t]
    test_half = replace(data, x_test=data.x_test[t], y_test=data.y_test[t], sub_test=sub_test)
    sub_val = None if data.sub_test is None else data.sub_test[v]
    return SplitData(test_half, data.x_test[v], data.y_test[v], sub_val)


def load_dataset(name: str, seed: int) -> SplitData:
    spec = DATASETS[name]
    if spec.needs_fashion and not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"{name} needs Fashion-MNIST (Debian package dataset-fashion-mnist) under "
            f"{FASHION_DIR}; it is not installed (`make demo` installs it as root)."
        )
    return split_validation(spec.load(seed))

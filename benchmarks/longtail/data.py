"""Offline long-tailed data sets: Fashion-MNIST-LT and Fashion-MNIST hidden stratification
(Debian's dataset-fashion-mnist) and digits-LT (scikit-learn's bundled digits). Nothing is
downloaded at run time."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclass(frozen=True)
class LongTailData:
    """A long-tailed training set with a balanced test set.

    ``groups`` maps each class to "many", "medium" or "few" by its training count. A data set
    with hidden subclasses (``fashion_hidden_strata``) also carries every example's subclass
    (``sub_train``, ``sub_test``), their names, and ``rare_subclasses``: its training labels
    are the superclasses, and the tail is the rare subclasses, which the labels do not show.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    counts: np.ndarray
    groups: tuple[str, ...]
    image_shape: tuple[int, int] | None
    sub_train: np.ndarray | None = None
    sub_test: np.ndarray | None = None
    subclass_names: tuple[str, ...] = ()
    rare_subclasses: tuple[int, ...] = ()

    def example_groups(self, index: np.ndarray) -> np.ndarray:
        """The group ("many", "medium" or "few") of the training examples ``index``, shape (n,).

        By class for a long-tailed set; with hidden subclasses, "few" for the rare subclasses'
        examples and "many" for the rest.
        """
        index = np.asarray(index)
        if self.sub_train is not None:
            rare = np.isin(self.sub_train[index], np.asarray(self.rare_subclasses))
            return np.where(rare, "few", "many")
        return np.asarray(np.asarray(self.groups, dtype=object)[self.y_train[index]].astype(str))


def fashion_mnist_available() -> bool:
    """True when Debian's dataset-fashion-mnist is installed (`make demo` installs it as root)."""
    return (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def exponential_counts(n_max: int, n_classes: int, imbalance: float) -> np.ndarray:
    """``n_max * imbalance^(-k / (C - 1))`` for k = 0 .. C-1 (Cui et al., 2019)."""
    k = np.arange(n_classes)
    return np.floor(n_max * imbalance ** (-k / (n_classes - 1))).astype(int)


def _groups(counts: np.ndarray) -> tuple[str, ...]:
    """Rank thirds: the most frequent ~30% of classes are "many", the rarest ~30% "few"."""
    n = len(counts)
    order = np.argsort(-counts, kind="stable")
    n_many = n_few = max(1, round(0.3 * n))
    label = np.empty(n, dtype=object)
    label[order[:n_many]] = "many"
    label[order[n_many : n - n_few]] = "medium"
    label[order[n - n_few :]] = "few"
    return tuple(label)


def make_long_tail(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_names: tuple[str, ...],
    *,
    imbalance: float,
    seed: int,
    image_shape: tuple[int, int] | None,
) -> LongTailData:
    """Subsample ``x, y`` to an exponential profile; class order from a seeded permutation."""
    rng = np.random.default_rng(seed)
    n_classes = len(class_names)
    n_max = min(np.bincount(y, minlength=n_classes))
    order = np.random.default_rng(12345).permutation(n_classes)  # fixed class order, as documented
    counts = np.zeros(n_classes, dtype=int)
    counts[order] = exponential_counts(n_max, n_classes, imbalance)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: counts[c]] for c in range(n_classes)])
    keep = rng.permutation(keep)
    # Balanced test set: the same number of test examples per class.
    per_class = min(np.bincount(y_test, minlength=n_classes))
    test = np.concatenate([np.flatnonzero(y_test == c)[:per_class] for c in range(n_classes)])
    return LongTailData(
        name, x[keep], y[keep], x_test[test], y_test[test], class_names, counts, _groups(counts), image_shape
    )


def _fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST train and test images (standardised with the training mean/std) and labels."""

    def load(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz").reshape(-1, 784)
        labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        return images.astype(np.float32) / 255.0, labels

    x, y = load("train")
    x_test, y_test = load("t10k")
    mean, std = x.mean(), x.std()
    return (x - mean) / std, y, (x_test - mean) / std, y_test


def fashion_mnist_lt(imbalance: float = 100.0, seed: int = 0) -> LongTailData:
    """Fashion-MNIST-LT: exponential profile, balanced test set (1000 per class)."""
    x, y, x_test, y_test = _fashion()
    return make_long_tail(
        f"Fashion-MNIST-LT (r={imbalance:g})", x, y, x_test, y_test, FASHION_CLASSES,
        imbalance=imbalance, seed=seed, image_shape=(28, 28),
    )  # fmt: skip


#: Hidden stratification: superclass k is Fashion-MNIST classes k (common) and k + 5 (rare).
HIDDEN_PAIRS = tuple((k, k + 5) for k in range(5))
HIDDEN_RARE_FRACTION = 0.02


def fashion_hidden_strata(seed: int = 0, rare_fraction: float = HIDDEN_RARE_FRACTION) -> LongTailData:
    """Fashion-MNIST with hidden stratification: 5 superclasses of 2 classes each.

    Superclass ``k`` is class ``k`` (all of its 6000 training images, the common subclass)
    plus class ``k + 5`` subsampled to ``rare_fraction`` (2%: 120 images, the rare
    subclass), so the superclass counts stay near balanced (6120 each) and class-frequency
    methods see no imbalance. The fixed pairing rule (k, k + 5) is documented, not chosen
    by results. The training labels are the superclasses; the test set keeps 1000 images of
    each of the 10 subclasses, so rare and common subclasses weigh alike in the metrics
    (superclass balanced accuracy, rare-subclass accuracy, worst-subclass accuracy; the
    hidden-stratification setting of Sohoni et al., 2020, and of JTT, Liu et al., 2021).
    The subsample follows ``seed``.
    """
    x, y, x_test, y_test = _fashion()
    rng = np.random.default_rng(seed)
    superclass = np.zeros(10, dtype=np.int64)
    for k, (common, rare) in enumerate(HIDDEN_PAIRS):
        superclass[common] = superclass[rare] = k
    rare_classes = tuple(rare for _, rare in HIDDEN_PAIRS)
    keep = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        keep.append(idx[: round(rare_fraction * len(idx))] if c in rare_classes else idx)
    order = rng.permutation(np.concatenate(keep))
    names = tuple(f"{FASHION_CLASSES[a]} + {FASHION_CLASSES[b]}" for a, b in HIDDEN_PAIRS)
    counts = np.bincount(superclass[y[order]], minlength=5)
    return LongTailData(
        f"Fashion-MNIST hidden strata (rare subclasses {100 * rare_fraction:g}%)",
        x[order], superclass[y[order]], x_test, superclass[y_test], names, counts,
        ("many",) * 5, (28, 28),
        sub_train=y[order], sub_test=y_test, subclass_names=FASHION_CLASSES, rare_subclasses=rare_classes,
    )  # fmt: skip


def subclass_metrics(pred: np.ndarray, data: LongTailData, sub: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Per-subclass accuracy of superclass predictions; rare, common and worst subclass (fractions)."""
    n_sub = len(data.subclass_names)
    hits = np.bincount(sub, weights=(pred == y).astype(np.float64), minlength=n_sub)
    per_sub = hits / np.maximum(np.bincount(sub, minlength=n_sub), 1)
    rare = np.isin(np.arange(n_sub), np.asarray(data.rare_subclasses))
    return {
        "per_subclass": per_sub,
        "rare_subclass": float(per_sub[rare].mean()),
        "common_subclass": float(per_sub[~rare].mean()),
        "worst_subclass": float(per_sub.min()),
    }


def digits_lt(imbalance: float = 10.0, seed: int = 0) -> LongTailData:
    """scikit-learn's digits (1797 8x8 images): 1/3 held out balanced, the rest long-tailed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(999)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:50] for c in range(10)])
    train = np.setdiff1d(np.arange(len(y)), test)
    return make_long_tail(
        f"digits-LT (r={imbalance:g})", x[train], y[train], x[test], y[test],
        tuple(str(c) for c in range(10)), imbalance=imbalance, seed=seed, image_shape=(8, 8),
    )  # fmt: skip

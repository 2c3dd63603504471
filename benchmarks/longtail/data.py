"""Offline long-tailed data sets: Fashion-MNIST-LT (Debian's dataset-fashion-mnist) and
digits-LT (scikit-learn's bundled digits). Nothing is downloaded at run time."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclass(frozen=True)
class LongTailData:
    """A long-tailed training set with a balanced test set.

    ``groups`` maps each class to "many", "medium" or "few" by its training count.
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


def fashion_mnist_lt(imbalance: float = 100.0, seed: int = 0) -> LongTailData:
    """Fashion-MNIST-LT: exponential profile, balanced test set (1000 per class)."""

    def load(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz").reshape(-1, 784)
        labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        return images.astype(np.float32) / 255.0, labels

    x, y = load("train")
    x_test, y_test = load("t10k")
    mean, std = x.mean(), x.std()
    x, x_test = (x - mean) / std, (x_test - mean) / std
    return make_long_tail(
        f"Fashion-MNIST-LT (r={imbalance:g})", x, y, x_test, y_test, FASHION_CLASSES,
        imbalance=imbalance, seed=seed, image_shape=(28, 28),
    )  # fmt: skip


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

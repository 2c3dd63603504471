"""Tail mining outputs, framework-free: rankings, exports, data maps and image grids.

The scores come from any adapter (``gradtail_torch.score_dataset``,
``gradtail_optax.score_batches``, or a GradTail memory's running scores); everything here
takes NumPy-convertible arrays and imports matplotlib / pandas only inside the functions
that need them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .validation import check_real

__all__ = [
    "data_map",
    "export_ranking",
    "memory_arrays",
    "plot_data_map",
    "rank",
    "retraining_weights",
    "save_image_grid",
    "to_numpy",
]

Array = Any


def to_numpy(x: Array, /) -> np.ndarray:
    """A NumPy copy of an array from any library (via DLPack, onto the CPU when needed).

    Examples
    --------
    >>> to_numpy([1, 2])
    array([1, 2])
    """
    if isinstance(x, np.ndarray):
        return x.copy()
    if hasattr(x, "__dlpack__"):
        try:
            return np.array(np.from_dlpack(x, device="cpu", copy=True))
        except (TypeError, ValueError, BufferError, RuntimeError):
            pass
        cpu = getattr(x, "cpu", None)  # a device array whose DLPack export cannot cross to the CPU
        if callable(cpu):
            return np.array(np.from_dlpack(cpu()))
    return np.array(x)


def _scores(name: str, scores: Array) -> np.ndarray:
    s = to_numpy(scores)
    if s.ndim != 1:
        raise ValueError(f"`{name}` must have shape (N,), one score per example; Received: shape {s.shape}.")
    return s.astype(np.float64)


def rank(scores: Array, /) -> np.ndarray:
    """Indices from most tail-like to most head-like: ascending score, ties by index, NaN last.

    Parameters
    ----------
    scores : array, shape (N,)
        One score per example, low = tail-like (GradTail alignments or running scores).

    Returns
    -------
    ndarray, shape (N,), int64

    Examples
    --------
    >>> rank(np.array([0.5, -0.2, np.nan, -0.2]))
    array([1, 3, 0, 2])
    """
    s = _scores("scores", scores)
    idx = np.arange(s.shape[0])
    missing = ~np.isfinite(s)
    return np.lexsort((idx, np.where(missing, 0.0, s), missing)).astype(np.int64)


def retraining_weights(scores: Array, /, *, gamma: float = 4.0) -> np.ndarray:
    """Per-example loss weights for retraining on a scored data set: ``exp(-gamma * r_i)``, mean 1.

    ``r_i`` is the percentile rank of example ``i``'s score in [0, 1] (0 for the lowest, most
    tail-like score; tied scores share their average rank; NaN scores rank last). It is the
    second stage of a two-stage scheme: score every training example under a first model
    (``gradtail_torch.score_dataset``, ``gradtail_optax.score_batches``), then retrain, e.g.
    the last layer on the frozen features, with these weights. This is automatic feature
    reweighting (AFR; Qiu et al., 2023, "Simple and Fast Group Robustness by Automatic
    Feature Reweighting", ICML, arXiv:2306.11074) with GradTail's alignment (Chen et al.,
    2022, "GradTail: Learning Long-Tailed Data Using Gradient-based Sample Weighting",
    arXiv:2201.05938) in place of the label probability; a rank rather than the raw cosine,
    because the cosines of a trained model crowd a narrow band. docs/tail_mining.md shows
    the recipe and what it measured.

    Parameters
    ----------
    scores : array, shape (N,)
        One score per example, low = tail-like; any library (converted to NumPy).
    gamma : float, optional
        How steeply the weight falls with the rank: with distinct extremes, the lowest-scored
        example weighs ``exp(gamma)`` times the highest. Finite, ``>= 0``; ``0`` gives every
        example 1. Defaults to 4.0: of 2, 4, 6 and 10, the value with the best validation
        balanced accuracy summed over the two sets the suite measured (Fashion-MNIST-LT r=100,
        hidden strata; docs/benchmarks.md).

    Returns
    -------
    ndarray, shape (N,), float64
        Weights with mean 1 (empty for ``N == 0``).

    Raises
    ------
    ValueError
        ``scores`` not of shape (N,), or ``gamma`` negative or not finite.

    Examples
    --------
    >>> retraining_weights(np.array([0.3, -0.1, 0.3, np.nan]), gamma=3.0).round(3)
    array([0.597, 2.674, 0.597, 0.133])
    """
    g = check_real("gamma", gamma, low=0.0)
    s = _scores("scores", scores)
    n = s.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    nan = np.isnan(s)
    position = np.full(n, n - (nan.sum() + 1) / 2.0)  # the NaNs share the last places
    _, inverse, counts = np.unique(s[~nan], return_inverse=True, return_counts=True)
    position[~nan] = (np.cumsum(counts) - counts + (counts - 1) / 2.0)[inverse]
    r = position / max(n - 1, 1)
    w = np.exp(-g * (r - r.min()))  # from the lowest rank: no underflow to 0 / 0 for a large gamma
    return np.asarray(w / w.mean(), dtype=np.float64)


def memory_arrays(memory: Any, /, *, unvisited: float = float("nan")) -> tuple[np.ndarray, np.ndarray]:
    """A GradTail memory's running scores and visits as NumPy arrays, for ranking and export.

    Parameters
    ----------
    memory : MemoryState or (score, visits)
        ``gradtail_ops.MemoryState``, ``GradTail.memory_scores()`` (PyTorch) or the ``memory``
        of a ``gradtail_optax`` state; arrays of shape (N,) from any library.
    unvisited : float, optional
        The score given to examples never visited (their stored 0 is no measurement).
        Defaults to NaN, which `rank` puts last.

    Returns
    -------
    score : ndarray, shape (N,), float64
    visits : ndarray, shape (N,), int64

    Examples
    --------
    >>> from gradtail_ops import MemoryState
    >>> memory_arrays(MemoryState(score=np.array([0.5, 0.0]), visits=np.array([2, 0])))
    (array([0.5, nan]), array([2, 0]))
    """
    score, visits = (memory.score, memory.visits) if hasattr(memory, "visits") else memory
    s, v = _scores("memory score", score), to_numpy(visits).astype(np.int64)
    if v.shape != s.shape:
        raise ValueError(
            f"The memory's score and visits must have the same shape (N,); Received: shapes {s.shape} "
            f"and {v.shape}."
        )
    return np.where(v > 0, s, unvisited), v


def export_ranking(
    path: str | Path,
    scores: Array,
    /,
    *,
    loss: Array | None = None,
    label: Array | None = None,
    index: Array | None = None,
    extra: dict[str, Array] | None = None,
) -> Path:
    """Write every example ranked from most tail-like to most head-like, as CSV or Parquet.

    Columns: ``rank`` (0 = most tail-like), ``index`` (the example's row in the data set),
    ``score``, then ``loss`` and ``label`` when given and each ``extra`` column.

    Parameters
    ----------
    path : str or Path
        ``*.parquet`` writes Parquet (needs pandas and pyarrow); anything else writes CSV.
    scores : array, shape (N,)
        One score per example, low = tail-like.
    loss, label : arrays, shape (N,), optional
        Each example's loss and label, in the order of ``scores``.
    index : array, shape (N,), optional
        Each example's row in the data set. Defaults to ``0 .. N-1``.
    extra : dict of name -> array of shape (N,), optional
        Further columns (e.g. visits, group).

    Returns
    -------
    Path
        The file written (its folder is created).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "ranked.csv"
    >>> _ = export_ranking(out, np.array([0.3, -0.5]), label=np.array([1, 0]))
    >>> print(out.read_text().strip())
    rank,index,score,label
    0,1,-0.5,0
    1,0,0.3,1
    """
    s = _scores("scores", scores)
    n = s.shape[0]
    columns: dict[str, np.ndarray] = {"index": np.arange(n) if index is None else to_numpy(index)}
    for name, values in (("loss", loss), ("label", label), *(extra or {}).items()):
        if values is None:
            continue
        array = to_numpy(values)
        if array.shape != (n,):
            raise ValueError(f"`{name}` must have shape ({n},) like `scores`; Received: shape {array.shape}.")
        columns[name] = array
    order = rank(s)
    table = {"rank": np.arange(n), "index": columns.pop("index")[order], "score": s[order]}
    table.update({k: v[order] for k, v in columns.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                f"Writing Parquet needs pandas and pyarrow; write a .csv instead ({exc})."
            ) from exc
        pd.DataFrame(table).to_parquet(path, index=False)
        return path
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(table))
        for row in zip(*table.values(), strict=True):
            writer.writerow([_cell(v) for v in row])
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, np.floating):
        return repr(float(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def data_map(history: Array, /) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and variability of the score over epochs (dataset cartography).

    Swayamdipta et al. (2020, "Dataset Cartography", arXiv:2009.10795) map each example by
    the mean and the standard deviation, over epochs, of its gold-label probability; here the
    coordinate is the GradTail alignment: low mean = consistently against the reference
    (tail-like or mislabelled), high variability = the model changes its mind (ambiguous).

    Parameters
    ----------
    history : array, shape (E, N)
        The scores of N examples after each of E epochs (E >= 1); NaN entries are skipped.

    Returns
    -------
    mean, variability : ndarrays, shape (N,)
        Mean and population standard deviation over the epochs; NaN for an example without
        a finite score.

    Examples
    --------
    >>> mean, var = data_map(np.array([[0.2, -0.5], [0.4, -0.5]]))
    >>> mean.round(2), var.round(2)
    (array([ 0.3, -0.5]), array([0.1, 0. ]))
    """
    h = to_numpy(history).astype(np.float64)
    if h.ndim != 2 or h.shape[0] < 1:
        raise ValueError(
            f"`history` must have shape (E, N): E >= 1 epochs of N scores; Received: shape {h.shape}."
        )
    finite = np.isfinite(h)
    count = finite.sum(axis=0)
    safe = np.where(finite, h, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, safe.sum(axis=0) / np.maximum(count, 1), np.nan)
        var = np.where(finite, (safe - mean) ** 2, 0.0).sum(axis=0) / np.maximum(count, 1)
    return mean, np.where(count > 0, np.sqrt(var), np.nan)


def plot_data_map(
    history: Array,
    /,
    *,
    path: str | Path | None = None,
    labels: Array | None = None,
    ax: Any = None,
    title: str = "GradTail data map",
) -> Any:
    """Scatter each example at (variability, mean alignment) over epochs; needs matplotlib.

    Parameters
    ----------
    history : array, shape (E, N)
        As in `data_map`.
    path : str or Path, optional
        Save the figure there (PNG, PDF, ... by suffix).
    labels : array, shape (N,), optional
        Colour the points by label (e.g. class or subgroup).
    ax : matplotlib Axes, optional
        Draw into it; a new figure otherwise.
    title : str, optional

    Returns
    -------
    matplotlib Figure

    Examples
    --------
    >>> fig = plot_data_map(np.random.default_rng(0).normal(size=(3, 50)))  # doctest: +SKIP
    """
    mean, variability = data_map(history)
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(4.8, 4.0))
    else:
        fig = ax.figure
    colour = None if labels is None else to_numpy(labels)
    points = ax.scatter(
        variability, mean, c=colour, s=6, alpha=0.6, cmap="tab10" if colour is not None else None
    )
    if colour is not None:
        fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel("variability (std of alignment over epochs)")
    ax.set_ylabel("mean alignment (low = tail-like)")
    ax.set_title(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def save_image_grid(
    path: str | Path,
    images: Array,
    groups: Sequence[tuple[str, Array]],
    /,
    *,
    titles: Sequence[str] | None = None,
    image_shape: tuple[int, ...] | None = None,
    columns: int = 16,
) -> Path:
    """A PNG of image groups, e.g. the most tail-like and the most head-like; needs matplotlib.

    Parameters
    ----------
    path : str or Path
        The file to write.
    images : array, shape (N, ...)
        All images (or flat rows with ``image_shape``); grey (H, W) or colour (H, W, 3).
    groups : sequence of (title, indices)
        Each group starts a new block of rows, under its title; indices into ``images``.
    titles : sequence of str, optional
        A short title per image of ``images`` (e.g. its class name).
    image_shape : tuple, optional
        Reshape each row of ``images`` to this shape.
    columns : int, optional
        Images per row. Defaults to 16.

    Returns
    -------
    Path

    Examples
    --------
    >>> order = rank(np.random.default_rng(0).normal(size=10))
    >>> save_image_grid("grid.png", np.zeros((10, 8, 8)), [("tail", order[:4])])  # doctest: +SKIP
    """
    pictures = to_numpy(images)
    blocks = [(t, to_numpy(i).astype(np.int64).reshape(-1)) for t, i in groups]
    if not blocks or columns < 1:
        raise ValueError(
            f"`groups` must hold at least one (title, indices) pair and `columns` must be >= 1; Received: "
            f"{len(blocks)} groups and columns={columns}."
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max(1, *(len(i) for _, i in blocks))
    cols = min(columns, longest)
    rows = [max(1, -(-len(i) // cols)) for _, i in blocks]
    ratios = [r for n in rows for r in [0.28] + [1.0] * n]
    fig = plt.figure(figsize=(0.9 * cols, 1.05 * sum(ratios) + 0.1))
    grid = fig.add_gridspec(len(ratios), cols, height_ratios=ratios, wspace=0.08, hspace=0.35)
    top = 0
    for (title, idx), n_rows in zip(blocks, rows, strict=True):
        label = fig.add_subplot(grid[top, :])
        label.axis("off")
        label.text(0.0, 0.1, title, fontsize=9, fontweight="bold", transform=label.transAxes)
        for j, i in enumerate(idx):
            ax = fig.add_subplot(grid[top + 1 + j // cols, j % cols])
            ax.axis("off")
            image = pictures[i] if image_shape is None else pictures[i].reshape(image_shape)
            ax.imshow(image, cmap="gray_r" if image.ndim == 2 else None, interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[int(i)])[:9], fontsize=6, pad=1)
        top += n_rows + 1
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Weighting methods of the imbalanced-regression benchmark (``regression.py``).

The loop minimises ``mean_i(w_i * L_i)`` with ``L_i = (f(x_i) - z_i)^2`` the squared error on
the standardised log target. The baselines mirror the classification suite's (``methods.py``:
uniform, loss rank with GradTail's default curve, GradTail on the loss); what is new here:

- ``lds``: label distribution smoothing (Yang et al., 2021, "Delving into Deep Imbalanced
  Regression", ICML, arXiv:2102.09554): the empirical target histogram over fine bins, its
  square root smoothed by a Gaussian kernel, per-example weight ``1 / smoothed`` normalised
  to mean 1 over the training set (their ``sqrt_inv`` + LDS recipe);
- GradTail scored on the gradient of the *prediction* ``f(x_i)`` instead of the loss:
  ``w = gt.weights(pred)`` gives every example the cosine of ``d f(x_i) / d theta`` with the
  running reference, with no error sign in it; the loss gradient of a squared error is that
  same vector times ``2 (f(x_i) - z_i)``, whose sign flips between over- and under-predicted
  examples (see docs/regression.md);
- ``lds_gradtail_pred``: the product of the two weights;
- ``bmc``: Balanced MSE, batch-based Monte Carlo (Ren et al., 2022, "Balanced MSE for
  Imbalanced Visual Regression", CVPR, arXiv:2203.16427): the loss is a cross-entropy over
  the batch, row ``i`` being ``-log softmax_j(-(f(x_i) - z_j)^2 / (2 sigma^2))`` at ``j = i``,
  times ``2 sigma^2`` (detached), with the noise scale ``sigma`` learned beside the model
  (initial 1 in standardised target units, its own Adam at 1e-2, as their reference code);
  it is a label-prior correction like logit adjustment, a loss rather than a weighting;
- ``bmc_gradtail_pred_head``: BMC's per-example rows weighted by the head-only GradTail
  prediction weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .methods import GradTailOnLoss, top_rank_weights

LDS_BINS = 100
LDS_KERNEL_SIZE = 5
LDS_SIGMA = 2.0


def lds_weights(
    targets: np.ndarray,
    /,
    *,
    n_bins: int = LDS_BINS,
    kernel_size: int = LDS_KERNEL_SIZE,
    sigma: float = LDS_SIGMA,
) -> np.ndarray:
    """Label-distribution-smoothing weights, inverse square root of the smoothed density.

    The targets' range is cut into ``n_bins`` equal-width bins; the square roots of the bin
    counts are convolved (zero padding) with a Gaussian window of ``kernel_size`` taps,
    ``exp(-j^2 / (2 sigma^2))`` for ``j = -(kernel_size // 2) .. kernel_size // 2`` (peak 1);
    each example gets ``1 / smoothed[bin]``, scaled so the weights average 1 (Yang et al.,
    2021, "Delving into Deep Imbalanced Regression", ICML; ``reweight="sqrt_inv"``, ``lds``).

    Parameters
    ----------
    targets : ndarray, shape (n,)
        Training targets.
    n_bins : int
        Histogram bins over ``[min(targets), max(targets)]``.
    kernel_size : int
        Odd window length, in bins.
    sigma : float
        Gaussian standard deviation, in bins.

    Returns
    -------
    ndarray, shape (n,), float64
        Weights with mean 1.

    Examples
    --------
    >>> w = lds_weights(np.array([0.0, 0.0, 0.0, 0.0, 1.0]), n_bins=2, kernel_size=1)
    >>> w.round(3).tolist(), float(w.mean())
    ([0.833, 0.833, 0.833, 0.833, 1.667], 1.0)
    """
    t = np.asarray(targets, dtype=np.float64)
    if t.ndim != 1 or len(t) == 0 or not np.all(np.isfinite(t)):
        raise ValueError(f"targets must be a non-empty finite 1-D array; Received: shape {t.shape}.")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer; Received: {kernel_size}.")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive; Received: {sigma}.")
    lo, hi = float(t.min()), float(t.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    half = kernel_size // 2
    j = np.arange(-half, half + 1, dtype=np.float64)
    window = np.exp(-(j**2) / (2.0 * sigma**2))
    smoothed = np.convolve(np.sqrt(counts), window, mode="same")
    w = 1.0 / smoothed[bins]
    return np.asarray(w * (len(w) / w.sum()), dtype=np.float64)


@dataclass(frozen=True)
class RegBatch:
    """One training batch: per-example squared errors and predictions (both with graph, shape
    (B,)), the standardised targets, the global step and the examples' training-set rows."""

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    step: int
    index: torch.Tensor


@dataclass(frozen=True)
class RegContext:
    """What a method may know about a run: the model, the schedule, the training targets
    (standardised, shape (n_train,); only the target-aware methods read them)."""

    model: nn.Module
    steps_per_epoch: int
    warmup_steps: int
    targets: np.ndarray


class RegWeighting:
    """Per-example loss weights for one batch; ``backward`` runs ``mean(w * loss).backward()``."""

    def weights(self, batch: RegBatch) -> torch.Tensor:
        """Weights of the batch, shape (B,), detached."""
        return torch.ones_like(batch.loss).detach()

    def backward(self, batch: RegBatch) -> torch.Tensor:
        """Weighted backward of the batch's loss; returns the weights."""
        w = self.weights(batch).detach()
        (w * batch.loss).mean().backward()  # type: ignore[no-untyped-call]
        return w

    def scores(self) -> dict[str, torch.Tensor]:
        """Diagnostic per-example scores of the last batch (low alignment = tail-like)."""
        return {}

    def close(self) -> None:
        """Release hooks and the like."""


class ExampleWeights(RegWeighting):
    """Fixed per-example weights looked up by training-set row."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def weights(self, batch: RegBatch) -> torch.Tensor:
        return self.table[batch.index]


class LossRank(RegWeighting):
    """Label-free baseline: per batch, the ``quantile`` largest losses weighted ``max_weight``
    (examples with fewer than ``quantile * B`` losses strictly above theirs), then batch mean 1;
    weight 1 during the warm-up."""

    def __init__(self, ctx: RegContext, *, quantile: float = 0.3, max_weight: float = 3.0) -> None:
        self.warmup_steps, self.quantile, self.max_weight = ctx.warmup_steps, quantile, max_weight

    def weights(self, batch: RegBatch) -> torch.Tensor:
        if batch.step < self.warmup_steps:
            return torch.ones_like(batch.loss).detach()
        return top_rank_weights(batch.loss, quantile=self.quantile, max_weight=self.max_weight)


class GradTailLoss(GradTailOnLoss, RegWeighting):
    """``gt = GradTail(model)`` (or the last ``nn.Linear`` with ``head_only``) and
    ``gt.backward(loss)``: GradTail scores the gradient of the squared error."""


class GradTailPrediction(GradTailLoss):
    """GradTail scored on the prediction: ``w = gt.weights(pred)``, then a weighted backward
    of the loss; optionally times fixed per-example weights (``table``)."""

    def __init__(self, ctx: RegContext, *, table: np.ndarray | None = None, **options: Any) -> None:
        super().__init__(ctx, **options)
        self.table = None if table is None else torch.as_tensor(table, dtype=torch.float32)

    def weights(self, batch: RegBatch) -> torch.Tensor:
        w = self.gt.weights(batch.pred)
        return w if self.table is None else w * self.table[batch.index]

    def backward(self, batch: RegBatch) -> torch.Tensor:
        return RegWeighting.backward(self, batch)


BMC_INIT_SIGMA = 1.0
BMC_SIGMA_LR = 1e-2


def bmc_rows(pred: torch.Tensor, target: torch.Tensor, noise_var: torch.Tensor) -> torch.Tensor:
    """Per-example Balanced MSE terms (batch-based Monte Carlo), shape ``(B,)``.

    Row ``i`` is ``-log softmax_j(-(pred_i - target_j)^2 / (2 noise_var))[i] * 2 noise_var``
    (the scale detached), so that their mean is the BMC loss of Ren et al. (2022), "Balanced MSE
    for Imbalanced Visual Regression", CVPR: the batch's targets stand for the training label
    distribution, and the softmax over them removes its prior from the fit.

    Parameters
    ----------
    pred, target : Tensor, shape (B,)
        Predictions and targets (standardised).
    noise_var : Tensor, shape ()
        The noise variance ``sigma^2``; gradients flow into it through the softmax.

    Returns
    -------
    Tensor, shape (B,)

    Examples
    --------
    >>> rows = bmc_rows(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 2.0]), torch.tensor(1.0))
    >>> [round(v, 4) for v in rows.tolist()]
    [0.2539, 0.2539]
    """
    logits = -0.5 * (pred[:, None] - target[None, :]) ** 2 / noise_var
    rows = -torch.log_softmax(logits, dim=1).diagonal()
    return rows * (2.0 * noise_var).detach()


class BalancedMSE(RegWeighting):
    """Balanced MSE (BMC) with a learned noise scale; optionally its rows weighted by the head's
    GradTail prediction weights (``gradtail``). The ``weights`` it reports are those weights
    (ones for plain BMC): the loss itself is BMC, not the squared error."""

    def __init__(self, ctx: RegContext, *, gradtail: bool = False) -> None:
        self.sigma = torch.nn.Parameter(torch.tensor(BMC_INIT_SIGMA))
        self.opt = torch.optim.Adam([self.sigma], lr=BMC_SIGMA_LR)
        self.gt = GradTailPrediction(ctx, head_only=True) if gradtail else None

    def weights(self, batch: RegBatch) -> torch.Tensor:
        return torch.ones_like(batch.loss).detach() if self.gt is None else self.gt.weights(batch)

    def backward(self, batch: RegBatch) -> torch.Tensor:
        w = self.weights(batch).detach()
        self.opt.zero_grad(set_to_none=True)
        rows = bmc_rows(batch.pred, batch.target, self.sigma**2)
        (w * rows).mean().backward()  # type: ignore[no-untyped-call]
        self.opt.step()
        return w

    def scores(self) -> dict[str, torch.Tensor]:
        return {} if self.gt is None else self.gt.scores()

    def close(self) -> None:
        if self.gt is not None:
            self.gt.close()


@dataclass(frozen=True)
class RegMethod:
    """One entry of the regression comparison."""

    name: str
    label: str
    description: str
    make: Callable[[RegContext], RegWeighting]
    uses_targets: bool = False
    gradtail: bool = False


def _lds(ctx: RegContext) -> RegWeighting:
    return ExampleWeights(lds_weights(ctx.targets))


_ALL = (
    RegMethod(
        "uniform",
        "uniform",
        "plain mean squared error",
        lambda ctx: RegWeighting(),
    ),
    RegMethod(
        "lds",
        "LDS (Yang et al.)",
        f"label distribution smoothing: {LDS_BINS} target bins, sqrt counts smoothed by a Gaussian window "
        f"({LDS_KERNEL_SIZE} taps, sigma {LDS_SIGMA:g} bins), weight 1 / smoothed, mean 1 over the training "
        "set (Yang et al., 2021)",
        _lds,
        uses_targets=True,
    ),
    RegMethod(
        "loss_rank",
        "loss rank (label-free)",
        "per batch, the top 30% by squared error weighted 3, normalised to batch mean 1; one-epoch warm-up",
        lambda ctx: LossRank(ctx),
    ),
    RegMethod(
        "gradtail",
        "GradTail (defaults, loss gradient)",
        "gt = GradTail(model); gt.backward(loss): every nn.Linear, library defaults, scores the gradient of "
        "the squared error; one-epoch warm-up",
        lambda ctx: GradTailLoss(ctx),
        gradtail=True,
    ),
    RegMethod(
        "gradtail_pred",
        "GradTail, prediction gradient",
        "gt = GradTail(model); w = gt.weights(pred); (w * loss).mean().backward(): every nn.Linear, library "
        "defaults, scores d f(x_i) / d theta (no error sign); one-epoch warm-up",
        lambda ctx: GradTailPrediction(ctx),
        gradtail=True,
    ),
    RegMethod(
        "gradtail_pred_head",
        "GradTail, prediction gradient, head only",
        "as gradtail_pred, only the last nn.Linear tracked",
        lambda ctx: GradTailPrediction(ctx, head_only=True),
        gradtail=True,
    ),
    RegMethod(
        "gradtail_pred_head_q10",
        "GradTail, prediction gradient, head only, q=0.1, wmax=10",
        "as gradtail_pred_head with a steeper curve: the lowest 10% of each batch weighted 10 (then batch "
        "mean 1); does a stronger curve turn a good detector into a gain?",
        lambda ctx: GradTailPrediction(ctx, head_only=True, quantile=0.1, max_weight=10.0),
        gradtail=True,
    ),
    RegMethod(
        "lds_gradtail_pred",
        "LDS x GradTail (prediction)",
        "the product of the LDS weight and the gradtail_pred weight",
        lambda ctx: GradTailPrediction(ctx, table=lds_weights(ctx.targets)),
        uses_targets=True,
        gradtail=True,
    ),
    RegMethod(
        "lds_gradtail_pred_head",
        "LDS x GradTail (prediction, head only)",
        "the product of the LDS weight and the gradtail_pred_head weight",
        lambda ctx: GradTailPrediction(ctx, head_only=True, table=lds_weights(ctx.targets)),
        uses_targets=True,
        gradtail=True,
    ),
    RegMethod(
        "bmc",
        "Balanced MSE (BMC, Ren et al.)",
        f"batch-based Monte Carlo Balanced MSE: cross-entropy of each prediction against the batch's "
        f"targets with Gaussian logits, times 2 sigma^2; sigma learned (initial {BMC_INIT_SIGMA:g}, Adam "
        f"{BMC_SIGMA_LR:g}) (Ren et al., 2022)",
        lambda ctx: BalancedMSE(ctx),
        uses_targets=True,
    ),
    RegMethod(
        "bmc_gradtail_pred_head",
        "BMC x GradTail (prediction, head only)",
        "BMC's per-example rows weighted by the gradtail_pred_head weights",
        lambda ctx: BalancedMSE(ctx, gradtail=True),
        uses_targets=True,
        gradtail=True,
    ),
)

REG_METHODS: dict[str, RegMethod] = {m.name: m for m in _ALL}

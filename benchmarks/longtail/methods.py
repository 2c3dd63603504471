"""The weighting methods compared by the long-tail suite, one registry entry each.

A method is a factory ``make(ctx, **options) -> Weighting``; a ``Weighting`` turns one
training batch into per-example loss weights ``w`` and the loop minimises
``mean_i(w_i * L_i)`` (``L_i`` the per-example cross-entropy). Weights are treated as
constants except where the method's loss needs their gradient (focal loss). A method may
do its own backward (GradTail's book-keeping path) and may expose per-example diagnostic
scores of the last batch (GradTail's alignment), which the suite uses for tail detection.

To add a method, write its weight function and add one ``Method(...)`` to ``_ALL``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradtail_ops
from gradtail_ops.mining import retraining_weights
from gradtail_torch import GradTail


@dataclass(frozen=True)
class Context:
    """What a method may know about a run (class counts only for the label-aware ones).

    ``misclassified(epochs)`` trains a fresh uniform model for ``epochs`` epochs and returns
    which training examples it gets wrong, shape (n_train,) bool (JTT's first phase);
    ``alignments(epochs)`` returns every training example's GradTail alignment under such a
    model instead, shape (n_train,) float (two-stage GradTail's first phase);
    ``first_model(epochs)`` is that first-phase model itself and ``true_class_probability(epochs)``
    its softmax probability of each training label, shape (n_train,) float (AFR's score). The
    loop trains the first phase once per run and shares it between these. ``epochs`` is the
    run's length.
    """

    model: nn.Module
    counts: np.ndarray
    steps_per_epoch: int
    warmup_steps: int
    misclassified: Callable[[int], np.ndarray] | None = None
    alignments: Callable[[int], np.ndarray] | None = None
    first_model: Callable[[int], nn.Module] | None = None
    true_class_probability: Callable[[int], np.ndarray] | None = None
    epochs: int | None = None


@dataclass(frozen=True)
class Batch:
    """One training batch: per-example losses (with graph), logits, labels, global step and
    the examples' indices into the training set (when the loop knows them)."""

    loss: torch.Tensor
    logits: torch.Tensor
    y: torch.Tensor
    step: int
    index: torch.Tensor | None = None


class Weighting:
    """Per-example loss weights for one batch; ``backward`` runs the weighted backward."""

    def weights(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, batch: Batch) -> torch.Tensor:
        w = self.weights(batch)
        (w * batch.loss).mean().backward()
        return w.detach()

    def scores(self) -> dict[str, torch.Tensor]:
        """Diagnostic per-example scores of the last batch (low alignment = tail-like)."""
        return {}

    def close(self) -> None:
        """Release hooks and the like."""


class FunctionWeighting(Weighting):
    """A stateless weight function ``fn(batch) -> (B,)``."""

    def __init__(self, fn: Callable[[Batch], torch.Tensor]) -> None:
        self.fn = fn

    def weights(self, batch: Batch) -> torch.Tensor:
        return self.fn(batch)


# ----------------------------------------------------------------------- weight functions


def class_weights_inverse_frequency(counts: np.ndarray) -> np.ndarray:
    """``n / (C * n_c)``: mean 1 over the training set."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return counts.sum() / (len(counts) * counts)


def class_weights_effective_number(counts: np.ndarray, beta: float = 0.999) -> np.ndarray:
    """Class-balanced weights ``(1 - beta) / (1 - beta^n_c)`` (Cui et al., 2019), mean 1 over
    the training set (``sum_c n_c w_c = n``)."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    w = (1.0 - beta) / (1.0 - beta**counts)
    return w * counts.sum() / float((counts * w).sum())


def class_weighting(weights: np.ndarray) -> FunctionWeighting:
    table = torch.as_tensor(weights, dtype=torch.float32)
    return FunctionWeighting(lambda b: table[b.y])


def focal_weights(batch: Batch, gamma: float = 2.0) -> torch.Tensor:
    """``(1 - p_y)^gamma`` with its gradient, so ``w * CE`` is the focal loss (Lin et al., 2017)."""
    p = torch.exp(-batch.loss)  # the true class's probability, differentiable
    return (1.0 - p).clamp_min(0.0) ** gamma


def top_rank_weights(score: torch.Tensor, *, quantile: float, max_weight: float) -> torch.Tensor:
    """``max_weight`` for the examples with fewer than ``quantile * n`` finite scores strictly
    above theirs (ties share a weight), 1 otherwise (non-finite scores: 1, not counted), divided
    by the batch mean: the core's rank curve on ``-score``, O(B log B)."""
    return gradtail_ops.weight_curve(
        -score.detach(), kind="rank", quantile=quantile, max_weight=max_weight, normalize=True
    )


class LossRank(Weighting):
    """Label-free baseline: the top ``quantile`` of each batch by loss weighted ``max_weight``."""

    def __init__(self, ctx: Context, *, quantile: float = 0.3, max_weight: float = 3.0) -> None:
        self.warmup_steps = ctx.warmup_steps
        self.quantile, self.max_weight = quantile, max_weight

    def weights(self, batch: Batch) -> torch.Tensor:
        if batch.step < self.warmup_steps:
            return torch.ones_like(batch.loss).detach()
        return top_rank_weights(batch.loss, quantile=self.quantile, max_weight=self.max_weight)


class _RunContext(Protocol):
    model: nn.Module
    warmup_steps: int


class _LossBatch(Protocol):
    loss: torch.Tensor


class GradTailOnLoss:
    """``gradtail_torch.GradTail`` on the per-example loss, with a warm-up of ``ctx.warmup_steps``;
    ``head_only`` tracks the last ``nn.Linear`` alone, otherwise every one (jointly).

    The shared body of :class:`GradTailWeighting` (classification) and
    ``regression_methods.GradTailLoss``: put it before the suite's weighting base class. ``ctx``
    needs ``model`` and ``warmup_steps``, a batch ``loss`` of shape (B,).

    Examples
    --------
    >>> ctx = Context(nn.Linear(3, 2), np.array([5, 1]), steps_per_epoch=1, warmup_steps=0)
    >>> w = GradTailWeighting(ctx, head_only=True)
    >>> w.scores()  # no batch seen yet
    {}
    >>> w.close()
    """

    def __init__(self, ctx: _RunContext, *, head_only: bool = False, **options: Any) -> None:
        linears = [m for m in ctx.model.modules() if isinstance(m, nn.Linear)]
        target: nn.Module = linears[-1] if head_only else ctx.model
        self.gt = GradTail(target, **({"warmup_steps": ctx.warmup_steps} | options))

    def backward(self, batch: _LossBatch) -> torch.Tensor:
        return self.gt.backward(batch.loss)

    def weights(self, batch: _LossBatch) -> torch.Tensor:
        return self.gt.weights(batch.loss)

    def scores(self) -> dict[str, torch.Tensor]:
        a = self.gt.last_alignment
        return {} if a is None else {"alignment": a}

    def close(self) -> None:
        self.gt.remove()


class GradTailWeighting(GradTailOnLoss, Weighting):
    """``gradtail_torch.GradTail`` with a warm-up of ``ctx.warmup_steps``; ``head_only``
    tracks the last ``nn.Linear`` alone, otherwise every one (jointly)."""


class GradTailMemoryWeighting(GradTailWeighting):
    """GradTail with the per-example memory (``memory_size`` = the training-set size, from
    the class counts' sum): weights from each example's running alignment score over its
    visits (``gradtail_ops.memory_update``); needs the batch's example indices."""

    def __init__(self, ctx: Context, **options: Any) -> None:
        super().__init__(ctx, **({"memory_size": int(np.sum(ctx.counts))} | options))

    @staticmethod
    def _index(batch: Batch) -> torch.Tensor:
        if batch.index is None:
            raise ValueError(
                "GradTail's memory needs the batch's example indices; Received: Batch(index=None)."
            )
        return batch.index

    def backward(self, batch: Batch) -> torch.Tensor:
        return self.gt.backward(batch.loss, index=self._index(batch))

    def weights(self, batch: Batch) -> torch.Tensor:
        return self.gt.weights(batch.loss, index=self._index(batch))


class JTT(Weighting):
    """Just Train Twice (Liu et al., 2021, "Just Train Twice: Improving Group Robustness
    without Training Group Information", ICML): a uniform model trained for
    ``identify_epochs`` epochs flags its misclassified training examples (the error set);
    the run then trains from scratch with the error set's loss weighted ``upweight``
    (weights normalised to mean 1 over the training set). Label-frequency-free; needs the
    examples' indices."""

    def __init__(self, ctx: Context, *, identify_epochs: int = 1, upweight: float = 20.0) -> None:
        if ctx.misclassified is None:
            raise ValueError("JTT needs ctx.misclassified (the training loop's first phase); Received: None.")
        errors = np.asarray(ctx.misclassified(identify_epochs), dtype=bool)
        w = np.where(errors, upweight, 1.0)
        self.table = torch.as_tensor(w / w.mean(), dtype=torch.float32)
        self.error_fraction = float(errors.mean())

    def weights(self, batch: Batch) -> torch.Tensor:
        if batch.index is None:
            raise ValueError("JTT needs the batch's example indices; Received: Batch(index=None).")
        return self.table[batch.index]


class TwoStageGradTail(Weighting):
    """Two-stage GradTail, JTT's scheme with GradTail's score as the identification: a
    uniform model trained ``identify_epochs`` epochs scores every training example's
    alignment (``gradtail_torch.score_dataset``); the ``quantile`` share with the lowest
    alignment (the examples whose gradient disagrees most with the data set's mean
    direction) is the tail set, whose loss is weighted ``upweight`` when the run trains from
    scratch (weights normalised to mean 1 over the training set). Label-frequency-free;
    needs the examples' indices."""

    def __init__(
        self, ctx: Context, *, identify_epochs: int = 1, quantile: float = 0.2, upweight: float = 5.0
    ) -> None:
        if ctx.alignments is None:
            raise ValueError(
                "Two-stage GradTail needs ctx.alignments (the training loop's first phase); Received: None."
            )
        scores = np.asarray(ctx.alignments(identify_epochs), dtype=np.float64)
        scores = np.where(np.isfinite(scores), scores, np.inf)  # a non-finite score is never tail
        order = np.argsort(scores, kind="stable")
        tail = np.zeros(len(scores), dtype=bool)
        tail[order[: round(quantile * len(scores))]] = True
        w = np.where(tail, upweight, 1.0)
        self.table = torch.as_tensor(w / w.mean(), dtype=torch.float32)
        self.tail_fraction = float(tail.mean())

    def weights(self, batch: Batch) -> torch.Tensor:
        if batch.index is None:
            raise ValueError(
                "Two-stage GradTail needs the batch's example indices; Received: Batch(index=None)."
            )
        return self.table[batch.index]


class LastLayerRetraining(Weighting):
    """AFR-style last-layer retraining (Qiu et al., 2023, "Simple and Fast Group Robustness by
    Automatic Feature Reweighting", ICML): the run starts from the first-phase model (a uniform
    model trained ``identify_epochs`` epochs, seed + 1), freezes every parameter but the last
    ``nn.Linear``'s, and retrains that head with per-example weights ``exp(-gamma * s_i)``
    (mean 1 over the training set). ``score="p_true"`` is AFR's ``s_i``, the first model's
    probability of the example's label; ``score="alignment"`` puts GradTail's in its place,
    ``s_i`` the percentile rank in [0, 1] of the example's alignment under the first model
    (``score_dataset``; cosines of a trained model crowd a narrow band, a rank spreads them),
    so the least-fitted / least-aligned examples weigh most; ``score="none"`` weighs every
    example 1 (plain last-layer retraining). ``identify_epochs=None`` trains
    the first phase as long as the run (``ctx.epochs``). Simplifications, stated in the
    registry: one training set for both phases (AFR holds out a reweighting split) and no class
    balancing of the weights or L2 pull to the first head (label-frequency-free). Needs the
    examples' indices."""

    def __init__(
        self, ctx: Context, *, identify_epochs: int | None = None, gamma: float, score: str = "p_true"
    ) -> None:
        if ctx.first_model is None or ctx.true_class_probability is None or ctx.alignments is None:
            raise ValueError(
                "Last-layer retraining needs ctx.first_model, ctx.true_class_probability and "
                "ctx.alignments (the training loop's first phase); Received: None."
            )
        epochs = identify_epochs if identify_epochs is not None else ctx.epochs
        if epochs is None:
            raise ValueError("identify_epochs is needed when ctx.epochs is unknown; Received: None.")
        if score == "p_true":
            p_true = np.asarray(ctx.true_class_probability(epochs), dtype=np.float64)
            w = np.exp(-gamma * np.where(np.isfinite(p_true), p_true, 1.0))  # non-finite: never upweighted
            w = w / w.mean()
        elif score == "none":  # plain last-layer retraining: every weight 1
            w = np.ones(len(np.asarray(ctx.true_class_probability(epochs))))
        elif score == "alignment":  # the library's mode: gradtail_ops.mining.retraining_weights
            w = retraining_weights(np.asarray(ctx.alignments(epochs), dtype=np.float64), gamma=gamma)
        else:
            raise ValueError(f"score must be 'p_true', 'alignment' or 'none'; Received: {score!r}.")
        self.table = torch.as_tensor(w, dtype=torch.float32)  # mean 1
        ctx.model.load_state_dict(ctx.first_model(epochs).state_dict())
        head = [m for m in ctx.model.modules() if isinstance(m, nn.Linear)][-1]
        trainable = {id(p) for p in head.parameters()}
        for p in ctx.model.parameters():
            p.requires_grad_(id(p) in trainable)  # Adam skips parameters without a gradient
        frozen = [m for m in ctx.model.modules() if m is not head and m is not ctx.model]

        def features_in_eval_mode(module: nn.Module, args: Any) -> None:
            # The loop switches the model back to train mode after each evaluation: keep the
            # frozen features deterministic (no dropout, BatchNorm statistics unchanged), as AFR's
            # precomputed embeddings are.
            for m in frozen:
                m.training = False

        self.handle = ctx.model.register_forward_pre_hook(features_in_eval_mode)

    def weights(self, batch: Batch) -> torch.Tensor:
        if batch.index is None:
            raise ValueError(
                "Last-layer retraining needs the batch's example indices; Received: Batch(index=None)."
            )
        return self.table[batch.index]

    def close(self) -> None:
        self.handle.remove()


class ClassBalancedGradTail(GradTailWeighting):
    """GradTail on top of class-balanced weights: ``w_i = c_{y_i} g_i`` renormalised so the
    batch keeps the class-balanced weights' batch sum (``c``: effective-number class weights,
    Cui et al., 2019; ``g``: GradTail's weights)."""

    def __init__(self, ctx: Context, *, beta: float = 0.999, **options: Any) -> None:
        super().__init__(ctx, **options)
        self.table = torch.as_tensor(class_weights_effective_number(ctx.counts, beta), dtype=torch.float32)

    def backward(self, batch: Batch) -> torch.Tensor:
        return Weighting.backward(self, batch)

    def weights(self, batch: Batch) -> torch.Tensor:
        g = self.gt.weights(batch.loss).detach()
        c = self.table[batch.y].to(g.dtype)
        return c * g * (c.sum() / (c * g).sum())


class LogitAdjusted(Weighting):
    """Logit-adjusted cross-entropy (Menon et al., 2021, "Long-tail learning via logit
    adjustment", ICLR): train on ``CE(f(x) + tau * log(pi), y)`` with ``pi`` the training
    class prior, predict with ``f(x)`` alone. Uniform weights; the loss itself is replaced, so
    ``backward`` differentiates the adjusted loss (the recorded loss stays the plain one)."""

    def __init__(self, ctx: Context, *, tau: float = 1.0) -> None:
        prior = np.asarray(ctx.counts, np.float64) / np.sum(ctx.counts)
        self.offset = torch.as_tensor(tau * np.log(prior))  # float64, cast to the logits dtype per batch

    def adjusted_loss(self, batch: Batch) -> torch.Tensor:
        offset = self.offset.to(batch.logits.device, batch.logits.dtype)
        return F.cross_entropy(batch.logits + offset, batch.y, reduction="none")

    def weights(self, batch: Batch) -> torch.Tensor:
        return torch.ones_like(batch.loss).detach()

    def backward(self, batch: Batch) -> torch.Tensor:
        w = self.weights(batch)
        self.adjusted_loss(batch).mean().backward()
        return w


class LogitAdjustedGradTail(LogitAdjusted):
    """GradTail (defaults) on the logit-adjusted loss: the class prior is corrected by the
    loss, and GradTail weighs, within it, the examples whose adjusted-loss gradient
    disagrees with the reference (the tail that class counts cannot see)."""

    def __init__(self, ctx: Context, *, tau: float = 1.0, **options: Any) -> None:
        super().__init__(ctx, tau=tau)
        self.gradtail = GradTailWeighting(ctx, **options)

    def backward(self, batch: Batch) -> torch.Tensor:
        return self.gradtail.gt.backward(self.adjusted_loss(batch))

    def weights(self, batch: Batch) -> torch.Tensor:
        return self.gradtail.gt.weights(self.adjusted_loss(batch))

    def scores(self) -> dict[str, torch.Tensor]:
        return self.gradtail.scores()

    def close(self) -> None:
        self.gradtail.close()


class LogitAdjustedLastLayer(LastLayerRetraining):
    """Last-layer retraining (``LastLayerRetraining``: the first-phase uniform model's features
    frozen, the head retrained with ``exp(-gamma s)`` weights) on the logit-adjusted loss
    ``CE(f(x) + tau log(pi), y)`` (``LogitAdjusted``): the class prior corrected by the loss,
    the within-class tail by the weights; ``score="none"`` is the prior correction alone
    (decoupled classifier retraining with logit adjustment). Uses the class counts."""

    def __init__(self, ctx: Context, *, tau: float = 1.0, **options: Any) -> None:
        super().__init__(ctx, **options)
        self.adjusted = LogitAdjusted(ctx, tau=tau)

    def backward(self, batch: Batch) -> torch.Tensor:
        w = self.weights(batch)
        (w * self.adjusted.adjusted_loss(batch)).mean().backward()
        return w


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Method:
    """One entry of the comparison."""

    name: str
    label: str
    description: str
    make: Callable[..., Weighting]
    uses_class_counts: bool = False
    gradtail: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    #: Bumped when the method's code changes its numbers; part of the run key when nonzero, so
    #: ``--checkpoint`` does not reuse rows of the older code.
    version: int = 0


def _two_stage(name: str, label: str, description: str, *, quantile: float) -> Method:
    """A registry entry of `TwoStageGradTail` (1 identification epoch, upweight 5)."""
    options = {"identify_epochs": 1, "quantile": quantile, "upweight": 5.0}
    return Method(
        name, label, description, lambda ctx, **o: TwoStageGradTail(ctx, **(options | o)), options=options
    )


#: The last-layer methods' code version (2: ties share their rank, the features kept in eval mode).
LAST_LAYER_VERSION = 2


def _last_layer(name: str, label: str, description: str, *, gamma: float, score: str) -> Method:
    """A registry entry of `LastLayerRetraining` (the first phase as long as the run; the run's
    own epochs retrain the head)."""
    options: dict[str, Any] = {"gamma": gamma, "score": score}
    return Method(
        name,
        label,
        description,
        lambda ctx, **o: LastLayerRetraining(ctx, **(options | o)),
        options=options,
        version=LAST_LAYER_VERSION if score == "alignment" else 0,
    )


_AFR_TEXT = (
    "a uniform model trained as long as the run (seed + 1) is the start; every parameter but the last "
    "Linear's is frozen and the head retrained with weights exp(-gamma s), mean 1 over the training set, "
)

_ALL = (
    Method(
        "uniform",
        "uniform",
        "plain mean cross-entropy",
        lambda ctx: FunctionWeighting(lambda b: torch.ones_like(b.loss).detach()),
    ),
    Method(
        "inverse_frequency",
        "inverse class frequency",
        "class weight n / (C n_c), mean 1 over the training set",
        lambda ctx: class_weighting(class_weights_inverse_frequency(ctx.counts)),
        uses_class_counts=True,
    ),
    Method(
        "class_balanced",
        "class-balanced (Cui et al.)",
        "effective-number class weights (1 - beta) / (1 - beta^n_c), beta = 0.999, mean 1 over the "
        "training set (Cui et al., 2019)",
        lambda ctx, beta=0.999: class_weighting(class_weights_effective_number(ctx.counts, beta)),
        uses_class_counts=True,
        options={"beta": 0.999},
    ),
    Method(
        "focal",
        "focal loss",
        "focal loss (1 - p_y)^gamma CE, gamma = 2 (Lin et al., 2017); the factor is differentiated",
        lambda ctx, gamma=2.0: FunctionWeighting(lambda b: focal_weights(b, gamma)),
        options={"gamma": 2.0},
    ),
    Method(
        "loss_rank",
        "loss rank (label-free)",
        "per batch, the top 30% by loss weighted 3, normalised to batch mean 1; one-epoch warm-up "
        "(GradTail's default curve on the loss instead of the alignment)",
        LossRank,
        options={"quantile": 0.3, "max_weight": 3.0},
    ),
    Method(
        "gradtail",
        "GradTail (defaults)",
        "GradTail(model): every nn.Linear scored jointly, the library defaults (gradtail_ops.defaults) "
        "with the recommended one-epoch warm-up",
        GradTailWeighting,
        gradtail=True,
    ),
    Method(
        "gradtail_memory",
        "GradTail + per-example memory",
        "as gradtail, but each example's weight comes from the EMA over its visits of its "
        "batch-standardised alignment: clip(exp(-m), 1/3, 3), batch mean 1 (memory_decay 0.5)",
        GradTailMemoryWeighting,
        gradtail=True,
    ),
    Method(
        "gradtail_memory_slow",
        "GradTail + per-example memory, decay 0.8",
        "as gradtail_memory with memory_decay 0.8 (a longer memory) and eta 1.5",
        lambda ctx, **o: GradTailMemoryWeighting(ctx, **({"memory_decay": 0.8, "memory_eta": 1.5} | o)),
        gradtail=True,
        options={"memory_decay": 0.8, "memory_eta": 1.5},
    ),
    Method(
        "jtt",
        "JTT (Liu et al.)",
        "Just Train Twice: a uniform model trained 1 epoch (seed + 1) flags its misclassified training "
        "examples; retrain from scratch with their loss weighted 20 (mean 1 over the training set)",
        JTT,
        options={"identify_epochs": 1, "upweight": 20.0},
    ),
    Method(
        "jtt_up5",
        "JTT, upweight 5",
        "as jtt with the error set's loss weighted 5 (the second of the two upweights compared on "
        "validation)",
        lambda ctx, **o: JTT(ctx, **({"identify_epochs": 1, "upweight": 5.0} | o)),
        options={"identify_epochs": 1, "upweight": 5.0},
    ),
    _two_stage(
        "gradtail_two_stage",
        "two-stage GradTail",
        "a uniform model trained 1 epoch (seed + 1) scores every training example's alignment "
        "(score_dataset, every Linear); the lowest-aligned 20% are weighted 5 when the run retrains from "
        "scratch (mean 1 over the training set): JTT with GradTail's score as the identification",
        quantile=0.2,
    ),
    _two_stage(
        "gradtail_two_stage_q10",
        "two-stage GradTail, 10%",
        "as gradtail_two_stage with the lowest-aligned 10% weighted 5",
        quantile=0.1,
    ),
    _last_layer(
        "afr",
        "AFR-style, gamma 2",
        _AFR_TEXT + "s = the first model's probability of the label, gamma 2 (Qiu et al., 2023; one "
        "training set for both phases, no class balancing)",
        gamma=2.0,
        score="p_true",
    ),
    _last_layer(
        "afr_g6",
        "AFR-style, gamma 6",
        "as afr with gamma 6",
        gamma=6.0,
        score="p_true",
    ),
    _last_layer(
        "gradtail_last_layer",
        "GradTail last-layer retraining, gamma 2",
        _AFR_TEXT + "s = the percentile rank of the example's alignment under the first model "
        "(score_dataset, every Linear), gamma 2: AFR with GradTail's score",
        gamma=2.0,
        score="alignment",
    ),
    _last_layer(
        "gradtail_last_layer_g6",
        "GradTail last-layer retraining, gamma 6",
        "as gradtail_last_layer with gamma 6",
        gamma=6.0,
        score="alignment",
    ),
    Method(
        "class_balanced_gradtail",
        "class-balanced x GradTail",
        "class-balanced weights times GradTail (defaults) weights, renormalised to the class-balanced "
        "batch sum",
        ClassBalancedGradTail,
        uses_class_counts=True,
        gradtail=True,
    ),
    Method(
        "gradtail_mean",
        'GradTail, reference="mean"',
        'as gradtail but reference="mean" (EMA of the plain batch-mean gradient)',
        lambda ctx, **o: GradTailWeighting(ctx, **({"reference": "mean"} | o)),
        gradtail=True,
        options={"reference": "mean"},
    ),
    Method(
        "logit_adjustment",
        "logit adjustment (Menon et al.)",
        "logit-adjusted cross-entropy CE(f(x) + tau log pi, y), tau = 1, pi the training class prior; "
        "predictions from f(x) (Menon et al., 2021)",
        lambda ctx, tau=1.0: LogitAdjusted(ctx, tau=tau),
        uses_class_counts=True,
        options={"tau": 1.0},
    ),
    Method(
        "logit_adjustment_gradtail",
        "logit adjustment + GradTail",
        "GradTail (defaults, GradTail(model), one-epoch warm-up) weighting the logit-adjusted loss "
        "(tau = 1), scored on that loss's gradients",
        lambda ctx, tau=1.0, **o: LogitAdjustedGradTail(ctx, tau=tau, **o),
        uses_class_counts=True,
        gradtail=True,
        options={"tau": 1.0},
    ),
    Method(
        "gradtail_head",
        "GradTail, head only",
        "as gradtail but only the last nn.Linear tracked",
        lambda ctx, **o: GradTailWeighting(ctx, head_only=True, **o),
        gradtail=True,
        options={"head_only": True},
    ),
)

METHODS: dict[str, Method] = {m.name: m for m in _ALL}

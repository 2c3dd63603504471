"""Training loops for the long-tail comparisons: one MLP, one loop, a weighting per method.

The weighting methods live in ``methods.py`` (``methods.METHODS``); ``METHODS`` here is the
three the demo compares.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradtail_torch import score_dataset

from .data import LongTailData, subclass_metrics
from .methods import METHODS as ALL_METHODS
from .methods import Batch, Context
from .metrics import class_accuracies, group_means
from .models import build_model

METHODS = ("uniform", "inverse_frequency", "gradtail")


@dataclass
class RunResult:
    """One training run: test metrics, per-class accuracy and a trace of GradTail's scores.

    ``scores`` (with ``record_scores=True``) holds, for every training example of every
    step, ``step``, ``index`` (into the training set), ``label``, ``loss`` (before that
    step's update), ``weight`` and the method's own per-example scores (``alignment`` for
    GradTail). ``test_metrics`` / ``val_metrics`` hold ``metrics(...)`` after every epoch.
    """

    method: str
    seed: int
    per_class_accuracy: np.ndarray
    accuracy: float
    balanced_accuracy: float
    group_accuracy: dict[str, float]
    seconds_per_epoch: float
    trace: dict[str, list[Any]] = field(default_factory=dict)
    val_balanced_accuracy: float | None = None
    val_curve: list[float] = field(default_factory=list)
    test_curve: list[float] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    steps_per_epoch: int = 0
    epochs: int = 0
    wall_seconds: float = 0.0
    test_metrics: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None


def _per_example_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    model.train(was_training)
    return pred


def metrics(
    pred: np.ndarray, y: np.ndarray, data: LongTailData, sub: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class and group accuracies (fractions) of ``pred``.

    With hidden subclasses (``sub``, the examples' subclasses) the groups are by subclass:
    "many" the common subclasses, "few" the rare ones; plus ``rare_subclass``,
    ``worst_subclass`` and ``per_subclass``.
    """
    per_class = class_accuracies(pred, y, len(data.class_names))
    out: dict[str, Any] = {
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(np.nanmean(per_class)),
        "per_class": per_class,
    }
    if sub is None:
        out |= group_means(per_class, data.groups)
    else:
        s = subclass_metrics(pred, data, sub, y)
        out |= s | {"many": s["common_subclass"], "few": s["rare_subclass"]}
    return out


def train(
    data: LongTailData,
    method: str,
    *,
    seed: int = 0,
    epochs: int = 12,
    batch_size: int = 128,
    lr: float = 1e-3,
    hidden: tuple[int, ...] = (512, 256),
    gradtail_options: dict[str, Any] | None = None,
    warmup_epochs: float = 1.0,
    progress: Any = None,
    validation: tuple[np.ndarray, ...] | None = None,
    record_scores: bool = False,
    method_options: dict[str, Any] | None = None,
    test_every_epoch: bool = False,
    arch: str = "mlp",
) -> RunResult:
    """Train a model (``arch``: ``models.ARCHS``, an MLP of ``hidden`` widths by default) with
    Adam on ``data`` with one weighting ``method`` (``methods.METHODS``).

    ``gradtail_options`` go to ``GradTail`` for the GradTail methods, ``method_options`` to
    any method's factory. ``validation=(x, y)`` or ``(x, y, subclasses)`` adds the validation
    metrics after every epoch (``val_curve``, ``val_metrics``), ``test_every_epoch=True`` the
    test metrics after every epoch (``test_curve``, ``test_metrics``: for averages over a
    fixed set of late epochs and for the epoch that validation selects). ``seconds_per_epoch``
    times the training steps only (batch slicing, forward, weighting, backward, optimiser
    step), not the recording or the evaluations.
    """
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {tuple(ALL_METHODS)}; Received: {method!r}")
    spec = ALL_METHODS[method]
    wall_start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_classes = len(data.class_names)
    model = build_model(arch, data.x_train.shape[1], n_classes, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all, y_all = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    n = len(y_all)
    steps_per_epoch = int(np.ceil(n / batch_size))

    @functools.lru_cache(maxsize=2)
    def first_model(identify_epochs: int) -> nn.Module:
        """The first phase shared by the two-stage methods: a fresh uniform model (seed + 1)
        trained ``identify_epochs`` epochs on the same training set."""
        first = train(
            data, "uniform", seed=seed + 1, epochs=identify_epochs, batch_size=batch_size, lr=lr,
            hidden=hidden, arch=arch,
        )  # fmt: skip
        assert first.model is not None
        return first.model

    def misclassified(identify_epochs: int) -> np.ndarray:
        """JTT's error set: the first-phase model's training errors, shape (n_train,) bool."""
        return np.asarray(predict(first_model(identify_epochs), data.x_train) != data.y_train)

    def true_class_probability(identify_epochs: int) -> np.ndarray:
        """AFR's score: the first-phase model's softmax probability of each training example's
        label, shape (n_train,) float64 (eval mode)."""
        model = first_model(identify_epochs)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            p = torch.cat(
                [
                    F.softmax(model(x_all[i : i + 1024]), dim=1).gather(1, y_all[i : i + 1024, None])[:, 0]
                    for i in range(0, n, 1024)
                ]
            )
        model.train(was_training)
        return np.asarray(p.numpy(), dtype=np.float64)

    def alignments(identify_epochs: int) -> np.ndarray:
        """Two-stage GradTail's first phase: every training example's alignment with the data
        set's mean gradient direction under the first-phase model
        (``gradtail_torch.score_dataset`` over every Linear layer), shape (n_train,)."""
        batches = [
            (x_all[i : i + 512], y_all[i : i + 512]) for i in range(0, n, 512)
        ]  # fixed order: the scores follow the training set's
        return np.asarray(
            score_dataset(first_model(identify_epochs), batches, _per_example_ce), dtype=np.float64
        )

    ctx = Context(
        model,
        np.asarray(data.counts),
        steps_per_epoch,
        round(warmup_epochs * steps_per_epoch),
        misclassified=misclassified,
        alignments=alignments,
        first_model=first_model,
        true_class_probability=true_class_probability,
        epochs=epochs,
    )
    options = dict(method_options or {})
    if spec.gradtail:
        options |= dict(gradtail_options or {})
    weighting = spec.make(ctx, **options)
    trace: dict[str, list[Any]] = {"epoch": [], "alignment": [], "weight": [], "group": []}
    recorded: dict[str, list[np.ndarray]] = {}
    val_curve: list[float] = []
    test_curve: list[float] = []
    val_metrics: list[dict[str, Any]] = []
    test_metrics: list[dict[str, Any]] = []
    train_seconds = 0.0
    global_step = 0
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        for step in range(steps_per_epoch):
            t0 = time.perf_counter()
            idx = order[step * batch_size : (step + 1) * batch_size]
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y, reduction="none")
            w = weighting.backward(Batch(loss, logits, y, global_step, index=idx))
            opt.step()
            train_seconds += time.perf_counter() - t0
            scores = weighting.scores()
            if record_scores:
                for key, value in (
                    ("step", np.full(len(y), global_step, dtype=np.int32)),
                    ("index", idx.numpy().astype(np.int32)),
                    ("label", y.numpy().astype(np.int16)),
                    ("loss", loss.detach().numpy().astype(np.float32)),
                    ("weight", w.detach().numpy().astype(np.float32)),
                    *((k, v.detach().cpu().numpy().astype(np.float32)) for k, v in scores.items()),
                ):
                    recorded.setdefault(key, []).append(value)
            if "alignment" in scores and step % 10 == 0 and epoch >= warmup_epochs:
                trace["epoch"] += [epoch] * len(y)
                trace["alignment"] += scores["alignment"].tolist()
                trace["weight"] += w.tolist()
                trace["group"] += data.example_groups(idx.numpy()).tolist()
            global_step += 1
            if progress is not None:
                progress.update(1)
        if validation is not None:
            sub_val = validation[2] if len(validation) > 2 else None
            val_metrics.append(metrics(predict(model, validation[0]), validation[1], data, sub_val))
            val_curve.append(val_metrics[-1]["balanced_accuracy"])
        if test_every_epoch:
            test_metrics.append(metrics(predict(model, data.x_test), data.y_test, data, data.sub_test))
            test_curve.append(test_metrics[-1]["balanced_accuracy"])
    weighting.close()
    final = metrics(predict(model, data.x_test), data.y_test, data, data.sub_test)
    per_class, acc, bal = final["per_class"], final["accuracy"], final["balanced_accuracy"]
    groups: dict[str, float] = {g: final[g] for g in ("many", "medium", "few") if g in final}
    return RunResult(
        method,
        seed,
        per_class,
        acc,
        bal,
        groups,
        train_seconds / epochs,
        trace if trace["alignment"] else {},
        val_balanced_accuracy=val_curve[-1] if val_curve else None,
        val_curve=val_curve,
        test_curve=test_curve,
        scores={k: np.concatenate(v) for k, v in recorded.items()},
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        wall_seconds=time.perf_counter() - wall_start,
        test_metrics=test_metrics,
        val_metrics=val_metrics,
        model=model,
    )

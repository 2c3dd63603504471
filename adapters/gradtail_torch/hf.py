"""GradTail in the Hugging Face Trainer: per-example losses weighted by GradTail.

``GradTailTrainer`` is a drop-in ``transformers.Trainer`` (docs/huggingface.md). Importing this
module imports ``transformers``; ``import gradtail_torch`` does not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:  # pragma: no cover - exercised without transformers installed
    raise ImportError(
        f"gradtail_torch.hf needs Hugging Face transformers: pip install 'gradtail[transformers]' ({exc})"
    ) from exc

from .hook import GradTail

__all__ = ["GRADTAIL_STATE_NAME", "GradTailTrainer", "per_example_loss"]

#: The file holding the GradTail state inside each ``checkpoint-<step>`` folder.
GRADTAIL_STATE_NAME = "gradtail.pt"
Modules = str | Callable[[nn.Module], "nn.Module | Iterable[nn.Module]"] | nn.Module | None


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, *, causal_lm: bool = False) -> torch.Tensor:
    """One loss per example from a Hugging Face model's logits, shape (B,).

    Parameters
    ----------
    logits : Tensor, shape (B, C), (B, 1) or (B, T, V)
        Sequence classification, regression, or token-level logits.
    labels : Tensor, shape (B,), (B, C) or (B, T)
        Class indices (cross-entropy), float targets with ``(B, 1)`` logits (squared error),
        or token labels with ``-100`` for positions to ignore.
    causal_lm : bool, optional
        Shift the token labels by one (the next token), as causal LMs do. Defaults to False.

    Returns
    -------
    Tensor, shape (B,)
        Cross-entropy (or squared error) per example; for token labels the mean over the
        sequence's counted tokens (0 for a sequence with none).

    Examples
    --------
    >>> per_example_loss(torch.zeros(2, 3), torch.tensor([0, 2])).round(decimals=4)
    tensor([1.0986, 1.0986])
    """
    if logits.ndim == 2 and logits.shape[-1] == 1 and labels.is_floating_point():
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    if logits.ndim == 2:
        if labels.shape != logits.shape[:1]:
            raise ValueError(
                f"`labels` must have shape ({logits.shape[0]},) for logits of shape {tuple(logits.shape)}; "
                f"Received: shape {tuple(labels.shape)}."
            )
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"`logits` must be (B, C) or (B, T, V) with labels (B,) or (B, T); Received: logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )
    if causal_lm:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    tokens = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counted = (labels != -100).sum(dim=1)
    return tokens.sum(dim=1) / counted.clamp(min=1)


class GradTailTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose loss is the GradTail-weighted mean of per-example losses.

    ``compute_loss`` runs the model without labels, takes one loss per example
    (`per_example_loss`: cross-entropy for sequence classification, the mean next-token
    cross-entropy per sequence for causal LMs, or ``per_example_loss_fn``), and returns
    ``mean_i(w_i L_i)`` with GradTail's weights (Chen et al., 2022, "GradTail",
    arXiv:2201.05938). Evaluation uses the unweighted mean. The GradTail state is saved as
    ``gradtail.pt`` in each ``checkpoint-<step>`` folder and restored by
    ``train(resume_from_checkpoint=...)``.

    Parameters
    ----------
    *args, **kwargs
        As for ``transformers.Trainer``.
    gradtail_modules : str, nn.Module, sequence of nn.Linear, or callable, optional
        The layers to score: a submodule path (``"classifier"``, ``"lm_head"``), modules, or
        ``fn(model)``. Defaults to the head: the output embeddings (``lm_head``, tied or not)
        of a causal LM, else the last ``nn.Linear`` with ``config.num_labels`` outputs.
    gradtail_options : dict, optional
        Passed to `GradTail` (``decay``, ``warmup_steps``, ...).
    per_example_loss_fn : callable, optional
        ``fn(outputs, labels) -> Tensor (B,)`` replacing the default per-example loss.

    Notes
    -----
    The causal-LM loss is a mean per sequence then over sequences, not the Trainer's mean
    over all tokens of the batch. Gradient accumulation divides each micro-batch's loss by
    the number of accumulation steps, as for any per-batch mean.

    Examples
    --------
    >>> trainer = GradTailTrainer(model=model, args=args, train_dataset=data,  # doctest: +SKIP
    ...                           gradtail_options={"warmup_steps": 20})
    """

    def __init__(
        self,
        *args: Any,
        gradtail_modules: Modules = None,
        gradtail_options: dict[str, Any] | None = None,
        per_example_loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.gradtail_modules = gradtail_modules
        self.gradtail_options = dict(gradtail_options or {})
        self.per_example_loss_fn = per_example_loss_fn
        self.gradtail: GradTail | None = None
        self._gradtail_pending: dict[str, Any] | None = None
        # compute_loss returns a per-batch mean: the Trainer divides it for gradient accumulation.
        self.loss_is_scaled_for_ga = False

    # ------------------------------------------------------------------------- the GradTail
    def _head(self, model: nn.Module) -> nn.Module | Iterable[nn.Module]:
        chosen = self.gradtail_modules
        if isinstance(chosen, str):
            return model.get_submodule(chosen)
        if callable(chosen) and not isinstance(chosen, nn.Module):
            return chosen(model)
        if chosen is not None:
            return chosen
        if _is_causal_lm(model):
            head = model.get_output_embeddings()  # type: ignore[operator]
            if isinstance(head, nn.Linear):
                return head
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
        if not found:
            raise ValueError(
                "No head found to score (the output embeddings of a causal LM, or an nn.Linear with "
                "config.num_labels outputs): pass gradtail_modules=; Received: a "
                f"{type(model).__name__}."
            )
        return found[-1]

    def _ensure_gradtail(self, model: nn.Module) -> GradTail:
        if self.gradtail is None:
            self.gradtail = GradTail(self._head(model), **self.gradtail_options)
        if self._gradtail_pending is not None:
            self.gradtail.load_state_dict(self._gradtail_pending)
            self._gradtail_pending = None
        return self.gradtail

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """``mean_i(w_i L_i)`` in training; the unweighted mean of ``L_i`` in evaluation."""
        del num_items_in_batch  # the loss is a per-batch mean of per-example losses
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise ValueError(
                f"GradTailTrainer needs `labels` in each batch; Received: keys {sorted(inputs)}."
            )
        labels = inputs.pop("labels")
        unwrapped = self.accelerator.unwrap_model(model)
        gt = self._ensure_gradtail(unwrapped)
        outputs = model(**inputs)
        if self.per_example_loss_fn is not None:
            losses = self.per_example_loss_fn(outputs, labels)
        else:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            losses = per_example_loss(logits, labels, causal_lm=_is_causal_lm(unwrapped))
        if model.training and torch.is_grad_enabled():
            weights = gt.weights(losses)
            loss = (weights * losses).mean()
        else:
            gt.discard()
            loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the latest step's mean alignment and largest weight to the training logs."""
        gt = self.gradtail
        if (
            "loss" in logs
            and gt is not None
            and gt.last_alignment is not None
            and gt.last_weights is not None
        ):
            logs["gradtail_alignment_mean"] = float(gt.last_alignment.float().nanmean())
            logs["gradtail_weight_max"] = float(gt.last_weights.float().max())
        super().log(logs, start_time)

    # ------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.gradtail is None or not self.args.should_save:
            return
        folder = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        torch.save(self.gradtail.state_dict(), os.path.join(folder, GRADTAIL_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, GRADTAIL_STATE_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"The checkpoint holds no GradTail state; Received: {resume_from_checkpoint!r} without "
                f"{GRADTAIL_STATE_NAME} (was it saved by a GradTailTrainer?)."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if self.gradtail is None:
            self._gradtail_pending = state
        else:
            self.gradtail.load_state_dict(state)

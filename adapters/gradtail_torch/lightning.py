"""GradTail in PyTorch Lightning: a callback that owns the GradTail, and a one-line loss helper.

Three changed lines in a LightningModule (docs/lightning.md)::

    loss = F.cross_entropy(logits, y, reduction="none")      # 1. per-example losses
    return gradtail_loss(self, loss)                         # 2. the weighted mean
    Trainer(callbacks=[GradTailCallback()])                  # 3. the callback

Importing this module imports ``lightning``; ``import gradtail_torch`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised without lightning installed
    raise ImportError(
        f"gradtail_torch.lightning needs PyTorch Lightning: pip install 'gradtail[lightning]' ({exc})"
    ) from exc

from .hook import GradTail

__all__ = ["GradTailCallback", "gradtail_loss"]

Modules = str | Callable[[nn.Module], "nn.Module | Iterable[nn.Module]"] | None


class GradTailCallback(pl.Callback):
    """Owns a `GradTail` for the trained LightningModule; saves and restores it with checkpoints.

    The GradTail is built at ``on_fit_start`` on the module's layers (all its ``nn.Linear`` by
    default), so it follows the module across devices and strategies (DDP: the batch
    reference is averaged over ranks, every rank holds the same state). Its `state_dict`
    travels in Lightning checkpoints (``checkpoint["callbacks"]``) and is restored on
    ``Trainer.fit(ckpt_path=...)``. In ``training_step``, `gradtail_loss` turns the
    per-example losses into the weighted mean (Chen et al., 2022, "GradTail",
    arXiv:2201.05938).

    Parameters
    ----------
    modules : str or callable, optional
        The layers to score: an attribute name of the LightningModule (``"head"``), or
        ``modules(pl_module) -> nn.Module | sequence of nn.Linear``. Defaults to the whole
        module (every ``nn.Linear``).
    log : bool, optional
        Log ``gradtail/alignment_mean``, ``gradtail/alignment_min`` and
        ``gradtail/weight_max`` through ``pl_module.log`` each step. Defaults to True.
    **gradtail_options
        Passed to `GradTail` (``decay``, ``warmup_steps``, ``memory_size``, ...).

    Examples
    --------
    >>> from gradtail_torch.lightning import GradTailCallback  # doctest: +SKIP
    >>> trainer = lightning.pytorch.Trainer(callbacks=[GradTailCallback(warmup_steps=10)])  # doctest: +SKIP
    """

    def __init__(self, modules: Modules = None, *, log: bool = True, **gradtail_options: Any) -> None:
        super().__init__()
        self.modules = modules
        self.log = log
        self.options = gradtail_options
        self.gradtail: GradTail | None = None
        self._pending: dict[str, Any] | None = None
        self._module_id: int | None = None

    @property
    def state_key(self) -> str:
        """One key per callback class: a Trainer holds at most one GradTailCallback."""
        return "GradTailCallback"

    def _layers(self, pl_module: nn.Module) -> nn.Module | Iterable[nn.Module]:
        if self.modules is None:
            return pl_module
        if isinstance(self.modules, str):
            found = getattr(pl_module, self.modules, None)
            if not isinstance(found, nn.Module):
                raise ValueError(
                    f"`modules` names an attribute of the LightningModule that is an nn.Module; Received: "
                    f"{self.modules!r}, which is {type(found).__name__}."
                )
            return found
        return self.modules(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the GradTail on the module's layers (once per module), carrying any state.

        ``on_fit_start`` runs after the strategy has moved the module to its device (and
        wrapped it for DDP), so the GradTail's state is made on the layers' device.
        """
        others = [c for c in trainer.callbacks if isinstance(c, GradTailCallback) and c is not self]  # type: ignore[attr-defined]
        if others:
            raise ValueError("A Trainer takes one GradTailCallback; Received: more than one.")
        if self.gradtail is not None and self._module_id == id(pl_module):
            return
        carried = self.gradtail.state_dict() if self.gradtail is not None else None
        if self.gradtail is not None:
            self.gradtail.remove()
        self.gradtail = GradTail(self._layers(pl_module), **self.options)
        self._module_id = id(pl_module)
        pending = self._pending if self._pending is not None else carried
        if pending is not None:
            self.gradtail.load_state_dict(pending)
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        """The GradTail's state (reference, options, memory), for Lightning's checkpoints."""
        if self.gradtail is None:
            return {} if self._pending is None else dict(self._pending)
        return self.gradtail.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a saved state now, or at ``on_fit_start`` when the GradTail does not exist yet."""
        if not state_dict:
            return
        if self.gradtail is None:
            self._pending = dict(state_dict)
        else:
            self.gradtail.load_state_dict(state_dict)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Forget what the hooks kept outside a training step (e.g. an extra forward)."""
        if self.gradtail is not None:
            self.gradtail.discard()

    def weighted_loss(
        self, pl_module: pl.LightningModule, per_example_loss: torch.Tensor, *, index: Any = None
    ) -> torch.Tensor:
        """``mean_i(w_i L_i)`` with this step's GradTail weights (see `gradtail_loss`)."""
        if self.gradtail is None:
            raise RuntimeError(
                "The GradTailCallback has not been set up: gradtail_loss() works inside training_step "
                "of a Trainer.fit run with the callback."
            )
        weights = self.gradtail.weights(per_example_loss, index=index)
        if self.log:
            align = self.gradtail.last_alignment
            assert align is not None
            pl_module.log("gradtail/alignment_mean", align.float().nanmean(), on_step=True, prog_bar=False)
            pl_module.log("gradtail/alignment_min", align.float().min(), on_step=True, prog_bar=False)
            pl_module.log("gradtail/weight_max", weights.float().max(), on_step=True, prog_bar=False)
        return (weights * per_example_loss).mean()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Drop what the hooks kept; the GradTail and its state stay (for a later fit)."""
        if self.gradtail is not None:
            self.gradtail.discard()


def gradtail_loss(
    pl_module: pl.LightningModule, per_example_loss: torch.Tensor, *, index: Any = None
) -> torch.Tensor:
    """The GradTail-weighted mean loss, inside ``training_step`` of a run with `GradTailCallback`.

    Parameters
    ----------
    pl_module : LightningModule
        ``self`` in ``training_step``.
    per_example_loss : Tensor, shape (B,)
        One loss per example (``reduction="none"``) from this step's forward.
    index : Tensor of shape (B,), integer, optional
        The examples' rows when the callback was built with ``memory_size=`` (single process).

    Returns
    -------
    Tensor, shape ()
        ``mean_i(w_i L_i)``, the loss to return; Lightning runs the backward.

    Examples
    --------
    >>> def training_step(self, batch, batch_idx):  # doctest: +SKIP
    ...     x, y = batch
    ...     return gradtail_loss(self, F.cross_entropy(self(x), y, reduction="none"))
    """
    trainer = pl_module.trainer
    found = [c for c in trainer.callbacks if isinstance(c, GradTailCallback)]  # type: ignore[attr-defined]
    if not found:
        raise RuntimeError(
            "gradtail_loss() needs a GradTailCallback in the Trainer: "
            "Trainer(callbacks=[GradTailCallback()]); Received: a Trainer without one."
        )
    return found[0].weighted_loss(pl_module, per_example_loss, index=index)

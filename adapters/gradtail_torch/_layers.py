"""Which modules GradTail tracks, and how their weights map to the core's (d_out, d_in) layout.

Tracked: ``nn.Linear`` (and subclasses that keep ``nn.Linear.forward``), and Hugging Face
``transformers.pytorch_utils.Conv1D`` (weight stored (d_in, d_out)), recognised by class
only when the user has imported transformers: this module never imports it.

Not tracked: the projections of ``nn.MultiheadAttention`` (its ``out_proj`` is an
``nn.Linear`` that attention applies through its weight, never through its forward, so no
forward hook sees it), and ``nn.Linear`` subclasses with their own ``forward`` (their output
need not be ``x W^T + b``). ``GradTail(model)`` skips them with a warning;
passing one explicitly is an error.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.parameter import UninitializedParameter

__all__ = [
    "bias_of",
    "collect_layers",
    "refusal",
    "warn_untracked",
    "grad_layout",
    "is_conv1d",
    "layout_error",
    "sequence_first_module",
    "template",
    "validate_batch_dim",
    "weight_of",
]


def _hf_conv1d() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` if the user imported transformers, else None."""
    module = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(module, "Conv1D", None)
    return cls if isinstance(cls, type) else None


def is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D``: ``y = x @ W + b`` with W of shape (d_in, d_out)."""
    cls = _hf_conv1d()
    return cls is not None and isinstance(module, cls)


def refusal(module: nn.Module) -> str | None:
    """Why GradTail cannot track ``module``, or None when it can.

    Refused: an ``nn.MultiheadAttention`` ``out_proj``, an ``nn.Linear`` subclass with its own
    forward.
    """
    if isinstance(module, NonDynamicallyQuantizableLinear):
        return (
            "it is nn.MultiheadAttention's out_proj, which attention applies through its weight "
            "(F.multi_head_attention_forward), never through its forward, so no hook can see it"
        )
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return (
            f"{type(module).__name__} overrides nn.Linear.forward, so its output need not be "
            "x @ weight.T + bias, which GradTail's per-example gradients assume"
        )
    return None


def warn_untracked(who: str, root: nn.Module, skipped: list[str], *, stacklevel: int) -> None:
    """The one warning for layers of a whole model that ``who`` leaves out, with the reasons."""
    reasons = sorted({refusal(m) or "" for name, m in root.named_modules() if name in skipped})
    warnings.warn(
        f"{who} does not track {skipped}: {'; '.join(reasons)}. They train as usual but "
        "are not part of the score; every other nn.Linear is (docs/torch.md, Supported models).",
        UserWarning,
        stacklevel=stacklevel,
    )


def _trackable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _check_initialised(module: nn.Module, name: str) -> None:
    if isinstance(getattr(module, "weight", None), UninitializedParameter):
        raise ValueError(
            f"GradTail cannot track {name}, an uninitialised nn.LazyLinear: run one forward of the "
            "model first (it fixes the weight's shape), then create GradTail; Received: "
            f"{type(module).__name__} with an UninitializedParameter weight."
        )


def collect_layers(modules: nn.Module | Iterable[nn.Module]) -> tuple[list[nn.Module], nn.Module | None]:
    """The tracked layers, and the root module when a whole model was given."""
    if isinstance(modules, nn.Module) and _trackable(modules):  # one layer
        given: list[nn.Module] = [modules]
        root = None
    elif isinstance(modules, nn.Module):
        root = getattr(modules, "_orig_mod", modules)  # a torch.compile'd model wraps the original
        layers, skipped = [], []
        for name, m in root.named_modules():
            if not _trackable(m):
                continue
            if refusal(m) is not None:
                skipped.append(name)
                continue
            _check_initialised(m, name or type(m).__name__)
            layers.append(m)
        if skipped:
            warn_untracked("GradTail(model)", root, skipped, stacklevel=4)
        if not layers:
            raise ValueError(
                "GradTail(module) tracks the module's nn.Linear (and transformers Conv1D) submodules, but "
                f"there are none it can track; Received: {type(modules).__name__}"
                + (f" whose only ones, {skipped}, cannot be tracked." if skipped else ".")
            )
        return layers, root
    else:
        given = list(modules)
        root = None
        if not given:
            raise ValueError("GradTail needs at least one nn.Linear to track; Received: an empty sequence.")
    for k, m in enumerate(given):
        if not _trackable(m):
            raise TypeError(
                "GradTail tracks nn.Linear modules and transformers Conv1D (pass a whole model to track all "
                f"of its Linear layers); Received: {type(m).__name__} at position {k}."
            )
        reason = refusal(m)
        if reason is not None:
            raise TypeError(
                f"GradTail cannot track the {type(m).__name__} at position {k}: {reason}. Track other layers "
                "(e.g. the feed-forward and head nn.Linear layers)."
            )
        _check_initialised(m, f"the layer at position {k}")
    if len({id(m) for m in given}) != len(given):
        raise ValueError("GradTail received the same nn.Linear more than once.")
    return given, root


def weight_of(layer: nn.Module) -> torch.Tensor:
    """A tracked layer's weight parameter, in the layer's own layout."""
    weight: torch.Tensor = getattr(layer, "weight")  # noqa: B009 - typed access to a tracked layer
    return weight


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    """A tracked layer's bias parameter, or None."""
    bias: torch.Tensor | None = getattr(layer, "bias", None)
    return bias


def template(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    """The layer's parameters in the core's layout: weight (d_out, d_in), then the bias."""
    weight = weight_of(layer).detach()
    if is_conv1d(layer):
        weight = weight.t()
    bias = bias_of(layer)
    return (weight,) if bias is None else (weight, bias.detach())


def grad_layout(layer: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """A weight gradient in the core's (d_out, d_in) layout, in the layer's own layout."""
    return grad.t() if is_conv1d(layer) else grad


def validate_batch_dim(batch_dim: object) -> None:
    if batch_dim is not None and (isinstance(batch_dim, bool) or batch_dim not in (0, 1)):
        raise ValueError(
            "`batch_dim` must be 0 (tracked layers see (B, ...) inputs) or 1 (sequence-first (T, B, ...) "
            f"inputs, e.g. nn.Transformer's default layout); Received: {batch_dim!r}."
        )


def sequence_first_module(root: nn.Module) -> str | None:
    """The name of a submodule that declares a sequence-first layout (``batch_first=False``)."""
    for name, m in root.named_modules():
        if getattr(m, "batch_first", None) is False:
            return f"{name or 'the model'} ({type(m).__name__})"
    return None


def layout_error(index: int, shape: tuple[int, ...], batch: int, batch_dim: int) -> str | None:
    """Why a tracked layer's input of ``shape`` does not fit a loss of ``batch`` entries."""
    if len(shape) < 3:
        if shape[0] == batch:
            return None
        return f"tracked layer {index} saw inputs of shape {shape}, whose batch axis 0 has {shape[0]} entries"
    if shape[batch_dim] == batch:
        return None
    other = 1 - batch_dim
    hint = f"; pass batch_dim={other}" if shape[other] == batch else ""
    return (
        f"tracked layer {index} saw inputs of shape {shape}, whose batch axis {batch_dim} (batch_dim) has "
        f"{shape[batch_dim]} entries{hint}"
    )

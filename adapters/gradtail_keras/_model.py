"""What the callback accepts, checked at ``fit`` start: the compiled loss and the tracked layer.

Each check raises before any step, naming what it received, so an unsupported model fails
before its weights change (a subclassed model's output is checked again in the first step).
"""

from __future__ import annotations

from typing import Any

import keras

from . import _private

__all__ = ["check_output", "resolve_layer", "resolve_loss"]


def resolve_loss(model: keras.Model, *, built_only: bool = False) -> Any:
    """The compiled loss as a Loss object whose ``call`` gives unreduced per-example values.

    With ``built_only``, None when Keras has not built the compiled loss yet (all other checks
    run).
    """
    if not getattr(model, "compiled", False):
        raise ValueError("GradTailCallback needs a compiled model; Received: a model without compile().")
    if type(model).compute_loss is not keras.Model.compute_loss:
        raise ValueError(
            "GradTailCallback weights the compiled loss through Keras' own Model.compute_loss; Received: "
            f"{type(model).__name__} overriding compute_loss. Compile the model with its loss instead."
        )
    if _private.compiled_loss(model) is None:
        raise ValueError(
            "GradTailCallback weights the loss given to compile(); Received: compile() without a `loss`."
        )
    flat = _private.compiled_losses(model)
    if flat is None:
        if built_only:
            return None
        raise ValueError("GradTailCallback could not read the compiled loss; Received: an unbuilt loss.")
    if len(flat) != 1:
        raise ValueError(
            "GradTailCallback supports models with one output and one loss; Received: "
            f"{len(flat)} losses ({[entry[3] for entry in flat]})."
        )
    loss = flat[0][1]
    if not isinstance(loss, keras.losses.Loss):
        raise ValueError(
            f"GradTailCallback needs a keras.losses.Loss (or a name or function Keras wraps in one); "
            f"Received: {type(loss).__name__}."
        )
    return loss


def resolve_layer(model: keras.Model, layer: keras.layers.Layer | str | None) -> keras.layers.Dense:
    layers = _private.all_layers(model)
    if layer is None:
        denses = [m for m in layers if isinstance(m, keras.layers.Dense)]
        if not denses:
            raise ValueError(
                "GradTailCallback tracks the model's last keras.layers.Dense, but there is none; "
                f"Received: {type(model).__name__} with layers {[m.name for m in model.layers]}."
            )
        chosen = denses[-1]
    elif isinstance(layer, str):
        named = [m for m in layers if m.name == layer]
        if not named:
            raise ValueError(f"`layer` names no layer of the model; Received: layer={layer!r}.")
        chosen = named[0]
    else:
        chosen = layer
        if not any(chosen is m for m in layers):
            raise ValueError(f"`layer` must belong to the model; Received: layer {chosen.name!r}.")
    if not isinstance(chosen, keras.layers.Dense):
        raise TypeError(
            f"GradTailCallback tracks a keras.layers.Dense; Received: {type(chosen).__name__} "
            f"({chosen.name!r})."
        )
    if getattr(chosen, "quantization_mode", None) is not None:
        raise ValueError(
            f"GradTailCallback cannot track a quantized Dense; Received: layer {chosen.name!r} with "
            f"quantization_mode={chosen.quantization_mode!r}."
        )
    if type(chosen).call is not keras.layers.Dense.call or "activation" not in chosen.__dict__:
        raise TypeError(
            "GradTailCallback reads the pre-activation output of keras.layers.Dense.call; Received: "
            f"{type(chosen).__name__} ({chosen.name!r}), a Dense subclass with its own call or activation."
        )
    if not chosen.built:
        raise ValueError(f"The tracked layer must be built; Received: unbuilt layer {chosen.name!r}.")
    return chosen


def _output_op(model: keras.Model) -> Any:
    """The operation producing a functional/sequential model's single output (None: unknown)."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    if outputs is None:
        return None
    if len(outputs) != 1:
        raise ValueError(
            f"GradTailCallback supports models with one output; Received: {len(outputs)} outputs."
        )
    return _private.producing_operation(outputs[0])


def check_output(model: keras.Model, dense: keras.layers.Dense) -> None:
    """Fail at fit start when the tracked layer does not produce the model's output."""
    op = _output_op(model)
    while isinstance(op, keras.Model) and op is not dense:
        op = _output_op(op)
    if op is None or op is dense:
        return  # subclassed models: checked again inside the first train step
    raise ValueError(
        f"GradTailCallback needs the tracked layer {dense.name!r} to produce the model's output, as "
        "the per-example gradients are taken through its activation and the loss; Received: a model "
        f"whose output comes from {type(op).__name__} {op.name!r}. Put the final activation into the "
        "Dense layer (e.g. Dense(10, activation='softmax')), or pass `layer=` the output Dense."
    )

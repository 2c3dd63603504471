"""Every use of Keras' private API by gradtail_keras, in one place, each with why.

Keras 3 (tested with 3.15) has no public accessor for these; everything else the adapter does
goes through public API (``Callback.model``, ``keras.utils.(un)pack_x_y_sample_weight``,
``Model.train_step`` / ``test_step`` / ``compute_loss`` / ``train_function`` /
``make_train_function``, ``Layer.call``, ``keras.ops``). A Keras release that renames one of
these breaks only this module; the adapter's tests (tests/keras/) exercise each of them.
"""

from __future__ import annotations

from typing import Any

import keras

# (1) The Keras mask of a tensor (e.g. from ``Embedding(mask_zero=True)``): Keras' own losses
# read it through this function; no public accessor exists (``keras.backend`` does not export it).
from keras.src.backend import get_keras_mask

__all__ = [
    "all_layers",
    "attach_metric",
    "build_compiled_loss",
    "compiled_loss",
    "compiled_losses",
    "detach_metric",
    "get_keras_mask",
    "producing_operation",
]


def compiled_loss(model: keras.Model) -> Any:
    """(2) The ``CompileLoss`` that ``compile(loss=...)`` built, or None without a loss.

    It is where Keras resolves a loss name, function or object into a ``Loss`` (including the
    shape-dependent ``"crossentropy"`` names and the function wrappers); ``Model.loss`` is only
    the argument as given, so resolving it again would re-implement, and drift from, Keras.
    """
    return getattr(model, "_compile_loss", None)


def build_compiled_loss(model: keras.Model, y: Any, y_pred: Any) -> None:
    """(2) Build the compiled loss from one batch, as Keras does in its first train step."""
    loss = compiled_loss(model)
    if loss is not None and not loss.built:
        loss.build(y, y_pred)


def compiled_losses(model: keras.Model) -> list[Any] | None:
    """(3) The built compiled loss's entries ``(path, Loss, weight, name)``, or None unbuilt.

    The resolved ``Loss`` objects are only reachable through ``CompileLoss._flat_losses``.
    """
    loss = compiled_loss(model)
    if loss is None or not loss.built:
        return None
    return list(loss._flat_losses)


def attach_metric(model: keras.Model, metric: keras.metrics.Metric) -> None:
    """(4) Make ``metric`` one of the model's own metrics for the duration of a ``fit``.

    ``Model.metrics`` (a property) collects ``Model._metrics``: the metrics a model tracks and
    threads through its compiled train step. The public route, tracking the metric as an
    attribute of a layer, would also put its variables into ``.keras`` files saved mid-fit
    (``ModelCheckpoint``), which then would not load without gradtail_keras.
    """
    model._metrics.append(metric)


def detach_metric(model: keras.Model, metric: keras.metrics.Metric) -> None:
    """(4) Undo `attach_metric`."""
    model._metrics[:] = [m for m in model._metrics if m is not metric]


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """(5) Every layer inside ``model``, recursively, in Keras' order.

    ``Model.layers`` is public but lists direct children only, and layers nested in a custom
    (non-Model) layer are reachable only through ``_flatten_layers``.
    """
    return list(model._flatten_layers(include_self=False, recursive=True))


def producing_operation(tensor: Any) -> Any:
    """(6) The layer or model whose call produced a symbolic ``KerasTensor`` (None: unknown).

    Used to refuse, at ``fit`` start, a functional model whose output does not come from the
    tracked layer; a KerasTensor's history has no public accessor.
    """
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation

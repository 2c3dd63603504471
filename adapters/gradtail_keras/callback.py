"""`GradTailCallback`: GradTail sample weighting inside ``model.fit``, from one callback."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

from gradtail_ops import (
    GradTailConfig,
    TailOutput,
    TailState,
    coerce_config,
    linear_tail_step,
    option_attributes,
    state_from_dict,
    state_to_dict,
)

from . import _private
from ._autodiff import output_grads
from ._index import indexed, split_index
from ._model import check_output, resolve_layer, resolve_loss
from ._state import GradTailState, numpy_template

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradtail_ops import GradTailOptions

__all__ = ["SUPPORTED_BACKENDS", "GradTailCallback"]

#: Keras backends the callback runs on (the core needs an Array API library: JAX or PyTorch).
SUPPORTED_BACKENDS: tuple[str, ...] = ("jax", "torch")
# The model's compiled step functions that the callback swaps in and out around each fit.
_STEP_FUNCTIONS = ("train_function", "test_function")
# Errors of a batch the scoring cannot use: fit will not reach on_train_end, so detach first.
_STEP_ERRORS = (ValueError, TypeError, IndexError)


class _Capture:
    """What the tracked layer saw since the last loss computation, and the batch's index.

    Only forwards inside the train step (``active``) with ``training`` not False are recorded.
    """

    __slots__ = ("active", "calls", "index", "inputs", "output", "preactivation")

    def __init__(self) -> None:
        self.active = False
        self.index: Any = None
        self.clear()

    def clear(self) -> None:
        self.calls = 0
        self.inputs: Any = None
        self.preactivation: Any = None
        self.output: Any = None


@option_attributes("decay", "reference", "warmup_steps", "curve", "eps", "method")
class GradTailCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """GradTail sample weighting for ``model.fit``: add the callback, nothing else.

    Each training step scores every example by the cosine between its gradient on the
    tracked ``Dense`` layer and a running reference gradient of earlier batches, and turns low
    alignment into a higher loss weight (Chen et al., 2022, "GradTail", arXiv:2201.05938;
    formulation and defaults in docs/method.md). The weights come from the batch's own
    per-example gradients, inside the compiled train step, and multiply each example's loss
    together with any ``sample_weight`` / ``class_weight``. The policy is the core's
    ``gradtail_ops.linear_tail_step``; the per-example gradients are never built.

    At ``fit`` start the callback wraps the model's ``compute_loss``, ``train_step`` and
    ``test_step`` and the tracked layer's ``call`` (on those instances only) and attaches a
    metric, `GradTailState`, whose variables hold the state; Keras threads them through the
    train step like any metric state, so on JAX there is no per-batch host sync. At ``fit``
    end everything is restored.

    Parameters
    ----------
    layer : keras.layers.Dense or str, optional
        The scored layer, or its name. It must produce the model's (single) output; its
        activation is part of the loss. Defaults to the model's last ``Dense`` layer.
    config : gradtail_ops.GradTailConfig, optional
        The whole policy as one object; or pass its flat options instead.
    **options
        The flat options of `gradtail_ops.GradTailConfig.from_options` (names in
        ``gradtail_ops.OPTION_NAMES``): ``decay``, ``reference``, ``warmup_steps``, the curve's
        ``kind``, ``max_weight``, ``threshold``, ``temperature``, ``quantile``, ``floor``,
        ``normalize``, ``eps``, ``method``, the per-example memory's ``memory_size``,
        ``memory_decay``, ``memory_eta``, ``memory_max_weight``, and the sketched reference's
        ``sketch_rank``, ``sketch_size``, ``sketch_seed``. Defaults to those of
        ``GradTailConfig()`` (``gradtail_ops.defaults``); each is validated there, at
        construction. With ``memory_size`` every batch needs its examples' indices: pass
        ``sample_weight=GradTailCallback.indexed(np.arange(len(x)))`` to ``fit``
        (docs/keras.md); ``sample_weight`` then carries the index only. With ``sketch_rank``
        a large tracked layer keeps its reference kernel as a rank-k sketch
        (`gradtail_ops.sketch`; a layer where that is not 4x smaller stays exact).

    Attributes
    ----------
    config : gradtail_ops.GradTailConfig
        The policy (``decay`` may be replaced by `set_state`, which adopts a saved decay).

    Notes
    -----
    Logs gain ``gradtail_weight_mean`` (mean loss weight), ``gradtail_upweighted`` (share of
    examples weighted above their batch's mean weight) and ``gradtail_alignment`` (mean
    alignment), averaged since the epoch began, like any Keras metric.

    Examples
    --------
    >>> cb = GradTailCallback(decay=0.9, max_weight=3.0)
    >>> cb.config.curve.max_weight
    3.0
    >>> GradTailCallback.from_config(cb.get_config()).get_config() == cb.get_config()
    True
    """

    #: ``sample_weight`` for ``fit`` carrying the memory's index (`gradtail_keras._index.indexed`).
    indexed = staticmethod(indexed)

    def __init__(
        self,
        *,
        layer: keras.layers.Layer | str | None = None,
        config: GradTailConfig | None = None,
        **options: Unpack[GradTailOptions],
    ) -> None:
        super().__init__()
        self.config = coerce_config(config, options)
        if layer is not None and not isinstance(layer, (str, keras.layers.Layer)):
            raise TypeError(
                "`layer` must be a keras.layers.Dense, a layer name or None; "
                f"Received: {type(layer).__name__}."
            )
        self.layer = layer
        self.state: GradTailState | None = None
        self._pending: TailState | None = None
        self._dense: keras.layers.Dense | None = None
        self._capture = _Capture()
        self._attached: dict[str, Any] | None = None
        self._step_cache: dict[str, Any] | None = None
        self._step_key: tuple[Any, ...] = ()
        self._step_config: GradTailConfig | None = None
        self._batch_score: tuple[tuple[Any, ...], Callable[..., TailOutput]] | None = None
        self._ran = False

    # ------------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """The constructor arguments: ``layer`` (a layer object by its name) and the flat options.

        Raises
        ------
        ValueError
            For a decay schedule (a Python callable, which has no Keras serialisation).

        Examples
        --------
        >>> sorted(GradTailCallback().get_config())[:3]
        ['decay', 'eps', 'floor']
        """
        if callable(self.config.decay):
            raise ValueError(
                "GradTailCallback.get_config cannot serialise a decay schedule (a Python callable); "
                f"Received: decay={self.config.decay!r}. Use a float decay, or build the callback "
                "in code instead of from a config."
            )
        layer = self.layer.name if isinstance(self.layer, keras.layers.Layer) else self.layer
        return {"layer": layer, **self.config.to_options()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GradTailCallback:
        """A callback from `get_config`'s dictionary (0.1.0's, without the memory keys, too).

        Examples
        --------
        >>> GradTailCallback.from_config({"decay": 0.5}).config.decay
        0.5
        """
        return cls(**config)

    # ------------------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        """The state in the library's interchange format (`gradtail_ops.state_to_dict`), as NumPy.

        Returns
        -------
        dict
            ``mean``: ``[[kernel (units, input_dim), bias (units,)]]`` (no bias entry for a
            layer without bias); ``total``: shape (); ``count``, ``steps``: int32 shape ();
            ``decay`` (None for a schedule) and ``reference``; with the memory,
            ``memory_score``, ``memory_visits`` (shape (memory_size,)) and ``memory_decay``.
            The layout of ``gradtail_torch.GradTail.state_dict``.

        Raises
        ------
        RuntimeError
            Before the callback has been through ``fit`` (or `set_state`) once.

        Examples
        --------
        >>> cb = GradTailCallback(decay=0.9)
        >>> cb.set_state({"mean": [[np.zeros((2, 3)), np.zeros(2)]], "total": 0.0, "count": 0})
        >>> state = cb.get_state()
        >>> [a.shape for a in state["mean"][0]], state["decay"], state["reference"]
        ([(2, 3), (2,)], 0.9, 'direction')
        """
        if self.state is None:
            if self._pending is not None:
                return state_to_dict(self._pending, config=self.config)
            raise RuntimeError(
                "GradTailCallback has no state yet: it is created at the first fit (or by set_state)."
            )
        self._sync()
        return state_to_dict(self.state.tail_state(numpy=True), config=self.config)

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state from `get_state` (or from ``gradtail_torch.GradTail.state_dict``).

        The whole dict is validated by `gradtail_ops.state_from_dict` before anything is
        assigned. Before the first ``fit`` the state is kept and checked against the tracked
        layer when ``fit`` starts; from another callback during ``fit`` it takes effect from
        the next step. A saved ``decay`` / ``memory_decay`` is adopted (a later ``fit``
        rebuilds its train step for it).

        Parameters
        ----------
        state : mapping
            With keys ``mean``, ``total``, ``count`` (arrays or tensors of any library) and
            optionally ``steps``, ``decay``, ``reference`` (must match) and the memory's keys
            (present exactly when ``memory_size`` is set).

        Raises
        ------
        ValueError, TypeError
            Naming the offending key: unknown or missing keys, another ``reference``, a
            ``mean`` that is not one Dense layer (or does not fit the tracked one), non-finite
            values, ``total`` outside [0, 1], a negative ``count``, a memory that does not
            match ``memory_size``.

        Examples
        --------
        >>> cb = GradTailCallback()
        >>> cb.set_state({"mean": [[np.zeros((2, 3)), np.zeros(2)]], "total": 0.5, "count": 1})
        >>> int(cb.get_state()["count"])
        1
        >>> cb.set_state({"mean": [[np.zeros((2, 3)), np.zeros(2)]], "total": -1.0, "count": 1})
        Traceback (most recent call last):
        ...
        ValueError: `total` must be a finite number in [0.0, 1.0]; Received: total=-1.0.
        """
        tracker = self.state
        if tracker is None:
            self._pending, self.config = state_from_dict(
                state, like=_template_of(state, self.config), config=self.config
            )
            return
        self._sync()  # before reading the variables: mid-fit on JAX the train loop holds them
        loaded, self.config = state_from_dict(state, like=tracker.tail_state(numpy=True), config=self.config)
        tracker.assign_tail_state(loaded)

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write `get_state` to a ``.npz`` file (next to a model checkpoint, say).

        Parameters
        ----------
        path : str or path-like
            The file to write (NumPy adds ``.npz`` when missing).

        Examples
        --------
        >>> import tempfile, os
        >>> cb = GradTailCallback()
        >>> cb.set_state({"mean": [[np.ones((2, 3))]], "total": 1.0, "count": 4})
        >>> path = os.path.join(tempfile.mkdtemp(), "gradtail.npz")
        >>> cb.save_state(path)
        >>> other = GradTailCallback()
        >>> other.load_state(path)
        >>> int(other.get_state()["count"])
        4
        """
        state = self.get_state()
        arrays: dict[str, Any] = {f"mean_{k}": np.asarray(t) for k, t in enumerate(state.pop("mean")[0])}
        sketch = state.pop("sketch", None)
        if sketch is not None:
            (arrays["sketch_omega"], arrays["sketch_psi"]) = (np.asarray(t) for t in sketch[0])
        arrays.update({k: np.asarray(v) for k, v in state.items() if v is not None})
        np.savez(path, **arrays)

    def load_state(self, path: str | os.PathLike[str]) -> None:
        """Restore a state written by `save_state`, 0.1.0's included (see `set_state`).

        Parameters
        ----------
        path : str or path-like
            A ``.npz`` file from `save_state`.
        """
        with np.load(path) as data:
            state: dict[str, Any] = {
                "mean": [[data[f"mean_{k}"] for k in range(3) if f"mean_{k}" in data]],
            }
            if "sketch_omega" in data.files:
                state["sketch"] = [[data["sketch_omega"], data["sketch_psi"]]]
            for key in data.files:
                if not key.startswith(("mean_", "sketch_")):
                    value = data[key]
                    state[key] = value.item() if key in ("decay", "reference", "memory_decay") else value
        self.set_state(state)

    def _sync(self) -> None:
        """On JAX mid-fit, copy the train loop's state into the variables (a no-op otherwise).

        ``Callback.model`` does it when read on JAX; the loop then re-reads the variables, so
        an assignment after this sticks.
        """
        _ = self.model

    # --------------------------------------------------------------------- fit hooks
    def restore(self) -> None:
        """Undo the wrapping now; ``fit`` does it when it ends normally.

        Keras does not call ``on_train_end`` when ``fit`` raises (or is interrupted), so the
        model would keep the callback's ``compute_loss``; call this to restore the model then.
        A later ``fit`` with this callback restores it too. Does nothing when not attached.

        Examples
        --------
        >>> GradTailCallback().restore()
        """
        self._detach()

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Check the model, then wrap its loss and the tracked layer for this ``fit``."""
        self._attach(self.model)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """Undo the wrapping; the state stays readable (`get_state`)."""
        self._detach()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Forget forwards outside the train step; from the second step, check the first one."""
        self._capture.clear()
        if batch > 0:
            self._check_ran()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Drop the meaningless validation copies of the log values (weights exist in training only)."""
        self._check_ran()
        if logs is not None:
            for key in [k for k in logs if k.startswith("val_gradtail_")]:
                del logs[key]

    # No on_train_batch_end: overriding it would make Keras dispatch batch ends synchronously,
    # converting the logs to Python numbers (a host sync) after every step.

    def _check_ran(self) -> None:
        """Raise when the train step did not go through the wrapped ``compute_loss``."""
        if self._ran or self._attached is None:
            return
        model = self._attached["model"]
        self._detach()
        raise RuntimeError(
            "GradTailCallback weights the loss through Model.compute_loss, but the train step of "
            f"{type(model).__name__} did not call it; Received: a model whose train_step computes its "
            "loss another way. Use the default train_step (or call self.compute_loss in yours)."
        )

    # ------------------------------------------------------------------- attach/detach
    def _attach(self, model: keras.Model) -> None:
        if self._attached is not None:  # an earlier fit ended by an exception
            self._detach()
        backend = keras.backend.backend()
        if backend not in SUPPORTED_BACKENDS:
            raise ValueError(
                f"GradTailCallback runs on the Keras backends {SUPPORTED_BACKENDS} (gradtail_ops needs an "
                f"Array API library); Received: KERAS_BACKEND={backend!r}."
            )
        # None when Keras has not built the compiled loss yet: then it is built and read in the
        # first train step, from that step's y and y_pred.
        loss: keras.losses.Loss | None = resolve_loss(model, built_only=True)
        dense = resolve_layer(model, self.layer)
        check_output(model, dense)
        self._bind_state(dense)
        self._dense = dense
        self._capture.clear()
        self._ran = False

        original_call = dense.__dict__.get("call")
        bound_call = dense.call
        capture = self._capture

        def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            # Dense.call is matmul, bias, then activation: run it without the activation to keep
            # the pre-activation z, then apply the activation exactly as Dense.call would.
            activation = dense.__dict__.get("activation")
            dense.__dict__["activation"] = None
            try:
                z = bound_call(inputs, *args, **kwargs)
            finally:
                dense.__dict__["activation"] = activation
            output = z if activation is None else activation(z)
            if not capture.active or kwargs.get("training", args[0] if args else None) is False:
                return output  # a forward outside the train step (another callback's), or inference
            capture.calls += 1
            capture.inputs, capture.preactivation, capture.output = inputs, z, output
            return output

        original_loss = model.__dict__.get("compute_loss")
        bound_loss = model.compute_loss

        def compute_loss(
            x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None, training: bool = True
        ) -> Any:
            nonlocal loss
            if training:
                if loss is None:
                    _private.build_compiled_loss(model, y, y_pred)
                    loss = resolve_loss(model)
                weights = self._weights_in_step(loss, dense, y, y_pred)
                sample_weight = _combine(sample_weight, weights)
            else:
                self._capture.clear()
            return bound_loss(x, y, y_pred, sample_weight, training=training)

        object.__setattr__(dense, "call", call)
        object.__setattr__(model, "compute_loss", compute_loss)
        assert self.state is not None
        _private.attach_metric(model, self.state)
        plain = {name: getattr(model, name, None) for name in _STEP_FUNCTIONS}
        self._attached = {
            "model": model,
            "dense": dense,
            "call": original_call,
            "loss": original_loss,
            "plain": plain,
            "train_step": model.__dict__.get("train_step"),
            "test_step": model.__dict__.get("test_step"),
        }
        # The step functions must trace the wrapped methods and thread the new metric variables
        # (fit looks the train function up again at every step). The ones built by an earlier fit
        # of this callback are reused while the model is unchanged (same compile, layer and loss)
        # and so is the config, a constant of the traced step (e.g. a decay adopted by
        # set_state rebuilds it); otherwise they are rebuilt.
        key = (model, model.optimizer, _private.compiled_loss(model), dense, loss)
        cached = self._step_cache
        reuse = (
            cached is not None
            and all(a is b for a, b in zip(cached["key"], key, strict=True))
            and cached["config"] == self.config
            and all(plain[name] is cached["restored"][name] for name in _STEP_FUNCTIONS)
        )
        for name in _STEP_FUNCTIONS:
            setattr(model, name, cached["functions"][name] if reuse and cached is not None else None)
        # The train step marks its forwards, the only ones scored (the torch trainer looks
        # model.train_step up at every step), and both steps take the memory's index out of the
        # batch. Fresh callables per attach also keep jax.jit from reusing an earlier trace.
        memory = self.config.memory is not None
        for name, record in (("train_step", True), ("test_step", False)):
            step = _indexed_step(getattr(model, name), capture, record=record, memory=memory)
            object.__setattr__(model, name, step)
        if model.train_function is None:
            model.make_train_function(force=True)
        self._step_key = key
        self._step_config = self.config
        # A reused function went through the wrapped compute_loss when it was traced.
        self._ran = bool(reuse and cached is not None and cached["verified"])

    def _bind_state(self, dense: keras.layers.Dense) -> None:
        """Create the state metric for ``dense`` (loading a pending `set_state`), or check it fits."""
        kernel_shape = tuple(dense.kernel.shape)
        input_dim, units = int(kernel_shape[0]), int(kernel_shape[1])
        use_bias = dense.bias is not None
        s = self.state
        if s is not None:
            if (s.units, s.input_dim, s.use_bias) != (units, input_dim, use_bias):
                raise ValueError(
                    f"This callback's state belongs to a Dense layer with kernel ({s.input_dim}, {s.units}) "
                    f"and use_bias={s.use_bias}; Received: layer {dense.name!r} with kernel "
                    f"{kernel_shape} and use_bias={use_bias}. Use a new GradTailCallback per model."
                )
            return
        pending = self._pending
        if pending is not None:
            template = numpy_template(units, input_dim, use_bias, config=self.config)
            expected = [tuple(t.shape) for t in template.ema.mean[0]]
            received = [tuple(t.shape) for t in pending.ema.mean[0]]
            if received != expected:
                raise ValueError(
                    f"The state does not fit the tracked layer {dense.name!r}: expected mean shapes "
                    f"{expected}; Received: mean shapes {received}."
                )
        memory = self.config.memory
        self.state = GradTailState(
            units,
            input_dim,
            use_bias,
            memory_size=None if memory is None else memory.size,
            sketch=self.config.sketch,
        )
        if pending is not None:
            self.state.assign_tail_state(pending)
            self._pending = None

    def _detach(self) -> None:
        attached, self._attached = self._attached, None
        if attached is None:
            return
        model, dense = attached["model"], attached["dense"]
        for obj, name, original in (
            (dense, "call", attached["call"]),
            (model, "compute_loss", attached["loss"]),
            (model, "train_step", attached["train_step"]),
            (model, "test_step", attached["test_step"]),
        ):
            if original is None:
                obj.__dict__.pop(name, None)
            else:
                object.__setattr__(obj, name, original)
        if self.state is not None:
            _private.detach_metric(model, self.state)
        functions = {name: getattr(model, name, None) for name in _STEP_FUNCTIONS}
        for name in _STEP_FUNCTIONS:
            setattr(model, name, attached["plain"][name])
        self._step_cache = {
            "key": self._step_key,
            "config": self._step_config,
            "functions": functions,
            "restored": attached["plain"],
            "verified": self._ran,
        }
        self._capture.clear()

    # -------------------------------------------------------------------------- step
    def _weights_in_step(
        self, loss: keras.losses.Loss, dense: keras.layers.Dense, y: Any, y_pred: Any
    ) -> Any:
        capture = self._capture
        calls, inputs, z, output = capture.calls, capture.inputs, capture.preactivation, capture.output
        capture.clear()
        if calls != 1:
            self._detach()  # fit will not reach on_train_end
            raise RuntimeError(
                f"GradTailCallback needs the tracked layer {dense.name!r} to run exactly once per train "
                f"step; Received: {calls} calls in this step's forward (a shared layer, or a forward "
                "outside fit between steps)."
            )
        if output is not y_pred:
            self._detach()
            raise ValueError(
                f"GradTailCallback needs the tracked layer {dense.name!r} to produce the model's output "
                "(y_pred), as the per-example gradients are taken through its activation and the loss; "
                "Received: a model whose output is computed after that layer. Put the final activation "
                "into the Dense layer, or pass `layer=` the output Dense."
            )
        self._ran = True
        tracker = self.state
        assert tracker is not None
        try:
            _check_index_given(self.config, capture.index)
            out = self._score(
                loss,
                dense.activation,
                z,
                inputs,
                y,
                tracker.tail_state(),
                mask=_private.get_keras_mask(y_pred),
                index=capture.index,
            )
        except _STEP_ERRORS:
            self._detach()  # a batch the scoring cannot use: fit will not reach on_train_end
            raise
        tracker.assign_tail_state(out.state, factors=False)
        tracker.update_state(out.weights, out.alignment)
        return out.weights

    def _score(
        self,
        loss: keras.losses.Loss,
        activation: Callable[[Any], Any] | None,
        z: Any,
        inputs: Any,
        y: Any,
        state: TailState,
        *,
        mask: Any = None,
        index: Any = None,
    ) -> TailOutput:
        """One batch through the core's `linear_tail_step`: a pure function of its arrays.

        ``inputs`` (B, ..., input_dim) and ``z`` (B, ..., units) are the tracked layer's input and
        pre-activation output in this forward; ``z`` is differentiated through the activation and
        the loss, per example, by the backend's autodiff (no gradient flows back from here).
        ``mask`` is the Keras mask of the model output (e.g. (B, T) from ``mask_zero=True``):
        masked entries of ``loss.call`` are zeroed before differentiating, as Keras leaves them
        out of the loss. ``index`` (B,): the examples' rows in the memory.
        """
        a = ops.stop_gradient(ops.convert_to_tensor(inputs))
        z = ops.stop_gradient(z)
        dtype = loss.dtype or keras.backend.floatx()
        y_true = ops.convert_to_tensor(y, dtype=dtype)
        batch = z.shape[0]

        def per_example_loss(t: Any) -> Any:
            values = loss.call(y_true, ops.cast(t if activation is None else activation(t), dtype))
            shape = tuple(values.shape)
            if not shape or shape[0] != batch:
                raise ValueError(
                    "GradTailCallback scores each example through its own loss, so the compiled loss's "
                    f"`call` must return one value per example (batch first, batch size {batch}); "
                    f"Received: {type(loss).__name__}.call returning shape {shape}. Use a per-example "
                    "loss (e.g. a Dice loss with an `axis` that keeps the batch axis)."
                )
            return values if mask is None else values * _mask_like(mask, values)

        d = output_grads(per_example_loss, z)
        if len(a.shape) > 3:  # (B, ..., T, d): one sequence axis, as the core expects
            a = ops.reshape(a, (a.shape[0], -1, a.shape[-1]))
            d = ops.reshape(d, (d.shape[0], -1, d.shape[-1]))
        if index is not None:
            index = ops.convert_to_tensor(index)
        out = linear_tail_step(state, [(a, d)], config=self.config, index=index)
        return out._replace(
            weights=ops.stop_gradient(out.weights), alignment=ops.stop_gradient(out.alignment)
        )

    def batch_weights(self, x: Any, y: Any, *, index: Any = None, update: bool = True) -> np.ndarray:
        """The weights a training step would give the batch ``(x, y)``, outside ``fit``.

        Runs the model forward (``training=True``) and the same scoring as the train step
        (compiled on JAX); for inspection and tests. The model must be compiled; the callback
        knows it from a ``fit`` or from ``set_model``.

        Parameters
        ----------
        x, y : arrays
            One batch, shaped as for ``fit``.
        index : array of int, shape (B,), optional
            The examples' rows in the memory; required exactly when ``memory_size`` is set.
        update : bool, optional
            Fold the batch into the state (reference and memory), as a train step does.
            Defaults to True.

        Returns
        -------
        np.ndarray, shape (B,)
            float32 weights (before any ``sample_weight``).

        Examples
        --------
        >>> import keras
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
        >>> model.compile(loss="sparse_categorical_crossentropy")
        >>> cb = GradTailCallback()
        >>> cb.set_model(model)
        >>> cb.batch_weights(np.ones((4, 3), "float32"), np.array([0, 1, 1, 0]))
        array([1., 1., 1., 1.], dtype=float32)
        """
        model = self.model
        if not getattr(model, "compiled", False):
            raise ValueError("batch_weights needs a compiled model; Received: a model without compile().")
        attached_here = self._attached is None
        if attached_here:
            if _private.compiled_loss(model) is not None:
                x_in = ops.convert_to_tensor(x)
                _private.build_compiled_loss(model, ops.convert_to_tensor(y), model(x_in, training=False))
            self._attach(model)
        try:
            self._capture.clear()
            self._capture.active = True
            try:
                model(ops.convert_to_tensor(x), training=True)
            finally:
                self._capture.active = False
            capture = self._capture
            inputs, z, calls = capture.inputs, capture.preactivation, capture.calls
            mask = _private.get_keras_mask(capture.output) if capture.output is not None else None
            capture.clear()
            dense, tracker = self._dense, self.state
            assert dense is not None
            assert tracker is not None
            if calls != 1:
                raise RuntimeError(
                    f"The tracked layer must run once per forward; Received: {calls} calls for this `x`."
                )
            _check_index_given(self.config, index)
            score = self._batch_scorer(resolve_loss(model), dense)
            rows = None if index is None else ops.convert_to_tensor(np.asarray(index))
            out = score(z, inputs, ops.convert_to_tensor(y), tracker.tail_state(), mask, rows)
            if update:
                tracker.assign_tail_state(out.state)
            return np.asarray(ops.convert_to_numpy(out.weights), dtype=np.float32)
        finally:
            if attached_here:
                self._detach()

    def _batch_scorer(self, loss: keras.losses.Loss, dense: keras.layers.Dense) -> Callable[..., TailOutput]:
        """`_score` for `batch_weights`, jitted on JAX, and kept while loss, layer and config are."""
        cached = self._batch_score
        if (
            cached is not None
            and cached[0][0] is loss
            and cached[0][1] is dense
            and cached[0][2] == self.config
        ):
            return cached[1]

        def score(z: Any, inputs: Any, y: Any, state: TailState, mask: Any, index: Any) -> TailOutput:
            return self._score(loss, dense.activation, z, inputs, y, state, mask=mask, index=index)

        if keras.backend.backend() == "jax":
            import jax

            score = jax.jit(score)
        self._batch_score = ((loss, dense, self.config), score)
        return score


# ------------------------------------------------------------------------------ helpers
def _indexed_step(
    step_fn: Callable[..., Any], capture: _Capture, *, record: bool, memory: bool
) -> Callable[..., Any]:
    """``step_fn`` (the model's train or test step), with the memory's index taken out of the batch.

    The batch is the last positional argument (``train_step(data)`` on torch,
    ``train_step(state, data)`` on JAX); its ``sample_weight`` is read as the index only with
    the memory (``memory``). With ``record``, the tracked layer's forwards are recorded while
    the step runs (or is traced). A new function object per call, so that jax.jit traces it
    afresh instead of reusing the trace of an earlier build.
    """

    def step(*args: Any, **kwargs: Any) -> Any:
        *head, data = args
        if memory:
            data, capture.index = split_index(data)
        capture.active = record
        try:
            return step_fn(*head, data, **kwargs)
        finally:
            capture.active = False
            capture.index = None

    return step


def _check_index_given(config: GradTailConfig, index: Any) -> None:
    """With the memory, say how a Keras user supplies the index (the core would ask for ``index=``)."""
    if config.memory is not None and index is None:
        raise ValueError(
            f"GradTailCallback keeps a per-example memory (memory_size={config.memory.size}), so every "
            "batch needs its examples' rows: fit(x, y, sample_weight=GradTailCallback.indexed("
            "np.arange(len(x)))) (or batch_weights(..., index=)); with the memory, sample_weight "
            "carries the index only. Received: a batch whose sample_weight does not come from "
            "GradTailCallback.indexed (none, or floating weights)."
        )


def _template_of(state: Mapping[str, Any], config: GradTailConfig) -> TailState:
    """The `state_from_dict` template for a state restored before the layer is known.

    Its layer shapes are the saved ones (checked against the tracked layer at ``fit`` start);
    everything else is validated now.
    """
    if not isinstance(state, Mapping) or "mean" not in state:
        return numpy_template(1, 1, True, config=config)  # the core names what is missing
    mean = state["mean"]
    layer = mean[0] if isinstance(mean, (list, tuple)) and len(mean) == 1 else None
    shapes = [tuple(np.shape(t)) for t in layer] if isinstance(layer, (list, tuple)) else []
    sketch = state.get("sketch")
    sketched = isinstance(sketch, (list, tuple)) and len(sketch) == 1 and sketch[0] is not None
    parts = 2 if sketched else 1  # the kernel, or its range and co-range sketches
    if len(shapes) not in (parts, parts + 1) or any(len(shape) != 2 for shape in shapes[:parts]):
        want = "[[range (units, k), co-range (l, input_dim)" if sketched else "[[kernel (units, input_dim)"
        raise ValueError(
            f"`state['mean']` must hold one Dense layer: {want}, bias (units,)]] or without the bias; "
            f"Received: {type(mean).__name__} with shapes {shapes or mean!r}."
        )
    units, input_dim = shapes[0][0], shapes[parts - 1][1]
    return numpy_template(units, input_dim, len(shapes) == parts + 1, config=config)


def _mask_like(mask: Any, values: Any) -> Any:
    """The output's Keras mask shaped like the per-example loss values (as Keras matches them)."""
    m = ops.cast(mask, values.dtype)
    while len(m.shape) > len(values.shape) and m.shape[-1] == 1:
        m = ops.squeeze(m, axis=-1)  # as Keras matches a (B, T, 1) mask to (B, T)
    if len(m.shape) < len(values.shape):
        m = ops.reshape(m, tuple(m.shape) + (1,) * (len(values.shape) - len(m.shape)))
    if tuple(m.shape) != tuple(values.shape):
        raise ValueError(
            "GradTailCallback applies the output's Keras mask to the per-example losses; "
            f"Received: a mask of shape {tuple(mask.shape)} for losses of shape {tuple(values.shape)}."
        )
    return m


def _combine(sample_weight: Any, weights: Any) -> Any:
    """``sample_weight * weights``, the GradTail weights broadcast over trailing axes."""
    if sample_weight is None:
        return weights
    sample_weight = ops.convert_to_tensor(sample_weight)
    dtype = sample_weight.dtype if "float" in str(sample_weight.dtype) else keras.backend.floatx()
    sample_weight = ops.cast(sample_weight, dtype)
    w = ops.cast(weights, dtype)
    if len(sample_weight.shape) > 1:
        w = ops.reshape(w, (-1,) + (1,) * (len(sample_weight.shape) - 1))
    return sample_weight * w

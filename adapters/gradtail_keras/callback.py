"""`GradTailCallback`: GradTail sample weighting inside ``model.fit``, from one callback."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import keras
import numpy as np
from keras import ops
from keras.src.backend import get_keras_mask  # no public accessor; Keras' own losses read it so

from gradtail_ops import (
    DEFAULT_CURVE,
    DEFAULT_DECAY,
    DEFAULT_REFERENCE,
    DEFAULT_WARMUP_STEPS,
    EMAState,
    WeightCurve,
    linear_score_and_update,
    validate_step_options,
)
from gradtail_ops.curves import Curve

from ._autodiff import output_grads
from ._state import GradTailState

__all__ = ["SUPPORTED_BACKENDS", "GradTailCallback"]

#: Keras backends the callback runs on (the core needs an Array API library: JAX or PyTorch).
SUPPORTED_BACKENDS: tuple[str, ...] = ("jax", "torch")
_METHODS = ("auto", "ghost", "materialize")
# The model's compiled step functions that the callback swaps in and out around each fit.
_STEP_FUNCTIONS = ("train_function", "test_function")


class _Capture:
    """What the tracked layer saw since the last loss computation: inputs, pre-activation, output.

    Only forwards inside the train step (``active``) with ``training`` not False are recorded.
    """

    __slots__ = ("active", "calls", "inputs", "output", "preactivation")

    def __init__(self) -> None:
        self.active = False
        self.clear()

    def clear(self) -> None:
        self.calls = 0
        self.inputs: Any = None
        self.preactivation: Any = None
        self.output: Any = None


class GradTailCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """GradTail sample weighting for ``model.fit``: add the callback, nothing else.

    Each training step scores every example by the cosine between its gradient on the
    tracked ``Dense`` layer and a running reference gradient of earlier batches, and turns low
    alignment into a higher loss weight (Chen et al., 2022, "GradTail", arXiv:2201.05938;
    formulation and defaults in docs/method.md). The weights come from the batch's own
    per-example gradients, inside the compiled train step, and multiply each example's loss
    together with any ``sample_weight`` / ``class_weight``. The math is `gradtail_ops`'
    ``linear_score_and_update``; the per-example gradients are never built.

    At ``fit`` start the callback wraps the model's ``compute_loss`` and the tracked layer's
    ``call`` (on those instances only) and attaches a metric, `GradTailState`, whose variables
    hold the reference; Keras threads them through the train step like any metric state, so
    on JAX there is no per-batch host sync. At ``fit`` end everything is restored.

    Parameters
    ----------
    layer : keras.layers.Dense or str, optional
        The scored layer, or its name (``model.get_layer``). It must produce the model's
        (single) output; its activation is part of the loss. Defaults to the model's last
        ``Dense`` layer.
    decay : float, optional
        EMA decay of the reference, in [0, 1]. Defaults to ``gradtail_ops.DEFAULT_DECAY``.
    reference : {"direction", "mean"}, optional
        EMA of the batch mean of unit-normalised per-example gradients, or of the plain
        batch-mean gradient. Defaults to ``gradtail_ops.DEFAULT_REFERENCE`` ("direction").
    warmup_steps : int, optional
        Steps with weight 1 while the reference builds up (the first step always is).
        Defaults to 0.
    kind, max_weight, threshold, temperature, quantile, floor, normalize
        The weighting curve (see `gradtail_ops.weight_curve`). Defaults to
        ``gradtail_ops.DEFAULT_CURVE`` (``kind="rank"``, ``quantile=0.3``,
        ``max_weight=3.0``, ``normalize=True``). ``max_weight=1`` turns weighting off.
    eps : float, optional
        Gradient norms at or below ``eps`` count as zero. Defaults to 0.0.
    method : {"auto", "ghost", "materialize"}, optional
        Norm computation for sequence inputs (see `gradtail_ops.linear_sq_norms`).
        Defaults to "auto".

    Notes
    -----
    Logs gain ``gradtail_weight_mean`` (mean loss weight), ``gradtail_upweighted`` (share of
    examples weighted above their batch's mean weight) and ``gradtail_alignment`` (mean
    alignment), averaged since the epoch began, like any Keras metric.

    Examples
    --------
    >>> cb = GradTailCallback(decay=0.9, max_weight=3.0)
    >>> cb.get_config()["max_weight"]
    3.0
    >>> GradTailCallback.from_config(cb.get_config()).get_config() == cb.get_config()
    True
    """

    def __init__(
        self,
        *,
        layer: keras.layers.Layer | str | None = None,
        decay: float = DEFAULT_DECAY,
        reference: Literal["mean", "direction"] = DEFAULT_REFERENCE,
        warmup_steps: int = DEFAULT_WARMUP_STEPS,
        kind: Curve = DEFAULT_CURVE.kind,
        max_weight: float = DEFAULT_CURVE.max_weight,
        threshold: float = DEFAULT_CURVE.threshold,
        temperature: float = DEFAULT_CURVE.temperature,
        quantile: float = DEFAULT_CURVE.quantile,
        floor: float = DEFAULT_CURVE.floor,
        normalize: bool = DEFAULT_CURVE.normalize,
        eps: float = 0.0,
        method: Literal["auto", "ghost", "materialize"] = "auto",
    ) -> None:
        super().__init__()
        validate_step_options(decay=decay, reference=reference, warmup_steps=warmup_steps)
        if layer is not None and not isinstance(layer, (str, keras.layers.Layer)):
            raise TypeError(
                "`layer` must be a keras.layers.Dense, a layer name or None; "
                f"Received: {type(layer).__name__}."
            )
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"`eps` must be a non-negative float; Received: eps={eps!r}.")
        if method not in _METHODS:
            raise ValueError(f"`method` must be one of {_METHODS}; Received: method={method!r}.")
        self.layer = layer
        self.decay = float(decay)
        self.reference = reference
        self.warmup_steps = warmup_steps
        self.curve = WeightCurve(  # validates the options now, not at fit start
            kind=kind,
            max_weight=float(max_weight),
            threshold=float(threshold),
            temperature=float(temperature),
            quantile=float(quantile),
            floor=float(floor),
            normalize=bool(normalize),
        )
        self.eps = float(eps)
        self.method = method
        self.state: GradTailState | None = None
        self._pending: dict[str, Any] | None = None
        self._dense: keras.layers.Dense | None = None
        self._capture = _Capture()
        self._attached: dict[str, Any] | None = None
        self._step_cache: dict[str, Any] | None = None
        self._step_key: tuple[Any, ...] = ()
        self._step_options: tuple[Any, ...] = ()
        self._ran = False

    # ------------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (a layer object is stored by its name).

        Examples
        --------
        >>> sorted(GradTailCallback().get_config())[:3]
        ['decay', 'eps', 'floor']
        """
        layer = self.layer.name if isinstance(self.layer, keras.layers.Layer) else self.layer
        curve = self.curve
        return {
            "layer": layer,
            "decay": self.decay,
            "reference": self.reference,
            "warmup_steps": self.warmup_steps,
            "kind": curve.kind,
            "max_weight": curve.max_weight,
            "threshold": curve.threshold,
            "temperature": curve.temperature,
            "quantile": curve.quantile,
            "floor": curve.floor,
            "normalize": curve.normalize,
            "eps": self.eps,
            "method": self.method,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GradTailCallback:
        """A callback from `get_config`'s dictionary.

        Examples
        --------
        >>> GradTailCallback.from_config({"decay": 0.5}).decay
        0.5
        """
        return cls(**config)

    # ------------------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        """The reference state, as NumPy arrays, in ``gradtail_torch.GradTail.state_dict``'s layout.

        Returns
        -------
        dict
            ``mean``: ``[[kernel (units, input_dim), bias (units,)]]`` (no bias entry for a
            layer without bias); ``total``: shape (); ``count``: int32 shape ();
            ``decay`` and ``reference``: the options that shaped it.

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
                return dict(self._pending)
            raise RuntimeError(
                "GradTailCallback has no state yet: it is created at the first fit (or by set_state)."
            )
        model = getattr(self, "_model", None)
        if model is not None and hasattr(model, "jax_state_sync"):
            model.jax_state_sync()  # mid-fit on JAX, the variables lag the train step's state
        s = self.state
        mean = [ops.convert_to_numpy(s.reference_kernel)]
        if s.reference_bias is not None:
            mean.append(ops.convert_to_numpy(s.reference_bias))
        return {
            "mean": [mean],
            "total": np.asarray(ops.convert_to_numpy(s.total)),
            "count": np.asarray(ops.convert_to_numpy(s.count)),
            "decay": self.decay,
            "reference": self.reference,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a state from `get_state` (or from ``gradtail_torch.GradTail.state_dict``).

        Before the first ``fit`` the state is kept and checked against the tracked layer when
        ``fit`` starts.

        Parameters
        ----------
        state : dict
            With keys ``mean``, ``total``, ``count`` (arrays or tensors) and optionally
            ``reference`` (must match this callback's) and ``decay`` (adopted; a later ``fit``
            rebuilds its train step for it). During ``fit`` (from another callback) the state
            takes effect from the next step.

        Raises
        ------
        ValueError
            For missing keys, another ``reference``, a ``decay`` outside [0, 1], shapes that do
            not fit the tracked layer, or ``memory_*`` keys (a ``gradtail_torch`` state with a
            per-example memory, which this callback cannot keep).

        Examples
        --------
        >>> cb = GradTailCallback()
        >>> cb.set_state({"mean": [[np.zeros((2, 3)), np.zeros(2)]], "total": 0.5, "count": 1})
        >>> int(cb.get_state()["count"])
        1
        """
        memory = sorted(k for k in state if str(k).startswith("memory_"))
        if memory:
            raise ValueError(
                "GradTailCallback keeps no per-example memory, so a state holding one cannot be restored "
                f"without losing it; Received: keys {memory}. Drop them first to keep only the reference "
                "(e.g. {k: v for k, v in state.items() if not k.startswith('memory_')})."
            )
        missing = {"mean", "total", "count"} - set(state)
        if missing:
            raise ValueError(f"`state` must have keys mean, total and count; Received: keys {sorted(state)}.")
        if state.get("reference", self.reference) != self.reference:
            raise ValueError(
                f"The state was built with reference={state['reference']!r} but this callback uses "
                f"reference={self.reference!r}."
            )
        mean = state["mean"]
        if len(mean) != 1 or len(mean[0]) not in (1, 2):
            raise ValueError(
                "`state['mean']` must hold one layer: [[kernel, bias]] or [[kernel]]; "
                f"Received: {len(mean)} layers."
            )
        decay = float(state.get("decay", self.decay))
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"`state['decay']` must lie in [0, 1]; Received: {decay}.")
        clean: dict[str, Any] = {
            "mean": [[np.asarray(_to_numpy(t), dtype=np.float32) for t in mean[0]]],
            "total": np.asarray(_to_numpy(state["total"]), dtype=np.float32),
            "count": np.asarray(_to_numpy(state["count"]), dtype=np.int32),
            "decay": decay,
            "reference": self.reference,
        }
        self.decay = decay
        if self.state is None:
            self._pending = clean
        else:
            self._load(clean)

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
        arrays: dict[str, Any] = {f"mean_{k}": np.asarray(t) for k, t in enumerate(state["mean"][0])}
        arrays.update(
            total=state["total"],
            count=state["count"],
            decay=np.asarray(state["decay"]),
            reference=np.asarray(state["reference"]),
        )
        np.savez(path, **arrays)

    def load_state(self, path: str | os.PathLike[str]) -> None:
        """Restore a state written by `save_state` (see `set_state` for the checks).

        Parameters
        ----------
        path : str or path-like
            A ``.npz`` file from `save_state`.
        """
        with np.load(path) as data:
            mean = [data[f"mean_{k}"] for k in range(2) if f"mean_{k}" in data]
            self.set_state(
                {
                    "mean": [mean],
                    "total": data["total"],
                    "count": data["count"],
                    "decay": float(data["decay"]),
                    "reference": str(data["reference"]),
                }
            )

    def _load(self, clean: dict[str, Any]) -> None:
        s = self.state
        assert s is not None
        expected = [(s.units, s.input_dim)] + ([(s.units,)] if s.use_bias else [])
        received = [tuple(t.shape) for t in clean["mean"][0]]
        if received != expected or clean["total"].shape != () or clean["count"].shape != ():
            raise ValueError(
                f"The state does not fit the tracked layer: expected mean shapes {expected} and scalar "
                f"total/count; Received: mean shapes {received}, total shape {clean['total'].shape}, "
                f"count shape {clean['count'].shape}."
            )
        if self._attached is not None:
            model = self._attached["model"]
            if hasattr(model, "jax_state_sync"):
                # Mid-fit on JAX the train loop holds its own copy of the variables and re-reads
                # them only after a sync; without it the next step would overwrite this state.
                model.jax_state_sync()
        s.reference_kernel.assign(clean["mean"][0][0])
        if s.reference_bias is not None:
            s.reference_bias.assign(clean["mean"][0][1])
        s.total.assign(clean["total"])
        s.count.assign(clean["count"])
        self._pending = None

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
        loss: keras.losses.Loss | None = _resolve_loss(model, built_only=True)
        dense = _resolve_layer(model, self.layer)
        _check_output(model, dense)
        kernel_shape = tuple(dense.kernel.shape)
        input_dim, units = int(kernel_shape[0]), int(kernel_shape[1])
        use_bias = dense.bias is not None
        s = self.state
        if s is None or (s.units, s.input_dim, s.use_bias) != (units, input_dim, use_bias):
            if s is not None:
                raise ValueError(
                    f"This callback's state belongs to a Dense layer with kernel ({s.input_dim}, {s.units}) "
                    f"and use_bias={s.use_bias}; Received: layer {dense.name!r} with kernel "
                    f"{kernel_shape} and use_bias={use_bias}. Use a new GradTailCallback per model."
                )
            self.state = GradTailState(units, input_dim, use_bias)
            if self._pending is not None:
                self._load(self._pending)
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
                    model._compile_loss.build(y, y_pred)
                    loss = _resolve_loss(model)
                weights = self._weights_in_step(loss, dense, y, y_pred)
                sample_weight = _combine(sample_weight, weights)
            else:
                self._capture.clear()
            return bound_loss(x, y, y_pred, sample_weight, training=training)

        object.__setattr__(dense, "call", call)
        object.__setattr__(model, "compute_loss", compute_loss)
        model._metrics.append(self.state)
        plain = {name: getattr(model, name, None) for name in _STEP_FUNCTIONS}
        self._attached = {
            "model": model,
            "dense": dense,
            "call": original_call,
            "loss": original_loss,
            "plain": plain,
            "train_step": model.__dict__.get("train_step"),
        }
        # The step functions must trace the wrapped methods and thread the new metric variables
        # (fit looks the train function up again at every step). The ones built by an earlier fit
        # of this callback are reused while the model is unchanged (same compile, layer and loss),
        # so repeated fit calls do not recompile; otherwise they are rebuilt.
        # The step-shaping options are constants of the traced step: a changed option (e.g. a
        # decay adopted by set_state) rebuilds it.
        key = (model, model.optimizer, model._compile_loss, dense, loss)
        options = self._options()
        cached = self._step_cache
        reuse = (
            cached is not None
            and all(a is b for a, b in zip(cached["key"], key, strict=True))
            and cached["options"] == options
            and all(plain[name] is cached["restored"][name] for name in _STEP_FUNCTIONS)
        )
        for name in _STEP_FUNCTIONS:
            setattr(model, name, cached["functions"][name] if reuse and cached is not None else None)
        # The train step marks its forwards, the only ones scored (the torch trainer looks
        # model.train_step up at every step). A fresh callable per attach also keeps jax.jit
        # from reusing the trace of an earlier build, whose step options were constants.
        object.__setattr__(model, "train_step", _recording_step(model.train_step, self._capture))
        if model.train_function is None:
            model.make_train_function(force=True)
        self._step_key = key
        self._step_options = options
        # A reused function went through the wrapped compute_loss when it was traced.
        self._ran = bool(reuse and cached is not None and cached["verified"])

    def _options(self) -> tuple[Any, ...]:
        """The options traced into the train step as constants (the cache key's second half)."""
        return (self.decay, self.reference, self.warmup_steps, self.curve, self.eps, self.method)

    def _detach(self) -> None:
        attached, self._attached = self._attached, None
        if attached is None:
            return
        model, dense = attached["model"], attached["dense"]
        for obj, name, original in (
            (dense, "call", attached["call"]),
            (model, "compute_loss", attached["loss"]),
            (model, "train_step", attached["train_step"]),
        ):
            if original is None:
                obj.__dict__.pop(name, None)
            else:
                object.__setattr__(obj, name, original)
        if self.state is not None and any(m is self.state for m in model._metrics):
            model._metrics[:] = [m for m in model._metrics if m is not self.state]
        functions = {name: getattr(model, name, None) for name in _STEP_FUNCTIONS}
        for name in _STEP_FUNCTIONS:
            setattr(model, name, attached["plain"][name])
        self._step_cache = {
            "key": self._step_key,
            "options": self._step_options,
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
        mask = get_keras_mask(y_pred)
        try:
            weights, alignment, state = self._score(
                loss, dense.activation, z, inputs, y, tracker.ema_state(), mask=mask
            )
        except ValueError:
            self._detach()  # a loss the scoring cannot use: fit will not reach on_train_end
            raise
        tracker.assign_ema_state(state)
        tracker.update_state(weights, alignment)
        return weights

    def _score(
        self,
        loss: keras.losses.Loss,
        activation: Callable[[Any], Any] | None,
        z: Any,
        inputs: Any,
        y: Any,
        state: EMAState,
        *,
        mask: Any = None,
    ) -> tuple[Any, Any, EMAState]:
        """Weights, alignments and new reference for one batch: a pure function of its arrays.

        ``inputs`` (B, ..., input_dim) and ``z`` (B, ..., units) are the tracked layer's input and
        pre-activation output in this forward; ``z`` is differentiated through the activation and
        the loss, per example, by the backend's autodiff (no gradient flows back from here).
        ``mask`` is the Keras mask of the model output (e.g. (B, T) from ``mask_zero=True``):
        masked entries of ``loss.call`` are zeroed before differentiating, as Keras leaves them
        out of the loss.
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
            if mask is not None:
                m = ops.cast(mask, values.dtype)
                while len(m.shape) > len(values.shape) and m.shape[-1] == 1:
                    m = ops.squeeze(m, axis=-1)  # as Keras matches a (B, T, 1) mask to (B, T)
                if len(m.shape) < len(values.shape):
                    m = ops.reshape(m, tuple(m.shape) + (1,) * (len(values.shape) - len(m.shape)))
                if tuple(m.shape) != tuple(values.shape):
                    raise ValueError(
                        "GradTailCallback applies the output's Keras mask to the per-example losses; "
                        f"Received: a mask of shape {tuple(mask.shape)} for losses of shape "
                        f"{tuple(values.shape)}."
                    )
                values = values * m
            return values

        d = output_grads(per_example_loss, z)
        if len(a.shape) > 3:  # (B, ..., T, d): one sequence axis, as the core expects
            a = ops.reshape(a, (a.shape[0], -1, a.shape[-1]))
            d = ops.reshape(d, (d.shape[0], -1, d.shape[-1]))
        out = linear_score_and_update(
            state,
            [(a, d)],
            decay=self.decay,
            reference=self.reference,
            curve=self.curve,
            warmup_steps=self.warmup_steps,
            eps=self.eps,
            method=self.method,
        )
        return ops.stop_gradient(out.weights), ops.stop_gradient(out.alignment), out.state

    def batch_weights(self, x: Any, y: Any, *, update: bool = True) -> np.ndarray:
        """The weights a training step would give the batch ``(x, y)``, outside ``fit``.

        Runs the model forward (``training=True``) and the same scoring as the train step
        (compiled on JAX); for inspection and tests. The model must be compiled; the callback
        knows it from a ``fit`` or from ``set_model``.

        Parameters
        ----------
        x, y : arrays
            One batch, shaped as for ``fit``.
        update : bool, optional
            Fold the batch into the reference, as a train step does. Defaults to True.

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
            _build_compile_loss(model, x, y)
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
            mask = get_keras_mask(capture.output) if capture.output is not None else None
            capture.clear()
            dense, tracker = self._dense, self.state
            assert dense is not None
            assert tracker is not None
            if calls != 1:
                raise RuntimeError(
                    f"The tracked layer must run once per forward; Received: {calls} calls for this `x`."
                )
            loss = _resolve_loss(model)

            def score(z: Any, inputs: Any, y: Any, state: EMAState, mask: Any) -> Any:
                return self._score(loss, dense.activation, z, inputs, y, state, mask=mask)

            if keras.backend.backend() == "jax":
                import jax

                score = jax.jit(score)
            weights, _, state = score(z, inputs, ops.convert_to_tensor(y), tracker.ema_state(), mask)
            if update:
                tracker.assign_ema_state(state)
            return np.asarray(ops.convert_to_numpy(weights), dtype=np.float32)
        finally:
            if attached_here:
                self._detach()


# ------------------------------------------------------------------------------ helpers
def _recording_step(train_step: Callable[..., Any], capture: _Capture) -> Callable[..., Any]:
    """``train_step`` with the tracked layer's forwards recorded while it runs (or is traced).

    A new function object per call, so that jax.jit traces it afresh instead of reusing the
    trace of an earlier build (whose step options were constants).
    """

    def step(*args: Any, **kwargs: Any) -> Any:
        capture.active = True
        try:
            return train_step(*args, **kwargs)
        finally:
            capture.active = False

    return step


def _to_numpy(value: Any) -> Any:
    if hasattr(value, "detach"):  # torch tensors from gradtail_torch's state_dict
        value = value.detach().cpu().numpy()
    return np.asarray(value)


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


def _build_compile_loss(model: keras.Model, x: Any, y: Any) -> None:
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is not None and not compile_loss.built:
        y_pred = model(ops.convert_to_tensor(x), training=False)
        compile_loss.build(ops.convert_to_tensor(y), y_pred)


def _resolve_loss(model: keras.Model, *, built_only: bool = False) -> Any:
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
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None:
        raise ValueError(
            "GradTailCallback weights the loss given to compile(); Received: compile() without a `loss`."
        )
    flat = compile_loss._flat_losses if compile_loss.built else None
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


def _dense_layers(model: keras.Model) -> list[keras.layers.Dense]:
    return [
        m
        for m in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(m, keras.layers.Dense)
    ]


def _resolve_layer(model: keras.Model, layer: keras.layers.Layer | str | None) -> keras.layers.Dense:
    denses = _dense_layers(model)
    if layer is None:
        if not denses:
            raise ValueError(
                "GradTailCallback tracks the model's last keras.layers.Dense, but there is none; "
                f"Received: {type(model).__name__} with layers {[m.name for m in model.layers]}."
            )
        chosen = denses[-1]
    elif isinstance(layer, str):
        named = [m for m in model._flatten_layers(include_self=False, recursive=True) if m.name == layer]
        if not named:
            raise ValueError(f"`layer` names no layer of the model; Received: layer={layer!r}.")
        chosen = named[0]
    else:
        chosen = layer
        if not any(chosen is m for m in model._flatten_layers(include_self=False, recursive=True)):
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
    history = getattr(outputs[0], "_keras_history", None)
    return None if history is None else history.operation


def _check_output(model: keras.Model, dense: keras.layers.Dense) -> None:
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

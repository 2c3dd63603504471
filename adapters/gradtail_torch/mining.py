"""`score_dataset`: every example's GradTail alignment over a whole data set, in factored form."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import nn

from gradtail_ops import (
    EMAState,
    cosine_from_dots,
    ema_mean,
    inverse_norms,
    linear_mean_grad,
    linear_sq_norms,
    multi_linear_dots_and_sq_norms,
)

from ._layers import refusal, warn_untracked
from .hook import GradTail

__all__ = ["score_dataset"]

LossFn = Callable[[Any, Any], torch.Tensor]
BatchFn = Callable[[Any], tuple[Any, Any]]


class _Capture:
    """Forward hooks that keep each tracked layer's input and output, in any mode."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)
        self.calls = [0] * len(layers)
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in enumerate(layers)]

    def _hook(self, k: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            # A frozen layer fed by frozen layers has an output outside autograd: a detached
            # leaf that requires grad stands in for it, so its output gradient can still be taken.
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            self.inputs[k], self.outputs[k] = args[0].detach(), output
            self.calls[k] += 1
            return output

        return hook

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        missing = [k for k, o in enumerate(self.outputs) if o is None]
        repeated = [k for k, c in enumerate(self.calls) if c > 1]
        if missing or repeated:
            raise RuntimeError(
                "Every tracked layer must run exactly once per forward of a batch; Received: layers "
                f"{missing} did not run and layers {repeated} ran more than once (pass modules= with "
                "layers each forward uses once)."
            )
        inputs = [t for t in self.inputs if t is not None]
        outputs = [t for t in self.outputs if t is not None]
        self.inputs = [None] * len(self.inputs)
        self.outputs = [None] * len(self.outputs)
        self.calls = [0] * len(self.calls)
        return inputs, outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _linears(model: nn.Module, modules: nn.Module | Iterable[nn.Module] | None) -> list[nn.Linear]:
    """The nn.Linear layers to score, by GradTail's rules.

    A whole module's are found, leaving out (with a warning) those no hook can see, e.g.
    nn.MultiheadAttention's out_proj; a layer named explicitly must be trackable.
    """
    if modules is None:
        modules = model
    if isinstance(modules, nn.Linear):
        named: list[tuple[str, nn.Module]] = [("", modules)]
        whole = None
    elif isinstance(modules, nn.Module):
        named = [(n, m) for n, m in modules.named_modules() if isinstance(m, nn.Linear)]
        whole = modules
    else:
        named = [(f"position {k}", m) for k, m in enumerate(modules)]
        whole = None
    bad = [type(m).__name__ for _, m in named if not isinstance(m, nn.Linear)]
    if not named or bad:
        raise ValueError(
            "`modules` must be an nn.Linear, a sequence of nn.Linear or a module holding some; "
            f"Received: {len(named)} modules, of which not nn.Linear: {bad}."
        )
    refused = [n for n, m in named if refusal(m) is not None]
    if refused and whole is None:
        m = next(m for n, m in named if n == refused[0])
        raise ValueError(
            f"`modules` holds a layer score_dataset cannot score: {refusal(m)}; Received: {refused}."
        )
    if refused and whole is not None:
        warn_untracked("score_dataset", whole, refused, stacklevel=4)
    found = [m for n, m in named if n not in refused]
    if not found:
        raise ValueError(f"`modules` holds no nn.Linear that score_dataset can score; Received: {refused}.")
    return found  # type: ignore[return-value]


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _split(batch: Any, batch_fn: BatchFn | None) -> tuple[Any, Any]:
    if batch_fn is not None:
        return batch_fn(batch)
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        "Each batch must be (inputs, targets, ...) or be mapped to (inputs, targets) by `batch_fn`; "
        f"Received: a batch of type {type(batch).__name__}."
    )


def _forward(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


class _Batches:
    """One pass over the loader: each batch's layer factors and per-example losses."""

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        loss_fn: LossFn,
        capture: _Capture,
        batch_fn: BatchFn | None,
        device: torch.device,
        bar: Any,
    ) -> None:
        self.model, self.loader, self.loss_fn = model, loader, loss_fn
        self.capture, self.batch_fn, self.device, self.bar = capture, batch_fn, device, bar

    def __iter__(self) -> Iterator[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]]:
        for batch in self.loader:
            inputs, targets = _split(batch, self.batch_fn)
            with torch.enable_grad():
                output = _forward(self.model, _to(inputs, self.device))
                loss = self.loss_fn(output, _to(targets, self.device))
                if not isinstance(loss, torch.Tensor) or loss.ndim != 1:
                    shape = tuple(loss.shape) if hasattr(loss, "shape") else type(loss).__name__
                    raise ValueError(
                        "`loss_fn(output, target)` must return one loss per example, shape (B,) (use "
                        f"reduction='none'); Received: {shape}."
                    )
                layer_inputs, outputs = self.capture.take()
                grads = torch.autograd.grad(loss.sum(), outputs, allow_unused=True)
            # Each example's loss depends only on its own outputs (no train-mode BatchNorm in the
            # default eval mode), so the summed loss's output gradients are per-example exact.
            layers = []
            for a, out, g in zip(layer_inputs, outputs, grads, strict=True):
                if a.shape[0] != loss.shape[0]:
                    raise ValueError(
                        f"`loss_fn` returned {loss.shape[0]} losses but a tracked layer saw inputs of "
                        f"shape {tuple(a.shape)}; Received: loss shape {tuple(loss.shape)}."
                    )
                layers.append((a, torch.zeros_like(out) if g is None else g.detach()))
            self.bar.update(1)
            yield layers, loss.detach()


def _finite_rows(layers: list[tuple[torch.Tensor, torch.Tensor]], sq: torch.Tensor) -> list[Any]:
    """The layers with every non-finite example's factors zeroed (it must not poison the mean)."""
    finite = torch.isfinite(sq)
    out = []
    for a, d in layers:
        keep_a = finite.reshape((-1,) + (1,) * (a.ndim - 1))
        keep_d = finite.reshape((-1,) + (1,) * (d.ndim - 1))
        out.append((torch.where(keep_a, a, 0.0), torch.where(keep_d, d, 0.0)))
    return out


def _reference_pass(
    batches: _Batches, layers: Sequence[nn.Linear], reference: str
) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    total: list[list[torch.Tensor]] | None = None
    count = 0
    for factors, _ in batches:
        sq = sum(
            linear_sq_norms(a, d, bias=m.bias is not None) for (a, d), m in zip(factors, layers, strict=True)
        )
        assert isinstance(sq, torch.Tensor)
        clean = _finite_rows(factors, sq)
        coef = inverse_norms(torch.where(torch.isfinite(sq), sq, 0.0)) if reference == "direction" else None
        batch = int(sq.shape[0])
        parts = []
        for (a, d), m in zip(clean, layers, strict=True):
            gw, gb = linear_mean_grad(a, d, bias=m.bias is not None, example_weights=coef)
            parts.append([gw * batch] + ([] if gb is None else [gb * batch]))
        total = (
            parts
            if total is None
            else [[t + p for t, p in zip(ts, ps, strict=True)] for ts, ps in zip(total, parts, strict=True)]
        )
        count += batch
    if total is None or count == 0:
        raise ValueError("`loader` yielded no examples; Received: an empty loader.")
    return [tuple(t / count for t in layer) for layer in total], count


def _given_reference(
    state: GradTail | EMAState, layers: Sequence[nn.Linear]
) -> list[tuple[torch.Tensor, ...]]:
    if isinstance(state, GradTail) and state.config.sketch is not None:
        raise ValueError(
            "`state` is a GradTail with a sketched reference (sketch_rank): mining scores against the "
            "exact reference; pass state=None to build it from the data; Received: "
            f"sketch_rank={state.config.sketch.rank}."
        )
    ema = state.state if isinstance(state, GradTail) else state
    if int(ema.count) == 0:
        raise ValueError(
            "`state` holds no reference yet (count 0): train with it first, or pass state=None to build "
            "the reference from the data."
        )
    means = [tuple(t) for t in ema_mean(ema)]
    shapes = [tuple(tuple(t.shape) for t in layer) for layer in means]
    expected = [
        ((m.out_features, m.in_features),) + (() if m.bias is None else ((m.out_features,),)) for m in layers
    ]
    if shapes != expected:
        raise ValueError(
            f"`state`'s reference must match the tracked layers, shapes {expected}; Received: {shapes} "
            "(pass modules= naming the layers the GradTail tracks)."
        )
    return means


def _progress(progress: bool, total: int | None) -> Any:
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, unit="batch", desc="gradtail: scoring")
    return _NoBar()


class _NoBar:
    def update(self, n: int) -> None:
        del n

    def close(self) -> None:
        pass


@overload
def score_dataset(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    modules: nn.Module | Iterable[nn.Module] | None = ...,
    state: GradTail | EMAState | None = ...,
    batch_fn: BatchFn | None = ...,
    reference: Literal["direction", "mean"] = ...,
    eval_mode: bool = ...,
    progress: bool = ...,
    eps: float = ...,
    return_loss: Literal[False] = ...,
) -> np.ndarray: ...


@overload
def score_dataset(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    modules: nn.Module | Iterable[nn.Module] | None = ...,
    state: GradTail | EMAState | None = ...,
    batch_fn: BatchFn | None = ...,
    reference: Literal["direction", "mean"] = ...,
    eval_mode: bool = ...,
    progress: bool = ...,
    eps: float = ...,
    return_loss: Literal[True],
) -> tuple[np.ndarray, np.ndarray]: ...


def score_dataset(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    modules: nn.Module | Iterable[nn.Module] | None = None,
    state: GradTail | EMAState | None = None,
    batch_fn: BatchFn | None = None,
    reference: Literal["direction", "mean"] = "direction",
    eval_mode: bool = True,
    progress: bool = False,
    eps: float = 0.0,
    return_loss: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Every example's GradTail alignment over a data set: low = tail-like, for mining.

    Each example is scored by the cosine between its gradient on the tracked ``nn.Linear``
    layers and a reference gradient (Chen et al., 2022, "GradTail", arXiv:2201.05938). The
    per-example gradients are never built: forward hooks keep each layer's inputs, one
    backward of the summed loss gives every example's output gradients, and the factored
    ops of `gradtail_ops` (`linear_sq_norms`, `linear_mean_grad`,
    `multi_linear_dots_and_sq_norms`) do the rest. One batch is held at a time, so memory
    does not grow with the data set (beyond the (N,) result).

    Without ``state`` the reference is built from the same data in a first pass: the mean
    over all N examples of their unit-normalised gradients (``reference="direction"``, the
    library's default) or of their gradients (``"mean"``); a second pass scores. With
    ``state`` (a trained `GradTail`, or its ``EMAState``) its running reference is used and
    the data are read once.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(inputs)``, or ``model(**inputs)`` when ``inputs`` is a mapping.
    loader : iterable
        Re-iterable (a ``DataLoader``, a list) yielding ``(inputs, targets, ...)`` (extra items,
        such as indices, are ignored), in a fixed order (``shuffle=False``): the result follows
        the loader's order. Tensors (also inside tuples and mappings) are moved to the tracked
        layers' device.
    loss_fn : callable
        ``loss_fn(output, targets) -> Tensor`` of shape (B,), one loss per example, e.g.
        ``lambda out, y: F.cross_entropy(out, y, reduction="none")``.
    modules : nn.Linear, sequence of nn.Linear, or nn.Module, optional
        The layers scored jointly (one cosine over all of them). Defaults to the ``state``
        GradTail's layers, else every ``nn.Linear`` of ``model``. Each must run exactly once
        per forward.
    state : GradTail or EMAState, optional
        Score against this running reference instead of building one from the data.
    batch_fn : callable, optional
        Maps a batch to ``(inputs, targets)``, for other layouts, e.g.
        ``lambda b: ({"input_ids": b["input_ids"]}, b["labels"])``.
    reference : {"direction", "mean"}, optional
        The reference built from the data (ignored with ``state``). Defaults to "direction".
    eval_mode : bool, optional
        Score with ``model.eval()`` (no dropout, BatchNorm in inference mode, per-example
        exact); the mode is restored afterwards. Defaults to True.
    progress : bool, optional
        Show a progress bar (tqdm, when installed). Defaults to False.
    eps : float, optional
        Norms at or below ``eps`` count as zero. Defaults to 0.0.
    return_loss : bool, optional
        Also return each example's loss. Defaults to False.

    Returns
    -------
    alignment : ndarray, shape (N,), float64
        Cosines in [-1, 1] in the loader's order; 0 for a zero gradient, NaN for an example
        with a non-finite loss or gradient (left out of the reference).
    loss : ndarray, shape (N,), float64
        Only with ``return_loss=True``.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    >>> loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="none")
    >>> scores = score_dataset(model, DataLoader(data, batch_size=16), loss_fn)
    >>> scores.shape, bool(((scores >= -1) & (scores <= 1)).all())
    ((40,), True)
    """
    if reference not in ("direction", "mean"):
        raise ValueError(f"`reference` must be 'direction' or 'mean'; Received: {reference!r}.")
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise ValueError(
            "`loader` shuffles, so its order changes between passes and the scores could not be matched "
            "to examples: use DataLoader(..., shuffle=False); Received: a DataLoader with a RandomSampler."
        )
    if iter(loader) is loader and state is None:
        raise TypeError(
            "`loader` is a one-shot iterator but building the reference reads the data twice: pass a "
            "DataLoader or a list, or a trained state=; Received: "
            f"{type(loader).__name__}."
        )
    if modules is None and isinstance(state, GradTail):
        others = [type(m).__name__ for m in state.layers if not isinstance(m, nn.Linear)]
        if others:
            raise ValueError(
                "score_dataset scores nn.Linear layers; the GradTail also tracks "
                f"{sorted(set(others))}: pass modules= naming nn.Linear layers; Received: {others}."
            )
        layers: list[nn.Linear] = [m for m in state.layers if isinstance(m, nn.Linear)]
    else:
        layers = _linears(model, modules)
    device = layers[0].weight.device
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    passes = 1 if state is not None else 2
    bar = _progress(progress, None if total is None else passes * total)
    was_training = model.training
    capture = _Capture(layers)
    if isinstance(state, GradTail):
        state.discard()
    try:
        if eval_mode:
            model.eval()
        batches = _Batches(model, loader, loss_fn, capture, batch_fn, device, bar)
        if state is None:
            means, count = _reference_pass(batches, layers, reference)
        else:
            means, count = _given_reference(state, layers), -1
        scores, losses = [], []
        for factors, loss in batches:
            dots, sq, ref_sq = multi_linear_dots_and_sq_norms(factors, means)
            scores.append(cosine_from_dots(dots, sq, ref_sq, eps=eps).cpu())
            losses.append(loss.cpu())
    finally:
        capture.remove()
        model.train(was_training)
        if isinstance(state, GradTail):
            state.discard()  # training-mode forwards above would have been recorded by its hooks
        bar.close()
    alignment = torch.cat(scores).to(torch.float64).numpy()
    if count >= 0 and alignment.shape[0] != count:
        raise RuntimeError(
            f"`loader` yielded {count} examples in the first pass and {alignment.shape[0]} in the second; "
            "it must yield the same data each pass."
        )
    if return_loss:
        return alignment, torch.cat(losses).to(torch.float64).numpy()
    return alignment

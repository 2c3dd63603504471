"""`GradTail`: forward hooks on nn.Linear (and transformers Conv1D) modules and the factored GradTail step."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from gradtail_ops import (
    Collectives,
    EMAState,
    GradTailConfig,
    MemoryState,
    TailState,
    WeightCurve,
    coerce_config,
    linear_mean_grad,
    linear_tail_step,
    option_attributes,
    state_from_dict,
    state_to_dict,
    tail_init,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradtail_ops import GradTailOptions

from ._distributed import distributed_mean
from ._graph import inspect_graph, reentrant_checkpoint, used_outside_layers
from ._hooks import EagerLayers, Record, RecordingHook
from ._layers import (
    bias_of,
    collect_layers,
    grad_layout,
    layout_error,
    sequence_first_module,
    template,
    validate_batch_dim,
    weight_of,
)

__all__ = ["GradTail"]


@option_attributes(
    "decay", "reference", "warmup_steps", "eps", "method", "memory_decay", "memory_eta", "memory_max_weight"
)
class GradTail:
    """GradTail sample weighting for PyTorch: hooks on ``nn.Linear`` (and HF ``Conv1D``) layers.

    Each step scores every example by the cosine between its gradient on the tracked
    layers and a running reference gradient, and turns low alignment into a higher loss
    weight (Chen et al., 2022, "GradTail", arXiv:2201.05938; formulation and defaults in
    docs/method.md). The per-example gradients are never built: forward hooks keep each
    tracked layer's input and output, and one ``torch.autograd.grad`` call gives every
    example's output gradient; the factored ops of `gradtail_ops` do the rest.

    Parameters
    ----------
    modules : nn.Linear, sequence of nn.Linear, or nn.Module
        The layers to score, jointly (one cosine over all of them). A module that is not an
        ``nn.Linear`` means all of its ``nn.Linear`` submodules (and ``transformers``
        ``Conv1D`` ones, when the user has imported transformers), except those that cannot
        be scored exactly, skipped with a warning: ``nn.MultiheadAttention``'s ``out_proj``
        and ``nn.Linear`` subclasses with their own ``forward`` (docs/torch.md, Supported
        models).
    config : gradtail_ops.GradTailConfig, optional
        The whole policy. Defaults to the one built from ``**options``.
    sync_distributed : bool, optional
        When ``torch.distributed`` is initialised, average the batch reference over ranks
        before the EMA update so every rank holds the same state. Defaults to True.
    batch_dim : {0, 1}, optional
        The batch axis of tracked layers' inputs that have a time axis (3-D and up): 0 for
        ``(B, T, d)``, 1 for sequence-first ``(T, B, d)`` (``nn.Transformer``'s default,
        ``nn.LSTM`` outputs). 2-D inputs are always ``(B, d)``. Defaults to 0; when a whole
        model is given and one of its modules declares ``batch_first=False``, it must be
        given explicitly (a ``(T, B, d)`` input with ``T == B`` cannot be told apart).
    **options
        The flat GradTail options, validated once by `gradtail_ops.GradTailConfig.from_options`
        (its docs list each with its default): ``decay`` (float or schedule ``steps -> decay``;
        0.999), ``reference`` ("direction"), ``warmup_steps`` (0), the curve's ``kind``
        ("rank"), ``max_weight`` (3.0), ``threshold``, ``temperature``, ``quantile`` (0.3),
        ``floor``, ``normalize`` (True), ``eps`` (0.0), ``method`` ("auto"), the
        per-example memory's ``memory_size`` (None: off), ``memory_decay`` (0.5),
        ``memory_eta`` (1.0), ``memory_max_weight`` (3.0), and the sketched reference's
        ``sketch_rank`` (None: exact), ``sketch_size``, ``sketch_seed``.

        With ``memory_size=N`` each example keeps an EMA, over its visits, of its
        batch-standardised alignment, and the loss weights come from that running score
        (``clip(exp(-memory_eta * m_i), 1/memory_max_weight, memory_max_weight)``, normalised
        to batch mean 1) instead of the per-batch curve; every `weights`/`backward` call then
        needs ``index=``, each example's row in ``[0, N)``. It costs 8 bytes per example on
        the tracked layers' device and is not synchronised across ``torch.distributed`` ranks
        (docs/tail_mining.md).

        With ``sketch_rank=k`` the reference of each large tracked layer is a rank-k sketch
        (`gradtail_ops.sketch`): its state and the scoring cost shrink from ``d_in·d_out`` to
        about ``3k·(d_in + d_out)``; small layers stay exact.

    Attributes
    ----------
    config : gradtail_ops.GradTailConfig
        The policy (frozen; `load_state_dict` may replace it with the saved decay).
    state : gradtail_ops.EMAState
        The reference (read-only view of the full state's ``ema``).
    memory : gradtail_ops.MemoryState or None
        The per-example memory, when on.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> gt = GradTail(model[-1], decay=0.9)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> loss = F.cross_entropy(model(x), y, reduction="none")
    >>> w = gt.weights(loss)             # (16,) detached; ones on the first step
    >>> (w * loss).mean().backward()
    >>> gt.remove()
    """

    def __init__(
        self,
        modules: nn.Module | Iterable[nn.Module],
        *,
        config: GradTailConfig | None = None,
        sync_distributed: bool = True,
        batch_dim: int | None = None,
        **options: Unpack[GradTailOptions],
    ) -> None:
        self.config = coerce_config(config, options)
        validate_batch_dim(batch_dim)
        self.layers, self._root = collect_layers(modules)
        seq_first = None if self._root is None or batch_dim is not None else sequence_first_module(self._root)
        if seq_first is not None:
            raise ValueError(
                f"The model has a sequence-first module, {seq_first}, declared with batch_first=False: say "
                "where the batch axis of the tracked layers' (3-D) inputs is, batch_dim=1 for (T, B, d) or "
                "batch_dim=0 for (B, T, d); Received: batch_dim=None."
            )
        self.batch_dim = 0 if batch_dim is None else int(batch_dim)
        self.sync_distributed = sync_distributed
        self._state: TailState = tail_init([template(m) for m in self.layers], config=self.config)
        self.last_alignment: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self._records = [Record() for _ in self.layers]
        # The hooks and eager forwards are objects that copies of the model do not share
        # (see _hooks): a deepcopy'd or pickled model is independent of this GradTail.
        self._handles = [
            m.register_forward_hook(RecordingHook(r, self.batch_dim))
            for m, r in zip(self.layers, self._records, strict=True)
        ]
        # Under torch.compile the tracked layers must run eagerly: inside a compiled region their
        # outputs are not nodes of the autograd graph, so their output gradients cannot be taken.
        # Excluding them from compilation costs a graph break per tracked layer, nothing else.
        self._eager = EagerLayers(self.layers)
        self._batchnorm_checked = False
        self.last_backward: Literal["book-keeping", "weighted backward"] | None = None

    # ------------------------------------------------------------------------- the policy
    @property
    def state(self) -> EMAState:
        """The reference gradient's state (``config`` and `state_dict` hold the rest)."""
        return self._state.ema

    @property
    def memory(self) -> MemoryState | None:
        """The per-example memory (scores and visits), or None when it is off."""
        return self._state.memory

    @property
    def curve(self) -> WeightCurve:
        """The weighting curve (``config.curve``)."""
        curve: WeightCurve = self.config.curve
        return curve

    # ----------------------------------------------------------------------------- hooks
    def discard(self) -> None:
        """Forget what the hooks kept since the last step (e.g. after an extra forward)."""
        for record in self._records:
            record.clear()

    def remove(self) -> None:
        """Remove every hook and drop what they kept. The state stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._eager.restore()
        self.discard()

    def __enter__(self) -> GradTail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------------------ step
    def _check_loss(self, per_example_loss: Any) -> None:
        if not isinstance(per_example_loss, torch.Tensor) or per_example_loss.ndim != 1:
            shape = (
                tuple(per_example_loss.shape)
                if hasattr(per_example_loss, "shape")
                else type(per_example_loss)
            )
            raise ValueError(
                "`per_example_loss` must be a tensor of shape (B,), one loss per example "
                f"(use reduction='none'); Received: {shape}."
            )
        if not per_example_loss.requires_grad:
            raise ValueError(
                "`per_example_loss` does not require grad: compute it from a forward in train mode "
                "with gradients enabled."
            )
        missing = [k for k, r in enumerate(self._records) if r.output is None]
        if len(missing) == len(self._records):
            raise RuntimeError(
                "GradTail.weights() was called without a forward of the tracked layers since the last "
                "call (or after a forward under torch.no_grad() / model.eval()): it needs exactly one "
                "training forward per call."
            )
        if missing and reentrant_checkpoint(per_example_loss):
            raise RuntimeError(
                f"Tracked layers {missing} ran inside torch.utils.checkpoint(..., use_reentrant=True), "
                "which runs them without autograd and hides their outputs, so GradTail cannot score them. "
                "Use use_reentrant=False (PyTorch's recommended mode, which GradTail supports), or track "
                "only layers outside the checkpointed segments."
            )
        if missing:
            raise RuntimeError(
                f"Tracked layers {missing} did not run in the forward behind this loss; GradTail scores "
                "all tracked layers jointly, so each must run once per step (track only the layers "
                "every forward uses; a layer run under torch.no_grad() counts as not run, e.g. inside "
                "torch.utils.checkpoint(use_reentrant=True) when no input of the segment requires grad)."
            )
        repeated = [k for k, r in enumerate(self._records) if r.calls > 1]
        if repeated:
            raise RuntimeError(
                f"Tracked layers {repeated} ran {[self._records[k].calls for k in repeated]} times since the "
                "last GradTail step; it needs exactly one forward per weights()/backward() call. "
                "Call gt.discard() after a forward you do not want scored."
            )
        batch = per_example_loss.shape[0]
        for k, r in enumerate(self._records):
            problem = None if r.inputs is None else layout_error(k, r.input_shape, batch, self.batch_dim)
            if problem is not None:
                raise ValueError(
                    f"`per_example_loss` has {batch} entries but {problem}; Received: loss shape "
                    f"{tuple(per_example_loss.shape)}."
                )

    def _output_grads(self, per_example_loss: torch.Tensor, *, retain_graph: bool) -> list[torch.Tensor]:
        present = [r for r in self._records if r.output is not None]
        # One backward from the summed loss: exact per example, since each loss depends only
        # on its own outputs (unless something mixes examples: see the batch-norm check).
        # The gradient is taken at each output's edge as the layer made it, so an in-place op
        # after the layer (nn.ReLU(inplace=True)) does not shift it.
        grads = torch.autograd.grad(
            per_example_loss.sum(),
            [r.edge for r in present if r.edge is not None],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        if all(g is None for g in grads):
            raise RuntimeError(
                "The loss does not depend, through autograd, on any tracked layer's output. Either the "
                "loss does not come from this forward, or the tracked layers ran inside a compiled region "
                "(torch.compile applied after GradTail was created, or to a function wrapping the model): "
                "create GradTail first (it keeps the tracked layers eager), or compile only the layers "
                "before the tracked ones."
            )
        out = [torch.zeros_like(r.output) if g is None else g for r, g in zip(present, grads, strict=True)]
        return [g.transpose(0, 1) if r.seq_first else g for r, g in zip(present, out, strict=True)]

    def _check_mixing(self, per_example_loss: torch.Tensor) -> None:
        tracked = {r.node for r in self._records if r.output is not None}
        if inspect_graph(per_example_loss, tracked).mixing_batchnorm:
            warnings.warn(
                "A train-mode BatchNorm lies between the loss and a tracked nn.Linear: its output "
                "gradients mix examples, so GradTail's per-example alignments are approximate. "
                "Track only layers after the last BatchNorm, or use LayerNorm/GroupNorm.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _rows(self, index: Any) -> torch.Tensor | None:
        """``index`` as an int64 tensor on the memory's device (the core checks the rest)."""
        if index is None or self.memory is None:
            given: torch.Tensor | None = index
            return given  # the core says which of the two is missing
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index)
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(
                f"`index` must be an integer tensor of shape (B,); Received: dtype={index.dtype} "
                f"with shape {tuple(index.shape)}."
            )
        if _distributed_active():
            raise RuntimeError(
                "The per-example memory is not synchronised across torch.distributed ranks: use it in "
                "single-process training (memory_size=None turns it off)."
            )
        rows: torch.Tensor = index.to(device=self.memory.score.device, dtype=torch.int64)
        return rows

    def _step(
        self, per_example_loss: torch.Tensor, *, retain_graph: bool, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # Callers have run _check_loss and _rows (backward() needs them before walking the graph).
        if not self._batchnorm_checked:
            self._check_mixing(per_example_loss)
            self._batchnorm_checked = True
        inputs = [r.inputs for r in self._records]
        try:
            output_grads = self._output_grads(per_example_loss, retain_graph=retain_graph)
        finally:
            self.discard()  # this forward is consumed, even when its gradients could not be taken
        collectives = (
            Collectives(mean=distributed_mean) if self.sync_distributed and _distributed_active() else None
        )
        layers = list(zip(inputs, output_grads, strict=True))
        with torch.no_grad():
            out = linear_tail_step(
                self._state,
                layers,
                config=self.config,
                index=index,
                collectives=collectives,
                copy_memory=False,
            )
        self._state = out.state
        self.last_alignment = out.alignment.detach()
        self.last_weights = out.weights.detach()
        return out.weights.to(per_example_loss.dtype), layers  # type: ignore[return-value]

    def weights(self, per_example_loss: torch.Tensor, *, index: Any = None) -> torch.Tensor:
        """Score this batch, update the reference, and return the loss weights.

        Parameters
        ----------
        per_example_loss : Tensor, shape (B,)
            One loss per example (``reduction="none"``), from a training forward through the
            tracked layers since the last call.
        index : Tensor of shape (B,), integer, optional
            Each example's row in the per-example memory, in ``[0, memory_size)``. Required
            when the GradTail was built with ``memory_size``; an error otherwise.

        Returns
        -------
        Tensor, shape (B,)
            Detached weights, in the loss's dtype, on its device; ones on the first step
            and during warm-up. Use ``(w * per_example_loss).mean().backward()``.

        Examples
        --------
        >>> import torch
        >>> head = torch.nn.Linear(3, 2)
        >>> gt = GradTail(head)
        >>> loss = head(torch.randn(5, 3)).pow(2).sum(1)
        >>> gt.weights(loss).shape
        torch.Size([5])
        """
        self._check_loss(per_example_loss)
        return self._step(per_example_loss, retain_graph=True, index=self._rows(index))[0]

    def backward(self, per_example_loss: torch.Tensor, *, index: Any = None) -> torch.Tensor:
        """Do the whole step: weights, then the weighted backward, in one go.

        When every tensor the loss needs a gradient for lives in the tracked layers, the
        gradient of ``mean_i(w_i L_i)`` is assembled from the stored inputs and output
        gradients (``sum_i w_i d_i a_i^T / B``, the book-keeping trick of Bu et al., 2022),
        so the network is differentiated once. That path is taken only when the autograd
        graph proves it exact: the loss reaches no other trainable tensor, and no tracked
        parameter is used outside its layer's forward (a tied embedding is such a use).
        Otherwise it runs one weighted backward.
        Either way ``.grad`` is accumulated exactly as ``(w * loss).mean().backward()``.

        Parameters
        ----------
        per_example_loss : Tensor, shape (B,)
        index : Tensor of shape (B,), integer, optional
            The examples' rows in the per-example memory (see `weights`).

        Returns
        -------
        Tensor, shape (B,)
            The detached weights.

        Examples
        --------
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> gt = GradTail(model)
        >>> w = gt.backward(model(torch.randn(5, 3)).pow(2).sum(1))
        >>> model[0].weight.grad.shape
        torch.Size([4, 3])
        """
        self._check_loss(per_example_loss)
        rows = self._rows(index)
        book_keeping = self._book_keeping_exact(per_example_loss) and not (
            self.sync_distributed and _distributed_active()
        )  # under DDP the weighted backward lets DDP's reducer average the gradients
        weights, layers = self._step(per_example_loss, retain_graph=not book_keeping, index=rows)
        self.last_backward = "book-keeping" if book_keeping else "weighted backward"
        if not book_keeping:
            (weights.detach() * per_example_loss).mean().backward()  # type: ignore[no-untyped-call]
            return weights
        with torch.no_grad():
            coef = weights.detach()
            layers.reverse()  # popped in layer order: each layer's inputs and grads die after use
            for layer in self.layers:
                inputs, grads = layers.pop()
                bias = bias_of(layer)
                bias = bias if bias is not None and bias.requires_grad else None
                gw, gb = linear_mean_grad(inputs, grads, bias=bias is not None, example_weights=coef)
                if weight_of(layer).requires_grad:
                    _accumulate(weight_of(layer), grad_layout(layer, gw))
                if bias is not None and gb is not None:
                    _accumulate(bias, gb)
        return weights

    def _book_keeping_exact(self, per_example_loss: torch.Tensor) -> bool:
        """Whether ``sum_i w_i d_i a_i^T / B`` per tracked layer is the whole weighted gradient.

        It is when every leaf the loss reaches is a tracked layer's parameter and no path from
        the loss reaches one without going through a tracked layer's output (a tied embedding,
        a functional use of the weight, a second use under another name would).
        """
        tracked_params = {id(p) for m in self.layers for p in m.parameters(recurse=False)}
        nodes = {r.node for r in self._records if r.output is not None}
        if not inspect_graph(per_example_loss, nodes).leaves <= tracked_params:
            return False
        layers = [(r.node, r.input_node) for r in self._records if r.output is not None]
        return not used_outside_layers(per_example_loss, layers)

    # ----------------------------------------------------------------------------- state
    def memory_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every example's running score and visit count, for tail mining.

        Returns
        -------
        score : Tensor, shape (memory_size,)
            The EMA over visits of the example's batch-standardised alignment: low is
            tail-like (its gradient disagrees with the reference), high is head-like. 0 for
            an example never visited.
        visits : Tensor, shape (memory_size,), int32
            How many scored steps included the example.

        Both are detached copies. Raises RuntimeError when the memory is off.

        Examples
        --------
        >>> import torch
        >>> gt = GradTail(torch.nn.Linear(3, 2), memory_size=10)
        >>> score, visits = gt.memory_scores()
        >>> score.shape, int(visits.sum())
        (torch.Size([10]), 0)
        """
        if self.memory is None:
            raise RuntimeError(
                "This GradTail keeps no per-example memory: construct it with memory_size=<number of "
                "training examples> and pass index= to weights()/backward()."
            )
        return self.memory.score.detach().clone(), self.memory.visits.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        """The state in the library's interchange format (`gradtail_ops.state_to_dict`).

        Tensors on the tracked layers' devices: ``mean`` (one list per layer), ``total``,
        ``count``, ``steps``, and the options that shaped them (``decay``, ``reference``);
        with the per-example memory, ``memory_score``, ``memory_visits`` (shape
        (memory_size,)) and ``memory_decay``.

        Examples
        --------
        >>> import torch
        >>> sorted(GradTail(torch.nn.Linear(3, 2)).state_dict())
        ['count', 'decay', 'mean', 'reference', 'steps', 'total']
        """
        return state_to_dict(self._state, config=self.config)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by `state_dict` (or by another adapter, same layers).

        Everything is validated first (`gradtail_ops.state_from_dict`: keys, shapes, dtypes,
        finiteness, ``0 <= total <= 1``, ``count >= 0``, the memory's presence); a refused
        state leaves this one untouched. The saved decay replaces the configured one.

        Examples
        --------
        >>> import torch
        >>> gt = GradTail(torch.nn.Linear(3, 2))
        >>> gt.load_state_dict(gt.state_dict())
        """
        self._state, self.config = state_from_dict(state_dict, like=self._state, config=self.config)


def _flat(mean: Any) -> list[Any]:
    return [t for layer in mean for t in layer]


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _distributed_active() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )

"""Recording a tracked layer's forward: the hook, what it keeps, and the eager-forward wrapper.

Both objects live inside the model (its ``_forward_hooks`` and the layers' ``forward``), so
they are written to survive ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the model: a
copy gets an inert hook (it is a separate model, not scored by this GradTail) and an eager
forward bound to the copy itself, never to the original's weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["EagerForward", "EagerLayers", "InertHook", "Record", "RecordingHook", "in_backward"]


class Record:
    """What one tracked layer saw in the current step.

    ``inputs`` is batch-first (a sequence-first input is transposed when recorded); ``edge`` is
    the autograd edge of the layer's output as the layer produced it (an in-place op after
    the layer, e.g. ``nn.ReLU(inplace=True)``, does not move it); ``seq_first`` says the
    output gradient must be transposed to batch-first too.
    """

    __slots__ = ("calls", "edge", "input_node", "input_shape", "inputs", "output", "seq_first")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.calls = 0
        self.inputs: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.edge: GradientEdge | None = None
        self.input_node: Any = None
        self.input_shape: tuple[int, ...] = ()
        self.seq_first = False

    @property
    def node(self) -> Any:
        """The autograd node of the layer's output (None before a forward)."""
        return None if self.edge is None else self.edge.node


def in_backward() -> bool:
    """True while autograd runs a backward pass in this thread.

    A forward that runs then is a recomputation (``torch.utils.checkpoint``), not a new step.
    """
    return bool(torch._C._current_graph_task_id() != -1)


class RecordingHook:
    """The forward hook of one tracked layer.

    It keeps nothing for evaluation forwards (no grad, eval mode, output without grad) and
    for forwards that run inside a backward pass (activation-checkpoint recomputation).
    """

    def __init__(self, record: Record, batch_dim: int) -> None:
        self.record = record
        self.batch_dim = batch_dim

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if not (module.training and torch.is_grad_enabled() and output.requires_grad) or in_backward():
            return
        record = self.record
        inputs = args[0].detach()
        record.calls += 1
        record.input_shape = tuple(inputs.shape)
        # A 2-D input is (B, d_in) whatever the layout of the sequence layers around it.
        record.seq_first = self.batch_dim == 1 and inputs.ndim >= 3
        record.inputs = inputs.transpose(0, 1) if record.seq_first else inputs
        record.output = output
        record.edge = get_gradient_edge(output)
        record.input_node = get_gradient_edge(args[0]).node if args[0].requires_grad else None

    def __deepcopy__(self, memo: dict[int, Any]) -> InertHook:
        return InertHook()

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:
        return (InertHook, ())


class InertHook:
    """What a copied or unpickled model holds instead of a `RecordingHook`: nothing happens."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        return None


_REASON = (
    "GradTail keeps its tracked layers out of torch.compile (their outputs must be autograd "
    "nodes to be scored), so a model with GradTail attached has one graph break per tracked layer "
    "and cannot be compiled with fullgraph=True: compile with fullgraph=False, or create GradTail "
    "on the layers outside the fullgraph region"
)


def _forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return type(module).forward(module, *args, **kwargs)


_eager_forward: Any = torch.compiler.disable(_forward, reason=_REASON)  # type: ignore[no-untyped-call]


class EagerForward:
    """A layer's ``forward`` run outside torch.compile; holds the layer, so copies rebind."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _eager_forward(self.module, *args, **kwargs)

    def __getstate__(self) -> nn.Module:
        return self.module

    def __setstate__(self, module: nn.Module) -> None:
        self.module = module


class EagerLayers:
    """Keeps modules out of torch.compile (a graph break around each), reversibly."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self._saved: list[tuple[nn.Module, Any]] = []
        for layer in layers:
            current = layer.__dict__.get("forward")
            if isinstance(current, EagerForward):
                continue  # another GradTail on the same model already keeps it eager
            self._saved.append((layer, current))
            # A forward the user set on the instance is kept (wrapped); the class's gets EagerForward.
            disable: Any = torch.compiler.disable
            layer.forward = EagerForward(layer) if current is None else disable(current, reason=_REASON)

    def restore(self) -> None:
        for layer, original in self._saved:
            if original is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = original
        self._saved = []

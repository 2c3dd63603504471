"""gradtail_torch.GradTail edges found by a mutation audit (/work/notes/mutation-audit.md):
frozen tracked parameters in the book-keeping backward, the read-only option attributes, and
state_dict as a snapshot of a memory that the adapter updates in place."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from gradtail_torch import GradTail  # noqa: E402

from ._torch_models import mlp  # noqa: E402


def _data(n=24, d_in=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g)


def test_book_keeping_backward_leaves_frozen_tracked_parameters_alone():
    """A frozen weight or bias of a tracked layer gets no .grad; the others get the gradient of
    ``mean(w * loss)`` computed by autograd on an identical twin."""
    model, twin = mlp(), mlp()
    for m in (model, twin):
        m[0].weight.requires_grad_(False)
        m[2].bias.requires_grad_(False)
    x, y = _data()
    gt = GradTail(model, decay=0.5)
    for step in range(3):  # from the second step on the weights are not all ones
        part = slice(8 * step, 8 * step + 8)
        model.zero_grad()
        twin.zero_grad()
        w = gt.backward(F.cross_entropy(model(x[part]), y[part], reduction="none"))
        assert gt.last_backward == "book-keeping"
        (w * F.cross_entropy(twin(x[part]), y[part], reduction="none")).mean().backward()
        assert model[0].weight.grad is None
        assert model[2].bias.grad is None
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            if q.requires_grad:
                np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_option_attributes_read_the_given_options():
    options = {
        "decay": 0.95,
        "reference": "mean",
        "warmup_steps": 3,
        "eps": 1e-7,
        "method": "ghost",
        "memory_size": 7,
        "memory_decay": 0.3,
        "memory_eta": 0.7,
        "memory_max_weight": 1.5,
    }
    gt = GradTail(torch.nn.Linear(3, 2), **options)
    for name, value in options.items():
        if name != "memory_size":
            assert getattr(gt, name) == value, name
    assert gt.curve.kind == "rank"
    gt.remove()


def test_state_dict_is_a_snapshot_while_the_memory_is_updated_in_place():
    """The adapter updates its memory in place (copy_memory=False); a state_dict taken earlier keeps
    the values it had (a checkpoint must not change after it was taken)."""
    model = mlp()
    x, y = _data()
    gt = GradTail(model, decay=0.6, memory_size=24)
    rng = np.random.default_rng(2)
    snapshot = None
    for step in range(4):
        index = torch.as_tensor(rng.permutation(24)[:8])
        gt.backward(F.cross_entropy(model(x[index]), y[index], reduction="none"), index=index)
        if step == 1:
            saved = gt.state_dict()
            snapshot = {k: v.clone() for k, v in saved.items() if isinstance(v, torch.Tensor)}
    assert snapshot is not None
    for key, value in snapshot.items():
        assert torch.equal(saved[key], value), key

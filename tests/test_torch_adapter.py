"""gradtail_torch.GradTail against per-example autograd loops in float64."""

from __future__ import annotations

import copy
import warnings
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

from gradtail_torch import GradTail  # noqa: E402

from . import reference as ref  # noqa: E402
from ._torch_models import mlp, per_example_grads  # noqa: E402


def _expected_weights(align, step, curve_max=3.0, quantile=0.3):
    if step == 0:
        return np.ones(len(align))
    w = ref.rank_weights(align, quantile, curve_max)
    return w / w.mean()


def _run_against_reference(model, tracked, params, make_loss, reference, steps=4, decay=0.8):
    gt = GradTail(tracked, decay=decay, reference=reference)
    history = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        loss = make_loss(step)
        flat = per_example_grads(loss, params)
        expected_align = ref.cosine_rows(flat, ref.ema(history, [decay] * len(history))) if history else None
        w = gt.weights(loss)
        if expected_align is not None:
            np.testing.assert_allclose(gt.last_alignment.numpy(), expected_align, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(w.numpy(), _expected_weights(expected_align, step), rtol=1e-9)
        else:
            np.testing.assert_array_equal(w.numpy(), 1.0)
        norms = np.linalg.norm(flat, axis=1)
        coef = 1 / norms if reference == "direction" else np.ones(len(flat))
        history.append((coef[:, None] * flat).mean(axis=0))
        opt.zero_grad()
        (w * loss).mean().backward()
        opt.step()
    gt.remove()


@pytest.mark.parametrize("reference", ["mean", "direction"])
def test_classification_head_matches_reference(reference):
    model = mlp()
    rng = torch.Generator().manual_seed(1)

    def make_loss(step):
        x = torch.randn(12, 6, generator=rng, dtype=torch.float64)
        y = torch.randint(0, 4, (12,), generator=rng)
        return F.cross_entropy(model(x), y, reduction="none")

    head = model[2]
    _run_against_reference(model, head, [head.weight, head.bias], make_loss, reference)


def test_regression_two_layers_match_reference():
    model = mlp(seed=2, d_out=1)
    rng = torch.Generator().manual_seed(3)

    def make_loss(step):
        x = torch.randn(10, 6, generator=rng, dtype=torch.float64)
        y = torch.randn(10, generator=rng, dtype=torch.float64)
        return F.mse_loss(model(x).squeeze(1), y, reduction="none")

    params = [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
    _run_against_reference(model, model, params, make_loss, "direction")


def test_sequence_head_matches_reference():
    torch.manual_seed(4)
    body = nn.Linear(5, 7).double()
    head = nn.Linear(7, 3, bias=False).double()
    rng = torch.Generator().manual_seed(5)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = body, head

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    model = Seq()

    def make_loss(step):
        x = torch.randn(6, 4, 5, generator=rng, dtype=torch.float64)  # (B, T, d)
        y = torch.randint(0, 3, (6, 4), generator=rng)
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction="none").reshape(6, 4).mean(1)

    _run_against_reference(model, head, [head.weight], make_loss, "direction")


def test_weights_leave_nothing_in_grad_and_weighted_grad_is_exact():
    model = mlp(seed=6)
    gt = GradTail(model[2], decay=0.5)
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 4, (9,))
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, reduction="none")
        w = gt.weights(loss)
        assert all(p.grad is None for p in model.parameters())
        assert not w.requires_grad
        (w * loss).mean().backward()
    # Independent: a fresh forward, weights as constants, autograd.grad.
    loss = F.cross_entropy(model(x), y, reduction="none")
    expected = torch.autograd.grad((w.clone() * loss).mean(), list(model.parameters()))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("track", "path"), [("all", "book-keeping"), ("head", "weighted backward")])
def test_backward_matches_weighted_backward(track, path):
    model = mlp(seed=7)
    twin = copy.deepcopy(model)
    gt = GradTail(model if track == "all" else model[2], decay=0.7)
    gt_twin = GradTail(twin if track == "all" else twin[2], decay=0.7)
    for step in range(3):
        x, y = torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 4, (11,))
        model.zero_grad()
        twin.zero_grad()
        w = gt.backward(F.cross_entropy(model(x), y, reduction="none"))
        loss_twin = F.cross_entropy(twin(x), y, reduction="none")
        w_twin = gt_twin.weights(loss_twin)
        (w_twin * loss_twin).mean().backward()
        assert gt.last_backward == path
        torch.testing.assert_close(w, w_twin, rtol=0, atol=0)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
        if step == 1:  # accumulation onto existing .grad, as backward() does
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                p.grad.mul_(0.5), q.grad.mul_(0.5)


def test_max_weight_one_trains_identically():
    a, b = mlp(seed=8), mlp(seed=8)
    opt_a, opt_b = torch.optim.Adam(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), 1e-2)
    gt = GradTail(a, max_weight=1.0)
    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        x, y = torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (8,), generator=gen)
        loss_a = F.cross_entropy(a(x), y, reduction="none")
        opt_a.zero_grad()
        (gt.weights(loss_a) * loss_a).mean().backward()
        opt_a.step()
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_state_dict_round_trip_resumes_bit_identically():
    model = mlp(seed=10)
    gt = GradTail(model, decay=0.9)
    batches = [(torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 4, (7,))) for _ in range(3)]
    for x, y in batches[:2]:
        gt.weights(F.cross_entropy(model(x), y, reduction="none"))
    saved = gt.state_dict()
    resumed = GradTail(model, decay=0.9)
    gt.remove()  # keep one set of hooks on the model at a time
    resumed.load_state_dict(copy.deepcopy(saved))
    x, y = batches[2]
    w_resumed = resumed.weights(F.cross_entropy(model(x), y, reduction="none"))
    resumed.remove()
    gt2 = GradTail(model, decay=0.9)
    gt2.load_state_dict(saved)
    w_again = gt2.weights(F.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(w_resumed, w_again, rtol=0, atol=0)
    assert int(resumed.state.count) == 3


def test_load_state_dict_rejects_other_shapes():
    gt = GradTail(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 3\)"):
        gt.load_state_dict(GradTail(nn.Linear(3, 4)).state_dict())


def test_nothing_kept_for_eval_or_no_grad_and_memory_does_not_grow():
    model = mlp(seed=11)
    gt = GradTail(model)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    model.train()
    assert all(r.output is None for r in gt._records)
    refs = []
    for _ in range(5):
        loss = F.cross_entropy(model(x), y, reduction="none")
        refs.append(weakref.ref(gt._records[-1].output))
        (gt.weights(loss) * loss).mean().backward()
        del loss
    assert all(r.output is None and r.inputs is None for r in gt._records)
    assert all(r() is None for r in refs), "GradTail keeps graph tensors alive across steps"


def test_errors_are_clear():
    with pytest.raises(TypeError, match="Conv1d at position 1"):
        GradTail([nn.Linear(2, 2), nn.Conv1d(1, 1, 1)])
    with pytest.raises(ValueError, match="none"):
        GradTail(nn.Sequential(nn.ReLU()))
    model = mlp(seed=12)
    gt = GradTail(model[2])
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    with pytest.raises(RuntimeError, match="without a forward"):
        gt.weights(torch.randn(4, dtype=torch.float64, requires_grad=True))
    logits = model(x)
    with pytest.raises(ValueError, match=r"shape \(B,\).*\(4, 1\)"):
        gt.weights(F.cross_entropy(logits, y, reduction="none")[:, None])
    gt.discard()
    model(x)
    loss = F.cross_entropy(model(x), y, reduction="none")
    with pytest.raises(RuntimeError, match="ran \\[2\\] times"):
        gt.weights(loss)
    gt.discard()
    loss = F.cross_entropy(model(x), y, reduction="none")
    gt.weights(loss)
    with pytest.raises(RuntimeError, match="without a forward"):
        gt.weights(loss)
    with pytest.raises(ValueError, match="reference"):
        GradTail(nn.Linear(2, 2), reference="median")
    with pytest.raises(ValueError, match="max_weight"):
        GradTail(nn.Linear(2, 2), max_weight=0.5)


def test_batchnorm_after_tracked_layer_warns_and_before_does_not():
    torch.manual_seed(13)
    after = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    gt = GradTail(after)
    with pytest.warns(RuntimeWarning, match="BatchNorm"):
        gt.weights(F.cross_entropy(after(x), y, reduction="none"))
    gt.remove()
    gt = GradTail(after[3])  # the BatchNorm is before the tracked head: harmless
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gt.weights(F.cross_entropy(after(x), y, reduction="none"))


def test_autocast_bfloat16_keeps_float32_state():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    gt = GradTail(model)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            loss = F.cross_entropy(logits, y, reduction="none")
        w = gt.weights(loss)
        (w * loss).mean().backward()
    assert gt.last_alignment.dtype == torch.float32
    assert all(t.dtype == torch.float32 for layer in gt.state.mean for t in layer)
    assert torch.isfinite(gt.last_alignment).all()


def test_context_manager_removes_hooks():
    layer = nn.Linear(3, 2)
    with GradTail(layer) as gt:
        assert len(layer._forward_hooks) == 1
    assert len(layer._forward_hooks) == 0
    assert gt.state.count == 0


@pytest.mark.slow
def test_torch_compile_model_works():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    gt, gt_eager = GradTail(compiled), GradTail(eager)
    for _ in range(3):
        x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
        loss = F.cross_entropy(compiled(x), y, reduction="none")
        loss_e = F.cross_entropy(eager(x), y, reduction="none")
        torch.testing.assert_close(gt.weights(loss), gt_eager.weights(loss_e))
        torch.testing.assert_close(gt.last_alignment, gt_eager.last_alignment, rtol=1e-4, atol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")


@pytest.mark.gpu
@cuda
def test_cuda_state_lives_on_the_layer_device_and_matches_cpu():
    cpu_model = mlp(seed=16).float()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    gt_cpu, gt_gpu = GradTail(cpu_model, decay=0.8), GradTail(gpu_model, decay=0.8)
    for _ in range(3):
        x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
        w_cpu = gt_cpu.weights(F.cross_entropy(cpu_model(x), y, reduction="none"))
        w_gpu = gt_gpu.weights(F.cross_entropy(gpu_model(x.cuda()), y.cuda(), reduction="none"))
        assert w_gpu.device.type == "cuda"
        torch.testing.assert_close(gt_gpu.last_alignment.cpu(), gt_cpu.last_alignment, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w_gpu.cpu(), w_cpu)
    assert all(t.device.type == "cuda" for layer in gt_gpu.state.mean for t in layer)


@pytest.mark.gpu
@cuda
def test_cuda_autocast_float16_keeps_float32_state():
    model = mlp(seed=17).float().cuda()
    gt = GradTail(model)
    x, y = torch.randn(32, 6, device="cuda"), torch.randint(0, 4, (32,), device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(x)
            assert logits.dtype == torch.float16
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        (gt.weights(loss) * loss).mean().backward()
    assert gt.last_alignment.dtype == torch.float32
    assert all(t.dtype == torch.float32 for layer in gt.state.mean for t in layer)


def test_a_tracked_layer_that_did_not_run_is_named():
    torch.manual_seed(18)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    gt = GradTail([a, b])
    loss = a(torch.randn(4, 3)).pow(2).sum(1)
    with pytest.raises(RuntimeError, match=r"Tracked layers \[1\] did not run"):
        gt.weights(loss)

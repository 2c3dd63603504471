"""GradTail on the models people train, against independent references.

Each model trains a few steps. Alignments are compared with per-example gradients from an
autograd loop (one ``autograd.grad`` per example) and a float64 NumPy EMA of past batches;
``gt.backward``'s ``.grad`` with ``(w * loss).mean().backward()`` on an untouched twin, same w.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

from gradtail_torch import GradTail  # noqa: E402

from . import reference as ref  # noqa: E402
from ._torch_models import mlp, per_example_grads  # noqa: E402
from ._torch_zoo_models import Checkpointed, Encoder, Tagger, TiedLM, cnn, sequence_loss  # noqa: E402

DECAY = 0.8


def _expected_weights(align: np.ndarray) -> np.ndarray:
    w = ref.rank_weights(align, 0.3, 3.0)
    return w / w.mean()


def check_alignment(gt, model, params, make_loss, steps=3, reference_loss=None, rtol=1e-8):
    """Train ``steps`` steps with ``gt.weights``; each step's alignment against the autograd loop.

    ``reference_loss(step)``, when given, is a separate forward whose per-example gradients
    over ``params`` are the reference (the scored forward is ``make_loss(step)``).
    """
    history: list[np.ndarray] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        if reference_loss is not None:
            flat = per_example_grads(reference_loss(step), params)
            gt.discard()  # the reference forward is not the scored one
        loss = make_loss(step)
        if reference_loss is None:
            flat = per_example_grads(loss, params)
        w = gt.weights(loss)
        if history:
            expected = ref.cosine_rows(flat, ref.ema(history, [DECAY] * len(history)))
            np.testing.assert_allclose(
                gt.last_alignment.double().numpy(), expected, rtol=rtol, atol=rtol * 1e-3
            )
            np.testing.assert_allclose(w.double().numpy(), _expected_weights(expected), rtol=1e-9)
        else:
            np.testing.assert_array_equal(w.numpy(), 1.0)
        norms = np.linalg.norm(flat, axis=1)
        history.append((flat / norms[:, None]).mean(axis=0))
        opt.zero_grad()
        (w * loss).mean().backward()
        opt.step()


def check_backward(model, track, make_loss, steps=3, path=None, **options):
    """``gt.backward`` on ``model`` against a weighted backward on an untouched twin, same w."""
    twin = copy.deepcopy(model)
    gt = GradTail(track(model), decay=DECAY, **options)
    opt, opt_twin = torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.SGD(twin.parameters(), lr=0.05)
    for step in range(steps):
        opt.zero_grad(), opt_twin.zero_grad()
        w = gt.backward(make_loss(model, step))
        if path is not None:
            assert gt.last_backward == path
        (w * make_loss(twin, step)).mean().backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
        opt.step(), opt_twin.step()
    return gt


def _tracked_params(gt):
    return [p for layer in gt.layers for p in layer.parameters(recurse=False)]


# ---------------------------------------------------------------------------------------- MLP
def test_mlp():
    model = mlp(seed=20)
    gen = torch.Generator().manual_seed(21)
    data = [
        (torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (10,), generator=gen))
        for _ in range(3)
    ]

    def make_loss(m, step):
        x, y = data[step]
        return F.cross_entropy(m(x), y, reduction="none")

    gt = GradTail(model, decay=DECAY)
    check_alignment(gt, model, _tracked_params(gt), lambda s: make_loss(model, s))
    gt.remove()
    check_backward(mlp(seed=22), lambda m: m, make_loss, path="book-keeping")


# ---------------------------------------------------------------------------------------- CNN
def _image_batches(steps=3, batch=8):
    gen = torch.Generator().manual_seed(23)
    return [
        (
            torch.randn(batch, 1, 6, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (batch,), generator=gen),
        )
        for _ in range(steps)
    ]


def test_cnn_head_only_matches_reference():
    model, data = cnn(seed=24), _image_batches()
    gt = GradTail(model[-1], decay=DECAY)

    def make_loss(step):
        torch.manual_seed(100 + step)  # the same dropout mask for the reference and the scored forward
        x, y = data[step]
        return F.cross_entropy(model(x), y, reduction="none")

    # BatchNorm before the head mixes examples in the body only: the head's per-example gradient is
    # the gradient through the head's own use, which an autograd loop over the same forward gives.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_alignment(gt, model, _tracked_params(gt), make_loss)


def test_cnn_whole_model_backward_is_exact():
    # GradTail(model) tracks the Linear head only; the BatchNorm before it is harmless (no
    # warning); the convolution is trained by the weighted backward.
    data = _image_batches()

    def make_loss(m, step):
        torch.manual_seed(200 + step)
        x, y = data[step]
        return F.cross_entropy(m(x), y, reduction="none")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gt = check_backward(cnn(seed=25), lambda m: m, make_loss, path="weighted backward")
    assert [type(m).__name__ for m in gt.layers] == ["Linear"]


def test_batchnorm_after_a_tracked_linear_warns_and_backward_is_exact():
    data = _image_batches()
    torch.manual_seed(39)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True), nn.Linear(8, 3)
    )

    def make_loss(m, step):
        x, y = data[step]
        return F.cross_entropy(m(x.float()), y, reduction="none")

    with pytest.warns(RuntimeWarning, match="BatchNorm"):
        check_backward(model, lambda m: m, make_loss, path="weighted backward")


def test_inplace_activation_after_a_tracked_linear_is_scored_at_the_layer_output():
    # nn.ReLU(inplace=True) rewrites the Linear's output tensor: the score must still use the
    # gradient at the Linear's output, not after the ReLU.
    torch.manual_seed(40)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 4)).double()
    gen = torch.Generator().manual_seed(41)
    data = [
        (torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (10,), generator=gen))
        for _ in range(3)
    ]
    gt = GradTail(model, decay=DECAY)
    check_alignment(
        gt,
        model,
        _tracked_params(gt),
        lambda s: F.cross_entropy(model(data[s][0]), data[s][1], reduction="none"),
    )


# ------------------------------------------------------------------------------- transformers
def _sequences(batch_first, steps=3, batch=5, time=5, d_in=4):
    gen = torch.Generator().manual_seed(26)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, time, d_in, generator=gen, dtype=torch.float64)
        out.append(
            (
                x if batch_first else x.transpose(0, 1).contiguous(),
                torch.randint(0, 3, (batch,), generator=gen),
            )
        )
    return out


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_trains_with_gradtail_of_the_model(batch_first):
    # T == B: a sequence-first layout cannot be told from the shapes.
    model, data = Encoder(batch_first, seed=27), _sequences(batch_first)
    options = {} if batch_first else {"batch_dim": 1}
    with pytest.warns(UserWarning, match="out_proj"):
        gt = GradTail(model, decay=DECAY, **options)
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(m)] for m in gt.layers] == [
        "embed",
        "encoder.layers.0.linear1",
        "encoder.layers.0.linear2",
        "head",
    ]

    def make_loss(m, step):
        x, y = data[step]
        return F.cross_entropy(m(x), y, reduction="none")

    check_alignment(gt, model, _tracked_params(gt), lambda s: make_loss(model, s))
    gt.remove()
    with pytest.warns(UserWarning, match="out_proj"):
        check_backward(
            Encoder(batch_first, seed=28), lambda m: m, make_loss, path="weighted backward", **options
        )


@pytest.mark.filterwarnings("ignore:GradTail\\(model\\) does not track")
def test_sequence_first_model_needs_an_explicit_batch_dim():
    with pytest.raises(ValueError, match=r"batch_first=False.*batch_dim"):
        GradTail(Encoder(batch_first=False))
    with pytest.raises(ValueError, match="batch_dim"):
        GradTail(nn.Linear(2, 2), batch_dim=2)
    # Explicit layers, (T, B, d) inputs with T != B: a clear error suggesting batch_dim=1.
    layer = nn.Linear(4, 3).double()
    gt = GradTail(layer)
    x = torch.randn(7, 5, 4, dtype=torch.float64)  # (T=7, B=5, d)
    with pytest.raises(ValueError, match="batch_dim=1"):
        gt.weights(layer(x).pow(2).sum((0, 2)))
    gt.remove()
    gt = GradTail(layer, batch_dim=1)
    for _ in range(2):
        out = layer(x)
        gt.weights(out.pow(2).sum((0, 2)))
    # Against the batch-first twin: identical scores.
    twin = GradTail(layer)
    twin.load_state_dict(gt.state_dict())
    gt.weights(layer(x).pow(2).sum((0, 2)))
    gt.remove()
    twin.discard()
    twin.weights(layer(x.transpose(0, 1)).pow(2).sum((1, 2)))
    torch.testing.assert_close(twin.last_alignment, gt.last_alignment, rtol=1e-12, atol=1e-14)


def test_sequence_first_lstm_tagger_with_batch_dim_1_matches_reference():
    model = Tagger(seed=45)
    with pytest.raises(ValueError, match=r"lstm \(LSTM\).*batch_dim"):
        GradTail(model)
    gt = GradTail(model, batch_dim=1, decay=DECAY)
    assert gt.layers == [model.head]
    gen = torch.Generator().manual_seed(46)
    data = [
        (torch.randn(5, 5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5, 5), generator=gen))
        for _ in range(3)
    ]  # (T, B) = (5, 5): the shapes cannot tell the layout

    def make_loss(step):
        x, y = data[step]
        logits = model(x)  # (T, B, 3)
        return F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction="none").reshape(5, 5).mean(0)

    check_alignment(gt, model, _tracked_params(gt), make_loss)


def test_multihead_attention_projection_given_explicitly_is_refused():
    attn = nn.MultiheadAttention(4, 2)
    with pytest.raises(TypeError, match="out_proj"):
        GradTail([attn.out_proj])
    with pytest.raises(ValueError, match="LazyLinear"):
        GradTail(nn.Sequential(nn.LazyLinear(3)))


# ----------------------------------------------------------------------- tied embeddings (LMs)
def _tokens(steps=3, batch=4, time=5, vocab=11):
    gen = torch.Generator().manual_seed(29)
    return [torch.randint(0, vocab, (batch, time + 1), generator=gen) for _ in range(steps)]


def test_tied_embedding_backward_equals_weighted_backward():
    data = _tokens()

    def make_loss(m, step):
        idx = data[step]
        return sequence_loss(m(idx[:, :-1]), idx[:, 1:])

    check_backward(TiedLM(seed=30), lambda m: m, make_loss, path="weighted backward")


def test_causal_lm_with_tied_weights_scores_the_tracked_uses():
    model, data = TiedLM(seed=31, causal=True), _tokens()
    with pytest.warns(UserWarning, match="out_proj"):
        gt = GradTail(model, decay=DECAY)

    def make_loss(step, detach=False):
        idx = data[step]
        return sequence_loss(model(idx[:, :-1], detach_embedding=detach), idx[:, 1:])

    check_alignment(gt, model, _tracked_params(gt), make_loss, reference_loss=lambda s: make_loss(s, True))


# ------------------------------------------------------------------------------ checkpointing
def test_reentrant_checkpointing_is_refused_clearly():
    model = Checkpointed(True, seed=42)
    gt = GradTail(model)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)  # reentrant needs a grad input
    with pytest.raises(RuntimeError, match=r"use_reentrant=True.*use_reentrant=False"):
        gt.weights(model(x).pow(2).sum(1))
    gt.discard()
    with pytest.raises(RuntimeError, match=r"did not run.*use_reentrant=True"):
        gt.weights(model(x.detach()).pow(2).sum(1))


def test_non_reentrant_checkpointing_matches_the_plain_model():
    gen = torch.Generator().manual_seed(32)
    data = [
        (torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
        for _ in range(3)
    ]
    model = Checkpointed(False, seed=33)
    plain = Checkpointed(False, seed=33, active=False)
    gt, gt_plain = GradTail(model, decay=DECAY), GradTail(plain, decay=DECAY)

    def make_loss(m, step):
        x, y = data[step]
        return F.cross_entropy(m(x), y, reduction="none")

    for step in range(3):
        model.zero_grad(), plain.zero_grad()
        w = gt.backward(make_loss(model, step))
        w_plain = gt_plain.backward(make_loss(plain, step))
        assert gt.last_backward == gt_plain.last_backward == "book-keeping"
        torch.testing.assert_close(gt.last_alignment, gt_plain.last_alignment, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(w, w_plain, rtol=0, atol=0)
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
            for p in plain.parameters():
                p -= 0.1 * p.grad
    # weights() then the user's own weighted backward: recomputation does not count as a forward.
    loss = make_loss(model, 0)
    (gt.weights(loss) * loss).mean().backward()
    loss = make_loss(model, 1)
    gt.weights(loss)


# -------------------------------------------------------------------------- copies and pickles
def test_deepcopy_teacher_is_an_independent_model():
    model = mlp(seed=34)
    gt = GradTail(model, decay=DECAY)
    teacher = copy.deepcopy(model)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 4, (6,))
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    independent = mlp(seed=34)
    with torch.no_grad():
        for p in independent.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(teacher(x), independent(x), rtol=0, atol=0)
    # A teacher forward in train mode with grad does not count as the student's forward.
    for _ in range(2):
        loss = F.cross_entropy(model(x), y, reduction="none")
        teacher(x)
        gt.backward(loss)
    gt.remove()


def test_model_with_gradtail_attached_pickles_and_saves():
    model = mlp(seed=35)
    gt = GradTail(model, decay=DECAY)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(4, 6, dtype=torch.float64)
    for other in (loaded, clone):
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
        with torch.no_grad():
            other[0].weight.zero_()
        assert not torch.equal(other(x), model(x))
    gt.discard()
    gt.backward(model(x).pow(2).sum(1))  # the original still trains
    assert gt.state.count == 1


# ---------------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_torch_compile_fullgraph_error_names_gradtail():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    GradTail(model)
    compiled = torch.compile(model, fullgraph=True)
    with pytest.raises(Exception, match="GradTail"):
        compiled(torch.randn(3, 6))


# ---------------------------------------------------------------------------------------- AMP
def test_transformer_under_bfloat16_autocast_tracks_float32():
    data = _sequences(True)
    model = Encoder(True, seed=36).float()
    exact = Encoder(True, seed=36).float()
    with pytest.warns(UserWarning, match="out_proj"):
        gt, gt_exact = GradTail(model, decay=DECAY), GradTail(exact, decay=DECAY)
    for step in range(3):
        x, y = data[step]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x.float()), y, reduction="none")
        gt.backward(loss)
        gt_exact.backward(F.cross_entropy(exact(x.float()), y, reduction="none"))
        assert gt.last_alignment.dtype == torch.float32
        if step:  # bfloat16 forwards: the alignments agree to bfloat16 precision
            torch.testing.assert_close(gt.last_alignment, gt_exact.last_alignment, rtol=0, atol=0.05)
        with torch.no_grad():
            for p, q in zip(model.parameters(), exact.parameters(), strict=True):
                assert p.grad is not None
                assert torch.isfinite(p.grad).all()
                p.copy_(q)  # both continue from the same parameters
                p.grad = None
                q.grad = None


# ------------------------------------------------------------------------ HF transformers GPT-2
def test_gradtail_does_not_import_transformers():
    # Conv1D is recognised only through sys.modules: a torch-only user never pays for the import.
    code = (
        "import sys, gradtail_torch, torch; "
        "gradtail_torch.GradTail(torch.nn.Sequential(torch.nn.Linear(2, 2))); "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gpt2_from_config_matches_reference():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(37)
    config = transformers.GPT2Config(
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=0,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).double().train()
    gt = GradTail(model, decay=DECAY)
    kinds = [type(m).__name__ for m in gt.layers]
    assert kinds.count("Conv1D") == 8
    assert kinds.count("Linear") == 1
    conv = next(m for m in gt.layers if isinstance(m, Conv1D))
    assert tuple(gt.state.mean[0][0].shape) == (conv.nf, conv.weight.shape[0])  # the core's (d_out, d_in)
    gen = torch.Generator().manual_seed(38)
    data = [torch.randint(0, 100, (3, 7), generator=gen) for _ in range(3)]
    wte = model.transformer.wte

    def make_loss(step, detach=False):
        idx = data[step]
        embeds = wte(idx).detach() if detach else None
        logits = model(input_ids=None if detach else idx, inputs_embeds=embeds).logits
        return sequence_loss(logits[:, :-1], idx[:, 1:])

    check_alignment(
        gt, model, _tracked_params(gt), make_loss, steps=2, reference_loss=lambda s: make_loss(s, True)
    )
    gt.remove()
    # gt.backward: the tied lm_head forces the weighted backward; .grad equals the twin's.
    model.zero_grad()

    def lm_loss(m, step):
        idx = data[step]
        return sequence_loss(m(input_ids=idx).logits[:, :-1], idx[:, 1:])

    check_backward(model, lambda m: m, lm_loss, steps=2, path="weighted backward")


def test_hf_conv1d_book_keeping_writes_its_own_layout():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(43)
    model = nn.Sequential(Conv1D(8, 5), nn.Tanh(), Conv1D(3, 8)).double()  # Conv1D(nf=d_out, nx=d_in)
    for m in model:
        if isinstance(m, Conv1D):
            nn.init.normal_(m.weight, std=0.5)
    gen = torch.Generator().manual_seed(44)
    data = [
        (torch.randn(6, 4, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6, 4), generator=gen))
        for _ in range(3)
    ]

    def make_loss(m, step):
        x, y = data[step]
        return F.cross_entropy(m(x).reshape(-1, 3), y.reshape(-1), reduction="none").reshape(6, 4).mean(1)

    gt = GradTail(model, decay=DECAY)
    check_alignment(gt, model, _tracked_params(gt), lambda s: make_loss(model, s))
    gt.remove()
    check_backward(model, lambda m: m, make_loss, path="book-keeping")

"""The mining API: gradtail_torch.score_dataset, gradtail_optax.score_batches, gradtail_ops.mining.

References are independent: per-example gradients materialised one example at a time by
autograd in float64, the reference and the cosines computed in NumPy.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from gradtail_ops import MemoryState
from gradtail_ops.mining import data_map, export_ranking, memory_arrays, rank

torch = pytest.importorskip("torch")
F = torch.nn.functional

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradtail_torch import GradTail, score_dataset  # noqa: E402


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties 1/2 (Mann-Whitney), by brute force."""
    pos, neg = score[positive], score[~positive]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def materialised_grads(model, layers, x, y, loss_fn):
    """(N, P) float64: each example's gradient on the layers' parameters, one backward each."""
    params = [p for m in layers for p in (m.weight, m.bias) if p is not None]
    rows = []
    for i in range(len(x)):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double().numpy())
    return np.stack(rows)


def numpy_cosines(g: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (g @ ref) / (np.linalg.norm(g, axis=1) * np.linalg.norm(ref))


def direction_reference(g: np.ndarray) -> np.ndarray:
    return (g / np.linalg.norm(g, axis=1, keepdims=True)).mean(axis=0)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def mlp(seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7),
        torch.nn.Tanh(),
        torch.nn.Linear(7, 3, bias=False),
        torch.nn.Tanh(),
        torch.nn.Linear(3, 4),
    ).to(dtype)


@pytest.mark.parametrize("reference", ["direction", "mean"])
def test_score_dataset_matches_float64_reference(reference):
    model = mlp()
    x, y = torch.randn(37, 5, dtype=torch.float64), torch.randint(0, 4, (37,))
    loader = DataLoader(TensorDataset(x, y), batch_size=10)  # an uneven last batch
    got, loss = score_dataset(model, loader, ce, reference=reference, return_loss=True, progress=True)
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    g = materialised_grads(model, layers, x, y, ce)
    ref = direction_reference(g) if reference == "direction" else g.mean(axis=0)
    np.testing.assert_allclose(got, numpy_cosines(g, ref), atol=1e-10)
    np.testing.assert_allclose(loss, ce(model(x), y).detach().numpy(), atol=1e-12)
    assert got.dtype == np.float64
    assert got.shape == (37,)


def test_score_dataset_on_chosen_layers_dict_batches_and_sequences():
    torch.manual_seed(1)

    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Linear(3, 6)
            self.head = torch.nn.Linear(6, 2)

        def forward(self, tokens):
            return self.head(torch.tanh(self.emb(tokens))).mean(dim=1)  # (B, T, d) through the head

    model = Seq().double()
    x, y = torch.randn(9, 4, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    batches = [{"tokens": x[i : i + 4], "label": y[i : i + 4]} for i in range(0, 9, 4)]
    got = score_dataset(
        model, batches, ce, modules=[model.head], batch_fn=lambda b: ({"tokens": b["tokens"]}, b["label"])
    )
    g = materialised_grads(model, [model.head], x, y, ce)
    np.testing.assert_allclose(got, numpy_cosines(g, direction_reference(g)), atol=1e-10)


def test_score_dataset_against_a_trained_gradtail_state():
    model = mlp(2)
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 4, (24,))
    gt = GradTail(model[-1], decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(0, 24, 8):
        opt.zero_grad()
        gt.backward(ce(model(x[i : i + 8]), y[i : i + 8]))
        opt.step()
    # The reference the state holds, read out before scoring (the state's own bias correction).
    w_ref, b_ref = (t.numpy() for t in gt.state.mean[0])
    ref = np.concatenate([w_ref.reshape(-1), b_ref])
    got = score_dataset(model, [(x, y)], ce, state=gt)
    g = materialised_grads(model, [model[-1]], x, y, ce)
    np.testing.assert_allclose(got, numpy_cosines(g, ref), atol=1e-10)
    gt.discard()  # the reference's own forwards above went through its hooks
    assert gt.backward(ce(model(x[:8]), y[:8])).shape == (8,)  # the hooks still work after scoring
    gt.remove()


def test_score_dataset_keeps_mode_frozen_layers_and_non_finite():
    model = mlp(3)
    for p in model[:2].parameters():
        p.requires_grad_(False)
    model.train()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    x[2, 0] = float("nan")
    got = score_dataset(model, [(x, y)], ce, modules=[model[0], model[-1]])
    assert model.training
    assert np.isnan(got[2])
    assert np.isfinite(np.delete(got, 2)).all()
    keep = np.arange(6) != 2
    g = materialised_grads(model.requires_grad_(True), [model[0], model[-1]], x[keep], y[keep], ce)
    np.testing.assert_allclose(got[keep], numpy_cosines(g, direction_reference(g)), atol=1e-10)


def test_score_dataset_errors_name_the_argument():
    model = mlp()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 4, (4,))
    with pytest.raises(ValueError, match=r"one loss per example.*Received: \(\)"):
        score_dataset(model, [(x, y)], lambda o, t: F.cross_entropy(o, t))
    with pytest.raises(TypeError, match="one-shot iterator"):
        score_dataset(model, iter([(x, y)]), ce)
    with pytest.raises(ValueError, match="shuffles"):
        score_dataset(model, DataLoader(TensorDataset(x, y), shuffle=True), ce)
    with pytest.raises(ValueError, match="empty loader"):
        score_dataset(model, [], ce)
    with pytest.raises(ValueError, match="no reference yet"):
        score_dataset(model, [(x, y)], ce, state=GradTail(model))
    with pytest.raises(ValueError, match="`modules`"):
        score_dataset(model, [(x, y)], ce, modules=[model[1]])


def rare_subgroup_data(n: int = 600, seed: int = 0):
    """Two classes split by x0; a 5% subgroup (x1 > 2.2, shifted) follows the opposite rule."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    rare = np.zeros(n, dtype=bool)
    rare[: n // 20] = True
    x[rare, 1] += 3.0
    y = (x[:, 0] > 0).astype(np.int64)
    y[rare] = 1 - y[rare]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y), rare


def test_score_dataset_ranks_a_rare_subgroup_low():
    x, y, rare = rare_subgroup_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # a short training: the head rule is learnt, the subgroup not yet
        for i in range(0, len(y), 50):
            opt.zero_grad()
            ce(model(x[i : i + 50]), y[i : i + 50]).mean().backward()
            opt.step()
    scores = score_dataset(model, DataLoader(TensorDataset(x, y), batch_size=64), ce)
    assert auroc(-scores, rare) > 0.9
    order = rank(scores)
    assert rare[order[: rare.sum()]].mean() > 0.6  # most of the lowest-ranked are the subgroup


def test_score_batches_matches_reference_and_torch():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    pytest.importorskip("optax")
    from gradtail_optax import score_batches

    was_x64 = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        model = mlp(4)
        x, y = torch.randn(21, 5, dtype=torch.float64), torch.randint(0, 4, (21,))
        params = [
            (
                jnp.asarray(m.weight.detach().numpy()),
                None if m.bias is None else jnp.asarray(m.bias.detach().numpy()),
            )
            for m in model
            if isinstance(m, torch.nn.Linear)
        ]

        def loss(p, xi, yi):
            h = xi
            for k, (w, b) in enumerate(p):
                h = h @ w.T + (0.0 if b is None else b)
                h = jnp.tanh(h) if k < len(p) - 1 else h
            return -jax.nn.log_softmax(h)[yi]

        grad_fn = jax.vmap(jax.grad(loss), (None, 0, 0))
        batches = [
            (jnp.asarray(x[i : i + 8].numpy()), jnp.asarray(y[i : i + 8].numpy())) for i in range(0, 21, 8)
        ]
        got = score_batches(lambda p, b: grad_fn(p, *b), params, batches)
        g = materialised_grads(model, [m for m in model if isinstance(m, torch.nn.Linear)], x, y, ce)
        np.testing.assert_allclose(got, numpy_cosines(g, direction_reference(g)), atol=1e-10)
        torch_scores = score_dataset(model, DataLoader(TensorDataset(x, y), batch_size=5), ce)
        np.testing.assert_allclose(got, torch_scores, atol=1e-10)
        with pytest.raises(TypeError, match="one-shot iterator"):
            score_batches(lambda p, b: grad_fn(p, *b), params, iter(batches))
    finally:
        jax.config.update("jax_enable_x64", was_x64)


def test_score_batches_against_a_gradtail_state():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    from gradtail_optax import gradtail, score_batches

    key = jax.random.key(0)
    x = jax.random.normal(key, (16, 3))
    y = x[:, 0]
    params = {"w": jnp.ones(3) * 0.1}

    def loss(p, xi, yi):
        return (xi @ p["w"] - yi) ** 2

    grad_fn = jax.vmap(jax.grad(loss), (None, 0, 0))
    tx = optax.chain(gradtail(batch_size=8, decay=0.5), optax.sgd(0.1))
    state = tx.init(params)
    for i in (0, 8):
        updates, state = tx.update(grad_fn(params, x[i : i + 8], y[i : i + 8]), state, params)
        params = optax.apply_updates(params, updates)
    gt_state = state[0]
    got = score_batches(lambda p, b: grad_fn(p, *b), params, [(x[:8], y[:8]), (x[8:], y[8:])], state=gt_state)
    g = np.asarray(grad_fn(params, x, y)["w"], dtype=np.float64)
    ref = np.asarray(gt_state.ema.mean[0], dtype=np.float64)
    np.testing.assert_allclose(got, numpy_cosines(g, ref), atol=1e-5)


def test_rank_and_memory_arrays():
    scores = np.array([0.2, np.nan, -0.4, 0.2, -1.0])
    assert rank(scores).tolist() == [4, 2, 0, 3, 1]
    score, visits = memory_arrays(MemoryState(score=np.array([0.5, 0.0, -1.0]), visits=np.array([1, 0, 3])))
    assert np.isnan(score[1])
    assert score[2] == -1.0
    assert visits.tolist() == [1, 0, 3]
    gt = GradTail(torch.nn.Linear(3, 2), memory_size=5)
    s, v = memory_arrays(gt.memory_scores(), unvisited=0.0)
    assert s.tolist() == [0.0] * 5
    assert v.dtype == np.int64
    with pytest.raises(ValueError, match="same shape"):
        memory_arrays((np.zeros(3), np.zeros(2)))


def test_export_ranking_csv_and_parquet(tmp_path):
    scores = np.array([0.3, -0.5, 0.1])
    path = export_ranking(
        tmp_path / "a" / "r.csv", scores, loss=np.array([1.0, 2.0, 3.0]), label=np.array([7, 8, 9]),
        index=np.array([10, 11, 12]), extra={"visits": np.array([1, 2, 3])},
    )  # fmt: skip
    rows = list(csv.DictReader(path.open()))
    assert [r["index"] for r in rows] == ["11", "12", "10"]
    assert [float(r["score"]) for r in rows] == [-0.5, 0.1, 0.3]
    assert [r["loss"] for r in rows] == ["2.0", "3.0", "1.0"]
    assert [r["label"] for r in rows] == ["8", "9", "7"]
    assert [r["visits"] for r in rows] == ["2", "3", "1"]
    assert [r["rank"] for r in rows] == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"`label` must have shape \(3,\)"):
        export_ranking(tmp_path / "x.csv", scores, label=np.zeros(2))
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frame = pd.read_parquet(export_ranking(tmp_path / "r.parquet", scores, label=np.array([7, 8, 9])))
    assert frame["index"].tolist() == [1, 2, 0]
    assert frame["label"].tolist() == [8, 9, 7]


def test_data_map_against_numpy_and_figures(tmp_path):
    rng = np.random.default_rng(0)
    history = rng.normal(size=(4, 30))
    history[1, 3] = np.nan
    mean, variability = data_map(history)
    np.testing.assert_allclose(mean[4:], history[:, 4:].mean(axis=0))
    np.testing.assert_allclose(variability[4:], history[:, 4:].std(axis=0))
    col = history[[0, 2, 3], 3]
    assert mean[3] == pytest.approx(col.mean())
    assert variability[3] == pytest.approx(col.std())
    with pytest.raises(ValueError, match=r"shape \(E, N\)"):
        data_map(np.zeros(3))
    pytest.importorskip("matplotlib")
    from gradtail_ops.mining import plot_data_map, save_image_grid

    plot_data_map(history, path=tmp_path / "map.png", labels=np.arange(30) % 3)
    assert (tmp_path / "map.png").read_bytes().startswith(b"\x89PNG")
    order = rank(mean)
    grid = save_image_grid(
        tmp_path / "grid.png", rng.random((30, 16)), [("tail", order[:5]), ("head", order[::-1][:5])],
        titles=[f"c{k}" for k in range(30)], image_shape=(4, 4), columns=4,
    )  # fmt: skip
    assert grid.read_bytes().startswith(b"\x89PNG")


def test_score_head_batches_equals_materialised_head_scores():
    """The factored head path against score_batches on the head's materialised gradients, and
    against a head_weights state's reference in NumPy."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    from gradtail_optax import (
        head_init,
        head_weights,
        loss_and_output_grads,
        score_batches,
        score_head_batches,
    )

    ce_jax = optax.softmax_cross_entropy_with_integer_labels
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "body": jax.random.normal(key1, (5, 6)) * 0.5,
        "head": {"kernel": jax.random.normal(key2, (6, 3)) * 0.5, "bias": jnp.full(3, 0.1)},
    }
    x = jax.random.normal(key3, (20, 5))
    y = jnp.arange(20) % 3
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]

    def head_fn(p, batch):
        h = jnp.tanh(batch[0] @ p["body"])
        return h, loss_and_output_grads(ce_jax, h @ p["head"]["kernel"] + p["head"]["bias"], batch[1])[1]

    def head_grads(p, batch):
        def loss(hp, xi, yi):
            return ce_jax(jnp.tanh(xi @ p["body"]) @ hp["kernel"] + hp["bias"], yi)

        return jax.vmap(jax.grad(loss), (None, 0, 0))(p["head"], *batch)

    got = score_head_batches(head_fn, params, batches)
    np.testing.assert_allclose(got, score_batches(head_grads, params, batches), atol=2e-5)
    state = head_init(params["head"], batch_size=8)
    for batch in batches[:2]:
        _, _, state = head_weights(state, *head_fn(params, batch), decay=0.5)
    got = score_head_batches(head_fn, params, batches, state=state)
    g = head_grads(params, (x, y))
    flat = np.concatenate(
        [np.asarray(g["bias"], np.float64), np.asarray(g["kernel"], np.float64).reshape(20, -1)], 1
    )
    kernel_ref, bias_ref = (np.asarray(t, np.float64) for t in state.ema.mean[0])
    ref = np.concatenate([bias_ref, kernel_ref.T.reshape(-1)])  # the state keeps (d_out, d_in)
    np.testing.assert_allclose(got, numpy_cosines(flat, ref), atol=2e-5)


class _Encoder(torch.nn.Module):
    """A transformer encoder classifier: its attention's out_proj runs through its weight only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(3, 8)
        layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def test_score_dataset_on_a_transformer_leaves_out_attention_out_proj_with_a_warning():
    model = _Encoder().double()
    x, y = torch.randn(12, 5, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    skipped = r"score_dataset does not track \['encoder.layers.0.self_attn.out_proj'\]"
    with pytest.warns(UserWarning, match=skipped):
        got = score_dataset(model, loader, ce)
    out_proj = model.encoder.layers[0].self_attn.out_proj
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not out_proj]
    assert len(layers) == 4  # embed, the two feed-forward layers, head
    g = materialised_grads(model, layers, x, y, ce)
    np.testing.assert_allclose(got, numpy_cosines(g, direction_reference(g)), atol=1e-10)
    with pytest.raises(ValueError, match="`modules` holds a layer score_dataset cannot score"):
        score_dataset(model, loader, ce, modules=[out_proj, model.head])

"""gradtail_optax against independent float64 NumPy references, PyTorch, and itself sharded.

The references build every per-example gradient by hand (a tanh MLP with a softmax head) and
apply the GradTail definition from tests/reference.py; nothing here reuses gradtail_ops.
Float64 runs enable ``jax_enable_x64`` only inside the tests that need it.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import gradtail_optax  # noqa: E402
from gradtail_optax import (  # noqa: E402
    GradTailState,
    gradtail,
    head,
    loss_and_output_grads,
)

from . import _optax_sharded_worker as sharded  # noqa: E402
from . import reference as ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEAD_ONLY = {"head": True, "hidden": False}
D_IN, HIDDEN, CLASSES = 5, 6, 3


# ------------------------------------------------------------------------------ the model


def make_params(seed: int = 0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    p = {
        "hidden": {"kernel": rng.normal(size=(D_IN, HIDDEN)), "bias": 0.1 * rng.normal(size=HIDDEN)},
        "head": {"kernel": rng.normal(size=(HIDDEN, CLASSES)), "bias": 0.1 * rng.normal(size=CLASSES)},
    }
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), p)


def make_batch(seed: int, batch: int = 8, dtype=np.float32):
    rng = np.random.default_rng(100 + seed)
    return jnp.asarray(rng.normal(size=(batch, D_IN)), dtype), jnp.asarray(rng.integers(0, CLASSES, batch))


def features(p, x):
    return jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])


def head_forward(p, x, y):
    """Per-example losses, shape (B,), with the features (B, HIDDEN) and logits (B, CLASSES) as aux."""
    h = features(p, x)
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y), (h, logits)


def per_example_losses(p, x, y):
    h = features(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["head"]["kernel"] + p["head"]["bias"], y)


def example_loss(p, x, y):  # one example: x (D_IN,), y ()
    return per_example_losses(p, x[None], y[None])[0]


def per_example_grads(p, x, y):
    return jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(p, x, y)


jit_grads = jax.jit(per_example_grads)


def numpy_per_example_grads(p, x, y) -> dict:
    """Each example's gradient of the cross-entropy, by hand, in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x, y = np.asarray(x, np.float64), np.asarray(y)
    h = np.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    z = h @ p["head"]["kernel"] + p["head"]["bias"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    dz = e / e.sum(axis=1, keepdims=True)
    dz[np.arange(len(y)), y] -= 1.0
    da = (dz @ p["head"]["kernel"].T) * (1.0 - h**2)
    return {
        "head": {"kernel": h[:, :, None] * dz[:, None, :], "bias": dz},
        "hidden": {"kernel": x[:, :, None] * da[:, None, :], "bias": da},
    }


def flat_rows(grads: dict, names) -> np.ndarray:
    b = grads["head"]["bias"].shape[0]
    return np.concatenate([np.asarray(grads[m][k], np.float64).reshape(b, -1) for m, k in names], axis=1)


ALL = [("head", "bias"), ("head", "kernel"), ("hidden", "bias"), ("hidden", "kernel")]
HEAD = [("head", "bias"), ("head", "kernel")]


def default_weights(align: np.ndarray) -> np.ndarray:
    """The library default curve: rank, lowest 30% weighted 3x, normalised to mean 1."""
    w = ref.rank_weights(align, 0.3, 3.0)
    return w / w.mean()


def gt_state(opt_state) -> GradTailState:
    return opt_state[0]


# ------------------------------------------------------------------------- the references


@pytest.mark.parametrize(
    ("reference", "mask", "schedule"),
    [("direction", None, False), ("mean", HEAD_ONLY, True)],
    ids=["direction-all", "mean-head-schedule"],
)
def test_transform_matches_float64_reference(reference, mask, schedule):
    decays = (lambda c: 0.5 + 0.1 * c) if schedule else (lambda c: 0.8)
    names = HEAD if mask else ALL
    lr, steps, batch = 0.5, 5, 8
    with jax.enable_x64(True):
        params = make_params(0, np.float64)
        tx = optax.chain(
            gradtail(
                batch_size=batch,
                decay=(lambda c: 0.5 + 0.1 * c) if schedule else 0.8,
                reference=reference,
                alignment_mask=mask,
            ),
            optax.sgd(lr),
        )
        state = tx.init(params)

        @jax.jit
        def step(params, state, x, y):
            updates, state = tx.update(per_example_grads(params, x, y), state, params)
            return optax.apply_updates(params, updates), updates, state

        ref_params = jax.tree.map(np.asarray, params)
        history, used = [], []
        for t in range(steps):
            x, y = make_batch(t, batch, np.float64)
            g = numpy_per_example_grads(ref_params, x, y)
            flat = flat_rows(g, names)
            if history:
                align = ref.cosine_rows(flat, ref.ema(history, used))
                w = default_weights(align)
            else:
                align, w = np.zeros(batch), np.ones(batch)
            norms = np.linalg.norm(flat, axis=1)
            coef = 1.0 / norms if reference == "direction" else np.ones(batch)
            history.append((coef[:, None] * flat).mean(axis=0))
            used.append(decays(t))
            expected = jax.tree.map(lambda a, w=w: np.tensordot(w, a, axes=1) / batch, g)

            params, updates, state = step(params, state, x, y)
            for m, k in ALL:
                np.testing.assert_allclose(updates[m][k], -lr * expected[m][k], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(optax.tree.get(state, "weights"), w, rtol=1e-12)
            if t:
                np.testing.assert_allclose(optax.tree.get(state, "alignment"), align, rtol=1e-9, atol=1e-12)
            ref_params = jax.tree.map(lambda p, e: p - lr * e, ref_params, expected)
        # The reference gradient of the scored leaves, in their flattening order.
        ema = np.concatenate([np.ravel(m) for m in gt_state(state).ema.mean])
        np.testing.assert_allclose(ema, ref.ema(history, used), rtol=1e-9, atol=1e-12)
        assert int(gt_state(state).count) == steps
        assert int(gt_state(state).ema.count) == steps
        assert step._cache_size() == 1


def test_max_weight_one_is_the_plain_mean_gradient():
    params = make_params(1)
    tx_gt = optax.chain(gradtail(batch_size=8, max_weight=1.0), optax.adam(1e-2))
    tx = optax.adam(1e-2)
    s_gt, s = tx_gt.init(params), tx.init(params)
    p_gt, p = params, params

    @jax.jit
    def steps(p_gt, s_gt, p, s, x, y):
        u_gt, s_gt = tx_gt.update(per_example_grads(p_gt, x, y), s_gt, p_gt)
        u, s = tx.update(jax.grad(lambda q: per_example_losses(q, x, y).mean())(p), s, p)
        return optax.apply_updates(p_gt, u_gt), s_gt, optax.apply_updates(p, u), s

    for t in range(3):
        p_gt, s_gt, p, s = steps(p_gt, s_gt, p, s, *make_batch(t))
        np.testing.assert_array_equal(optax.tree.get(s_gt, "weights"), 1.0)
        assert optax.tree.allclose(p_gt, p, rtol=1e-5, atol=1e-6)


def test_head_path_matches_sequence_reference():
    """(B, T, d_in) inputs: alignments and reference equal the materialised float64 ones."""
    rng = np.random.default_rng(3)
    batch, steps_t, d_in, d_out, decay = 4, 3, 5, 2, 0.7
    with jax.enable_x64(True):
        ht = head(batch_size=batch, decay=decay, reference="mean")
        state = ht.init({"kernel": jnp.zeros((d_in, d_out)), "bias": jnp.zeros(d_out)})
        fn = jax.jit(ht.update)
        history = []
        for _ in range(4):
            a, d = rng.normal(size=(batch, steps_t, d_in)), rng.normal(size=(batch, steps_t, d_out))
            flat = ref.flatten_examples(ref.per_example_linear_grads(a, d, bias=True))
            w, align, state = fn(state, jnp.asarray(a), jnp.asarray(d))
            if history:
                expected = ref.cosine_rows(flat, ref.ema(history, [decay] * len(history)))
                np.testing.assert_allclose(align, expected, rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(w, default_weights(expected), rtol=1e-12)
            else:
                np.testing.assert_array_equal(w, 1.0)
            history.append(flat.mean(axis=0))
        mean = ref.ema(history, [decay] * len(history))
        kernel, bias = state.ema.mean[0]
        # The head state keeps the kernel's reference in the core's (d_out, d_in) layout.
        assert kernel.shape == (d_out, d_in)
        np.testing.assert_allclose(kernel, mean[: d_out * d_in].reshape(d_out, d_in), rtol=1e-9)
        np.testing.assert_allclose(bias, mean[d_out * d_in :], rtol=1e-9)
        assert fn._cache_size() == 1


def head_path_step(ht, state, params, x, y, index=None):
    """``ht.update`` (a `head` transform) on one batch of the test MLP: features, logits, output gradients."""
    h = features(params, x)
    logits = h @ params["head"]["kernel"] + params["head"]["bias"]
    _, dlogits = loss_and_output_grads(optax.softmax_cross_entropy_with_integer_labels, logits, y)
    return ht.update(state, h, dlogits, index=index)


def test_head_path_equals_transform_on_the_head():
    params, batch = make_params(2), 16
    tx = gradtail(batch_size=batch, decay=0.9, alignment_mask=HEAD_ONLY)
    s_tx = tx.init(params)
    ht = head(batch_size=batch, decay=0.9)
    s_head = ht.init(params["head"])
    head_fn = jax.jit(lambda s, x, y: head_path_step(ht, s, params, x, y))
    tx_fn = jax.jit(lambda s, x, y: tx.update(per_example_grads(params, x, y), s, params)[1])
    for t in range(4):
        x, y = make_batch(t, batch)
        s_tx = tx_fn(s_tx, x, y)
        w, align, s_head = head_fn(s_head, x, y)
        np.testing.assert_allclose(w, s_tx.weights, rtol=1e-6)
        np.testing.assert_allclose(align, s_tx.alignment, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(s_head.weights, w)
    tx_bias, tx_kernel = s_tx.ema.mean  # flattening order: bias, kernel
    head_kernel, head_bias = s_head.ema.mean[0]  # the kernel's reference as (d_out, d_in)
    np.testing.assert_allclose(head_kernel.T, tx_kernel, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(head_bias, tx_bias, rtol=1e-5, atol=1e-7)
    assert head_fn._cache_size() == 1


def torch_model_like(params):
    """The test MLP as a float64 ``torch.nn.Sequential`` (Linear, Tanh, Linear) holding ``params``."""
    import torch

    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)
    ).double()
    with torch.no_grad():
        for layer, name in ((model[0], "hidden"), (model[2], "head")):
            layer.weight.copy_(torch.tensor(np.array(params[name]["kernel"]).T))  # (d_out, d_in)
            layer.bias.copy_(torch.tensor(np.array(params[name]["bias"])))
    return model


@pytest.mark.parametrize("scope", ["head", "all"])
def test_same_weights_as_gradtail_torch(scope):
    torch = pytest.importorskip("torch")
    from gradtail_torch import GradTail

    params, batch = make_params(4), 16
    model = torch_model_like(params)
    gt = GradTail(model[2] if scope == "head" else model, decay=0.9)
    tx = gradtail(batch_size=batch, decay=0.9, alignment_mask=HEAD_ONLY if scope == "head" else None)
    s_tx = tx.init(params)
    ht = head(batch_size=batch, decay=0.9)
    s_head = ht.init(params["head"])
    tx_fn = jax.jit(lambda s, x, y: tx.update(per_example_grads(params, x, y), s, params)[1])
    head_fn = jax.jit(lambda s, x, y: head_path_step(ht, s, params, x, y))
    for t in range(4):
        x, y = make_batch(t, batch)
        loss = torch.nn.functional.cross_entropy(
            model(torch.tensor(np.array(x), dtype=torch.float64)),
            torch.tensor(np.array(y), dtype=torch.int64),
            reduction="none",
        )
        w_torch = gt.weights(loss).numpy()
        s_tx = tx_fn(s_tx, x, y)
        np.testing.assert_allclose(s_tx.weights, w_torch, rtol=1e-6)
        np.testing.assert_allclose(s_tx.alignment, gt.last_alignment.numpy(), atol=1e-5)
        if scope == "head":
            w_head, _, s_head = head_fn(s_head, x, y)
            np.testing.assert_allclose(w_head, w_torch, rtol=1e-6)
    gt.remove()


# ------------------------------------------------------------------------------- training


def long_tailed_blobs(seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = [160, 48, 16, 8]
    centers = 2.0 * rng.normal(size=(len(counts), D_IN))
    x = np.concatenate([c + rng.normal(size=(n, D_IN)) for c, n in zip(centers, counts, strict=True)])
    y = np.concatenate([np.full(n, k) for k, n in enumerate(counts)])
    order = rng.permutation(len(y))
    return jnp.asarray(x[order], jnp.float32), jnp.asarray(y[order] % CLASSES)


def test_jitted_long_tail_training_without_recompiling():
    x_all, y_all = long_tailed_blobs()
    batch, n_steps = 32, 24
    opt = optax.adam(3e-2)

    tx = gradtail(opt, batch_size=batch, decay=0.9)
    ht = head(batch_size=batch, decay=0.9)

    @jax.jit
    def transform_step(params, state, x, y):
        updates, state = tx.update(per_example_grads(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def head_step(params, opt_state, gt, x, y):
        _, backward, (h, logits) = jax.vjp(lambda p: head_forward(p, x, y), params, has_aux=True)
        _, dlogits = loss_and_output_grads(optax.softmax_cross_entropy_with_integer_labels, logits, y)
        w, _, gt = ht.update(gt, h, dlogits)
        (grads,) = backward(w / batch)  # the weighted loss, differentiated once
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, gt

    p1 = p2 = make_params(5)
    s1, s2, gt = tx.init(p1), opt.init(p2), ht.init(p2["head"])
    start = float(per_example_losses(p1, x_all, y_all).mean())
    for t in range(n_steps):
        lo = (t * batch) % (len(y_all) - batch)
        x, y = x_all[lo : lo + batch], y_all[lo : lo + batch]
        p1, s1 = transform_step(p1, s1, x, y)
        p2, s2, gt = head_step(p2, s2, gt, x, y)
    assert transform_step._cache_size() == 1  # compiled once: no retracing after the first step
    assert head_step._cache_size() == 1
    for p, state in ((p1, gt_state(s1)), (p2, gt)):
        assert float(per_example_losses(p, x_all, y_all).mean()) < 0.7 * start
        assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(state))
        w = optax.tree.get(state, "weights")
        assert w.shape == (batch,)
        assert abs(float(w.mean()) - 1.0) < 1e-5
        assert float(w.max()) > 1.0
        assert int(state.count) == n_steps


# ------------------------------------------------------------------ composition and state


def test_multisteps_after_gradtail_accumulates_weighted_means():
    params, k, lr = make_params(6), 2, 0.1
    tx = optax.chain(gradtail(batch_size=8, decay=0.9), optax.MultiSteps(optax.sgd(lr), every_k_schedule=k))
    alone = gradtail(batch_size=8, decay=0.9)
    state, s_alone = tx.init(params), alone.init(params)
    outputs = []
    for t in range(k):
        x, y = make_batch(t)
        g = jit_grads(params, x, y)
        updates, state = jax.jit(tx.update)(g, state, params)
        out, s_alone = jax.jit(alone.update)(g, s_alone, params)
        outputs.append(out)
    expected = jax.tree.map(lambda *o: -lr * sum(o) / k, *outputs)
    assert optax.tree.allclose(updates, expected, rtol=1e-6, atol=1e-7)
    assert int(gt_state(state).count) == k  # every micro-batch is scored and folded in


@pytest.mark.parametrize(
    ("wrap", "name"),
    [
        (lambda t: optax.MultiSteps(t, every_k_schedule=2), "optax.MultiSteps"),
        (lambda t: optax.apply_if_finite(t, 3), "optax.apply_if_finite"),
    ],
    ids=["MultiSteps", "apply_if_finite"],
)
def test_gradtail_inside_a_wrapper_is_refused(wrap, name):
    params = make_params(0)
    tx = wrap(optax.chain(gradtail(batch_size=8), optax.sgd(0.1)))
    x, y = make_batch(0)
    with pytest.raises(TypeError, match=rf"cannot run inside {name}.*must come first"):
        tx.update(jit_grads(params, x, y), tx.init(params), params)


def test_checkpoint_round_trip_resumes_identically(tmp_path):
    params = make_params(7)
    tx = optax.chain(gradtail(batch_size=8, decay=0.9), optax.adam(1e-2))
    step = jax.jit(lambda p, s, x, y: tx.update(per_example_grads(p, x, y), s, p))
    state = tx.init(params)
    for t in range(2):
        _, state = step(params, state, *make_batch(t))
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps(jax.device_get(state)))
    restored = jax.tree.map(jnp.asarray, pickle.loads(path.read_bytes()))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(gt_state(restored), GradTailState)
    for t in range(2, 4):
        u1, state = step(params, state, *make_batch(t))
        u2, restored = step(params, restored, *make_batch(t))
        for a, b in zip(jax.tree.leaves((u1, state)), jax.tree.leaves((u2, restored)), strict=True):
            np.testing.assert_array_equal(a, b)
    assert step._cache_size() == 1


def test_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = make_params(7)
    tx = optax.chain(gradtail(batch_size=8), optax.sgd(0.1))
    state = tx.update(jit_grads(params, *make_batch(0)), tx.init(params), params)[1]
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(tx.init, params))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)


def test_data_parallel_state_equals_single_device_run(tmp_path):
    """2 devices with axis_name: the state (and the parameters) equal a single-device run on the
    whole batch, for the transformation (shard_map and pmap) and the efficient path (shard_map)."""
    out = tmp_path / "sharded.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(Path(sharded.__file__)), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    got = np.load(out)
    with jax.enable_x64(True):
        params0, batches = sharded.problem()
        tx = optax.chain(gradtail(batch_size=sharded.BATCH, **sharded.OPTIONS), optax.sgd(sharded.LR))
        for path in ("transform", "pmap", "head"):
            params = jax.tree.map(jnp.asarray, params0)
            if path in ("transform", "pmap"):
                state, step = tx.init(params), jax.jit(sharded.transform_step(tx))
            else:
                state, step = sharded.head_init(params, sharded.BATCH), jax.jit(sharded.head_step())
            for t, (x, y) in enumerate(batches):
                params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
                gt = state[1] if path == "head" else state[0]
                for key, value in sharded.flat_state(gt, params).items():
                    np.testing.assert_allclose(
                        got[f"{path}_step{t}_{key}"], value, rtol=1e-10, atol=1e-13, err_msg=f"{path} {key}"
                    )
            assert int(got[f"{path}_step{len(batches) - 1}_ema_count"]) == len(batches)
    # Per-example gradients taken w.r.t. replicated parameters are summed over the devices by
    # JAX: gradtail refuses them with the fix in the message.
    assert bool(got["replicated_grads_refused"])


# ------------------------------------------------------------------------------ bad input


def test_non_finite_example_is_neutral_and_state_stays_finite():
    params, batch = make_params(8), 8
    tx = gradtail(batch_size=batch, decay=0.9, normalize=False)
    state = tx.init(params)
    x, y = make_batch(0)
    update = jax.jit(tx.update)
    _, state = update(jit_grads(params, x, y), state, params)
    before = state.ema
    x, y = make_batch(1)
    g = jit_grads(params, x, y)
    g = jax.tree.map(lambda a: a.at[3].set(jnp.nan), g)
    updates, state = update(g, state, params)
    assert np.isnan(state.alignment[3])
    assert np.isfinite(np.delete(np.asarray(state.alignment), 3)).all()
    assert float(state.weights[3]) == 1.0
    assert bool(jnp.isfinite(state.weights).all())
    # The batch does not move the reference; the step is counted.
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.ema), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state.count) == 2
    assert int(state.ema.count) == 1
    assert not all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))  # nothing dropped

    # What follows gradtail can skip such a step: optax.apply_if_finite after it.
    chained = optax.chain(tx, optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3))
    u, s = jax.jit(chained.update)(g, chained.init(params), params)
    assert all(bool((leaf == 0).all()) for leaf in jax.tree.leaves(u))
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(gt_state(s).ema))


def test_missing_batch_axis_names_the_leaf_and_shapes():
    params = make_params(0)
    tx = optax.chain(gradtail(batch_size=8), optax.sgd(0.1))
    state = tx.init(params)
    x, y = make_batch(0)
    mean_grads = jax.tree.map(lambda g: g.mean(0), jit_grads(params, x, y))
    lacks = r"\['head'\]\['bias'\] has shape \(3,\).*lacks the batch axis.*\(8, 3\)"
    with pytest.raises(ValueError, match=lacks):
        tx.update(mean_grads, state, params)
    no_axis = r"\['head'\]\['bias'\] must have a leading batch axis of size batch_size=8"
    with pytest.raises(ValueError, match=no_axis):
        tx.update(mean_grads, state)
    x, y = make_batch(0, batch=5)
    with pytest.raises(ValueError, match=r"must have shape \(8, 3\).*Received: shape \(5, 3\)"):
        tx.update(jit_grads(params, x, y), state, params)


def test_mismatched_trees_and_states_raise():
    params = make_params(0)
    tx = gradtail(batch_size=8)
    x, y = make_batch(0)
    g = jit_grads(params, x, y)
    with pytest.raises(ValueError, match="must have the structure of `params`"):
        tx.update({"head": g["head"]}, tx.init(params), params)
    head_state = gradtail(batch_size=8, alignment_mask=HEAD_ONLY).init(params)
    with pytest.raises(ValueError, match="do not match the state"):
        tx.update(g, head_state, params)
    with pytest.raises(TypeError, match="GradTailState"):
        tx.update(g, optax.EmptyState(), params)


def test_options_are_validated_at_construction():
    with pytest.raises(ValueError, match="decay"):
        gradtail(batch_size=8, decay=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        gradtail(batch_size=0)
    with pytest.raises(ValueError, match="reference"):
        gradtail(batch_size=8, reference="median")
    with pytest.raises(ValueError, match="quantile"):
        gradtail(batch_size=8, quantile=2.0)
    with pytest.raises(TypeError, match="Python bools"):
        gradtail(batch_size=8, alignment_mask={"head": jnp.array(True), "hidden": False})
    with pytest.raises(ValueError, match="selects no parameter"):
        gradtail(batch_size=8, alignment_mask={"head": False, "hidden": False}).init(make_params(0))
    with pytest.raises(TypeError, match=r"\['step'\] must have a floating-point dtype"):
        gradtail(batch_size=8).init({"w": jnp.zeros(2), "step": jnp.zeros((), jnp.int32)})


def test_callable_mask_without_params_sees_shapes():
    params = make_params(0)
    tx = gradtail(batch_size=8, alignment_mask=lambda p: jax.tree.map(lambda a: a.ndim == 2, p))
    state = tx.init(params)
    assert [m.shape for m in state.ema.mean] == [(HIDDEN, CLASSES), (D_IN, HIDDEN)]
    x, y = make_batch(0)
    _, state = tx.update(jit_grads(params, x, y), state)  # no params: ShapeDtypeStructs
    assert int(state.ema.count) == 1


def test_head_path_errors():
    ht = head(batch_size=2)
    state = ht.init({"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"`head_inputs` of layer 0 must have shape \(2, d_in=4\)"):
        ht.update(state, jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"`head_output_grads` of layer 0 must have shape \(2, 3\)"):
        ht.update(state, jnp.zeros((2, 4)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="1 dense layer"):
        ht.update(state, [jnp.zeros((2, 4))] * 2, [jnp.zeros((2, 3))] * 2)
    with pytest.raises(ValueError, match=r"kernel must have shape \(d_in, d_out\)"):
        ht.init(jnp.zeros(3))
    with pytest.raises(TypeError, match="GradTailState"):
        ht.update(optax.EmptyState(), jnp.zeros((2, 4)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="one loss per example"):
        loss_and_output_grads(lambda z: z.sum(), jnp.zeros((2, 3)))


def test_import_error_names_the_extra():
    code = (
        "import sys; sys.modules['optax'] = None\n"
        "try:\n import gradtail_optax\nexcept ImportError as e:\n print(e)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert "pip install 'gradtail[optax]'" in result.stdout, result.stdout + result.stderr


def test_public_api():
    assert set(gradtail_optax.__all__) == {
        "GradTailState",
        "HeadOutput",
        "HeadTransform",
        "gradtail",
        "head",
        "head_init",
        "head_weights",
        "loss_and_output_grads",
        "score_batches",
        "score_head_batches",
        "state_from_dict",
        "state_to_dict",
    }
    assert isinstance(gradtail(batch_size=2), optax.GradientTransformationExtraArgs)
    assert GradTailState._fields == ("ema", "count", "weights", "alignment", "memory", "sketch")

"""gradtail_optax with the per-example memory (``memory_size=``, ``index=``).

Against float64 loops (materialised per-example gradients, tests/reference.py, and the memory
definition of tests/test_memory.py), against gradtail_torch on the same model and indices,
and sharded on 2 CPU devices against a single-device run on the whole batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

from gradtail_optax import gradtail, head, loss_and_output_grads  # noqa: E402

from . import reference as ref  # noqa: E402
from .reference import memory_scores as ref_memory  # noqa: E402
from .reference import memory_weights as ref_weights  # noqa: E402
from .test_optax_adapter import (  # noqa: E402
    ALL,
    CLASSES,
    D_IN,
    flat_rows,
    head_forward,
    head_path_step,
    make_params,
    numpy_per_example_grads,
    per_example_grads,
    torch_model_like,
)

ROOT = Path(__file__).resolve().parents[1]
N = 20  # training-set size


def dataset(seed: int = 0, n: int = N, dtype=np.float32):
    rng = np.random.default_rng(50 + seed)
    return rng.normal(size=(n, D_IN)).astype(dtype), rng.integers(0, CLASSES, n)


def index_sequence(steps: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Indices drawn with replacement: duplicates within a batch happen."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, N, size=batch) for _ in range(steps)]


# ------------------------------------------------------------------------- the references


@pytest.mark.parametrize("warmup", [0, 2])
def test_transform_matches_float64_loop_reference(warmup):
    decay, mem_decay, eta, cap, lr, batch = 0.8, 0.6, 1.5, 2.5, 0.5, 8
    x_all, y_all = dataset(dtype=np.float64)
    with jax.enable_x64(True):
        params = make_params(0, np.float64)
        tx = optax.chain(
            gradtail(
                batch_size=batch,
                decay=decay,
                warmup_steps=warmup,
                memory_size=N,
                memory_decay=mem_decay,
                memory_eta=eta,
                memory_max_weight=cap,
            ),
            optax.sgd(lr),
        )
        state = tx.init(params)

        def step(params, state, x, y, index):
            updates, state = tx.update(per_example_grads(params, x, y), state, params, index=index)
            return optax.apply_updates(params, updates), updates, state

        step = jax.jit(step, donate_argnums=(1,))
        ref_params = jax.tree.map(np.asarray, params)
        history, batches = [], []
        for t, index in enumerate(index_sequence(7, batch)):
            x, y = x_all[index], y_all[index]
            g = numpy_per_example_grads(ref_params, x, y)
            flat = flat_rows(g, ALL)
            if history:
                align = ref.cosine_rows(flat, ref.ema(history, [decay] * len(history)))
                batches.append((index, align))
            score, visits = ref_memory(N, batches, mem_decay)
            w = ref_weights(score, visits, index, eta, cap) if t >= max(1, warmup) else np.ones(batch)
            history.append((flat / np.linalg.norm(flat, axis=1)[:, None]).mean(axis=0))
            expected = jax.tree.map(lambda a, w=w: np.tensordot(w, a, axes=1) / batch, g)

            params, updates, state = step(params, state, jnp.asarray(x), jnp.asarray(y), jnp.asarray(index))
            memory = optax.tree.get(state, "memory")
            np.testing.assert_allclose(memory.score, score, rtol=1e-9, atol=1e-12)
            np.testing.assert_array_equal(memory.visits, visits)
            np.testing.assert_allclose(optax.tree.get(state, "weights"), w, rtol=1e-9)
            for m, k in ALL:
                np.testing.assert_allclose(updates[m][k], -lr * expected[m][k], rtol=1e-9, atol=1e-12)
            ref_params = jax.tree.map(lambda p, e: p - lr * e, ref_params, expected)
        assert step._cache_size() == 1


def test_head_path_matches_float64_loop_reference():
    """(B, T, d_in) inputs: the materialised head gradients, then the loop memory."""
    rng = np.random.default_rng(3)
    batch, steps_t, d_in, d_out, decay = 6, 3, 5, 2, 0.7
    options = {
        "decay": decay,
        "warmup_steps": 0,
        "memory_decay": 0.3,
        "memory_eta": 0.8,
        "memory_max_weight": 4.0,
    }
    with jax.enable_x64(True):
        ht = head(batch_size=batch, memory_size=N, **options)
        state = ht.init({"kernel": jnp.zeros((d_in, d_out)), "bias": jnp.zeros(d_out)})
        fn = jax.jit(lambda s, a, d, i: ht.update(s, a, d, index=i))
        history, batches = [], []
        for t, index in enumerate(index_sequence(6, batch, seed=1)):
            a, d = rng.normal(size=(batch, steps_t, d_in)), rng.normal(size=(batch, steps_t, d_out))
            flat = ref.flatten_examples(ref.per_example_linear_grads(a, d, bias=True))
            w, align, state = fn(state, jnp.asarray(a), jnp.asarray(d), jnp.asarray(index))
            if history:
                expected_align = ref.cosine_rows(flat, ref.ema(history, [decay] * len(history)))
                np.testing.assert_allclose(align, expected_align, rtol=1e-9, atol=1e-12)
                batches.append((index, expected_align))
            score, visits = ref_memory(N, batches, options["memory_decay"])
            np.testing.assert_allclose(state.memory.score, score, rtol=1e-9, atol=1e-12)
            np.testing.assert_array_equal(state.memory.visits, visits)
            expected = ref_weights(score, visits, index, 0.8, 4.0) if t >= 1 else np.ones(batch)
            np.testing.assert_allclose(w, expected, rtol=1e-9)
            np.testing.assert_array_equal(state.weights, w)
            history.append((flat / np.linalg.norm(flat, axis=1)[:, None]).mean(axis=0))
        assert fn._cache_size() == 1


@pytest.mark.parametrize("warmup", [0, 2])
def test_same_weights_and_memory_as_gradtail_torch(warmup):
    torch = pytest.importorskip("torch")
    from gradtail_torch import GradTail

    params, batch = make_params(4), 8
    model = torch_model_like(params)
    options = {"decay": 0.9, "warmup_steps": warmup, "memory_size": N}
    gt_all, gt_head = GradTail(model, **options), GradTail(model[2], **options)
    tx = gradtail(batch_size=batch, **options)
    s_tx = tx.init(params)
    ht = head(batch_size=batch, **options)
    s_head = ht.init(params["head"])
    tx_fn = jax.jit(lambda s, x, y, i: tx.update(per_example_grads(params, x, y), s, params, index=i)[1])
    head_fn = jax.jit(lambda s, x, y, i: head_path_step(ht, s, params, x, y, index=i))
    x_all, y_all = dataset()
    for index in index_sequence(6, batch, seed=2):
        x, y = jnp.asarray(x_all[index]), jnp.asarray(y_all[index])
        rows = torch.as_tensor(index)
        loss = torch.nn.functional.cross_entropy(
            model(torch.tensor(x_all[index], dtype=torch.float64)),
            torch.tensor(y_all[index], dtype=torch.int64),
            reduction="none",
        )
        for gt in (gt_all, gt_head):  # one forward, seen by both
            gt.weights(loss, index=rows)
        s_tx = tx_fn(s_tx, x, y, jnp.asarray(index))
        w_head, _, s_head = head_fn(s_head, x, y, jnp.asarray(index))
        for got, gt in ((s_tx, gt_all), (s_head, gt_head)):
            score, visits = gt.memory_scores()
            np.testing.assert_allclose(got.weights, gt.last_weights.numpy(), rtol=2e-5)
            np.testing.assert_allclose(got.memory.score, score.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(got.memory.visits, visits.numpy())
        np.testing.assert_array_equal(w_head, s_head.weights)
    assert int(np.asarray(s_tx.memory.visits).sum()) > 0
    gt_all.remove()
    gt_head.remove()


# ------------------------------------------------------------------------ jit and donation


def test_donated_memory_is_updated_in_place_without_recompiling():
    """Under jax.jit with the state donated, XLA aliases the memory's buffers to the output
    (the scatter writes the batch's rows in place) and no O(N) temporary is allocated."""
    big, batch = 1_000_000, 8
    params = make_params(5)
    tx = gradtail(batch_size=batch, memory_size=big, decay=0.9)

    def step(state, x, y, index):
        return tx.update(per_example_grads(params, x, y), state, params, index=index)[1]

    donated = jax.jit(step, donate_argnums=(0,))
    state = tx.init(params)
    rng = np.random.default_rng(0)
    x_all, y_all = dataset(n=64)
    for _ in range(4):
        pick = rng.integers(0, 64, size=batch)
        index = jnp.asarray(rng.integers(0, big, size=batch))
        state = donated(state, jnp.asarray(x_all[pick]), jnp.asarray(y_all[pick]), index)
    assert donated._cache_size() == 1
    assert int(state.memory.visits.sum()) == 3 * batch  # not updated on the first step
    compiled = donated.lower(state, jnp.asarray(x_all[:batch]), jnp.asarray(y_all[:batch]), index).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    memory_bytes = 8 * big  # float32 scores and int32 visits
    assert analysis.alias_size_in_bytes >= memory_bytes
    assert analysis.temp_size_in_bytes < memory_bytes // 4


# ------------------------------------------------------------------------------- behaviour


def test_non_finite_example_leaves_its_row_alone():
    params, batch = make_params(8), 8
    tx = gradtail(batch_size=batch, decay=0.9, memory_size=N)
    update = jax.jit(lambda g, s, i: tx.update(g, s, params, index=i))
    x_all, y_all = dataset()
    first, second = np.arange(8), np.arange(4, 12)
    state = update(
        per_example_grads(params, x_all[first], y_all[first]), tx.init(params), jnp.asarray(first)
    )[1]
    assert int(state.memory.visits.sum()) == 0  # the first step does not touch the memory
    g = per_example_grads(params, x_all[second], y_all[second])
    g = jax.tree.map(lambda a: a.at[3].set(jnp.nan), g)  # example 7 (position 3)
    _, state = update(g, state, jnp.asarray(second))
    visits = np.asarray(state.memory.visits)
    assert visits[7] == 0
    np.testing.assert_array_equal(visits[[4, 5, 6, 8, 9, 10, 11]], 1)
    assert bool(jnp.isfinite(state.memory.score).all())
    assert bool(jnp.isfinite(state.weights).all())


def test_state_without_memory_is_unchanged():
    params = make_params(0)
    state = gradtail(batch_size=4).init(params)
    assert state.memory is None
    assert head(batch_size=4).init(params["head"]).memory is None


# ------------------------------------------------------------------------------ bad input


def _update_args(batch=5):
    params = make_params(0)
    x_all, y_all = dataset()
    return params, per_example_grads(params, x_all[:batch], y_all[:batch])


def test_index_errors_of_the_transform():
    params, grads = _update_args()
    plain = gradtail(batch_size=5)
    with pytest.raises(ValueError, match=r"`index` was given.*memory_size.*Received: index of shape \(5,\)"):
        plain.update(grads, plain.init(params), params, index=jnp.arange(5))
    tx = optax.chain(gradtail(batch_size=5, memory_size=N), optax.sgd(0.1))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"memory_size=20.*pass index=.*Received: index=None"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match=r"`index` must have shape \(5,\).*Received: shape \(4,\)"):
        tx.update(grads, state, params, index=jnp.arange(4))
    with pytest.raises(ValueError, match=r"Received: shape \(5, 1\)"):
        jax.jit(lambda i: tx.update(grads, state, params, index=i))(jnp.zeros((5, 1), jnp.int32))
    with pytest.raises(TypeError, match=r"`index` must have an integer dtype.*Received: dtype=float32"):
        tx.update(grads, state, params, index=jnp.zeros(5, jnp.float32))  # explicit: x64 may be on
    with pytest.raises(TypeError, match=r"Received: dtype=bool"):
        tx.update(grads, state, params, index=jnp.ones(5, bool))
    with pytest.raises(IndexError, match=r"`index`.*\[0, 20\).*Received.*25"):
        tx.update(grads, state, params, index=jnp.array([0, 1, 2, 3, 25]))
    _, state = tx.update(grads, state, params, index=[0, 1, 2, 3, 4])  # sequences are accepted
    assert state[0].memory.score.shape == (N,)


def test_index_errors_of_the_head_path():
    layer = {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}
    a, d = jnp.ones((2, 4)), jnp.ones((2, 3))
    plain = head(batch_size=2)
    with pytest.raises(ValueError, match=r"`index` was given.*no per-example memory"):
        plain.update(plain.init(layer), a, d, index=jnp.arange(2))
    ht = head(batch_size=2, memory_size=N)
    state = ht.init(layer)
    with pytest.raises(ValueError, match=r"pass index=.*Received: index=None"):
        ht.update(state, a, d)
    with pytest.raises(ValueError, match=r"shape \(2,\).*Received: shape \(3,\)"):
        ht.update(state, a, d, index=jnp.arange(3))
    with pytest.raises(TypeError, match=r"Received: dtype=float32"):
        ht.update(state, a, d, index=jnp.zeros(2, jnp.float32))
    with pytest.raises(ValueError, match=r"`memory_eta`.*Received: memory_eta=-1"):
        head(batch_size=2, memory_size=N, memory_eta=-1.0)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"memory_size": 0}, "memory_size"),
        ({"memory_size": 3.5}, "memory_size"),
        ({"memory_size": True}, "memory_size"),
        ({"memory_size": 5, "memory_decay": 1.0}, "memory_decay"),
        ({"memory_size": 5, "memory_eta": -1.0}, "memory_eta"),
        ({"memory_size": 5, "memory_eta": float("inf")}, "memory_eta"),
        ({"memory_size": 5, "memory_max_weight": 0.5}, "memory_max_weight"),
    ],
)
def test_options_are_validated_at_construction(options, match):
    # A memory_size of the wrong type (3.5, True) is a TypeError since 0.2 (0.1: ValueError).
    with pytest.raises((ValueError, TypeError), match=rf"`{match}`.*Received"):
        gradtail(batch_size=4, **options)
    with pytest.raises((ValueError, TypeError), match=rf"`{match}`.*Received"):
        head(batch_size=4, **options)


# ------------------------------------------------------------------------------ sharded

STEPS, BATCH, DEVICES = 4, 8, 2
MEMORY_OPTIONS: dict[str, Any] = {"decay": 0.8, "warmup_steps": 1, "memory_decay": 0.4, "memory_eta": 1.2}


def _sharded_problem():
    rng = np.random.default_rng(11)
    x_all, y_all = rng.normal(size=(N, D_IN)), rng.integers(0, CLASSES, N)
    indices = [rng.integers(0, N, size=BATCH) for _ in range(STEPS)]
    return x_all, y_all, indices


def _transform_step(tx, axis_name=None):
    def step(params, opt_state, x, y, index):
        local = params if axis_name is None else jax.lax.pcast(params, axis_name, to="varying")
        grads = per_example_grads(local, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, index=index)
        return optax.apply_updates(params, updates), opt_state

    return step


def _head_step(axis_name=None, devices=1):
    sgd = optax.sgd(0.1)
    ht = head(batch_size=BATCH // devices, axis_name=axis_name, memory_size=N, **MEMORY_OPTIONS)

    def step(params, state, x, y, index):
        opt_state, gt = state

        _, backward, (h, logits) = jax.vjp(lambda p: head_forward(p, x, y), params, has_aux=True)
        _, dlogits = loss_and_output_grads(optax.softmax_cross_entropy_with_integer_labels, logits, y)
        w, _, gt = ht.update(gt, h, dlogits, index=index)
        (grads,) = backward(w / (x.shape[0] * devices))  # summed over devices under shard_map
        updates, opt_state = sgd.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), (opt_state, gt)

    return step


def _flat(gt, params) -> dict[str, np.ndarray]:
    out = {"score": np.asarray(gt.memory.score), "visits": np.asarray(gt.memory.visits)}
    out |= {"weights": np.asarray(gt.weights), "ema_count": np.asarray(gt.ema.count)}
    return out | {f"param{k}": np.asarray(p) for k, p in enumerate(jax.tree.leaves(params))}


def _runs(devices: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """Both paths on ``devices`` devices (shard_map, axis_name="data"), or one without axis."""
    from jax.sharding import PartitionSpec as P

    x_all, y_all, indices = _sharded_problem()
    local = BATCH // devices
    axis = "data" if devices > 1 else None
    tx = optax.chain(
        gradtail(batch_size=local, axis_name=axis, memory_size=N, **MEMORY_OPTIONS), optax.sgd(0.1)
    )
    runs = {}
    for path in ("transform", "head"):
        params = make_params(0, np.float64)
        if path == "transform":
            init_fn, step_fn = tx.init, _transform_step(tx, axis)
        else:

            def init_fn(p):
                return optax.sgd(0.1).init(p), head(batch_size=local, memory_size=N).init(p["head"])

            step_fn = _head_step(axis, devices)
        if devices > 1:
            mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
            shapes = jax.eval_shape(init_fn, params)
            specs = jax.tree.map(lambda _: P(), shapes)  # the memory is replicated
            gt_of = (lambda s: s[0]) if path == "transform" else (lambda s: s[1])
            gt_spec = gt_of(specs)._replace(weights=P("data"), alignment=P("data"))
            specs = (gt_spec, *specs[1:]) if path == "transform" else (specs[0], gt_spec)
            # Committed, as the step's outputs will be: the jitted step then compiles once.
            params = jax.device_put(params, jax.sharding.NamedSharding(mesh, P()))
            init = jax.jit(jax.shard_map(init_fn, mesh=mesh, in_specs=P(), out_specs=specs))
            step = jax.jit(
                jax.shard_map(
                    step_fn, mesh=mesh, in_specs=(P(), specs, *[P("data")] * 3), out_specs=(P(), specs)
                )
            )
        else:
            init, step = init_fn, jax.jit(step_fn)
        state = init(params)
        history = []
        for index in indices:
            params, state = step(params, state, x_all[index], y_all[index], jnp.asarray(index))
            history.append(_flat(state[0] if path == "transform" else state[1], params))
        assert step._cache_size() == 1
        runs[path] = history
    return runs


def _pmap_run() -> list[dict[str, np.ndarray]]:
    """The transformation under ``jax.pmap`` (per-device parameter copies; no pcast)."""
    x_all, y_all, indices = _sharded_problem()
    local = BATCH // DEVICES
    tx = optax.chain(
        gradtail(batch_size=local, axis_name="data", memory_size=N, **MEMORY_OPTIONS), optax.sgd(0.1)
    )
    params = jax.tree.map(lambda a: jnp.stack([a] * DEVICES), make_params(0, np.float64))
    state = jax.pmap(tx.init, axis_name="data")(params)
    step = jax.pmap(_transform_step(tx), axis_name="data")
    history = []
    for index in indices:
        split = [a.reshape(DEVICES, local, *a.shape[1:]) for a in (x_all[index], y_all[index], index)]
        params, state = step(params, state, *split)
        gt = state[0]
        for leaf in jax.tree.leaves(gt.memory):  # every device holds the same memory
            np.testing.assert_array_equal(np.asarray(leaf)[1], np.asarray(leaf)[0])
        flat = _flat(*jax.tree.map(lambda a: a[0], (gt, params)))
        flat["weights"] = np.asarray(gt.weights).reshape(-1)  # the devices' examples, in order
        history.append(flat)
    return history


def _sharded_worker(out: str) -> None:
    """Run in a fresh process with 2 host devices (the test does)."""
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == DEVICES, jax.devices()
    runs = _runs(DEVICES)
    runs["pmap"] = _pmap_run()
    np.savez(
        out, **{f"{p}_{t}_{k}": v for p, h in runs.items() for t, s in enumerate(h) for k, v in s.items()}
    )


def test_sharded_memory_equals_single_device_run(tmp_path):
    """shard_map (both paths) and pmap (the transformation) with axis_name: every device holds
    the memory of a single-device run on the whole batch, and each gets its examples' weights
    of that run."""
    out = tmp_path / "memory.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    code = f"from tests.test_optax_memory import _sharded_worker; _sharded_worker({str(out)!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    got = np.load(out)
    with jax.enable_x64(True):
        single = _runs(1)
    single["pmap"] = single["transform"]
    for path, history in single.items():
        for t, state in enumerate(history):
            for key, value in state.items():
                np.testing.assert_allclose(
                    got[f"{path}_{t}_{key}"], value, rtol=1e-10, atol=1e-13, err_msg=f"{path} step {t} {key}"
                )
        assert int(history[-1]["visits"].sum()) > 0

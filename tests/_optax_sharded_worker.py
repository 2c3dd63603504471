"""Worker for test_optax_adapter's data-parallel test: 2-device `jax.shard_map` runs.

Run as a script in a fresh process with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``
(the test does); it writes the states of both paths (the transformation and the efficient
head path) to the ``.npz`` path given as its argument. The problem (model, batches, options)
and the step functions are defined here so the test's single-device runs use the same ones.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

STEPS, BATCH, D_IN, HIDDEN, CLASSES, DEVICES = 3, 8, 5, 6, 3, 2
# A pointwise curve: with batch-relative curves (rank, zscore) each device ranks its own examples.
OPTIONS: dict[str, Any] = {"decay": 0.8, "kind": "sigmoid", "max_weight": 3.0, "normalize": False}
LR = 0.1


def problem() -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(7)
    params = {
        "hidden": {"kernel": rng.normal(size=(D_IN, HIDDEN)), "bias": 0.1 * rng.normal(size=HIDDEN)},
        "head": {"kernel": rng.normal(size=(HIDDEN, CLASSES)), "bias": 0.1 * rng.normal(size=CLASSES)},
    }
    batches = [(rng.normal(size=(BATCH, D_IN)), rng.integers(0, CLASSES, BATCH)) for _ in range(STEPS)]
    return params, batches


def features(p: Any, x: Any) -> Any:
    import jax.numpy as jnp

    return jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])


def losses(logits: Any, y: Any) -> Any:
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def example_loss(p: Any, x: Any, y: Any) -> Any:
    return losses(features(p, x) @ p["head"]["kernel"] + p["head"]["bias"], y)


def transform_step(tx: Any, axis_name: str | None = None) -> Any:
    """A step of ``optax.chain(gradtail(...), ...)`` on per-example gradients."""
    import jax
    import optax

    def step(params: Any, opt_state: Any, x: Any, y: Any) -> Any:
        # Under shard_map, jax.grad with respect to replicated (device-invariant) parameters sums
        # each gradient over the devices; per-example gradients need device-varying parameters.
        local = params if axis_name is None else jax.lax.pcast(params, axis_name, to="varying")
        grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(local, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def head_step(axis_name: str | None = None, devices: int = 1) -> Any:
    """A step of the efficient path: `gradtail_optax.head`, then one backward of the weighted loss."""
    import jax
    import optax

    import gradtail_optax

    sgd = optax.sgd(LR)
    # batch_size only shapes init's state; update takes it from the state.
    ht = gradtail_optax.head(batch_size=BATCH // devices, axis_name=axis_name, **OPTIONS)

    def step(params: Any, state: Any, x: Any, y: Any) -> Any:
        opt_state, gt = state

        def forward(p: Any) -> Any:
            h = features(p, x)
            logits = h @ p["head"]["kernel"] + p["head"]["bias"]
            return losses(logits, y), (h, logits)

        _, backward, (h, logits) = jax.vjp(forward, params, has_aux=True)
        _, dlogits = gradtail_optax.loss_and_output_grads(losses, logits, y)
        w, _, gt = ht.update(gt, h, dlogits)
        # Under shard_map the gradient of replicated parameters is summed over the devices:
        # dividing by the global batch size gives the global mean.
        (grads,) = backward(w / (x.shape[0] * devices))
        updates, opt_state = sgd.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), (opt_state, gt)

    return step


def head_init(params: Any, batch: int) -> Any:
    import optax

    import gradtail_optax

    return optax.sgd(LR).init(params), gradtail_optax.head(batch_size=batch, **OPTIONS).init(params["head"])


def flat_state(gt: Any, params: Any) -> dict[str, np.ndarray]:
    """A GradTailState and the parameters, as named NumPy arrays."""
    import jax

    out = {f"mean{k}": np.asarray(m) for k, m in enumerate(jax.tree.leaves(gt.ema.mean))}
    out |= {"total": np.asarray(gt.ema.total), "ema_count": np.asarray(gt.ema.count)}
    out |= {"weights": np.asarray(gt.weights), "alignment": np.asarray(gt.alignment)}
    out |= {f"param{k}": np.asarray(p) for k, p in enumerate(jax.tree.leaves(params))}
    return out


def sharded_runs() -> dict[str, list[dict[str, np.ndarray]]]:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import gradtail_optax

    assert jax.device_count() == DEVICES, jax.devices()
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    local = BATCH // DEVICES
    tx = optax.chain(gradtail_optax.gradtail(batch_size=local, axis_name="data", **OPTIONS), optax.sgd(LR))

    def specs_for(shapes: Any, gt_of: Any) -> Any:
        # Everything replicated but the per-example fields of the GradTail state.
        specs = jax.tree.map(lambda _: P(), shapes)
        gt = gt_of(specs)._replace(weights=P("data"), alignment=P("data"))
        return gt, specs

    runs: dict[str, list[dict[str, np.ndarray]]] = {}
    for path in ("transform", "head"):
        params0, batches = problem()
        params = jax.device_put(jax.tree.map(jnp.asarray, params0), replicated)
        if path == "transform":
            init_fn, step_fn = tx.init, transform_step(tx, "data")
            gt_spec, specs = specs_for(jax.eval_shape(tx.init, params), lambda s: s[0])
            specs = (gt_spec, *specs[1:])
        else:
            init_fn, step_fn = (lambda p: head_init(p, local)), head_step("data", DEVICES)
            gt_spec, specs = specs_for(jax.eval_shape(lambda p: head_init(p, local), params), lambda s: s[1])
            specs = (specs[0], gt_spec)
        init = jax.jit(jax.shard_map(init_fn, mesh=mesh, in_specs=P(), out_specs=specs))
        step = jax.jit(
            jax.shard_map(
                step_fn, mesh=mesh, in_specs=(P(), specs, P("data"), P("data")), out_specs=(P(), specs)
            )
        )
        state = init(params)
        history = []
        for x, y in batches:
            params, state = step(params, state, jax.device_put(x, split), jax.device_put(y, split))
            history.append(flat_state(state[0] if path == "transform" else state[1], params))
        assert step._cache_size() == 1, step._cache_size()
        runs[path] = history
    return runs


def pmap_run() -> list[dict[str, np.ndarray]]:
    """The transformation under ``jax.pmap`` (parameters replicated by stacking; no pcast)."""
    import jax
    import jax.numpy as jnp
    import optax

    import gradtail_optax

    local = BATCH // DEVICES
    tx = optax.chain(gradtail_optax.gradtail(batch_size=local, axis_name="data", **OPTIONS), optax.sgd(LR))
    params0, batches = problem()
    params = jax.tree.map(lambda a: jnp.stack([jnp.asarray(a)] * DEVICES), params0)
    state = jax.pmap(tx.init, axis_name="data")(params)
    step = jax.pmap(transform_step(tx), axis_name="data")
    history = []
    for x, y in batches:
        xs, ys = jnp.asarray(x).reshape(DEVICES, local, -1), jnp.asarray(y).reshape(DEVICES, local)
        params, state = step(params, state, xs, ys)
        gt = state[0]
        for k in range(1, DEVICES):  # every device holds the same reference
            for a in jax.tree.leaves(gt.ema):
                np.testing.assert_array_equal(np.asarray(a)[k], np.asarray(a)[0])
        first = jax.tree.map(lambda a: a[0], (gt, params))
        flat = flat_state(*first)
        flat["weights"] = np.asarray(gt.weights).reshape(-1)  # the devices' examples, in order
        flat["alignment"] = np.asarray(gt.alignment).reshape(-1)
        history.append(flat)
    return history


def replicated_grads_refused() -> bool:
    """Whether gradtail refuses per-example gradients taken w.r.t. replicated parameters."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import PartitionSpec as P

    import gradtail_optax

    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = optax.chain(gradtail_optax.gradtail(batch_size=BATCH // DEVICES, axis_name="data"), optax.sgd(LR))

    def step(params: Any, x: Any, y: Any) -> Any:
        grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)  # no pcast
        return tx.update(grads, tx.init(params), params)[0]

    params, batches = problem()
    x, y = batches[0]
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()))
    try:
        fn(jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(y))
    except ValueError as exc:
        return "pcast" in str(exc)
    return False


def main(out: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    runs = sharded_runs()
    runs["pmap"] = pmap_run()
    np.savez(
        out,
        replicated_grads_refused=np.asarray(replicated_grads_refused()),
        **{
            f"{path}_step{t}_{k}": v
            for path, history in runs.items()
            for t, state in enumerate(history)
            for k, v in state.items()
        },
    )


if __name__ == "__main__":
    main(sys.argv[1])

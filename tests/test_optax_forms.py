"""gradtail_optax's 0.2 forms: the wrapper, `head`'s init/update, the state dict, bad options.

The policy checks compare every form (the transformation alone, wrapping an optimiser, the
`head` transform and the deprecated `head_weights`) with the float64 loop reference shared by
all adapters, `tests/reference.py::gradtail_loop`, on a dense layer whose per-example
gradients are built by hand.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import gradtail_optax  # noqa: E402
from gradtail_optax import GradTailState, gradtail, head, state_from_dict, state_to_dict  # noqa: E402

from . import reference as ref  # noqa: E402
from .test_policy import CURVES  # noqa: E402  # the curves of the core's policy tests

D_IN, D_OUT, BATCH, N = 5, 3, 6, 12
MEMORY = {"size": N, "decay": 0.4, "eta": 1.3, "max_weight": 2.5}


def schedule(steps):
    """A decay that changes every step: evaluating it one step off changes the reference."""
    return 0.5 + 0.4 * steps / (steps + 1.0)


def _options(curve: str, reference: str, memory: bool) -> dict:
    options = dict(CURVES[curve], decay=schedule, reference=reference, warmup_steps=2)
    if memory:
        options.update(
            memory_size=N, memory_decay=MEMORY["decay"], memory_eta=MEMORY["eta"], memory_max_weight=2.5
        )
    return options


def _batches(memory: bool, seed: int = 5):
    """Inputs, output gradients and indices of a dense layer; the third batch is empty."""
    rng = np.random.default_rng(seed)
    out = []
    for b in (BATCH, BATCH, 0, BATCH, BATCH, BATCH):
        a, d = rng.normal(size=(b, D_IN)), rng.normal(size=(b, D_OUT))
        out.append((a, d, rng.integers(0, N, size=b) if memory else None))
    return out


def _flat(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(B, P): each example's gradient of z = W a + b, W in (d_out, d_in), then b."""
    if len(a) == 0:
        return np.zeros((0, D_OUT * D_IN + D_OUT))
    return ref.flatten_examples(ref.per_example_linear_grads(a, d, bias=True))


CASES = {
    "sigmoid-direction": ("sigmoid", "direction", False),
    "rank-mean-memory": ("rank", "mean", True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form", ["head", "head_weights", "transform", "wrapped"])
def test_every_form_with_a_schedule_matches_the_loop_reference(form, case):
    """Decay schedule, warm-up, curve or memory, and an empty batch, against gradtail_loop."""
    curve, reference, memory = CASES[case]
    options = _options(curve, reference, memory)
    batches = _batches(memory)
    expected, final = ref.gradtail_loop(
        [(_flat(a, d), index) for a, d, index in batches],
        decay=schedule,
        reference=reference,
        warmup=2,
        curve=CURVES[curve],
        memory=MEMORY if memory else None,
    )
    lr = 1.0
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        layer = {"kernel": jnp.zeros((D_IN, D_OUT)), "bias": jnp.zeros(D_OUT)}
        if form == "head":
            ht = head(batch_size=BATCH, **options)
            state, update = ht.init(layer), jax.jit(ht.update)
        elif form == "head_weights":
            with pytest.warns(DeprecationWarning, match="head_init is deprecated"):
                state = gradtail_optax.head_init(layer, batch_size=BATCH, memory_size=N if memory else None)
            legacy = {k: v for k, v in options.items() if k != "memory_size"}

            def update(s, a, d, index=None):
                with pytest.warns(DeprecationWarning, match="head_weights is deprecated"):
                    return gradtail_optax.head_weights(s, a, d, index=index, **legacy)
        else:
            inner = optax.sgd(lr) if form == "wrapped" else None
            tx = (
                gradtail(inner, batch_size=BATCH, **options)
                if inner
                else gradtail(batch_size=BATCH, **options)
            )
            opt_state = tx.init(layer)
            tx_update = jax.jit(tx.update)

        for (a, d, index), (w_ref, align_ref) in zip(batches, expected, strict=True):
            a, d = jnp.asarray(a), jnp.asarray(d)
            rows = None if index is None else jnp.asarray(index)
            if form.startswith("head"):
                w, align, state = update(state, a, d, index=rows)
            else:
                grads = {"kernel": a[:, :, None] * d[:, None, :], "bias": d}
                updates, opt_state = tx_update(grads, opt_state, layer, index=rows)
                state = opt_state if form == "transform" else opt_state[0]
                w, align = (state.weights, state.alignment) if len(a) else (jnp.zeros(0), jnp.zeros(0))
                scale = -lr if form == "wrapped" else 1.0
                for key, g in grads.items():
                    want = np.tensordot(w_ref, np.asarray(g), axes=1) / max(len(a), 1)
                    np.testing.assert_allclose(updates[key], scale * want, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(w, w_ref, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(align, align_ref, rtol=1e-9, atol=1e-12)

        config = gradtail_optax.head(batch_size=BATCH, **options).config
        saved = state_to_dict(state, config)
        if form.startswith("head"):
            kernel, bias = saved["mean"][0]  # the core's (d_out, d_in) layout
        else:
            bias, kernel = saved["mean"]  # flattening order; the JAX (d_in, d_out) layout
            kernel = np.asarray(kernel).T
        np.testing.assert_allclose(np.concatenate([np.ravel(kernel), bias]), final["mean"], rtol=1e-9)
        np.testing.assert_allclose(saved["total"], final["total"], rtol=1e-12)
        assert int(saved["count"]) == final["count"] == 5
        assert int(saved["steps"]) == int(state.count) == final["steps"] == 5  # the empty batch is no step
        assert saved["decay"] is None  # a schedule
        if memory:
            np.testing.assert_allclose(saved["memory_score"], final["memory_score"], rtol=1e-9, atol=1e-12)
            np.testing.assert_array_equal(saved["memory_visits"], final["memory_visits"])


# ------------------------------------------------------------------------- bad options

NAN, INF = float("nan"), float("inf")
BAD_OPTIONS = [
    ({"eps": NAN}, ValueError, "eps"),
    ({"eps": -1.0}, ValueError, "eps"),
    ({"max_weight": INF}, ValueError, "max_weight"),
    ({"threshold": NAN}, ValueError, "threshold"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"quantile": NAN}, ValueError, "quantile"),
    ({"floor": INF}, ValueError, "floor"),
    ({"decay": NAN}, ValueError, "decay"),
    ({"decay": 1.5}, ValueError, "decay"),
    ({"decay": np.float32(NAN)}, ValueError, "decay"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps"),
    ({"warmup_steps": 2.0}, TypeError, "warmup_steps"),
    ({"reference": "median"}, ValueError, "reference"),
    ({"method": "fast"}, ValueError, "method"),
    ({"kind": "cubic"}, ValueError, "kind"),
    ({"normalize": "yes"}, TypeError, "normalize"),
    ({"memory_size": 0}, ValueError, "memory_size"),
    ({"memory_size": 10, "memory_eta": INF}, ValueError, "memory_eta"),
    ({"memory_decay": NAN}, ValueError, "memory_decay"),  # checked even while the memory is off
    ({"memory_size": 10, "memory_max_weight": 0.5}, ValueError, "memory_max_weight"),
    ({"colour": "red"}, TypeError, "colour"),
]


@pytest.mark.parametrize(("options", "error", "name"), BAD_OPTIONS, ids=[str(o[0]) for o in BAD_OPTIONS])
@pytest.mark.parametrize("build", ["gradtail", "wrapped", "head"])
def test_bad_options_are_refused_at_construction(build, options, error, name):
    make = {
        "gradtail": lambda **o: gradtail(batch_size=4, **o),
        "wrapped": lambda **o: gradtail(optax.sgd(0.1), batch_size=4, **o),
        "head": lambda **o: head(batch_size=4, **o),
    }[build]
    with pytest.raises(error, match=rf"{name}.*Received"):
        make(**options)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, NAN, "8"])
@pytest.mark.parametrize("build", [gradtail, head])
def test_bad_batch_size_is_refused(build, batch_size):
    with pytest.raises((ValueError, TypeError), match=r"`batch_size`.*Received"):
        build(batch_size=batch_size)


def test_numpy_scalar_options_are_accepted_as_python_numbers():
    options = {"decay": np.float32(0.5), "max_weight": np.float64(2.0), "eps": np.float32(0.0)}
    ht = head(batch_size=np.int64(2), memory_size=np.int32(10), warmup_steps=np.int64(1), **options)
    assert ht.config.decay == 0.5
    assert type(ht.config.decay) is float
    assert ht.config.memory.size == 10
    assert type(ht.config.memory.size) is int
    state = ht.init({"kernel": jnp.zeros((4, 3))})
    assert state.weights.shape == (2,)
    params = {"w": jnp.ones(3)}
    tx = gradtail(optax.sgd(0.1), batch_size=np.int64(2), **options)
    updates, _ = tx.update({"w": jnp.ones((2, 3))}, tx.init(params), params)
    assert bool(jnp.isfinite(updates["w"]).all())


def test_config_or_options_not_both():
    config = head(batch_size=2, decay=0.9).config
    assert gradtail_optax.head(batch_size=2, config=config).config is config
    with pytest.raises(TypeError, match="either `config=` or keyword options"):
        gradtail(batch_size=2, config=config, decay=0.5)


# ------------------------------------------------------------------------- empty batch


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("memory", [False, True], ids=["curve", "memory"])
def test_empty_batch_changes_nothing(memory):
    params = {"w": jnp.ones((D_IN, D_OUT)), "b": jnp.zeros(D_OUT)}
    options = {"decay": 0.9, "memory_size": N} if memory else {"decay": 0.9}
    rng = np.random.default_rng(0)
    full = {
        "w": jnp.asarray(rng.normal(size=(4, D_IN, D_OUT))),
        "b": jnp.asarray(rng.normal(size=(4, D_OUT))),
    }
    empty = jax.tree.map(lambda g: g[:0], full)
    index = {"index": jnp.arange(4)} if memory else {}
    no_rows = {"index": jnp.zeros(0, jnp.int32)} if memory else {}
    for tx in (gradtail(batch_size=4, **options), gradtail(optax.adam(0.1), batch_size=4, **options)):
        _, state = tx.update(full, tx.init(params), params, **index)  # a state that is not fresh
        for update in (tx.update, jax.jit(tx.update)):
            updates, after = update(empty, state, params, **no_rows)
            _assert_same_tree(after, state)  # GradTail's state and the wrapped Adam's alike
            for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
                assert u.shape == p.shape
                np.testing.assert_array_equal(u, 0.0)

    ht = head(batch_size=4, **options)
    a, d = jnp.asarray(rng.normal(size=(4, D_IN))), jnp.asarray(rng.normal(size=(4, D_OUT)))
    _, _, state = ht.update(ht.init({"kernel": params["w"], "bias": params["b"]}), a, d, **index)
    for update in (ht.update, jax.jit(ht.update)):
        w, align, after = update(state, a[:0], d[:0], **no_rows)
        assert w.shape == align.shape == (0,)
        _assert_same_tree(after, state)


# ------------------------------------------------------------- the wrapper and the chain


def _linear_grads(seed: int, batch: int = 8):
    rng = np.random.default_rng(seed)
    a, d = rng.normal(size=(batch, D_IN)), rng.normal(size=(batch, D_OUT))
    return {"b": jnp.asarray(d, jnp.float32), "w": jnp.asarray(a[:, :, None] * d[:, None, :], jnp.float32)}


def test_wrapper_equals_the_chain_form():
    params = {"w": jnp.ones((D_IN, D_OUT)), "b": jnp.zeros(D_OUT)}
    wrapped = gradtail(optax.adam(1e-2), batch_size=8, decay=0.9)
    chained = optax.chain(gradtail(batch_size=8, decay=0.9), optax.adam(1e-2))
    s1, s2 = wrapped.init(params), chained.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)  # a chain's checkpoint loads in either
    for t in range(3):
        g = _linear_grads(t)
        u1, s1 = jax.jit(wrapped.update)(g, s1, params)
        u2, s2 = jax.jit(chained.update)(g, s2, params)
        _assert_same_tree(u1, u2)
        _assert_same_tree(s1, s2)
    assert isinstance(s1[0], GradTailState)
    assert int(optax.tree.get(s1, "weights").shape[0]) == 8


def test_wrapper_around_multisteps_accumulates_weighted_means():
    params, k, lr = {"w": jnp.ones((D_IN, D_OUT)), "b": jnp.zeros(D_OUT)}, 2, 0.1
    tx = gradtail(optax.MultiSteps(optax.sgd(lr), every_k_schedule=k), batch_size=8, decay=0.9)
    alone = gradtail(batch_size=8, decay=0.9)
    state, s_alone, outputs = tx.init(params), alone.init(params), []
    for t in range(k):
        updates, state = jax.jit(tx.update)(_linear_grads(t), state, params)
        out, s_alone = alone.update(_linear_grads(t), s_alone, params)
        outputs.append(out)
    expected = jax.tree.map(lambda *o: -lr * sum(o) / k, *outputs)
    assert optax.tree.allclose(updates, expected, rtol=1e-6, atol=1e-7)


def test_wrapper_refuses_what_is_not_a_transformation():
    with pytest.raises(TypeError, match=r"GradientTransformation.*Received: float"):
        gradtail(1e-3, batch_size=8)


@pytest.mark.parametrize(
    "build",
    [
        lambda: optax.chain(optax.adam(1e-3), gradtail(batch_size=8)),
        lambda: optax.chain(optax.scale(0.5), gradtail(optax.sgd(0.1), batch_size=8)),
        lambda: optax.named_chain(("adam", optax.adam(1e-3)), ("gradtail", gradtail(batch_size=8))),
        lambda: optax.chain(optax.identity(), optax.chain(gradtail(batch_size=8), optax.sgd(0.1))),
    ],
    ids=["adam-first", "scale-before-wrapper", "named_chain", "nested"],
)
@pytest.mark.parametrize("jit", [False, True])
def test_gradtail_after_another_transformation_is_refused(build, jit):
    """The 0.1 wrong order (Adam first) silently widened Adam's moments to per-example shapes."""
    params = {"w": jnp.ones((D_IN, D_OUT)), "b": jnp.zeros(D_OUT)}
    tx = build()
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(TypeError, match=r"must come first in optax.chain.*gradtail\(optax.adam"):
        update(_linear_grads(0), tx.init(params), params)


def test_gradtail_first_in_a_chain_is_accepted_at_any_depth():
    params = {"w": jnp.ones((D_IN, D_OUT)), "b": jnp.zeros(D_OUT)}
    tx = optax.chain(optax.chain(gradtail(optax.sgd(0.1), batch_size=8)), optax.scale(1.0))
    updates, _ = tx.update(_linear_grads(0), tx.init(params), params)
    assert updates["w"].shape == (D_IN, D_OUT)


# ---------------------------------------------------------------- masked integer leaves


def _int_problem():
    params = {"w": jnp.ones(3), "b": jnp.zeros(()), "step": jnp.zeros((), jnp.int32)}

    def loss(p, x):
        return jnp.sum(jnp.tanh(p["w"] * x)) + p["b"] ** 2 + x[0] * p["b"]

    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
    grads = jax.vmap(jax.grad(loss, allow_int=True), in_axes=(None, 0))(params, x)
    return params, grads


def test_masked_integer_leaf_gets_a_zero_update_and_the_rest_is_unchanged():
    params, grads = _int_problem()
    assert grads["step"].dtype == jax.dtypes.float0
    mask = {"w": True, "b": True, "step": False}
    floats = {k: params[k] for k in ("w", "b")}
    plain = gradtail(optax.adam(0.1), batch_size=4, decay=0.9)
    tx = gradtail(optax.adam(0.1), batch_size=4, decay=0.9, alignment_mask=mask)
    s_plain, state, p = plain.init(floats), tx.init(params), params
    step = jax.jit(tx.update)
    for _ in range(2):
        u_plain, s_plain = plain.update({k: grads[k] for k in floats}, s_plain, floats)
        updates, state = step(grads, state, p)
        p = optax.apply_updates(p, updates)  # the integer leaf stays as it is
        for k in floats:
            np.testing.assert_allclose(updates[k], u_plain[k], rtol=1e-6)
        np.testing.assert_array_equal(optax.tree.get(state, "weights"), optax.tree.get(s_plain, "weights"))
    assert p["step"].dtype == jnp.int32
    assert int(p["step"]) == 0
    # Without params, a float0 gradient's update is float0 zeros (its own dtype).
    out, _ = gradtail(batch_size=4, alignment_mask=mask).update(
        grads, gradtail(batch_size=4, alignment_mask=mask).init(params)
    )
    assert out["step"].dtype == jax.dtypes.float0
    assert out["step"].shape == ()


def test_leaf_errors_name_the_leaf():
    params, grads = _int_problem()
    with pytest.raises(TypeError, match=r"Scored parameter \['step'\] must have a floating-point dtype"):
        gradtail(batch_size=4).init(params)
    tx = gradtail(batch_size=4, alignment_mask={"w": True, "b": True, "step": False})
    state = tx.init(params)
    complex_grads = dict(grads, step=jnp.zeros(4, jnp.complex64))
    with pytest.raises(TypeError, match=r"leaf \['step'\] must have a real dtype"):
        tx.update(complex_grads, state, params)
    with pytest.raises(ValueError, match=r"leaf \['b'\] must have shape \(4,\)"):
        tx.update(dict(grads, b=jnp.zeros((3,))), state, params)


# ------------------------------------------------------------------------- state dicts


def _memory_problem():
    params = {"w": jnp.ones((D_IN, D_OUT)), "b": jnp.zeros(D_OUT)}
    options = {"decay": schedule, "warmup_steps": 1, "memory_size": N, "kind": "sigmoid"}
    rng = np.random.default_rng(3)
    steps = [(_linear_grads(t), jnp.asarray(rng.integers(0, N, 8))) for t in range(4)]
    return params, options, steps


def test_state_dict_round_trip_resumes_identically():
    params, options, steps = _memory_problem()
    tx = gradtail(optax.adam(1e-2), batch_size=8, **options)
    step = jax.jit(lambda s, g, i: tx.update(g, s, params, index=i))
    state = tx.init(params)
    for g, index in steps[:2]:
        _, state = step(state, g, index)
    saved = state_to_dict(state, **options)
    assert int(saved["steps"]) == int(state[0].count) == 2
    # Through NumPy, as a checkpoint would store it.
    saved = {
        k: jax.tree.map(np.asarray, v) if k in ("mean", "total", "count", "steps") else v
        for k, v in saved.items()
    }
    saved |= {k: np.asarray(saved[k]) for k in ("memory_score", "memory_visits")}
    restored, config = state_from_dict(saved, like=tx.init(params), **options)
    assert config.memory.decay == 0.5
    assert config.decay is schedule
    restored = (restored[0], state[1])  # the Adam state is the optimiser's business
    for g, index in steps[2:]:
        u1, state = step(state, g, index)
        u2, restored = step(restored, g, index)
        _assert_same_tree(u1, u2)
    _assert_same_tree(state[0]._replace(weights=0, alignment=0), restored[0]._replace(weights=0, alignment=0))
    assert step._cache_size() == 1  # the loaded state is placed like a fresh one


def _saved():
    params, options, steps = _memory_problem()
    tx = gradtail(batch_size=8, **options)
    state = tx.init(params)
    for g, index in steps[:2]:
        _, state = tx.update(g, state, params, index=index)
    return tx.init(params), options, state_to_dict(state, **options)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            lambda d: d.update(total=np.float64(1.5)),
            ValueError,
            r"`total` must be a finite number in \[0.0, 1.0\]",
        ),
        (lambda d: d.update(steps=np.int32(0)), ValueError, r"`steps` >= `count`"),
        (lambda d: d.update(count=np.int32(-1)), ValueError, r"`count` must be >= 0"),
        (
            lambda d: d["mean"].__setitem__(0, np.full(D_OUT, np.nan)),
            ValueError,
            r"`mean\[0\]` must be finite",
        ),
        (lambda d: d["mean"].__setitem__(1, np.zeros((D_OUT, D_IN))), ValueError, r"`mean` must match"),
        (
            lambda d: d.update(memory_visits=-np.ones(N, np.int32)),
            ValueError,
            r"`memory_visits` must be >= 0",
        ),
        (lambda d: d.update(memory_score=np.zeros(N, np.int32)), TypeError, r"`memory_score` must hold real"),
        (lambda d: [d.pop(k) for k in ("memory_score", "memory_visits")], ValueError, r"per-example memory"),
        (lambda d: d.update(reference="mean"), ValueError, r"reference='mean'"),
        (lambda d: d.update(colour=1), ValueError, r"unknown \['colour'\]"),
    ],
    ids=[
        "total",
        "steps",
        "count",
        "nan-mean",
        "shape",
        "visits",
        "score-dtype",
        "no-memory",
        "reference",
        "key",
    ],
)
def test_state_from_dict_validates_before_building(change, error, match):
    like, options, saved = _saved()
    saved = {k: list(v) if k == "mean" else v for k, v in saved.items()}
    change(saved)
    with pytest.raises(error, match=match):
        state_from_dict(saved, like=like, **options)


def test_state_dict_of_an_optimiser_state_needs_one_gradtail_state():
    with pytest.raises(ValueError, match=r"exactly one; Received: tuple holding 0"):
        state_to_dict((optax.EmptyState(),), decay=0.9)


def test_head_state_dict_round_trip_and_steps_semantics():
    ht = head(batch_size=4, decay=schedule)
    state = ht.init({"kernel": jnp.zeros((D_IN, D_OUT)), "bias": jnp.zeros(D_OUT)})
    rng = np.random.default_rng(2)
    a, d = jnp.asarray(rng.normal(size=(4, D_IN))), jnp.asarray(rng.normal(size=(4, D_OUT)))
    _, _, state = ht.update(state, a, d)
    d_bad = d.at[1].set(jnp.nan)  # a non-finite batch: a step, but no reference update
    _, _, state = ht.update(state, a, d_bad)
    saved = state_to_dict(state, ht.config)
    assert (int(saved["count"]), int(saved["steps"])) == (1, 2)
    restored, _ = state_from_dict(
        saved, like=ht.init({"kernel": jnp.zeros((D_IN, D_OUT)), "bias": jnp.zeros(D_OUT)}), config=ht.config
    )
    _assert_same_tree(restored._replace(weights=0, alignment=0), state._replace(weights=0, alignment=0))
    assert math.isclose(float(saved["total"]), 1 - schedule(0), rel_tol=1e-6)

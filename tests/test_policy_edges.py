"""Edges of the core policy that the loop-reference tests do not reach (from a mutation audit,
docs in /work/notes/mutation-audit.md): the gather/local collectives of the memory, the int32
step counter's saturation, the interchange format's copies, exactness of the EMA at decay 0,
the eps boundary of the cosine, and the in-place memory update."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

import gradtail_ops as gt

from . import reference as ref
from .conftest import to_numpy

N = 12
MEMORY = {"size": N, "decay": 0.6, "eta": 1.5, "max_weight": 2.5}
CURVE = {"kind": "rank", "max_weight": 3.0, "quantile": 0.3, "normalize": True}


def _memory_config(warmup: int = 1) -> gt.GradTailConfig:
    return gt.GradTailConfig.from_options(
        **CURVE,
        decay=0.8,
        warmup_steps=warmup,
        memory_size=N,
        memory_decay=MEMORY["decay"],
        memory_eta=MEMORY["eta"],
        memory_max_weight=MEMORY["max_weight"],
    )


class _Replicas:
    """R replicas in R threads; gather/mean exchange their values at a barrier, in replica order."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.barrier = threading.Barrier(replicas)
        self.slots: list[object] = [None] * replicas

    def _exchange(self, rank: int, value: object) -> list[object]:
        self.barrier.wait()
        self.slots[rank] = value
        self.barrier.wait()
        everything = list(self.slots)
        self.barrier.wait()
        return everything

    def collectives(self, rank: int, batch: int) -> gt.Collectives:
        def mean(tree: object) -> object:
            return np.mean(np.stack(self._exchange(rank, tree)), axis=0)

        def gather(a: np.ndarray) -> np.ndarray:
            return np.concatenate(self._exchange(rank, np.asarray(a)))

        def local(a: np.ndarray) -> np.ndarray:
            return a[rank * batch : (rank + 1) * batch]

        return gt.Collectives(mean=mean, gather=gather, local=local)


def test_memory_with_gather_and_local_equals_one_global_batch():
    """R replicas of B examples give, per replica, its block of the global (R*B) batch's weights,
    and every replica holds the global-batch state (the float64 loop on the whole batch)."""
    replicas, batch, steps = 2, 4, 5
    config = _memory_config()
    rng = np.random.default_rng(7)
    grads = [rng.normal(size=(replicas * batch, 6)) for _ in range(steps)]
    for g in grads:
        g[:3] += 1.0
    # Each example appears once per step (index rows are distinct across replicas).
    rows = [rng.permutation(N)[: replicas * batch] for _ in range(steps)]
    group = _Replicas(replicas)
    results: list[list[gt.TailOutput]] = [[] for _ in range(replicas)]
    errors: list[BaseException] = []

    def replica(rank: int) -> None:
        try:
            state = gt.tail_init(np.zeros(6), config=config)
            part = slice(rank * batch, (rank + 1) * batch)
            for g, index in zip(grads, rows, strict=True):
                out = gt.tail_step(
                    state,
                    g[part],
                    config=config,
                    index=index[part],
                    collectives=group.collectives(rank, batch),
                )
                results[rank].append(out)
                state = out.state
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    expected, final = ref.gradtail_loop(
        list(zip(grads, rows, strict=True)),
        decay=0.8,
        reference="direction",
        warmup=1,
        curve=CURVE,
        memory=MEMORY,
    )
    for rank in range(replicas):
        part = slice(rank * batch, (rank + 1) * batch)
        for out, (w, a) in zip(results[rank], expected, strict=True):
            assert out.weights.shape == (batch,)
            np.testing.assert_allclose(out.alignment, a[part], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(out.weights, w[part], rtol=1e-9, atol=1e-12)
        state = results[rank][-1].state
        np.testing.assert_allclose(state.ema.mean, final["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(state.memory.score, final["memory_score"], atol=1e-12)
        np.testing.assert_array_equal(state.memory.visits, final["memory_visits"])


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_step_counter_saturates_at_the_int32_maximum(name):
    """A run longer than 2**31 - 1 steps keeps steps at the maximum; it never wraps negative."""
    xp = pytest.importorskip(name)
    config = gt.GradTailConfig(decay=0.9, curve=gt.WeightCurve(**CURVE))
    state = gt.tail_init(xp.asarray(np.zeros(3)), config=config)
    top = 2**31 - 1
    state = state._replace(steps=xp.asarray(np.int32(top - 1)))
    g = xp.asarray(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    for _ in range(3):
        state = gt.tail_step(state, g, config=config).state
        assert int(to_numpy(state.steps)) == top
        assert str(state.steps.dtype).endswith("int32")


def test_state_to_dict_is_a_snapshot_of_an_in_place_memory():
    """With copy_memory=False the memory is updated in place; a dict saved before must not change."""
    config = _memory_config(warmup=0)
    rng = np.random.default_rng(3)
    state = gt.tail_init(np.zeros(5), config=config)
    saved = None
    for step in range(4):
        g = rng.normal(size=(6, 5))
        out = gt.tail_step(state, g, config=config, index=rng.permutation(N)[:6], copy_memory=False)
        state = out.state
        if step == 1:
            saved = gt.state_to_dict(state, config=config)
            expected = {k: np.array(saved[k], copy=True) for k in saved if k not in ("decay", "reference")}
    assert saved is not None
    for key, value in expected.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)


def test_memory_update_in_place_writes_into_the_given_arrays():
    """copy=False is documented as O(B) in place on NumPy: the returned arrays are the input's."""
    state = gt.memory_init(N, like=np.zeros(1))
    score, visits = state.score, state.visits
    new = gt.memory_update(state, np.array([1, 4, 7]), np.array([0.3, -0.2, 0.9]), decay=0.5, copy=False)
    assert np.shares_memory(new.score, score)
    assert np.shares_memory(new.visits, visits)
    expected, expected_visits = ref.memory_scores(N, [(np.array([1, 4, 7]), np.array([0.3, -0.2, 0.9]))], 0.5)
    np.testing.assert_allclose(score, expected, atol=1e-12)
    np.testing.assert_array_equal(visits, expected_visits)


@pytest.mark.parametrize("name", ["numpy", "array_api_strict", "torch"])
def test_ema_with_decay_zero_is_the_latest_batch_bit_for_bit(name):
    """``decay = 0`` gives the latest g itself (documented exact), not m + (g - m) with round-off."""
    xp = pytest.importorskip(name)
    rng = np.random.default_rng(0)
    state = gt.ema_init(xp.asarray(np.zeros(2000)))
    state = gt.ema_update(state, xp.asarray(rng.normal(size=2000) * 1e3), decay=0.5)
    latest = rng.normal(size=2000) * 1e-3
    state = gt.ema_update(state, xp.asarray(latest), decay=0.0)
    assert np.array_equal(to_numpy(state.mean), latest)


def test_torch_large_layer_non_finite_batch_leaves_state_bit_identical():
    """Layers of at least 2**15 elements take the bit-pattern select on PyTorch: a skipped update
    must keep the old state exactly, and an accepted one must give the float64 EMA."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    shape = (256, 160)  # 40960 elements
    first, second = rng.normal(size=shape), rng.normal(size=shape)
    state = gt.ema_init(torch.zeros(shape, dtype=torch.float64))
    state = gt.ema_update(state, torch.as_tensor(first), decay=0.7)
    kept = state.mean.clone()
    bad = second.copy()
    bad[3, 5] = np.nan
    skipped = gt.ema_update(state, torch.as_tensor(bad), decay=0.7)
    assert torch.equal(skipped.mean, kept)
    assert int(skipped.count) == 1
    moved = gt.ema_update(state, torch.as_tensor(second), decay=0.7)
    expected = ref.ema([first, second], [0.7, 0.7])
    np.testing.assert_allclose(moved.mean.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert int(moved.count) == 2


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_a_norm_equal_to_eps_counts_as_zero(name):
    """ "Norms at or below eps count as zero": a gradient of norm exactly eps has cosine 0."""
    xp = pytest.importorskip(name)
    g = xp.asarray(np.array([[0.5, 0.0], [1.0, 0.0], [0.25, 0.0]]))
    out = to_numpy(gt.alignment(g, xp.asarray(np.array([2.0, 0.0])), eps=0.5))
    np.testing.assert_array_equal(out, [0.0, 1.0, 0.0])
    # The reference's norm at eps as well.
    out = to_numpy(gt.alignment(g, xp.asarray(np.array([0.5, 0.0])), eps=0.5))
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0])


def test_to_options_round_trips_every_field():
    """from_options(**config.to_options()) rebuilds the same config, non-default values included."""
    config = gt.GradTailConfig(
        decay=0.95,
        reference="mean",
        warmup_steps=4,
        curve=gt.WeightCurve(
            kind="zscore", max_weight=2.5, threshold=0.2, temperature=0.3, quantile=0.4, floor=-0.7
        ),
        eps=1e-6,
        method="ghost",
        memory=gt.MemoryConfig(9, decay=0.3, eta=0.7, max_weight=1.5),
    )
    assert gt.GradTailConfig.from_options(**config.to_options()) == config
    for field in dataclasses.fields(gt.GradTailConfig):
        assert getattr(gt.GradTailConfig.from_options(**config.to_options()), field.name) == getattr(
            config, field.name
        ), field.name


@pytest.mark.parametrize("total", [1.5, 1.0 + 1e-9])
def test_a_saved_total_above_one_is_refused(total):
    """``total = 1 - prod(decay)`` cannot exceed 1; the upper bound is checked, not only the lower."""
    config = gt.GradTailConfig(decay=0.9, curve=gt.WeightCurve(**CURVE))
    state = gt.tail_init(np.zeros(3), config=config)
    state = gt.tail_step(state, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), config=config).state
    saved = gt.state_to_dict(state, config=config)
    saved["total"] = np.float64(total)
    with pytest.raises(ValueError, match=r"`total` must be a finite number in \[0.0, 1.0\]"):
        gt.state_from_dict(saved, like=state, config=config)
    saved["total"] = np.float64(1.0)  # the bound itself is a valid total (decay 0)
    loaded, _ = gt.state_from_dict(saved, like=state, config=config)
    assert float(loaded.ema.total) == 1.0


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_rank_curve_when_the_quantile_share_is_a_whole_number(name):
    """quantile * n = 2 exactly: only examples with strictly fewer than 2 below are upweighted,
    ties included (the float64 counting reference)."""
    xp = pytest.importorskip(name)
    for align in ([0.1, 0.5, 0.9, 0.2], [0.1, 0.1, 0.3, 0.3], [0.4, 0.2, 0.2, 0.2], [0.3, 0.1, 0.2, 0.5]):
        got = to_numpy(
            gt.weight_curve(xp.asarray(np.array(align)), kind="rank", quantile=0.5, max_weight=3.0)
        )
        np.testing.assert_array_equal(got, ref.rank_weights(np.array(align), 0.5, 3.0))


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_a_non_finite_array_decay_skips_the_update_and_is_not_counted(name):
    """A jitted schedule that yields NaN/inf skips the update: mean, total and count unchanged."""
    xp = pytest.importorskip(name)
    state = gt.ema_update(gt.ema_init(xp.asarray(np.zeros(3))), xp.asarray(np.ones(3)), decay=0.5)
    for bad in (np.nan, np.inf, -np.inf):
        out = gt.ema_update(state, xp.asarray(np.array([3.0, -1.0, 2.0])), decay=xp.asarray(bad))
        assert int(to_numpy(out.count)) == 1
        assert float(to_numpy(out.total)) == 0.5
        np.testing.assert_array_equal(to_numpy(out.mean), np.ones(3))


def test_a_schedule_yielding_nan_counts_a_step_but_no_reference_update():
    """tail_step: the step is taken (steps + 1), the reference is not updated (count unchanged)."""
    config = gt.GradTailConfig(decay=lambda steps: np.asarray(np.nan), curve=gt.WeightCurve(**CURVE))
    state = gt.tail_init(np.zeros(2), config=config)
    out = gt.tail_step(state, np.array([[1.0, 0.0], [0.0, 1.0]]), config=config)
    assert int(out.state.steps) == 1
    assert int(out.state.ema.count) == 0
    assert float(out.state.ema.total) == 0.0


def test_memory_weights_give_one_to_unvisited_rows_whatever_their_score():
    """ "An example never visited gets 1": decided by visits, not by a zero score (a state built or
    loaded with a stale score and no visits)."""
    state = gt.MemoryState(np.array([-1.0, 2.0, -0.5]), np.array([0, 0, 2], dtype=np.int32))
    w = gt.memory_weights(state, np.array([0, 1, 2]), eta=1.0, max_weight=3.0, normalize=False)
    np.testing.assert_allclose(w, [1.0, 1.0, np.exp(0.5)], rtol=1e-15)


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_first_visit_without_standardisation_stores_the_score_exactly(name):
    """A group of one is taken exactly (no cumulative-sum round-off): with standardize=False the
    first visit stores each raw score bit for bit, next to scores of very different magnitude."""
    xp = pytest.importorskip(name)
    scores = np.array([1e8, 1e-8, 3.3, -7e7, 1.0 / 3.0, 2e-9])
    index = np.array([5, 0, 9, 2, 7, 3])
    state = gt.memory_init(N, like=xp.asarray(np.zeros(1)))
    new = gt.memory_update(state, xp.asarray(index), xp.asarray(scores), decay=0.5, standardize=False)
    np.testing.assert_array_equal(to_numpy(new.score)[index], scores)

"""examples/flax_nnx.py: Flax NNX with gradtail_optax (transformation, head path, mining)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

import gradtail_optax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("flax_nnx_example", ROOT / "examples" / "flax_nnx.py")
assert _spec is not None
assert _spec.loader is not None
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_head_path_equals_the_transformation_scoring_the_head():
    """Two steps from the same NNX parameters: the head path's alignments and weights equal the
    transformation's with alignment_mask selecting the head (factored vs materialised)."""
    x, y, _ = ex.toy_data(n=64)
    graphdef, params = nnx.split(ex.MLP(4, 8, 2, rngs=nnx.Rngs(1)), nnx.Param)
    mask = jax.tree_util.tree_map_with_path(lambda path, _: "head" in jax.tree_util.keystr(path), params)
    tx = gradtail_optax.gradtail(batch_size=32, decay=0.9, alignment_mask=mask)
    tx_state = tx.init(params)
    head = gradtail_optax.head_init(nnx.to_pure_dict(params)["head"], batch_size=32)

    @jax.jit
    def both(tx_state, head, batch):
        _, tx_state = tx.update(ex.per_example_grads(graphdef, params, batch), tx_state, params)
        model = nnx.merge(graphdef, params)
        h = model.features(batch[0])
        _, dlogits = gradtail_optax.loss_and_output_grads(ex.ce, model.head(h), batch[1])
        w, align, head = gradtail_optax.head_weights(head, h, dlogits, decay=0.9)
        return tx_state, head, w, align

    for batch in ex.batches(x, y, 32):
        tx_state, head, w, align = both(tx_state, head, batch)
    assert float(np.abs(np.asarray(align)).max()) > 0.1  # a reference exists on the second step
    np.testing.assert_allclose(np.asarray(align), np.asarray(tx_state.alignment), atol=2e-5)
    np.testing.assert_allclose(np.asarray(w), np.asarray(tx_state.weights), atol=1e-5)


def test_both_training_paths_run_and_weight():
    x, y, _ = ex.toy_data(n=256)
    initial = ex.train_transform(x, y, epochs=0)
    losses0 = float(np.mean(ex.ce(nnx.merge(initial[0], initial[1])(x), y)))
    graphdef, params, opt_state = ex.train_transform(x, y, epochs=2)
    assert float(np.mean(ex.ce(nnx.merge(graphdef, params)(x), y))) < losses0
    assert float(np.max(optax.tree.get(opt_state, "weights"))) > 1.0
    graphdef, params, gt = ex.train_head(x, y, epochs=2)
    assert float(np.mean(ex.ce(nnx.merge(graphdef, params)(x), y))) < losses0
    assert float(np.max(gt.weights)) > 1.0


def test_mining_ranks_the_rare_subgroup_low():
    x, y, rare = ex.toy_data()
    graphdef, params, _ = ex.train_head(x, y, epochs=2)
    scores = ex.mine(graphdef, params, x, y)
    assert scores.shape == (len(y),)
    assert auroc(-scores, rare) > 0.9

"""gradtail_torch.lightning with the real Lightning package: exact checkpoint resume, 2-process DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from gradtail_torch.lightning import GradTailCallback  # noqa: E402

from . import _lightning_models as lit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_checkpoint_resume_is_exact(tmp_path):
    straight_cb = GradTailCallback(decay=0.8, warmup_steps=2)
    straight = lit.LitClassifier()
    straight_trainer = lit.trainer(2, straight_cb)
    straight_trainer.fit(straight, lit.loader())

    first_cb = GradTailCallback(decay=0.8, warmup_steps=2)
    first = lit.LitClassifier()
    first_trainer = lit.trainer(1, first_cb)
    first_trainer.fit(first, lit.loader())
    ckpt = tmp_path / "epoch1.ckpt"
    first_trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["GradTailCallback"]
    assert int(saved["count"]) == 4  # 64 examples / 16 per batch, one epoch

    resumed_cb = GradTailCallback(decay=0.8, warmup_steps=2)
    resumed = lit.LitClassifier()
    with torch.no_grad():  # start from other weights: everything must come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    lit.trainer(2, resumed_cb).fit(resumed, lit.loader(), ckpt_path=ckpt)

    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    want, got = straight_cb.gradtail.state_dict(), resumed_cb.gradtail.state_dict()
    assert int(got["count"]) == int(want["count"]) == 8
    torch.testing.assert_close(got["total"], want["total"], rtol=0, atol=0)
    for layer_w, layer_g in zip(want["mean"], got["mean"], strict=True):
        for w, g in zip(layer_w, layer_g, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    metrics = straight_trainer.callback_metrics
    assert {"gradtail/alignment_mean", "gradtail/alignment_min", "gradtail/weight_max"} <= set(metrics)
    assert float(metrics["gradtail/weight_max"]) > 1.0  # weighting is on after warm-up
    assert -1.0 <= float(metrics["gradtail/alignment_min"]) <= float(metrics["gradtail/alignment_mean"])


def test_callback_on_chosen_modules_and_errors():
    cb = GradTailCallback("head")
    model = lit.LitClassifier()
    lit.trainer(1, cb, limit_train_batches=2).fit(model, lit.loader())
    assert cb.gradtail.layers == [model.head]
    with pytest.raises(ValueError, match="Received: 'nope'"):
        lit.trainer(1, GradTailCallback("nope"), limit_train_batches=1).fit(lit.LitClassifier(), lit.loader())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_ddp_two_cpu_processes(tmp_path):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]), OMP_NUM_THREADS="1"
    )
    result = subprocess.run(
        [sys.executable, "-m", "tests._lightning_models", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    # 64 examples, 8 per batch per rank on 2 ranks: 4 steps an epoch, 2 epochs.
    assert [int(r["state"]["count"]) for r in ranks] == [8, 8]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # DDP kept the replicas equal
    # The batch reference is averaged over ranks before each EMA update: one state on both.
    for la, lb in zip(ranks[0]["state"]["mean"], ranks[1]["state"]["mean"], strict=True):
        for a, b in zip(la, lb, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert bool(torch.linalg.vector_norm(a) > 0)
    assert "gradtail/alignment_mean" in ranks[0]["metrics"]

"""Two CPU processes on gloo: every rank's GradTail state equals a single-process run on the
concatenated batch, because the batch reference is averaged across ranks before the EMA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
mp = pytest.importorskip("torch.multiprocessing")
F = torch.nn.functional

from gradtail_torch import GradTail  # noqa: E402

from . import _ddp_worker as worker  # noqa: E402


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.filterwarnings("ignore:GradTail\\(model\\) does not track")
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_two_ranks_hold_the_single_process_state(tmp_path, kind):
    steps, batch = 3, 8
    mp.spawn(
        worker.run, args=(2, str(tmp_path / "init"), str(tmp_path), steps, batch, kind), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # The single-process reference on the whole batch, without torch.distributed, stepping
    # through the ranks' parameters (they trained with DDP-averaged weighted gradients).
    for r in ranks[1:]:
        for step_params, other in zip(ranks[0]["params"], r["params"], strict=True):
            for pa, pb in zip(step_params, other, strict=True):
                torch.testing.assert_close(pa, pb, rtol=0, atol=0)  # DDP kept replicas equal
    model = worker.make_model(kind)
    gt = GradTail(model, decay=0.8)
    for step, (x, y) in enumerate(worker.batches(steps, batch, kind)):
        with torch.no_grad():
            for p, value in zip(model.parameters(), ranks[0]["params"][step], strict=True):
                p.copy_(value)
        gt.weights(F.cross_entropy(model(x), y, reduction="none"))
        expected = torch.cat([r["alignments"][step] for r in ranks])
        torch.testing.assert_close(gt.last_alignment, expected, rtol=1e-10, atol=1e-12)
    reference = gt.state_dict()
    for r in ranks:
        assert int(r["state"]["count"]) == steps
        torch.testing.assert_close(r["state"]["total"], reference["total"], rtol=1e-12, atol=0)
        for layer, ref_layer in zip(r["state"]["mean"], reference["mean"], strict=True):
            for t, ref_t in zip(layer, ref_layer, strict=True):
                torch.testing.assert_close(t, ref_t, rtol=1e-10, atol=1e-13)

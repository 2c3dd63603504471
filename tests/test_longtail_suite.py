"""The long-tail evidence suite (benchmarks/longtail/run.py): CLI smoke run, JSON schema, AUROC."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.longtail.methods import METHODS
from benchmarks.longtail.metrics import auroc

ROOT = Path(__file__).resolve().parents[1]
#: The smoke run's methods: one of each kind (the full list would only repeat the same paths).
SMOKE_METHODS = (
    "uniform",
    "class_balanced",
    "loss_rank",
    "gradtail",
    "gradtail_head",
    "jtt",
    "class_balanced_gradtail",
)


def _pairwise_auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Independent reference: the share of (positive, negative) pairs ranked right, ties 1/2."""
    pos, neg = score[positive], score[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def test_auroc_perfect_and_inverted():
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    positive = np.array([False, False, False, True, True])
    assert auroc(score, positive) == 1.0
    assert auroc(-score, positive) == 0.0
    assert auroc(np.zeros(5), positive) == 0.5
    assert np.isnan(auroc(score, np.zeros(5, dtype=bool)))


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        score = rng.integers(0, 6, size=n).astype(float)  # many ties
        positive = rng.random(n) < 0.3
        if positive.all() or not positive.any():
            continue
        assert auroc(score, positive) == pytest.approx(_pairwise_auroc(score, positive), abs=1e-12)


def test_quick_cli_on_digits_writes_the_documented_json(tmp_path):
    out = tmp_path / "longtail.json"
    cmd = [
        sys.executable, "-m", "benchmarks.longtail.run", "--quick", "--datasets", "digits_lt10",
        "--seeds", "0", "--epochs", "2", "--out", str(out), "--no-progress", "--methods", *SMOKE_METHODS,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())

    assert doc["benchmark"] == "longtail"
    assert doc["quick"] is True
    for key in ("date", "command", "wall_seconds", "config", "datasets", "methods", "runs", "aggregates"):
        assert key in doc, key
    machine = doc["machine"]
    for key in ("cpu_model", "cpu_count", "loadavg_before", "loadavg_after", "git"):
        assert key in machine, key
    assert machine["versions"]["torch"].startswith("2.13.0")
    assert "commit" in machine["git"]
    assert "--datasets digits_lt10" in doc["command"]

    info = doc["datasets"]["digits_lt10"]
    assert info["epochs"] == 2
    assert set(info["groups"]) == {"many", "medium", "few"}
    assert info["n_val"] == info["n_test"]  # balanced halves of the balanced test pool

    runs = doc["runs"]
    assert runs[0]["method"] == "uniform"
    assert {r["method"] for r in runs} == set(SMOKE_METHODS)
    for r in runs:
        assert r["dataset"] == "digits_lt10"
        assert r["seed"] == 0
        for key in ("balanced_accuracy", "accuracy", "many", "medium", "few"):
            assert 0.0 <= r["test"][key] <= 100.0
        assert len(r["test"]["per_class"]) == 10
        assert r["test"]["balanced_accuracy"] == pytest.approx(np.mean(r["test"]["per_class"]))
        assert len(r["val"]["curve"]) == 2
        assert r["val"]["balanced_accuracy"] == r["val"]["curve"][-1]
        # validation-based selection: the earliest epoch of the highest validation accuracy
        curve = r["val"]["curve"]
        assert r["selected_epoch"] == 1 + min(k for k, v in enumerate(curve) if v == max(curve))
        assert r["val"]["selected_balanced_accuracy"] == max(curve)
        selected = r["test"]["selected_balanced_accuracy"]
        assert selected == pytest.approx(np.mean(r["test"]["selected_per_class"]))
        if r["selected_epoch"] == 2:
            assert r["test"]["selected_balanced_accuracy"] == r["test"]["balanced_accuracy"]
        assert r["late_epochs"] == 1  # the last 25% of 2 epochs, at least one
        assert r["test"]["late_balanced_accuracy"] == pytest.approx(r["test"]["balanced_accuracy"])
        assert r["val"]["late_balanced_accuracy"] == pytest.approx(r["val"]["balanced_accuracy"])
        assert r["seconds_per_epoch"] > 0
        uniform = next(u for u in runs if u["method"] == "uniform")
        for key in ("balanced_accuracy", "selected_balanced_accuracy", "late_few"):
            delta = r["delta_vs_uniform"][key]
            assert delta == pytest.approx(r["test"][key] - uniform["test"][key])
        detectors = r["tail_detection"]["auroc"]
        expected = {"loss", "alignment"} if doc["methods"][r["method"]]["gradtail"] else {"loss"}
        assert set(detectors) == expected
        for marks in detectors.values():
            assert set(marks) == {"0.1", "0.5", "1"}
            assert all(v is None or 0.0 <= v <= 1.0 for v in marks.values())
        if doc["methods"][r["method"]]["gradtail"]:
            hist = r["alignment_histograms"]
            assert set(hist["marks"]) == {"0.1", "1"}
            assert len(hist["edges"]) == len(hist["marks"]["1"]["few"]) + 1
            wvs = r["weight_vs_score"]
            assert len(wvs["edges"]) == len(wvs["groups"]["few"]["count"]) + 1

    aggs = {a["method"]: a for a in doc["aggregates"]}
    assert set(aggs) == set(SMOKE_METHODS)
    gt = aggs["gradtail"]
    assert gt["n_seeds"] == 1
    d = gt["delta_vs_uniform"]["balanced_accuracy"]
    assert set(d) >= {"mean", "std", "n_positive", "every_seed_positive"}
    assert d["every_seed_positive"] == (d["mean"] > 0)
    assert aggs["uniform"]["delta_vs_uniform"]["balanced_accuracy"]["mean"] == 0.0

    assert doc["figures"], "figures were requested"
    for path in doc["figures"]:
        assert Path(path).exists() or (ROOT / path).exists(), path

    from benchmarks.longtail.render import render

    text = render(doc)
    assert "Quick smoke run" in text
    assert "GradTail (defaults)" in text
    assert "selected epoch" in text


def test_variant_cli_parses_and_registers():
    from benchmarks.longtail.run import parse_args

    args = parse_args(
        ["--quick", "--methods", "uniform", "--variant", "t_head_w5", "head_only=true", "max_weight=5"]
    )
    assert args.methods == ["uniform", "t_head_w5"]
    spec = METHODS.pop("t_head_w5")
    assert spec.gradtail
    assert spec.options == {"head_only": True, "max_weight": 5.0}
    with pytest.raises(SystemExit):
        parse_args(["--variant", "bad", "max_weight"])
    with pytest.raises(SystemExit):
        parse_args(["--variant", "uniform", "decay=0.9"])


def test_last_layer_variant_registers_last_layer_retraining():
    import torch

    from benchmarks.longtail.methods import Context, LastLayerRetraining
    from benchmarks.longtail.run import parse_args

    parse_args(["--methods", "uniform", "--variant", "t_ll", "last_layer=alignment", "gamma=4"])
    spec = METHODS.pop("t_ll")
    assert spec.options == {"last_layer": "alignment", "gamma": 4.0}
    model = torch.nn.Linear(2, 2)
    ctx = Context(
        model, np.array([1, 1]), 1, 0, epochs=1, first_model=lambda e: torch.nn.Linear(2, 2),
        true_class_probability=lambda e: np.zeros(3), alignments=lambda e: np.array([0.1, 0.3, 0.2]),
    )  # fmt: skip
    method = spec.make(ctx)
    assert isinstance(method, LastLayerRetraining)
    expected = np.exp(-4.0 * np.array([0.0, 1.0, 0.5]))
    np.testing.assert_allclose(method.table.numpy(), expected / expected.mean(), rtol=1e-6)
    for bad in (
        ["last_layer=loss", "gamma=2"],
        ["last_layer=p_true"],
        ["last_layer=p_true", "gamma=2", "decay=0.9"],
    ):
        with pytest.raises(SystemExit):
            parse_args(["--variant", "t_bad", *bad])
        METHODS.pop("t_bad", None)


def test_selected_epoch_is_the_first_best():
    from benchmarks.longtail.run import selected_epoch

    assert selected_epoch([0.1, 0.5, 0.3, 0.5]) == 1
    assert selected_epoch([0.9]) == 0


def test_weight_vs_score_matches_a_loop():
    from benchmarks.longtail.analysis import weight_vs_score

    rng = np.random.default_rng(1)
    n = 500
    scores = {
        "alignment": rng.uniform(-1, 1, n).astype(np.float32),
        "weight": rng.uniform(0.5, 3, n).astype(np.float32),
        "step": rng.integers(0, 10, n),
    }
    groups = rng.choice(["many", "medium", "few"], n)
    out = weight_vs_score(scores, groups=groups, start_step=3, bins=8)
    edges = np.linspace(-1, 1, 9)
    for g in ("many", "medium", "few"):
        for b in range(8):
            upper = scores["alignment"] <= edges[b + 1] if b == 7 else scores["alignment"] < edges[b + 1]
            sel = (groups == g) & (scores["step"] >= 3) & (scores["alignment"] >= edges[b]) & upper
            assert out["groups"][g]["count"][b] == sel.sum()
            if sel.any():
                expected = scores["weight"][sel].mean()
                assert out["groups"][g]["mean_weight"][b] == pytest.approx(expected, rel=1e-5)


def test_jtt_upweights_exactly_the_error_set():
    import torch

    from benchmarks.longtail.methods import Batch, Context

    errors = np.array([True, False, False, True, False])
    ctx = Context(torch.nn.Linear(2, 2), np.array([3, 2]), 1, 0, misclassified=lambda epochs: errors)
    jtt = METHODS["jtt"].make(ctx, identify_epochs=1, upweight=10.0)
    loss = torch.ones(5)
    w = jtt.weights(Batch(loss, loss, torch.zeros(5, dtype=torch.long), 0, index=torch.arange(5)))
    expected = np.where(errors, 10.0, 1.0)
    np.testing.assert_allclose(w.numpy(), expected / expected.mean(), rtol=1e-6)


def test_two_stage_gradtail_upweights_the_lowest_aligned_share():
    import torch

    from benchmarks.longtail.methods import Batch, Context

    scores = np.array([0.9, -0.2, 0.5, np.nan, 0.1, 0.7, -0.5, 0.3, 0.8, 0.6])
    ctx = Context(torch.nn.Linear(2, 2), np.array([6, 4]), 1, 0, alignments=lambda epochs: scores)
    method = METHODS["gradtail_two_stage"].make(ctx, quantile=0.3, upweight=4.0)
    w = method.weights(
        Batch(torch.ones(10), torch.ones(10), torch.zeros(10, dtype=torch.long), 0, index=torch.arange(10))
    )
    expected = np.where(np.isin(np.arange(10), [6, 1, 4]), 4.0, 1.0)  # the three lowest; NaN is never tail
    np.testing.assert_allclose(w.numpy(), expected / expected.mean(), rtol=1e-6)


#: (method, first-phase scores, the s_i they give): AFR's label probability (NaN counts as fitted);
#: GradTail's alignment as a percentile rank (NaN ranks last).
LAST_LAYER_CASES = [
    ("afr", [0.9, 0.1, 0.5, np.nan, 1.0], [0.9, 0.1, 0.5, 1.0, 1.0]),
    ("gradtail_last_layer", [0.3, -0.2, 0.1, np.nan, 0.0], [0.75, 0.0, 0.5, 1.0, 0.25]),
]


@pytest.mark.parametrize(("name", "score", "s"), LAST_LAYER_CASES)
def test_last_layer_retraining_starts_from_the_first_model_and_trains_the_head_alone(name, score, s):
    import torch

    from benchmarks.longtail.methods import Batch, Context

    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    ctx = Context(
        model, np.array([3, 2]), 1, 0, epochs=7,
        first_model=lambda epochs: first if epochs == 7 else None,
        true_class_probability=lambda epochs: np.asarray(score), alignments=lambda epochs: np.asarray(score),
    )  # fmt: skip
    method = METHODS[name].make(ctx, gamma=3.0)
    for mine, theirs in zip(model.parameters(), first.parameters(), strict=True):
        assert torch.equal(mine, theirs)
        assert mine is not theirs
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    w = method.weights(
        Batch(torch.ones(5), torch.ones(5), torch.zeros(5, dtype=torch.long), 0, torch.arange(5))
    )
    expected = np.exp(-3.0 * np.asarray(s))
    np.testing.assert_allclose(w.numpy(), expected / expected.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="score must be"):
        METHODS[name].make(ctx, score="loss")


def test_last_layer_retraining_keeps_a_cnn_s_features_fixed_in_train_mode():
    """BatchNorm statistics and dropout belong to the frozen features: after head-only steps in
    train mode, everything but the head equals the first model, and two forwards agree."""
    import torch

    from benchmarks.longtail.methods import Batch, Context
    from benchmarks.longtail.models import build_model

    torch.manual_seed(0)
    first, model = build_model("cnn", 784, 3), build_model("cnn", 784, 3)
    first.train()
    with torch.no_grad():
        first(torch.randn(32, 784))  # BatchNorm statistics of its own
    n = 16
    ctx = Context(
        model, np.array([8, 8]), 1, 0, epochs=1, first_model=lambda e: first,
        true_class_probability=lambda e: np.linspace(0, 1, n), alignments=lambda e: np.zeros(n),
    )  # fmt: skip
    method = METHODS["afr"].make(ctx)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(n, 784), torch.randint(0, 3, (n,))
    model.train()
    for step in range(3):
        opt.zero_grad()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        method.backward(Batch(loss, logits, y, step, index=torch.arange(n)))
        opt.step()
    head_name = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    head_keys = {f"{head_name}.weight", f"{head_name}.bias"}
    theirs = first.state_dict()
    for key, value in model.state_dict().items():
        if key in head_keys:
            assert not torch.equal(value, theirs[key]), key  # the head did train
        else:
            assert torch.equal(value, theirs[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # no dropout noise in train mode
    method.close()
    assert model.training


def test_logit_adjusted_last_layer_differentiates_the_weighted_adjusted_loss():
    """The head's gradient is that of mean_i w_i CE(f(x_i) + tau log(prior), y_i), w_i =
    exp(-gamma s_i) / mean, by hand in float64; the first layer stays frozen."""
    import torch

    from benchmarks.longtail.methods import Batch, Context
    from benchmarks.longtail.run import parse_args

    parse_args(["--variant", "t_la_ll", "last_layer=alignment", "gamma=2", "tau=0.5"])
    spec = METHODS.pop("t_la_ll")
    assert spec.uses_class_counts
    rng = np.random.default_rng(1)
    counts, n = np.array([40, 8, 2]), 6
    x, y = rng.normal(size=(n, 3)), np.array([0, 1, 2, 0, 1, 0])
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    align = np.array([0.5, -0.1, 0.2, 0.9, 0.0, 0.3])
    ctx = Context(
        model, counts, 1, 0, epochs=2, first_model=lambda e: first,
        true_class_probability=lambda e: np.zeros(n), alignments=lambda e: align,
    )  # fmt: skip
    method = spec.make(ctx)
    logits = model(torch.as_tensor(x))
    plain = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y), reduction="none")
    w = method.backward(Batch(plain, logits, torch.as_tensor(y), 0, index=torch.arange(n)))
    ranks = np.argsort(np.argsort(align)) / (n - 1)
    w_ref = np.exp(-2.0 * ranks)
    w_ref /= w_ref.mean()
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6)
    h = np.tanh(x @ first[0].weight.detach().numpy().T + first[0].bias.detach().numpy())
    z = (
        h @ first[2].weight.detach().numpy().T
        + first[2].bias.detach().numpy()
        + 0.5 * np.log(counts / counts.sum())
    )
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = w_ref[:, None] * (p - np.eye(3)[y]) / n
    np.testing.assert_allclose(model[2].weight.grad.numpy(), dz.T @ h, rtol=1e-5)
    np.testing.assert_allclose(model[2].bias.grad.numpy(), dz.sum(0), rtol=1e-5)
    assert model[0].weight.grad is None


@pytest.mark.parametrize("name", ["logit_adjustment", "logit_adjustment_gradtail"])
def test_logit_adjustment_differentiates_the_adjusted_loss(name):
    """The head's gradient is that of mean CE(f(x) + log(prior), y), by hand in float64 (the
    GradTail variant's weights are 1 in its warm-up step)."""
    import torch

    from benchmarks.longtail.methods import Batch, Context

    rng = np.random.default_rng(0)
    counts = np.array([50, 5, 1])
    x, y = rng.normal(size=(6, 4)), np.array([0, 1, 2, 0, 0, 1])
    head = torch.nn.Linear(4, 3).double()
    method = METHODS[name].make(Context(head, counts, steps_per_epoch=1, warmup_steps=1))
    logits = head(torch.as_tensor(x))
    plain = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y), reduction="none")
    w = method.backward(Batch(plain, logits, torch.as_tensor(y), 0))
    method.close()
    z = logits.detach().numpy() + np.log(counts / counts.sum())
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(3)[y]) / len(y)
    np.testing.assert_allclose(w.numpy(), 1.0)
    np.testing.assert_allclose(head.weight.grad.numpy(), dz.T @ x, rtol=1e-10)
    np.testing.assert_allclose(head.bias.grad.numpy(), dz.sum(0), rtol=1e-10)


def test_variants_table_writes_its_own_benchmark():
    from benchmarks.longtail.run import VARIANTS_BENCHMARK, benchmark_name, parse_args

    args = parse_args(["--variants-table", "--methods", "uniform", "--variant", "t_sk", "sketch_rank=16"])
    METHODS.pop("t_sk")
    assert benchmark_name(args) == VARIANTS_BENCHMARK
    assert args.out.name == f"{VARIANTS_BENCHMARK}.json"
    with pytest.raises(SystemExit):
        parse_args(["--variants-table", "--sweep"])


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed",
)
def test_hidden_strata_data_set():
    from benchmarks.longtail.datasets import load_dataset

    split = load_dataset("fashion_hidden", 0)
    data = split.data
    assert data.sub_train is not None
    assert data.sub_test is not None
    assert split.sub_val is not None
    sub_counts = np.bincount(data.sub_train, minlength=10)
    assert list(sub_counts[:5]) == [6000] * 5
    assert list(sub_counts[5:]) == [120] * 5
    np.testing.assert_array_equal(data.y_train, data.sub_train % 5)  # superclass k = classes k, k + 5
    assert list(data.counts) == [6120] * 5
    assert list(np.bincount(data.sub_test, minlength=10)) == [500] * 10  # test half balanced by subclass
    assert list(np.bincount(split.sub_val, minlength=10)) == [500] * 10
    groups = data.example_groups(np.arange(len(data.y_train)))
    np.testing.assert_array_equal(groups == "few", data.sub_train >= 5)

    from benchmarks.longtail.train import metrics

    pred = data.y_test.copy()
    pred[data.sub_test == 7] = (pred[data.sub_test == 7] + 1) % 5  # every "Sneaker" wrong
    m = metrics(pred, data.y_test, data, data.sub_test)
    assert m["worst_subclass"] == 0.0
    assert m["rare_subclass"] == pytest.approx(0.8)
    assert m["common_subclass"] == 1.0


def test_metrics_doctests():
    import doctest

    from benchmarks.longtail import metrics

    result = doctest.testmod(metrics)
    assert result.attempted > 0
    assert result.failed == 0

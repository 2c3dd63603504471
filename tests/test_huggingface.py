"""gradtail_torch.hf.GradTailTrainer on tiny randomly initialised models (no download), on CPU."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gradtail_torch.hf import GRADTAIL_STATE_NAME, GradTailTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)
VOCAB, SEQ = 40, 8


def bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQ, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=SEQ)
    return transformers.GPT2LMHeadModel(config)


def dataset(kind: str, n: int = 24):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    if kind == "classification":
        labels = (ids[:, 0] % 3 == 0).long() + (ids[:, 1] % 7 == 0).long()
        mask = torch.ones(SEQ, dtype=torch.long)
        return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]
    labels = ids.clone()
    labels[:4, -3:] = -100  # a few padded tail positions
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def make_trainer(model, data, out, **kwargs):
    torch.manual_seed(0)
    options = {
        "output_dir": str(out), "per_device_train_batch_size": 4, "num_train_epochs": 1,
        "learning_rate": 1e-2, "use_cpu": True, "report_to": [], "save_strategy": "no",
        "logging_steps": 2, "seed": 0,
        "disable_tqdm": True, "dataloader_num_workers": 0,
    }  # fmt: skip
    args = transformers.TrainingArguments(**{**options, **kwargs.pop("args", {})})
    return GradTailTrainer(model=model, args=args, train_dataset=data, **kwargs)


def independent_losses(model, data, causal):
    """Each example's loss from the model's own loss, one example at a time (HF's reduction)."""
    model.eval()
    out = []
    with torch.no_grad():
        for ex in data:
            batch = {k: v[None] for k, v in ex.items()}
            out.append(model(**batch).loss)
    model.train()
    return torch.stack(out)


@pytest.mark.parametrize(
    ("factory", "kind", "head"),
    [(bert, "classification", "classifier"), (llama, "lm", "lm_head"), (gpt2, "lm", "lm_head")],
)
def test_one_epoch_weights_the_per_example_losses(tmp_path, factory, kind, head):
    torch.manual_seed(0)
    model = factory()
    data = dataset(kind)
    trainer = make_trainer(model, data, tmp_path, gradtail_options={"decay": 0.5})
    # First: compute_loss against the model's own per-example losses (weights are 1 on step 1).
    batch = {k: torch.stack([ex[k] for ex in data[:4]]) for k in data[0]}
    expected = independent_losses(model, data[:4], kind == "lm")
    model.train()
    for m in model.modules():  # no dropout, so the training forward equals the reference forward
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-5, atol=1e-6)
    assert trainer.gradtail.layers == [model.get_submodule(head)]
    loss.backward()
    model.zero_grad()
    # Second step: the weights are GradTail's, and the loss is their weighted mean.
    loss = trainer.compute_loss(model, dict(batch))
    w = trainer.gradtail.last_weights
    assert not torch.allclose(w, torch.ones_like(w))
    torch.testing.assert_close(loss, (w * expected).mean(), rtol=1e-5, atol=1e-6)
    model.zero_grad()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert (
        int(trainer.gradtail.state_dict()["count"]) == 2 + 6
    )  # the two steps above, then 24 examples, 4 a step
    logged = [entry for entry in trainer.state.log_history if "gradtail_alignment_mean" in entry]
    assert logged
    # Evaluation: the unweighted mean of the per-example losses, and no GradTail step.
    metrics = trainer.evaluate(eval_dataset=data[:8])
    expected = independent_losses(model, data[:8], kind == "lm").mean()
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert int(trainer.gradtail.state_dict()["count"]) == 8
    if kind == "lm" and factory is llama:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stayed tied


def test_checkpoint_resume_restores_the_state(tmp_path):
    def run(out, resume=None, **args):
        torch.manual_seed(0)
        trainer = make_trainer(
            bert(), dataset("classification"), out, gradtail_options={"decay": 0.5},
            args={"save_strategy": "steps", "save_steps": 3, **args},
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "a")
    saved = tmp_path / "a" / "checkpoint-3" / GRADTAIL_STATE_NAME
    assert saved.exists()
    assert int(torch.load(saved)["count"]) == 3
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    want, got = straight.gradtail.state_dict(), resumed.gradtail.state_dict()
    assert int(got["count"]) == int(want["count"]) == 6
    for lw, lg in zip(want["mean"], got["mean"], strict=True):
        for w, g in zip(lw, lg, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

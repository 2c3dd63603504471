"""The long-tail suite's architectures (benchmarks/longtail/models.py) and ``run.py --arch``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks.longtail.models import ARCHS, PATCH, ViT, build_model


@pytest.mark.parametrize("arch", ARCHS)
def test_models_map_flat_images_to_logits(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 784, 10)
    out = model(torch.rand(5, 784))
    assert out.shape == (5, 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == 10  # the head GradTail's head_only tracks


def test_vit_patches_are_the_7x7_tiles_in_row_major_order() -> None:
    """Reference: torch's own unfold of the 28x28 image into non-overlapping 7x7 tiles."""
    torch.manual_seed(0)
    vit = ViT(10)
    x = torch.rand(3, 784)
    seen: list[torch.Tensor] = []
    vit.embed.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    vit(x)
    tiles = torch.nn.functional.unfold(x.reshape(3, 1, 28, 28), kernel_size=PATCH, stride=PATCH)
    torch.testing.assert_close(seen[0], tiles.transpose(1, 2))


def test_image_models_refuse_other_inputs() -> None:
    with pytest.raises(ValueError, match="Received: d_in=64"):
        build_model("cnn", 64, 10)
    with pytest.raises(ValueError, match="Received: arch='resnet'"):
        build_model("resnet", 784, 10)


def test_arch_option_keys_and_defaults() -> None:
    from benchmarks.longtail.run import ARCH_METHODS, benchmark_name, parse_args, run_key

    mlp = parse_args(["--datasets", "fashion_lt100"])
    cnn = parse_args(["--arch", "cnn", "--datasets", "fashion_lt100"])
    assert benchmark_name(mlp) == "longtail"
    assert benchmark_name(cnn) == "longtail_cnn"
    assert str(cnn.out).endswith("longtail_cnn.json")
    # GradTail(model) tracks the CNN's Linear layers, so every default method runs
    assert cnn.methods == list(ARCH_METHODS)
    assert not cnn.arch_skipped
    # the MLP's run keys (and so its checkpoints) stay as they were; other archs are keyed apart
    assert "arch" not in json.loads(run_key("fashion_lt100", 0, "uniform", 12, mlp))
    assert json.loads(run_key("fashion_lt100", 0, "uniform", 12, cnn))["arch"] == "cnn"
    with pytest.raises(SystemExit):
        parse_args(["--arch", "vit", "--sweep"])


def test_vit_defaults_drop_whole_model_gradtail_only_where_it_fails() -> None:
    from benchmarks.longtail.run import parse_args, whole_model_gradtail_error

    vit = parse_args(["--arch", "vit", "--datasets", "fashion_lt100"])
    reason = whole_model_gradtail_error("vit")
    assert ("gradtail" in vit.methods) == (reason is None)
    assert "gradtail_head" in vit.methods
    if reason is not None:
        assert vit.arch_skipped == {"gradtail": reason}


def test_torch_overhead_renders_the_arch_rows() -> None:
    from benchmarks.torch_overhead import render

    def row(variant: str, seconds: float, peak: int) -> dict[str, object]:
        return {
            "arch": "cnn",
            "B": 128,
            "variant": variant,
            "seconds": seconds,
            "ratio_to_plain": seconds / 0.1,
            "peak_bytes": peak,
            "peak_ratio_to_plain": peak / 2**20,
        }

    doc = {
        "results": [],
        "arch_models": {"cnn": "a CNN"},
        "arch_results": [
            row("plain", 0.1, 2**20),
            row("gt_head", 0.12, 2**20),
            row("gt_all_weights", 0.15, 2 * 2**20),
            {"arch": "vit", "B": 128, "variant": "gt_all_weights", "skipped": "RuntimeError: no"},
        ],
    }
    text = render(doc).replace("\N{MULTIPLICATION SIGN}", "x")
    assert "| cnn | 128 | 100 ms (1x) / 1.00 MiB (1x) | 120 ms (1.2x) / 1.00 MiB (1x) |" in text
    assert "150 ms (1.5x) / 2.00 MiB (2x)" in text
    assert "| vit | 128 |  |  | fails: RuntimeError |" in text

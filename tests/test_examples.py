"""The scripts under examples/ run, at a tiny size."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_transmil_example_trains_saves_a_heatmap_and_a_model_that_load_rebuilds(tmp_path):
    pytest.importorskip("matplotlib")
    import torch

    example = runpy.run_path(str(EXAMPLES / "transmil.py"))
    png, path = tmp_path / "heatmap.png", tmp_path / "model.pt"
    argv = ["--dim", "16", "--landmarks", "8", "--features", "12", "--steps", "2", "--batch", "2"]
    argv += ["--train-sizes", "10", "20", "--bag-size", "30", "--eval-bags", "4"]
    result = example["main"]([*argv, "--out", str(png), "--save", str(path)])
    assert png.read_bytes().startswith(b"\x89PNG")
    assert len(result["losses"]) == 2
    # The heatmap is the class token's row over the 30 instances: a share of attention.
    assert 0.0 <= result["accuracy"] <= 1.0 and abs(result["key_share"]) < 10
    # The file alone rebuilds the model: the settings it needs and the weights.
    model, saved = example["load"](str(path))
    assert saved["settings"] == dict(features=12, dim=16, landmarks=8, attention="nystromer")
    assert saved["training"]["losses"] == result["losses"] and saved["training"]["batch"] == 2
    bags = torch.randn(3, 25, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(bags), result["model"].eval()(bags), rtol=0, atol=0)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not written by examples/transmil.py --save"):
        example["load"](str(tmp_path / "other.pt"))


def test_transmil_heatmap_is_the_class_token_row_in_both_numerics():
    import torch

    example = runpy.run_path(str(EXAMPLES / "transmil.py"))
    torch.manual_seed(0)
    model = example["TransMIL"](8, 16, landmarks=8).eval()
    bags = torch.randn(2, 21, 8)
    for numerics in ("nystromer", "lucidrains"):
        for trans_layer in model.layers:
            trans_layer.attn.numerics = numerics
        with torch.no_grad():
            x = model._tokens(bags)
            _, first = model.layers[0](x, return_attn=True)
            _, second = model.layers[1](model.layers[0](x), return_attn=True)
        # 22 tokens: lucidrains numerics pad 2 zero tokens in front to a multiple of 8.
        pad = {"nystromer": 0, "lucidrains": 2}[numerics]
        for layer, attn in enumerate((first, second)):
            heat = model.heatmap(bags, layer)
            assert heat.shape == (2, 8, 21) and attn.shape[-1] == 22 + pad
            torch.testing.assert_close(heat, attn.full()[:, :, pad, pad + 1 :])

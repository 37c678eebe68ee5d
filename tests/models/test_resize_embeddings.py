"""resize_token_embeddings: transformers' semantics, checked against transformers itself."""

from __future__ import annotations

import pytest
import torch

import nystromer.models as ours
from nystromer.models import NystromformerForMaskedLM

from .tiny import tiny_config, tiny_hf_config

# float32 logits of the same weights through numerics="hf" and transformers: measured ≤ 2e-7
# of their scale in tests/models/test_hf_compat.py; 1e-5 as there.
TOL = 1e-5


def _pair(tmp_path, tie):
    """transformers' masked LM (random output bias) and ours loaded from its checkpoint."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.NystromformerForMaskedLM(tiny_hf_config(tie_word_embeddings=tie)).eval()
    with torch.no_grad():
        hf.cls.predictions.decoder.bias.normal_()  # the bias its forward adds, tied or not
    hf.save_pretrained(tmp_path / "hf")
    model = NystromformerForMaskedLM.from_pretrained(tmp_path / "hf", numerics="hf", strict=True)
    return hf, model


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("rows, multiple", [(57, None), (43, None), (45, 8)])
def test_resize_as_transformers_does(tmp_path, tie, rows, multiple):
    transformers = pytest.importorskip("transformers")
    hf, model = _pair(tmp_path, tie)
    got = model.resize_token_embeddings(rows, pad_to_multiple_of=multiple, mean_resizing=False)
    hf.resize_token_embeddings(rows, pad_to_multiple_of=multiple, mean_resizing=False)
    size = hf.config.vocab_size
    assert got is model.get_input_embeddings() and model.config.vocab_size == size
    keep = min(50, size)
    pairs = [
        (got.weight, hf.get_input_embeddings().weight),
        (model.get_output_embeddings().weight, hf.get_output_embeddings().weight),
        (model.cls.predictions.bias, hf.cls.predictions.decoder.bias),
    ]
    for a, b in pairs:
        assert a.shape == b.shape and a.shape[0] == size
        assert torch.equal(a[:keep], b[:keep])
    assert (model.get_output_embeddings().weight is got.weight) == tie
    assert model.get_output_embeddings().out_features == size
    ids = torch.randint(0, keep, (2, 11))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        expected = hf(input_ids=ids).logits
    # Old tokens' logits are unchanged (new tokens' rows are random in both).
    old = (logits[..., :keep] - expected[..., :keep]).abs().max()
    assert old <= TOL * expected.abs().max()
    assert logits.shape == expected.shape

    # Written and read back by both libraries.
    model.save_pretrained(tmp_path / "ours")
    back = NystromformerForMaskedLM.from_pretrained(tmp_path / "ours", numerics="hf", strict=True)
    reloaded = transformers.NystromformerForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    assert (back.get_output_embeddings().weight is back.get_input_embeddings().weight) == tie
    new_ids = torch.randint(0, size, (2, 11))
    with torch.no_grad():
        logits = model(input_ids=new_ids).logits
        assert torch.equal(back(input_ids=new_ids).logits, logits)
        expected = reloaded(input_ids=new_ids).logits
    assert (logits - expected).abs().max() <= TOL * expected.abs().max()


def test_mean_resizing_and_edge_cases():
    torch.manual_seed(0)
    model = NystromformerForMaskedLM(tiny_config()).eval()
    table = model.get_input_embeddings()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    weight, bias = table.weight.detach().clone(), model.cls.predictions.bias.detach().clone()
    assert model.resize_token_embeddings() is table  # None: the current table, unchanged
    assert table.weight.shape == (50, 32)

    # Mean resizing: new rows at the old rows' mean, up to 1e-9 of their covariance (50 rows
    # of width 32 have a positive definite covariance, so rows are drawn: spread ≈ 3e-5·std).
    model.resize_token_embeddings(53)
    assert torch.equal(table.weight[:50], weight)
    spread = (table.weight[50:] - weight.mean(0)).abs().max()
    assert 0 < spread < 1e-3 * weight.std()
    assert torch.allclose(model.cls.predictions.bias[50:], bias.mean().expand(3))
    assert torch.equal(model.cls.predictions.bias[:50], bias)
    # Fewer rows than hidden_size: a singular covariance, new rows are the mean itself.
    model.resize_token_embeddings(10)
    model.resize_token_embeddings(12)
    assert torch.allclose(table.weight[10:], weight[:10].mean(0).expand(2, -1), atol=1e-7)

    # Shrinking below the padding index drops it (the row is gone).
    assert table.padding_idx == 1
    model.resize_token_embeddings(1)
    assert table.padding_idx is None and model.config.vocab_size == 1
    # pad_to_multiple_of alone rounds the current size up.
    model.resize_token_embeddings(pad_to_multiple_of=8)
    assert table.num_embeddings == 8 and len(model.cls.predictions.bias) == 8
    assert model(input_ids=torch.tensor([[7, 3]])).logits.shape == (1, 2, 8)
    for kwargs, name in (({"new_num_tokens": 0}, "new_num_tokens"),
                         ({"pad_to_multiple_of": 2.5}, "pad_to_multiple_of")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            model.resize_token_embeddings(**kwargs)


@pytest.mark.parametrize("name", ["NystromformerModel", "NystromformerForSequenceClassification"])
def test_resize_without_a_decoder(name):
    model = getattr(ours, name)(tiny_config()).eval()
    assert model.get_output_embeddings() is None
    table = model.resize_token_embeddings(70, mean_resizing=False)
    assert table.weight.shape == (70, 32) and model.config.vocab_size == 70
    assert table.weight.requires_grad
    model(input_ids=torch.tensor([[69, 3, 4]]))  # new ids are accepted

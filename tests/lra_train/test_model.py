"""The authors' LRA classifiers: shapes, padding/batch invariance, exact baseline, two towers."""

from __future__ import annotations

import math

import pytest
import torch

from nystromer.lra.model import (
    LRAClassifier,
    LRADualClassifier,
    LRAModelConfig,
    SoftmaxAttention,
    build_model,
    classification_objective,
    collate,
    round_up,
)

from .synthetic import tiny_model_config


def model64(**kw):
    torch.manual_seed(0)
    kw.setdefault("dropout", 0.0)
    return build_model(tiny_model_config(**kw)).double().eval()


def ids(length, seed=0, vocab=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (length,), generator=g)


@pytest.mark.parametrize("attention", ["nystrom", "softmax"])
def test_padding_and_batch_do_not_change_a_sequence_logits(attention):
    model = model64(attention=attention)
    a, b = ids(70, 1), ids(100, 2)  # 70 and 100 real tokens, both above 8 landmarks
    alone = model(a[None])
    padded = model(torch.cat([a, torch.zeros(58, dtype=torch.long)])[None])
    batch = collate([(a, 0), (b, 1)])  # a padded to 128 beside a longer sequence
    together = model(batch["input_ids"])
    # float64: the only differences are summation orders over masked zeros (~1e-16).
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(together[1:], model(b[None]), rtol=0, atol=1e-12)


def test_softmax_attention_equals_masked_softmax_formula():
    torch.manual_seed(0)
    attn = SoftmaxAttention(16, 2).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.arange(9)[None] < torch.tensor([[9], [5]])
    out = attn(x, mask=mask)

    def heads(t):
        return t.view(2, 9, 2, 8).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 16)
    torch.testing.assert_close(out, attn.out_proj(ref), rtol=0, atol=1e-12)
    # A sample without real tokens stays finite.
    assert torch.isfinite(attn(x, mask=torch.zeros(2, 9, dtype=torch.bool))).all()


def test_nystrom_and_softmax_columns_share_weights_and_agree_when_exact():
    # With at most m real tokens Nyström attention is exact, so without the convolution
    # skip the two models are the same function of the same state dict.
    nys = model64(attention="nystrom", conv_kernel_size=None, num_landmarks=64)
    soft = model64(attention="softmax")
    soft.load_state_dict(nys.state_dict())
    x = torch.stack([ids(64, 3), torch.cat([ids(40, 4), torch.zeros(24, dtype=torch.long)])])
    torch.testing.assert_close(nys(x), soft(x), rtol=0, atol=1e-12)


def test_encoder_pools_real_tokens_and_checks_input():
    model = model64()
    assert model(ids(90)[None]).shape == (1, 3)
    with pytest.raises(ValueError, match="max_length"):
        model(ids(129)[None])
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.rand(1, 10))
    # An all-padding row gives finite logits (the pooled mean of nothing is zero).
    assert torch.isfinite(model(torch.zeros(2, 64, dtype=torch.long))).all()


def test_two_tower_features_and_shared_encoder():
    model = model64(two_tower=True)
    assert isinstance(model, LRADualClassifier)
    a, b = ids(70, 5)[None], ids(50, 6)[None]
    x0, x1 = model.encoder(a), model.encoder(b)
    expected = model.head(torch.cat([x0, x1, x0 * x1, x0 - x1], -1))
    torch.testing.assert_close(model(a, b), expected, rtol=0, atol=0)
    assert model.head[0].in_features == 4 * 16
    # One encoder: a single set of encoder weights in the state dict.
    assert sum(k.startswith("encoder.tokens") for k in model.state_dict()) == 1


def test_authors_listops_model_shape():
    cfg = LRAModelConfig(vocab_size=20, num_classes=10, max_length=2048)
    model = build_model(cfg)
    assert isinstance(model, LRAClassifier)
    layer = model.encoder.layers[0]
    assert layer.attn.num_heads == 2 and layer.attn.head_dim == 32
    assert layer.attn.num_landmarks == 64 and layer.attn.conv.kernel_size == (35, 1)
    assert layer.ffn[0].out_features == 128 and len(model.encoder.layers) == 2
    assert [m.out_features for m in model.head if hasattr(m, "out_features")] == [128, 10]
    assert cfg.effective_attention_dropout == 0.0  # the authors' Nyström has none
    soft = LRAModelConfig(vocab_size=20, num_classes=10, max_length=2048, attention="softmax")
    assert soft.effective_attention_dropout == 0.1


def test_model_config_errors_name_the_field():
    with pytest.raises(ValueError, match="attention"):
        tiny_model_config(attention="linear")
    with pytest.raises(ValueError, match="num_classes"):
        tiny_model_config(num_classes=1)
    with pytest.raises(ValueError, match="unknown model config keys"):
        LRAModelConfig.from_dict({**tiny_model_config().to_dict(), "foo": 1})
    assert LRAModelConfig.from_dict(tiny_model_config().to_dict()) == tiny_model_config()


def test_collate_pads_to_a_multiple_of_64_and_drops_extra_padding():
    a = torch.cat([ids(70), torch.zeros(300, dtype=torch.long)])  # pre-padded by the loader
    batch = collate([(a, 2), (ids(10), 0)])
    assert batch["input_ids"].shape == (2, 128)
    assert batch["labels"].tolist() == [2, 0]
    assert (batch["input_ids"][1, 10:] == 0).all() and (batch["input_ids"][0, :70] != 0).all()
    pairs = collate([(ids(5), ids(200), 1)])
    assert pairs["input_ids_1"].shape == (1, 64) and pairs["input_ids_2"].shape == (1, 256)
    with pytest.raises(ValueError, match="items must all be"):
        collate([(ids(5), 1), (ids(5), ids(5), 1)])
    assert round_up(2000) == 2048 and round_up(1024) == 1024


def test_objective_reports_sums():
    model = model64()
    batch = collate([(ids(30, i), i % 3) for i in range(5)])
    loss, sums = classification_objective(model, batch)
    logits = model(batch["input_ids"])
    assert sums["count"] == 5
    assert sums["loss"].item() == pytest.approx(5 * loss.item())
    assert sums["accuracy"] == (logits.argmax(-1) == batch["labels"]).sum()

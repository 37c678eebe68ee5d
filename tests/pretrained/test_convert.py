"""nystromer.convert / extend_positions / from_pretrained on tiny random models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import nystromer
from nystromer.models import NystromformerConfig, NystromformerModel

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTModel,
)

SMALL = dict(
    vocab_size=60,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _peaked(model: nn.Module) -> nn.Module:
    # Peaked attention (as in a trained model) so that Nyström attention differs from exact.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(20.0)
    return model


def bert(max_positions: int = 40) -> BertModel:
    torch.manual_seed(0)
    return _peaked(BertModel(BertConfig(**SMALL, max_position_embeddings=max_positions))).eval()


def roberta(max_positions: int = 42) -> RobertaModel:
    torch.manual_seed(0)
    cfg = RobertaConfig(**SMALL, max_position_embeddings=max_positions, pad_token_id=1)
    return _peaked(RobertaModel(cfg)).eval()


def ids(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SMALL["vocab_size"], (batch, n), generator=g)


@pytest.mark.parametrize("make", [bert, roberta], ids=["bert", "roberta"])
def test_convert_keeps_outputs_up_to_m_tokens_and_approximates_beyond(make):
    exact = make().double()
    converted = nystromer.convert(copy.deepcopy(exact), num_landmarks=16)
    x = ids(16)
    # n ≤ m: exact attention on both sides, in float64; only summation order differs.
    torch.testing.assert_close(
        converted(x).last_hidden_state, exact(x).last_hidden_state, rtol=0, atol=1e-10
    )
    x = ids(36)
    diff = (converted(x).last_hidden_state - exact(x).last_hidden_state).abs().max()
    assert torch.isfinite(diff) and diff > 1e-4  # a real approximation, not exact attention
    assert nystromer.convert.__module__ == "nystromer.conversion"
    assert converted.config.nystrom == {
        "num_landmarks": 16,
        "pinv_iterations": 6,
        "conv_kernel_size": None,
        "kmeans_iterations": 0,
    }


def test_extend_positions_bert_copies_the_trained_table_block_wise():
    model = bert(max_positions=40)
    old = model.embeddings.position_embeddings.weight.detach().clone()
    x = ids(30)
    before = model(x).last_hidden_state
    nystromer.convert(model, num_landmarks=8, max_position_embeddings=100)
    new = model.embeddings.position_embeddings.weight.detach()
    assert new.shape == (100, 32) and model.config.max_position_embeddings == 100
    assert torch.equal(new[:40], old)  # the first rows are unchanged
    assert torch.equal(new[40:80], old) and torch.equal(new[80:100], old[:20])  # the copies
    assert model.embeddings.position_ids.shape == (1, 100)
    assert model.embeddings.token_type_ids.shape == (1, 100)
    out = model(ids(100)).last_hidden_state  # the longer input now runs
    assert out.shape == (2, 100, 32) and torch.isfinite(out).all()
    # Up to the old length the extended model is the old model (Nyström aside: n ≤ m exact).
    exact_again = nystromer.extend_positions(bert(max_positions=40), 100)
    torch.testing.assert_close(exact_again(x).last_hidden_state, before, rtol=0, atol=0)


def test_extend_positions_roberta_keeps_the_reserved_rows_out_of_the_copies():
    model = roberta(max_positions=42)  # pad_token_id 1: rows 0, 1 are never positions
    old = model.embeddings.position_embeddings.weight.detach().clone()
    nystromer.extend_positions(model, 2 + 100)  # 100 tokens, as Longformer's 4098
    new = model.embeddings.position_embeddings.weight.detach()
    assert new.shape == (102, 32)
    assert torch.equal(new[:42], old)
    trained = old[2:]  # 40 position rows
    assert torch.equal(new[42:82], trained) and torch.equal(new[82:102], trained[:20])
    assert model.embeddings.position_embeddings.padding_idx == 1
    assert model(ids(100)).last_hidden_state.shape == (2, 100, 32)


def test_convert_nystromformer_changes_landmarks_and_positions():
    torch.manual_seed(0)
    cfg = NystromformerConfig(
        **{k: v for k, v in SMALL.items()},
        max_position_embeddings=30,
        num_landmarks=4,
        conv_kernel_size=3,
        numerics="hf",
        segment_means_seq_len=16,
    )
    model = NystromformerModel(cfg).eval()
    reference = copy.deepcopy(model)  # its own copy of the config, too
    reference.config.numerics, reference.config.num_landmarks = "nystromer", 64
    old = model.embeddings.position_embeddings.weight.detach().clone()  # 32 rows: 2 + 30
    nystromer.convert(model, num_landmarks=8, max_position_embeddings=70)
    new = model.embeddings.position_embeddings.weight.detach()
    assert new.shape == (72, 32) and model.config.max_position_embeddings == 70
    assert torch.equal(new[:32], old)
    assert torch.equal(new[32:62], old[2:]) and torch.equal(new[62:72], old[2:12])
    assert (model.config.num_landmarks, model.config.numerics) == (8, "nystromer")
    x = ids(8)  # n ≤ m: exact attention plus the trained convolution, in both
    torch.testing.assert_close(model(x).last_hidden_state, reference(x).last_hidden_state)
    assert model(ids(70)).last_hidden_state.shape == (2, 70, 32)
    with pytest.raises(ValueError, match="conv_kernel_size must be None or the model's own 3"):
        nystromer.convert(model, conv_kernel_size=5)


def test_saved_conversion_loads_back_with_nystromer_and_with_plain_transformers(tmp_path):
    model = bert(max_positions=40)
    nystromer.convert(model, num_landmarks=8, conv_kernel_size=3, max_position_embeddings=90)
    with torch.no_grad():  # a trained convolution must survive the round trip
        for layer in model.encoder.layer:
            layer.attention.self.nystrom_conv.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = nystromer.from_pretrained(tmp_path)
    x = ids(90)
    torch.testing.assert_close(
        loaded(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=0
    )
    assert loaded.config.max_position_embeddings == 90
    # Plain transformers: exact attention with the longer table (the convolution is dropped).
    plain = BertModel.from_pretrained(tmp_path).eval()
    assert plain.embeddings.position_embeddings.weight.shape == (90, 32)
    exact = bert(max_positions=40)
    nystromer.extend_positions(exact, 90)
    torch.testing.assert_close(plain(x).last_hidden_state, exact(x).last_hidden_state)
    # Another head class, and settings overridden at load time.
    mlm = nystromer.from_pretrained(
        tmp_path, model_class=BertForMaskedLM, num_landmarks=16, conv_kernel_size=None
    )
    assert isinstance(mlm, BertForMaskedLM) and mlm.config.nystrom["num_landmarks"] == 16


def test_nystromformer_conversion_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = NystromformerConfig(**SMALL, max_position_embeddings=30, conv_kernel_size=None)
    model = nystromer.convert(
        NystromformerModel(cfg).eval(), num_landmarks=8, max_position_embeddings=60
    )
    model.save_pretrained(tmp_path)
    loaded = nystromer.from_pretrained(tmp_path)
    assert isinstance(loaded, NystromformerModel)
    x = ids(60)
    torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize("kind", ["bert", "nystromformer"])
def test_kmeans_landmarks_are_used_saved_and_restored(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "bert":
        model = bert(max_positions=60)
    else:
        cfg = NystromformerConfig(**SMALL, max_position_embeddings=60, conv_kernel_size=None)
        model = _peaked(NystromformerModel(cfg).eval())
    x = ids(60)
    plain = copy.deepcopy(model)
    nystromer.convert(plain, num_landmarks=8)
    nystromer.convert(model, num_landmarks=8, kmeans_iterations=2)
    out = model(x).last_hidden_state
    assert (out - plain(x).last_hidden_state).abs().max() > 1e-4  # the option changes the math
    model.save_pretrained(tmp_path)
    loaded = nystromer.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(x).last_hidden_state, out, rtol=0, atol=0)
    # Up to m tokens the conversion stays exact, k-means or not.
    short = ids(8)
    reference = bert(max_positions=60) if kind == "bert" else None
    if reference is not None:
        torch.testing.assert_close(
            model(short).last_hidden_state, reference(short).last_hidden_state
        )


def test_convert_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="use nystromer.patch"):
        nystromer.convert(
            nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), 1)
        )
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=64, image_size=8, patch_size=4))  # fmt: skip
    with pytest.raises(ValueError, match="patch grid"):
        nystromer.convert(vit, max_position_embeddings=64)
    with pytest.raises(ValueError, match="max_position_embeddings must be an integer ≥ the"):
        nystromer.convert(bert(max_positions=40), max_position_embeddings=20)
    with pytest.raises(ValueError, match="num_landmarks"):
        nystromer.convert(bert(), num_landmarks=0)
    with pytest.raises(ValueError, match="max_position_embeddings must be an integer"):
        nystromer.extend_positions(bert(), 50.0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        nystromer.from_pretrained(tmp_path / "missing")
    bert().save_pretrained(tmp_path / "b")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['landmarks'\\]"):
        nystromer.from_pretrained(tmp_path / "b", landmarks=8)
    gpt2 = GPT2Model(GPT2Config(vocab_size=60, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    gpt2.save_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match="future tokens would leak"):
        nystromer.from_pretrained(tmp_path / "g")


def test_options_object_equals_the_keywords_and_is_recorded(tmp_path):
    opts = nystromer.NystromOptions(num_landmarks=8, kmeans_iterations=1, conv_kernel_size=3)
    by_keywords = nystromer.convert(bert(), **opts.to_dict())
    model = nystromer.convert(bert(), options=opts)
    assert model.config.nystrom == opts.to_dict() == by_keywords.config.nystrom
    x = ids(40)
    torch.testing.assert_close(
        model(x).last_hidden_state, by_keywords(x).last_hidden_state, rtol=0, atol=0
    )
    model.save_pretrained(tmp_path)
    # Loading with options replaces the recorded settings; keywords then override fields.
    other = nystromer.NystromOptions(num_landmarks=16)
    loaded = nystromer.from_pretrained(tmp_path, options=other, pinv_iterations=4)
    assert loaded.config.nystrom == other.replace(pinv_iterations=4).to_dict()
    with pytest.raises(TypeError, match="options must be a NystromOptions"):
        nystromer.from_pretrained(tmp_path, options=opts.to_dict())
    # A Nyströmformer keeps its trained convolution under options without one.
    torch.manual_seed(0)
    cfg = NystromformerConfig(**SMALL, max_position_embeddings=40, conv_kernel_size=5)
    NystromformerModel(cfg).save_pretrained(tmp_path / "nf")
    nf = nystromer.from_pretrained(tmp_path / "nf", options=other)
    assert nf.config.nystrom_options == other.replace(conv_kernel_size=5)
    assert nf.config.numerics == "nystromer"


def test_renamed_modules_no_longer_shadowed_and_old_paths_warn():
    # The modules are conversion and calibration; nystromer.convert / .calibrate are the
    # functions, and the old module paths still import, with a DeprecationWarning, for one
    # release.
    import nystromer.calibration
    import nystromer.conversion

    assert callable(nystromer.convert) and callable(nystromer.calibrate)
    assert nystromer.conversion.reserved_positions is not None
    with pytest.warns(DeprecationWarning, match="nystromer.conversion"):
        from nystromer.convert import reserved_positions
    assert reserved_positions is nystromer.conversion.reserved_positions
    with pytest.warns(DeprecationWarning, match="nystromer.calibration"):
        from nystromer.calibrate import CalibrationResult
    assert CalibrationResult is nystromer.CalibrationResult
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown name is an ImportError, not a warning
        with pytest.raises(ImportError):
            from nystromer.convert import no_such_name  # noqa: F401


@pytest.mark.parametrize("kind", ["bert", "nystromformer"])
def test_from_pretrained_loads_in_float32_unless_asked(tmp_path, kind):
    # transformers 5 keeps a bfloat16 checkpoint in bfloat16 (its dtype defaults to "auto");
    # nystromer loads both kinds of checkpoint in torch's default dtype unless asked.
    torch.manual_seed(0)
    if kind == "bert":
        model = nystromer.convert(bert(), num_landmarks=8, conv_kernel_size=3)
    else:
        model = NystromformerModel(NystromformerConfig(**SMALL, conv_kernel_size=3)).eval()
    model.to(torch.bfloat16).save_pretrained(tmp_path)

    def dtypes(loaded):
        return {p.dtype for p in loaded.parameters()}

    assert dtypes(nystromer.from_pretrained(tmp_path)) == {torch.float32}
    assert dtypes(nystromer.from_pretrained(tmp_path, dtype="auto")) == {torch.bfloat16}
    assert dtypes(nystromer.from_pretrained(tmp_path, dtype="bfloat16")) == {torch.bfloat16}
    assert dtypes(nystromer.from_pretrained(tmp_path, dtype=torch.float64)) == {torch.float64}
    for wrong in ("int8", torch.int64, "half precision"):
        with pytest.raises(ValueError, match="dtype must be"):
            nystromer.from_pretrained(tmp_path, dtype=wrong)
    # The weights were exact in bfloat16: loading in float32 keeps them exactly.
    saved = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    loaded = nystromer.from_pretrained(tmp_path).state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(loaded[k], v.float(), rtol=0, atol=0)


def test_nystromformer_float64_checkpoint_is_not_rounded_through_float32(tmp_path):
    torch.manual_seed(0)
    model = NystromformerModel(NystromformerConfig(**SMALL, conv_kernel_size=3)).double()
    model.save_pretrained(tmp_path)
    loaded = NystromformerModel.from_pretrained(tmp_path, dtype="auto")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

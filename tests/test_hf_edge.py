"""Edge cases of attn_implementation="nystrom", convert and calibrate on tiny random models.

Comparisons run in float64: at n ≤ m Nyström attention is exact softmax attention, so a
tolerance of 1e-10 separates "the same computation up to summation order" from a wrong mask
or a dropped bias (differences of 1e-3 and more on these models).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import nystromer
from nystromer import hf

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, BertConfig  # noqa: E402

M = 16
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def bert(implementation: str = "nystrom", **extra) -> transformers.BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=90, **SMALL, **extra)
    cfg.nystrom = {"num_landmarks": M}
    return AutoModel.from_config(cfg, attn_implementation=implementation).double().eval()


def ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (batch, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- attention


def test_position_bias_of_t5_style_attention_is_refused_not_dropped():
    # T5's encoder passes its relative position bias to the attention function as a keyword;
    # Nyström attention cannot add it, and dropping it changed every output.
    cfg = transformers.T5Config(
        vocab_size=90, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4
    )
    with pytest.raises(ValueError, match="relative position bias"):
        nystromer.convert(transformers.T5EncoderModel(cfg), num_landmarks=M)
    # Switched by transformers itself, it is the attention call that refuses.
    model = transformers.T5EncoderModel._from_config(cfg, attn_implementation="nystrom")
    with pytest.raises(ValueError, match="position_bias"):
        model(input_ids=ids(2, 10))


def test_causal_flag_passed_as_keyword_is_refused():
    model = bert()
    module = hf.attention_modules(model)[0][1]
    q = torch.randn(1, 4, 20, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="is_causal"):
        hf._attention(module, q, q, q, None, is_causal=True)
    out, _ = hf._attention(module, q, q, q, None, is_causal=False)
    assert out.shape == (1, 20, 4, 8)


def test_packed_sequences_in_any_batch_row_are_refused_not_merged():
    # Position ids that restart mark several sequences packed into one row: transformers folds
    # a block-diagonal mask into its mask function. It was only inspected for batch row 0, so
    # a packed row 1 was attended to as one sequence (wrong even at n ≤ m).
    model, exact = bert(), bert("eager")
    n = 12
    single = torch.arange(n)
    packed = torch.cat([torch.arange(6), torch.arange(6)])
    for rows in ((single, packed), (packed, single)):
        with pytest.raises(ValueError, match="key padding and bidirectional local windows"):
            model(input_ids=ids(2, n), position_ids=torch.stack(rows))
    # Without packing, the same position ids in every row are exact attention.
    positions = torch.stack([single, single])
    with torch.no_grad():
        got = model(input_ids=ids(2, n), position_ids=positions).last_hidden_state
        want = exact(input_ids=ids(2, n), position_ids=positions).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_4d_mask_with_batch_one_broadcasts_like_eager():
    model, exact = bert(), bert("eager")
    x = ids(3, 12)
    # transformers' additive form (eager adds a bool mask as numbers): 0 attend, min masked.
    keys = torch.zeros(1, 1, 1, 12, dtype=torch.float64)
    keys[..., 9:] = torch.finfo(torch.float64).min
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=keys).last_hidden_state
        want = exact(input_ids=x, attention_mask=keys).last_hidden_state
    torch.testing.assert_close(got[:, :9], want[:, :9], rtol=0, atol=1e-10)


def test_grouped_query_attention_eurobert():
    # EuroBERT passes fewer key/value heads than query heads (num_key_value_groups); they were
    # refused with a shape error that did not say why.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "eurobert" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no EuroBERT")
    cfg = dict(
        vocab_size=90, **SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, mask_token_id=3,
    )  # fmt: skip

    def build(implementation):
        config = transformers.AutoConfig.for_model("eurobert", **cfg)
        config.nystrom = {"num_landmarks": M}
        torch.manual_seed(0)
        return AutoModel.from_config(config, attn_implementation=implementation).double().eval()

    model, exact = build("nystrom"), build("sdpa")
    x = ids(2, 40)
    mask = torch.ones_like(x)
    mask[1, 30:] = 0
    with torch.no_grad():
        # n ≤ m: exact attention.
        got = model(input_ids=x[:, :12]).last_hidden_state
        want = exact(input_ids=x[:, :12]).last_hidden_state
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        # n > m: a padded sequence is computed as alone.
        together = model(input_ids=x, attention_mask=mask).last_hidden_state
        alone = model(input_ids=x[1:, :30]).last_hidden_state
    torch.testing.assert_close(together[1, :30], alone[0], rtol=0, atol=1e-10)
    assert (together - exact(input_ids=x, attention_mask=mask).last_hidden_state).abs().max() > 1e-4


@pytest.mark.parametrize("masked", [-10_000.0, torch.finfo(torch.float32).min, float("-inf")])
def test_additive_4d_masks_of_any_large_negative_value(masked):
    # Older BERT code masks with -10000, and a mask built in float32 holds float32's minimum,
    # not float64's: eager attention gives those keys no weight, and they were refused as
    # "additive attention biases".
    model, exact = bert(), bert("eager")
    x = ids(2, 12)
    keys = torch.zeros(2, 1, 1, 12, dtype=torch.float64)
    keys[1, ..., 9:] = masked
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=keys).last_hidden_state
        want = exact(input_ids=x, attention_mask=keys).last_hidden_state
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1, :9], want[1, :9], rtol=0, atol=1e-10)
    bias = keys.clone()
    bias[0, ..., 3] = -5.0  # a bias, not a mask
    with pytest.raises(ValueError, match="additive attention biases"):
        model(input_ids=x, attention_mask=bias)
    # A 0/1 mask in a float dtype is additive too: the message names the argument and what
    # it may hold (it said only "additive attention biases are not supported").
    ones = (keys == 0).double().expand(2, 1, 12, 12)
    with pytest.raises(ValueError, match=r"^attention_mask: .*0 \(attend\).*bool mask"):
        model(input_ids=x, attention_mask=ones)
    with pytest.raises(ValueError, match="must be bool"):
        model(input_ids=x, attention_mask=(keys == 0).long())


def test_unhashable_setting_is_named():
    model = bert()
    model.config.nystrom = {"num_landmarks": [8]}
    with pytest.raises(ValueError, match="num_landmarks"):
        model(input_ids=ids(1, 20))


def test_settings_object_in_the_config_is_refused_before_save_pretrained_fails(tmp_path):
    # A NystromOptions in config.nystrom ran, then save_pretrained (and printing the config)
    # failed with "Object of type NystromOptions is not JSON serializable".
    model = bert()
    model.config.nystrom = nystromer.NystromOptions(num_landmarks=8)
    with pytest.raises(TypeError, match=r"config\.nystrom must be a dict.*\.to_dict\(\)"):
        model(input_ids=ids(1, 20))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_landmarks": 0}, r"num_landmarks must be an integer ≥ 1, got 0"),
        ({"num_landmark": 8}, r"unknown Nyström setting"),
    ],
)
def test_an_impossible_setting_names_config_nystrom(settings, message):
    # Raised from inside a forward pass: the message says where the setting was read.
    model = bert()
    model.config.nystrom = settings
    with pytest.raises(ValueError, match=r"^config\.nystrom: " + message):
        model(input_ids=ids(1, 20))


def test_local_window_layers_do_not_warn_that_attentions_are_unsupported(monkeypatch):
    # The window layers run transformers' SDPA function, which warns that it returns no
    # attention weights; Nyström attention returns them (exact softmax rows) itself.
    from transformers.integrations import sdpa_attention

    seen = []
    original = sdpa_attention.sdpa_attention_forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("output_attentions"))
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    cfg = transformers.ModernBertConfig(
        vocab_size=90,
        **dict(SMALL, num_hidden_layers=3),
        global_attn_every_n_layers=2,
        local_attention=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )
    cfg.nystrom = {"num_landmarks": M}
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg, attn_implementation="nystrom").eval()
    with torch.no_grad():
        out = model(input_ids=ids(1, 20), output_attentions=True)
    assert len(out.attentions) == 3 and seen and not any(seen)


# --------------------------------------------------------------------------- calibrate


def converted(**extra) -> transformers.BertModel:
    model = bert("sdpa", **extra)
    return nystromer.convert(model, num_landmarks=8, conv_kernel_size=3)


def batches() -> list[dict]:
    x = ids(3, 37)
    mask = torch.ones_like(x)
    mask[1, 20:] = 0
    return [{"input_ids": x, "attention_mask": mask}, {"input_ids": ids(1, 29, seed=1)}]


def test_calibrate_restores_each_modules_mode_and_dtype():
    model = converted()
    model.train()
    model.encoder.layer[0].eval()  # e.g. a frozen part of a model in training
    modes = [m.training for m in model.modules()]
    nystromer.calibrate(model, batches())
    assert [m.training for m in model.modules()] == modes
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_calibrate_reads_an_iterator_for_every_layer():
    # A generator was refused by len() with "object of type 'generator' has no len()"; read
    # once, it would leave the layers after the first without inputs.
    want = nystromer.calibrate(converted(), batches())
    got = nystromer.calibrate(converted(), iter(batches()))
    assert len(got.explained) == 2 and got.tokens == want.tokens
    for a, b in zip(got.explained, want.explained, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_calibrate_names_a_batch_that_is_not_a_dict():
    with pytest.raises(ValueError, match=r"inputs\[0\] must be a dict"):
        nystromer.calibrate(converted(), [ids(2, 37)])
    for inputs in (None, [], iter([]), {"input_ids": ids(2, 37)}):
        with pytest.raises(ValueError, match="inputs must be a non-empty sequence"):
            nystromer.calibrate(converted(), inputs)


# --------------------------------------------------------------------------- convert


@pytest.mark.parametrize("case", ["vision", "rotary", "shorter"])
def test_convert_refusing_the_positions_leaves_the_model_unchanged(case):
    # convert switched the attention and added skips before extend_positions refused the
    # table: the ValueError came with a model converted anyway.
    if case == "vision":
        cfg = transformers.ViTConfig(**SMALL, image_size=16, patch_size=4, num_channels=3)
        model, positions = AutoModel.from_config(cfg, attn_implementation="sdpa"), 100
    elif case == "rotary":
        cfg = transformers.ModernBertConfig(
            vocab_size=90, **SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2,
        )  # fmt: skip
        model, positions = AutoModel.from_config(cfg, attn_implementation="sdpa"), 10_000
    else:
        model, positions = bert("sdpa", max_position_embeddings=40), 30
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = getattr(model.config, "nystrom", None)
    with pytest.raises(ValueError, match="max_position_embeddings|position"):
        nystromer.convert(model, conv_kernel_size=3, max_position_embeddings=positions)
    assert model.config._attn_implementation == "sdpa"
    assert getattr(model.config, "nystrom", None) == settings
    assert model.state_dict().keys() == state.keys()


def test_patch_reaches_the_sub_configs_of_a_composite_model(tmp_path):
    # SigLIP's text and vision encoders read their own sub-configs: patch wrote the settings
    # into the top-level config only, so they ran with the defaults (m = 64, exact on these
    # 64 patches), and a convolution skip failed on the top config's missing head count.
    text = dict(vocab_size=90, **dict(SMALL, num_hidden_layers=1))
    vision = dict(SMALL, num_hidden_layers=1, image_size=32, patch_size=4)
    cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = transformers.SiglipModel(cfg).double().eval()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        exact = model.vision_model(pixel_values=pixels).last_hidden_state
    nystromer.patch(model, num_landmarks=8, conv_kernel_size=3)
    modules = hf.attention_modules(model)
    assert len(modules) == 2
    asked = nystromer.NystromOptions(num_landmarks=8, conv_kernel_size=3)
    for _, m in modules:
        assert hf.get_options(m.config) == asked
        torch.nn.init.normal_(m.nystrom_conv.weight, 0, 0.1)
    with torch.no_grad():
        got = model.vision_model(pixel_values=pixels).last_hidden_state
    assert (got - exact).abs().max() > 1e-3  # 64 patches > m = 8: not exact attention
    model.save_pretrained(tmp_path)
    loaded = nystromer.from_pretrained(
        tmp_path, model_class=transformers.SiglipModel, dtype=torch.float64
    )
    with torch.no_grad():
        again = loaded.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(again, got, rtol=0, atol=1e-12)


def test_compiles_in_one_graph_like_sdpa():
    # torch.compile(model, fullgraph=True) works with "sdpa"; the mask builder's check of the
    # mask's kind (causal? window?) read tensors back and broke the graph.
    model = bert()
    x = ids(2, 40)
    mask = torch.ones_like(x)
    mask[1, 30:] = 0
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for n in (40, 12):  # Nyström, and exact at n ≤ m
        with torch.no_grad():
            expected = model(input_ids=x[:, :n], attention_mask=mask[:, :n]).last_hidden_state
            got = compiled(input_ids=x[:, :n], attention_mask=mask[:, :n]).last_hidden_state
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    torch._dynamo.reset()


def test_compiles_unpadded_inputs_whose_length_is_no_multiple_of_m():
    # Without a mask the CPU's segment sizes were counted by bincount, whose output size
    # dynamo cannot know: the compiled graph failed at run time ("Runtime assertion failed
    # for expression Eq((u1//16), 2)") for every n that m does not divide.
    model = bert()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = ids(2, 40)
    with torch.no_grad():
        expected = model(input_ids=x).last_hidden_state
        got = compiled(input_ids=x).last_hidden_state
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    torch._dynamo.reset()


def test_compiles_with_dynamic_shapes_in_one_graph_like_sdpa():
    # With dynamic=True the score scale transformers passes (head_dim ** -0.5) is a symbolic
    # float; checking it with math.isfinite broke the graph, which "sdpa" does not.
    model = bert()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    for n in (40, 53):  # Nyström at two lengths of one graph
        x = ids(2, n)
        mask = torch.ones_like(x)
        mask[1, n // 2 :] = 0
        with torch.no_grad():
            expected = model(input_ids=x, attention_mask=mask).last_hidden_state
            got = compiled(input_ids=x, attention_mask=mask).last_hidden_state
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    torch._dynamo.reset()


def test_compiles_before_any_eager_forward_and_warns_nothing(monkeypatch):
    # The mask builder asks transformers whether the model type uses the attention interface,
    # which transformers answers by reading the model's source file: traced, that failed
    # under fullgraph=True unless an eager forward had cached the answer, and dynamo warned
    # about the functools cache around it. Both caches are emptied; dynamo warns once per
    # message, so its record is cleared too.
    monkeypatch.delattr(
        transformers.BertModel, "_can_set_attn_implementation_cached_value", raising=False
    )
    hf._class_outside_interface.cache_clear()
    getattr(torch._dynamo.utils, "warn_once_cache", set()).clear()
    model = bert()
    x = ids(2, 40)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = compiled(input_ids=x).last_hidden_state
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    with torch.no_grad():
        assert torch.allclose(got, model(input_ids=x).last_hidden_state, rtol=0, atol=1e-12)
    torch._dynamo.reset()


def test_convert_of_a_wrapped_model_names_the_wrapper():
    # Said "use nystromer.patch (no position table to extend)", which does not apply.
    with pytest.raises(ValueError, match=r"DataParallel.*model\.module"):
        nystromer.convert(torch.nn.DataParallel(bert("eager")), num_landmarks=M)

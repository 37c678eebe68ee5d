"""Switching existing models to Nyström attention: `nystromer.patch` (the function; its module is
`nystromer.patching`) and NystromMultiheadAttention."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import nystromer
from nystromer import NystromOptions, patch
from nystromer.attention import NystromMultiheadAttention

# float32 against torch's own attention: exact fallback (n ≤ m) differs only by the order of
# float32 reductions inside SDPA vs the math path (measured ≤ 5e-7).
TOL = 1e-5


def rel_err(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(32, 4, **kw)
    return mha, NystromMultiheadAttention.from_multihead_attention(mha, num_landmarks=16)


# --------------------------------------------------------------------------- the module


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"kdim": 24, "vdim": 20},
        {"add_bias_kv": True, "add_zero_attn": True},
        {"bias": False},
    ],
)
def test_equals_multihead_attention_when_n_le_m(batch_first, kw):
    mha, ny = _pair(batch_first=batch_first, **kw)
    kdim, vdim = kw.get("kdim", 32), kw.get("vdim", 32)
    g = torch.Generator().manual_seed(1)
    if "kdim" in kw:  # cross-attention: 7 queries over 12 keys
        q = torch.randn(3, 7, 32, generator=g)
        k, v = torch.randn(3, 12, kdim, generator=g), torch.randn(3, 12, vdim, generator=g)
    else:
        q = k = v = torch.randn(3, 12, 32, generator=g)
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[1, 9:] = True
    pad[2, 4:] = True
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if "kdim" not in kw:
            k = v = q  # keep query is key: self-attention
    ref, _ = mha(q, k, v, key_padding_mask=pad)
    out, weights = ny(q, k, v, key_padding_mask=pad)
    assert weights is None
    assert out.shape == ref.shape
    if "kdim" in kw:
        assert rel_err(out, ref) <= TOL
    else:  # self-attention: outputs at padded query positions carry no meaning
        real = ~pad if batch_first else (~pad).transpose(0, 1)
        assert rel_err(out[real], ref[real]) <= TOL


@pytest.mark.parametrize("batch_first", [False, True])
def test_query_as_key_with_other_values_projects_the_values(batch_first):
    # mha(x, x, y): the keys are the queries, the values another tensor.
    mha, ny = _pair(batch_first=batch_first)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 12, 32, generator=g), torch.randn(3, 12, 32, generator=g)
    ref, _ = mha(x, x, y)
    out, _ = ny(x, x, y)
    assert rel_err(out, ref) <= TOL


def test_unbatched_float_mask_and_state_dict_layout():
    mha, ny = _pair()
    assert list(ny.state_dict()) == list(mha.state_dict())
    assert ny.in_proj_weight is mha.in_proj_weight  # shared: optimisers keep working
    x = torch.randn(10, 32)
    float_pad = torch.zeros(10)
    float_pad[7:] = float("-inf")
    ref, _ = mha(x, x, x, key_padding_mask=float_pad)
    out, _ = ny(x, x, x, key_padding_mask=float_pad)
    assert out.shape == (10, 32)
    assert rel_err(out[:7], ref[:7]) <= TOL
    # An attn_mask that masks the same keys for every query is key padding too.
    attn_mask = torch.zeros(10, 10, dtype=torch.bool)
    attn_mask[:, 7:] = True
    out2, _ = ny(x, x, x, attn_mask=attn_mask)
    assert torch.allclose(out2[:7], out[:7])


def test_refuses_causal_and_non_padding_masks():
    _, ny = _pair()
    x = torch.randn(6, 2, 32)
    with pytest.raises(ValueError, match="is_causal=True is not supported"):
        ny(x, x, x, is_causal=True)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="key padding only"):
        ny(x, x, x, attn_mask=causal)
    bias = torch.zeros(2, 6)
    bias[0, 1] = -2.0
    with pytest.raises(ValueError, match="additive biases"):
        ny(x, x, x, key_padding_mask=bias)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 6\)"):
        ny(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_landmarks must be an integer"):
        NystromMultiheadAttention(32, 4, num_landmarks=0)


# --------------------------------------------------------------------------- torch.nn models


def _encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()


def _padded_batch(n=40, lengths=(40, 28, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), n, 32, generator=g)
    pad = torch.arange(n) >= torch.tensor(lengths)[:, None]
    return x, pad


def test_transformer_encoder_exact_when_n_le_m_even_on_the_fused_inference_path(caplog):
    enc = _encoder()
    x, pad = _padded_batch()
    with torch.no_grad():  # eval + no_grad: nn.TransformerEncoder's fused path conditions
        ref = enc(x, src_key_padding_mask=pad)
        with caplog.at_level(logging.INFO, logger="nystromer.patching"):
            patched = patch(copy.deepcopy(enc), num_landmarks=64)
        assert "layers.0.self_attn, layers.1.self_attn" in caplog.text
        assert all(type(layer.self_attn) is NystromMultiheadAttention for layer in patched.layers)
        out = patched(x, src_key_padding_mask=pad)
    assert rel_err(out[~pad], ref[~pad]) <= TOL


def test_transformer_encoder_runs_nystrom_when_n_gt_m(monkeypatch):
    enc = _encoder()
    x, pad = _padded_batch()
    patched = patch(copy.deepcopy(enc), num_landmarks=8)
    import nystromer.attention as attention_module

    calls = []
    original = attention_module.nystrom_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["num_landmarks"])
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_module, "nystrom_attention", spy)
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=pad)
        out = patched(x, src_key_padding_mask=pad)
    # If torch's fused encoder path had run, our attention would not have been called.
    assert calls == [8, 8]
    err = rel_err(out[~pad], ref[~pad])
    # Measured 9.8e-2 at n = 40, m = 8 with random weights (a trained MiniLM: mean-pooled
    # cosine 0.90 at m = 64, docs/models.md). The bound only guards against garbage.
    assert 1e-6 < err < 0.2
    # Each sequence alone gives what it gives in the padded batch.
    with torch.no_grad():
        alone = patched(x[2:, :11])
    assert torch.allclose(alone[0], out[2, :11], atol=1e-5)


def test_transformer_encoder_padding_is_not_read_on_the_host_off_the_cpu():
    # nn.TransformerEncoder turns src_key_padding_mask into a float mask for every layer;
    # checking its values (0 or -inf?) reads them back, which on a GPU waits for all queued
    # work at every layer. Meta tensors have no values (a read raises): a forward on the meta
    # device shows that none is made. (On the CPU the check stays: see the test above.)
    x, pad = _padded_batch()
    patched = patch(_encoder(), num_landmarks=8).train().to("meta")
    out = patched(x.to("meta"), src_key_padding_mask=pad.to("meta"))
    assert out.shape == x.shape and out.device.type == "meta"


def test_encoder_built_after_patching_accepts_nested_tensors():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    patch(layer, num_landmarks=64)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    assert enc.use_nested_tensor  # torch will pack the padded batch into a nested tensor
    reference = _encoder()
    enc.load_state_dict(reference.state_dict())
    x, pad = _padded_batch()
    with torch.no_grad():
        out = enc(x, src_key_padding_mask=pad)
        ref = reference(x, src_key_padding_mask=pad)
    assert rel_err(out[~pad], ref[~pad]) <= TOL


def test_fine_tuning_step_after_patching():
    torch.manual_seed(0)
    model = nn.Sequential(_encoder().train(), nn.Flatten(), nn.Linear(40 * 32, 2))
    patch(model, num_landmarks=8, conv_kernel_size=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, _ = _padded_batch()
    y = torch.tensor([0, 1, 1])
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    attn = model[0].layers[0].self_attn
    assert attn.in_proj_weight.grad.abs().sum() > 0 and attn.conv.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0]


def test_a_shared_attention_module_is_replaced_everywhere_by_one_module():
    # One nn.MultiheadAttention reused (weight sharing), twice in one container and elsewhere.
    shared = nn.MultiheadAttention(32, 4, batch_first=True)
    model = nn.Module()
    model.layers = nn.ModuleList([shared, shared])
    model.other = shared
    patch(model, num_landmarks=8, conv_kernel_size=3)
    new = model.layers[0]
    assert isinstance(new, NystromMultiheadAttention)
    assert model.layers[1] is new and model.other is new  # still shared, conv skip included
    assert new.in_proj_weight is shared.in_proj_weight


def test_decoder_self_attention_and_empty_models_are_refused():
    decoder_layer = nn.TransformerDecoderLayer(32, 4, 64, batch_first=True)
    with pytest.raises(ValueError, match="causal"):
        patch(nn.TransformerDecoder(decoder_layer, 1))
    with pytest.raises(ValueError, match="found nothing to patch"):
        patch(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="conv_kernel_size must be an odd"):
        patch(_encoder(), conv_kernel_size=4)


# --------------------------------------------------------------------------- transformers


def _bert_like(kind, seed=0, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    common = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **kw
    )
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=60, max_position_embeddings=128, **common)
        return transformers.BertForSequenceClassification(cfg).eval()
    if kind == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=60, max_position_embeddings=130, **common)
        return transformers.RobertaModel(cfg).eval()
    cfg = transformers.ViTConfig(image_size=32, patch_size=4, **common)  # 64 patches + CLS
    return transformers.ViTModel(cfg).eval()


def _inputs(kind, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}, None
    ids = torch.randint(3, 60, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, n - 9 :] = 0
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()


def _hidden(model, inputs):
    base = getattr(model, "bert", model)
    return base(**inputs).last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "roberta", "vit"])
def test_transformers_models_exact_when_n_le_m(kind, caplog):
    model = _bert_like(kind)
    inputs, real = _inputs(kind, 50)
    with torch.no_grad():
        ref = _hidden(model, inputs)
        with caplog.at_level(logging.INFO, logger="nystromer.patching"):
            patched = patch(copy.deepcopy(model), num_landmarks=80)
        assert "attention 'sdpa' -> 'nystrom'" in caplog.text
        out = _hidden(patched, inputs)
    if real is not None:
        out, ref = out[real], ref[real]
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_transformers_models_close_when_n_gt_m_and_trainable(kind):
    model = _bert_like(kind)
    inputs, real = _inputs(kind, 100)
    with torch.no_grad():
        ref = _hidden(model, inputs)
    patched = patch(copy.deepcopy(model), num_landmarks=16, conv_kernel_size=5)
    with torch.no_grad():
        out = _hidden(patched, inputs)
    if real is not None:
        out, ref = out[real], ref[real]
    # Random weights give near-uniform attention, which landmarks summarise well: measured
    # 3.8e-5 (BERT) and 1.3e-3 (ViT) at n = 100 / 65, m = 16.
    assert 0 < rel_err(out, ref) < 1e-2
    if kind == "bert":
        patched.train()
        opt = torch.optim.SGD(patched.parameters(), lr=0.1)
        labels = torch.tensor([0, 1])
        loss = patched(**inputs, labels=labels).loss
        loss.backward()
        attn = patched.bert.encoder.layer[0].attention.self
        assert attn.query.weight.grad.abs().sum() > 0
        assert attn.nystrom_conv.weight.grad.abs().sum() > 0
        opt.step()
        patched.eval()
        with torch.no_grad():
            assert patched(**inputs, labels=labels).loss < loss


def test_transformers_padding_invariance_after_patching():
    model = patch(_bert_like("bert"), num_landmarks=16)
    inputs, _ = _inputs("bert", 100)
    with torch.no_grad():
        both = _hidden(model, inputs)
        alone = _hidden(model, {"input_ids": inputs["input_ids"][1:, :91]})
    assert torch.allclose(alone[0], both[1, :91], atol=1e-5)


def test_transformers_decoders_and_other_models_are_refused():
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    decoder = transformers.BertLMHeadModel(
        transformers.BertConfig(vocab_size=60, is_decoder=True, **small)
    )
    with pytest.raises(ValueError, match="decoder"):
        patch(decoder)
    gpt2 = transformers.GPT2Model(
        transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    )
    with pytest.raises(ValueError, match="causal"):
        patch(gpt2)
    from transformers.masking_utils import causal_mask_function

    from nystromer.hf import _mask

    with pytest.raises(ValueError, match="causal attention mask"):
        _mask(2, 5, 5, mask_function=causal_mask_function)


def test_worked_example_pretrained_bert_with_linear_attention(tmp_path):
    # docs/models.md, "Worked example", with a locally built BERT in place of a download.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    transformers.BertModel(cfg).save_pretrained(tmp_path)

    exact = transformers.BertModel.from_pretrained(tmp_path).eval()
    model = patch(transformers.BertModel.from_pretrained(tmp_path), num_landmarks=32).eval()
    ids = torch.randint(3, 60, (2, 512))
    mask = torch.ones_like(ids)
    mask[1, 300:] = 0
    with torch.no_grad():
        emb = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = exact(input_ids=ids, attention_mask=mask).last_hidden_state
    w = mask[..., None].float()
    pooled, pooled_ref = (emb * w).sum(1) / w.sum(1), (ref * w).sum(1) / w.sum(1)
    cosine = nn.functional.cosine_similarity(pooled, pooled_ref)
    assert (cosine > 0.99).all()  # random weights; a trained MiniLM gives ≈ 0.89 (docs)


# --------------------------------------------------------------------------- options and hooks


def test_options_object_equals_the_keywords_in_patch_and_the_module():
    opts = NystromOptions(num_landmarks=16, pinv_iterations=4, conv_kernel_size=3)
    by_keywords = patch(_encoder(), **opts.to_dict())
    by_options = patch(_encoder(), options=opts)
    x, pad = _padded_batch()
    attns = [m.layers[0].self_attn for m in (by_keywords, by_options)]
    assert attns[0].options == attns[1].options == opts
    assert "conv.weight" in dict(attns[1].named_parameters())
    with torch.no_grad():
        for a in attns:
            a.conv.weight.fill_(0.1)
        outs = [m.eval()(x, src_key_padding_mask=pad) for m in (by_keywords, by_options)]
    assert torch.equal(outs[0], outs[1])
    mha = nn.MultiheadAttention(32, 4)
    direct = NystromMultiheadAttention.from_multihead_attention(mha, options=opts)
    assert direct.options == opts and direct.in_proj_weight is mha.in_proj_weight
    with pytest.raises(ValueError, match="either as options or as keywords"):
        patch(_encoder(), options=opts, conv_kernel_size=5)


def test_transformers_patch_takes_options_and_the_conv_skip_takes_hooks():
    opts = NystromOptions(num_landmarks=16, conv_kernel_size=5)
    inputs, _ = _inputs("bert", 100)
    by_keywords = patch(_bert_like("bert"), num_landmarks=16, conv_kernel_size=5)
    model = patch(_bert_like("bert"), options=opts)
    conv = model.bert.encoder.layer[1].attention.self.nystrom_conv
    assert conv.weight.shape == (4, 1, 5, 1)
    seen = []
    handle = conv.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        out = _hidden(model, inputs)
        assert torch.equal(out, _hidden(by_keywords, inputs))
    handle.remove()
    assert seen == [(2, 4, 100, 8)]


def test_attention_probe_sees_each_layer_before_the_skip():
    from nystromer.patching import AttentionCall, attention_probe

    opts = NystromOptions(num_landmarks=16, conv_kernel_size=5)
    model = patch(_bert_like("bert"), options=opts)
    inputs, real = _inputs("bert", 100)
    for layer in model.bert.encoder.layer:
        torch.nn.init.normal_(layer.attention.self.nystrom_conv.weight)
    calls: list[AttentionCall] = []

    def probe(call):
        calls.append(call)
        # What the layer adds next: its convolution skip.
        skip = call.module.nystrom_conv(call.value, call.mask)
        skips.append(skip)
        outputs.append(call.output.clone())

    skips, outputs = [], []
    with torch.no_grad(), attention_probe(probe):
        _hidden(model, inputs)
    assert [c.module for c in calls] == [m.attention.self for m in model.bert.encoder.layer]
    first = calls[0]
    assert first.query.shape == first.value.shape == (2, 4, 100, 8)
    assert torch.equal(first.mask, real) and first.options.num_landmarks == 16
    # The output before the skip is Nyström attention of the layer's own q, k, v.
    want = nystromer.nystrom_attention(
        first.query, first.key, first.value, num_landmarks=16, mask=first.mask, scale=first.scale
    )
    assert torch.allclose(outputs[0], want, atol=1e-6)
    assert skips[0].abs().max() > 0
    # Outside the block nothing is probed; an exception in the probe ends the forward pass.
    with torch.no_grad():
        _hidden(model, inputs)
    assert len(calls) == 2

    class Stop(Exception):
        pass

    def stop(call):
        raise Stop

    with pytest.raises(Stop), attention_probe(stop), torch.no_grad():
        _hidden(model, inputs)


def test_patching_again_applies_the_new_settings():
    # A second patch of a torch model must not keep the first call's settings without a word
    # (the transformers path rewrites config.nystrom); its convolution skips are kept.
    model = _encoder()
    patch(model, num_landmarks=16, conv_kernel_size=3)
    conv = model.layers[0].self_attn.conv
    patch(model, num_landmarks=8, pinv_iterations=3, kmeans_iterations=2)
    for layer in model.layers:
        assert layer.self_attn.options == NystromOptions(
            num_landmarks=8, pinv_iterations=3, kmeans_iterations=2, conv_kernel_size=3
        )
    assert model.layers[0].self_attn.conv is conv  # trained skips stay
    plain = patch(_encoder(), num_landmarks=16)
    with pytest.raises(ValueError, match="conv_kernel_size"):
        patch(plain, num_landmarks=16, conv_kernel_size=3)  # a skip cannot be added afterwards


def test_wrapped_transformers_model_is_patched_inside_the_wrapper():
    # nn.DataParallel (and DistributedDataParallel) hold the model as .module: the wrapper is
    # no transformers model, but what it wraps is.
    model = _bert_like("bert")
    wrapped = nn.DataParallel(model)
    assert patch(wrapped, num_landmarks=8) is wrapped
    assert model.config._attn_implementation == "nystrom"
    assert nystromer.hf.get_options(model.config).num_landmarks == 8


def test_distributed_data_parallel_model_is_patched_inside_unless_new_parameters(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of the caller")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = _bert_like("bert")
        wrapped = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="before wrapping"):
            patch(wrapped, num_landmarks=8, conv_kernel_size=3)
        assert model.config._attn_implementation != "nystrom"  # refused: unchanged
        patch(wrapped, num_landmarks=8)
        assert model.config._attn_implementation == "nystrom"
    finally:
        dist.destroy_process_group()

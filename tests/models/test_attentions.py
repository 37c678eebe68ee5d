"""output_attentions=True: one AttentionMap per layer, of the matrix the layer really applies."""

from __future__ import annotations

import pytest
import torch

import nystromer.models as ours
from nystromer import AttentionMap, reference
from nystromer.models import NystromformerConfig, NystromformerModel, hf_io
from nystromer.models import modeling as modeling_module

from .tiny import HEADS, batch, hf_branch, main_output, peaked, tiny_config

# float64 throughout: map and forward compute the same products in another order (the map
# forms F·A⁺·B, the forward F·A⁺·(B·V) through SDPA), so they agree to rounding, ~1e-15 of
# the output's scale; 1e-10 leaves room and still fails on any wrong row, mask or kernel.
ATOL = 1e-10


def _record_self_attention(model):
    """Per layer: the input of attention.self and its output (B, n, hidden)."""
    records = []

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        records.append((module, args[0], args[1], out))

    base = getattr(model, "nystromformer", model)
    handles = [layer.attention.self.register_forward_hook(hook) for layer in base.encoder.layer]
    return records, handles


def _heads(module, x, proj):
    cfg = module.config
    return proj(x).unflatten(-1, (cfg.num_attention_heads, cfg.head_dim)).transpose(1, 2)


def _dense_nystromer(q, k, mask, m, iterations):
    """(B, H, n, n) reference from nystromer.reference, sample by sample over real tokens:
    F·A⁺·B for more than m real tokens, exact softmax otherwise; padding rows and columns 0."""
    b, h, n, _ = q.shape
    out = q.new_zeros(b, h, n, n)
    for i in range(b):
        length = n if mask is None else int(mask[i].sum())
        qi, ki = q[i, :, :length], k[i, :, :length]
        if length > m:
            dense = reference.nystrom_matrix(qi, ki, m, iterations)
        else:
            dense = reference.softmax_kernel(qi, ki)
        out[i, :, :length, :length] = dense
    return out


@pytest.mark.parametrize(
    "m, n, pad",
    [
        (4, 12, True),  # Nyström for both samples (12 and 7 real tokens)
        (8, 12, True),  # sample 0 Nyström, sample 1 (7 real tokens ≤ m) exact
        (16, 12, True),  # n ≤ m: exact softmax attention
        (4, 12, False),
    ],
)
def test_maps_are_the_matrices_the_layers_apply(m, n, pad):
    torch.manual_seed(0)
    model = peaked(NystromformerModel(tiny_config(num_landmarks=m)).double().eval())
    kwargs, _ = batch("NystromformerModel", n, pad=pad)
    records, handles = _record_self_attention(model)
    with torch.no_grad():
        out = model(**kwargs, output_attentions=True)
    for h in handles:
        h.remove()
    assert len(out.attentions) == len(records) == 2
    mask = kwargs["attention_mask"].bool() if pad else None
    for attn, (module, x, layer_mask, context) in zip(out.attentions, records, strict=True):
        assert isinstance(attn, AttentionMap) and attn.shape == (2, 4, n, n)
        q, k, v = (_heads(module, x, p) for p in (module.query, module.key, module.value))
        expected = _dense_nystromer(q, k, mask, m, module.config.pinv_iterations)
        rows = [0, 5, n - 1]
        assert torch.allclose(attn[:, :, rows], expected[:, :, rows], atol=ATOL, rtol=0)
        full = attn.full()
        assert torch.allclose(full, expected, atol=ATOL, rtol=0)
        # attn @ v plus the (masked) convolution skip is the layer's output before its
        # projection: the map is the matrix the forward applied.
        rebuilt = full @ v + module.conv(v, layer_mask)
        assert torch.allclose(rebuilt.transpose(1, 2).flatten(2), context, atol=ATOL, rtol=0)


@pytest.mark.parametrize("branch", ["exact", "nystrom"])
def test_hf_numerics_maps(tmp_path, branch):
    transformers = pytest.importorskip("transformers")
    hf_cfg, n, pad = hf_branch(branch)
    torch.manual_seed(0)
    hf = peaked(transformers.NystromformerModel(hf_cfg).double().eval())
    hf.save_pretrained(tmp_path)
    # Built in float64 before loading: from_pretrained loads into float32 parameters.
    config = NystromformerConfig.from_pretrained(tmp_path, numerics="hf")
    model = NystromformerModel(config).double().eval()
    hf_io.load_into(model, hf_io.read_state_dict(tmp_path), strict=True, source="hf")
    kwargs, _ = batch("NystromformerModel", n, pad=pad)
    records, handles = _record_self_attention(model)
    with torch.no_grad():
        out = model(**kwargs, output_attentions=True)
        hf_out = hf(**kwargs, output_attentions=True)
    for h in handles:
        h.remove()
    for layer, (attn, hf_attn) in enumerate(zip(out.attentions, hf_out.attentions, strict=True)):
        module, x, _, context = records[layer]
        full = attn.full()
        q, k, v = (_heads(module, x, p) for p in (module.query, module.key, module.value))
        if branch == "exact":
            # transformers returns the exact branch's (B, H, n, n) softmax itself.
            assert torch.allclose(full, hf_attn, atol=ATOL, rtol=0)
        else:
            # transformers returns F·A⁺ (B, H, n, m), not the matrix it applies; times its
            # landmark-to-key kernel (segment means of q against k) it is.
            assert hf_attn.shape == (2, 4, n, 8)
            q_land = q.unflatten(2, (8, n // 8)).mean(3)
            expected = hf_attn @ reference.softmax_kernel(q_land, k)
            assert torch.allclose(full, expected, atol=ATOL, rtol=0)
        assert torch.allclose(attn[1, :, [3, -1]], full[1, :, [3, -1]], atol=ATOL, rtol=0)
        # transformers' skip convolves the unmasked values.
        rebuilt = (full @ v + module.conv(v)).transpose(1, 2).flatten(2)
        assert torch.allclose(rebuilt, context, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", HEADS)
def test_every_head_returns_maps_in_transformers_position(name):
    torch.manual_seed(0)
    model = getattr(ours, name)(tiny_config(num_landmarks=4)).eval()
    kwargs, labels = batch(name, 12, pad=True)
    with torch.no_grad():
        plain = model(**kwargs, **labels)
        out = model(**kwargs, **labels, output_attentions=True, output_hidden_states=True)
        tup = model(**kwargs, **labels, output_attentions=True, return_dict=False)
    assert plain.attentions is None
    assert torch.equal(main_output(name, out), main_output(name, plain))
    sequences = 6 if name == "NystromformerForMultipleChoice" else 2
    assert [a.shape for a in out.attentions] == [(sequences, 4, 12, 12)] * 2
    # transformers' tuple: the set fields in order, attentions last (after hidden states).
    assert tup[-1][0].shape == out.attentions[0].shape
    assert len(tup) == len(model(**kwargs, **labels, return_dict=False)) + 1


def test_forward_without_output_attentions_builds_no_map(monkeypatch):
    # No extra work unless asked: the map is never built, and with output_attentions the
    # rows are computed only when indexed.
    calls = []
    model = NystromformerModel(tiny_config(num_landmarks=4)).eval()
    kwargs, _ = batch("NystromformerModel", 12, pad=True)

    def refuse(*args, **kw):
        raise AssertionError("attention map built without output_attentions")

    with monkeypatch.context() as patch:
        patch.setattr(modeling_module.NystromformerSelfAttention, "_attention_map", refuse)
        assert model(**kwargs).attentions is None
    real = modeling_module.attention_rows
    monkeypatch.setattr(
        modeling_module, "attention_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    out = model(**kwargs, output_attentions=True)
    assert calls == []
    out.attentions[0][:, :, 0]
    assert calls == [1]


def test_maps_under_gradient_checkpointing_and_autograd():
    # In training with checkpointing the layers return their maps too, and rows carry
    # gradients to the projections (attention-gradient attributions).
    torch.manual_seed(0)
    config = tiny_config(num_landmarks=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    model = NystromformerModel(config).double().train()
    kwargs, _ = batch("NystromformerModel", 12, pad=True)
    model.gradient_checkpointing_enable()
    out = model(**kwargs, output_attentions=True)
    assert len(out.attentions) == 2
    row = out.attentions[0][:, :, 0]
    row.sum().backward()
    grad = model.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        again = model(**kwargs, output_attentions=True).attentions[0][:, :, 0]
    # The map leaves out attention dropout: the first layer's (whose input has no dropout
    # here) is the same in training and in eval mode.
    assert torch.allclose(row, again, atol=ATOL, rtol=0)


@pytest.mark.parametrize("numerics", ["nystromer", "hf"])
def test_maps_under_torch_compile_fullgraph_are_the_eager_maps(numerics):
    # output_attentions under torch.compile(model, fullgraph=True): dynamo returns the maps
    # (their row functions hold the compiled forward's q and k), and their rows, computed when
    # indexed after the compiled call, and gradients through them are eager's. aot_eager
    # backend: fullgraph is a property of dynamo's capture, which the backend does not change,
    # and it skips inductor's code generation (seconds instead of a minute).
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = tiny_config(num_landmarks=4, numerics=numerics, segment_means_seq_len=12)
    model = peaked(NystromformerModel(config).double().eval())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    kwargs, _ = batch("NystromformerModel", 12, pad=numerics == "nystromer")
    got = compiled(**kwargs, output_attentions=True)
    want = model(**kwargs, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 2
    for attn, ref in zip(got.attentions, want.attentions, strict=True):
        assert isinstance(attn, AttentionMap) and attn.shape == ref.shape == (2, 4, 12, 12)
        torch.testing.assert_close(attn[:, :, [0, -1]], ref[:, :, [0, -1]], atol=ATOL, rtol=0)
        torch.testing.assert_close(attn.full(), ref.full(), atol=ATOL, rtol=0)
    # An attention loss on a row (as attention supervision takes it) differentiates through
    # the compiled forward to the parameters.
    params = [p for p in model.parameters() if p.requires_grad]
    # (Unused parameters: zeros from the compiled graph, None eagerly; materialised as zeros.)
    grads = [
        torch.autograd.grad(
            out.attentions[-1][:, :, 0].square().sum(), params, materialize_grads=True
        )
        for out in (got, want)
    ]
    assert any(w.abs().max() > 0 for w in grads[1])
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)

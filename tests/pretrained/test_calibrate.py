"""nystromer.calibrate: the least-squares fit of the convolution skip, against a fit written
here from the definition, padding-correct, and its errors."""

from __future__ import annotations

import copy

import pytest
import torch

import nystromer
from nystromer import calibrate

from .tiny import make_bert

transformers = pytest.importorskip("transformers")

M = 8  # landmarks; sequences are longer, so the approximation (and the skip) matters
K = 5  # kernel


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    # value_scale 1: _local_teacher sets the values of the local heads itself.
    path = make_bert(tmp_path_factory.mktemp("calibrate") / "bert", value_scale=1.0)
    return transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").double().eval()


def _batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(5, 45, (len(lengths), n), generator=gen)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


def _layer0_attention(model, batch):
    """Layer 0 by hand from the embeddings: q, k, v (B, H, n, d), the bool mask and exact
    softmax attention."""
    attn = model.encoder.layer[0].attention.self
    with torch.no_grad():
        h = model.embeddings(input_ids=batch["input_ids"])
        b, n, _ = h.shape
        heads, d = attn.num_attention_heads, attn.attention_head_size

        def split(x):
            return x.view(b, n, heads, d).transpose(1, 2)

        q, k, v = split(attn.query(h)), split(attn.key(h)), split(attn.value(h))
        mask = batch["attention_mask"].bool()
        return q, k, v, mask, _exact(q, k, v, mask)


def _exact(q, k, v, mask):
    """Softmax attention (B, H, n, d) with the padding keys (False in mask) masked out."""
    logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, -1) @ v


def _skip_equations(v, exact, approx, mask, head):
    """The least-squares equations of one head's K-tap convolution skip, written out from the
    definition: per real token, its (d, K) taps of v and the target exact − approx (d,)."""
    rows, target = [], []
    d = v.shape[-1]
    for s in range(v.shape[0]):
        length = int(mask[s].sum())
        vs = v[s, head, :length]
        for i in range(length):
            # Tap t reads position i + t − K//2 (zero outside the sequence).
            taps = [
                vs[i + t - K // 2] if 0 <= i + t - K // 2 < length else torch.zeros(d)
                for t in range(K)
            ]
            rows.append(torch.stack(taps, -1))  # (d, K)
            target.append(exact[s, head, i] - approx[s, head, i])
    return rows, target


def test_first_layer_kernel_equals_a_least_squares_fit_from_the_definition(teacher):
    student = nystromer.convert(copy.deepcopy(teacher), num_landmarks=M, conv_kernel_size=K)
    batch = _batch([40, 33])
    result = calibrate(student, [batch], ridge=0.0)
    assert len(result.explained) == 2 and result.tokens == 73

    # Reference for layer 0, from its inputs.
    q, k, v, mask, exact = _layer0_attention(teacher, batch)
    heads = q.shape[1]
    approx = nystromer.nystrom_attention(q, k, v, num_landmarks=M, mask=mask)
    for h_ in range(heads):
        rows, target = _skip_equations(v, exact, approx, mask, h_)
        x = torch.cat(rows).double()  # (tokens·d, K)
        y = torch.cat(target).double()
        w = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
        fitted = student.encoder.layer[0].attention.self.nystrom_conv.weight[h_, 0, :, 0]
        torch.testing.assert_close(fitted, w, rtol=1e-8, atol=1e-10)
        explained = 1 - (y - x @ w).square().sum() / y.square().sum()
        assert result.explained[0][h_].item() == pytest.approx(explained.item(), abs=1e-5)


def _local_teacher(teacher):
    """The tiny BERT with its first two heads made local: positions are a slow rotation in
    two dimensions of the embeddings and those heads' queries and keys read only them, so
    q_i·k_j ∝ cos(ω(i − j)) peaks at j = i and decays over a few tokens, like the
    neighbour-attending heads of pretrained encoders. Random BERTs have no local heads, and
    nothing for a local kernel to fix."""
    local = copy.deepcopy(teacher)
    emb = local.embeddings
    n_pos = emb.position_embeddings.weight.shape[0]
    angle = 0.05 * torch.arange(n_pos, dtype=torch.float64)
    with torch.no_grad():
        # Dimensions 0 and 1 hold the position alone and dominate the LayerNorm's statistics;
        # the words, small after it, are what the values read (scaled up below).
        emb.word_embeddings.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
        emb.word_embeddings.weight[:, :2] = 0
        emb.token_type_embeddings.weight.zero_()
        emb.position_embeddings.weight.zero_()
        emb.position_embeddings.weight[:, 0] = 10 * angle.cos()
        emb.position_embeddings.weight[:, 1] = 10 * angle.sin()
        for layer in local.encoder.layer:
            attn = layer.attention.self
            d = attn.attention_head_size
            for proj in (attn.query, attn.key):
                for head in (0, 1):
                    proj.weight[head * d : (head + 1) * d] = 0
                    proj.bias[head * d : (head + 1) * d] = 0
                    proj.weight[head * d, 0] = proj.weight[head * d + 1, 1] = 6.0
            attn.value.weight[:, :2] = 0
            attn.value.weight[:, 2:] *= 20
    return local


def test_calibration_brings_the_model_closer_to_exact_attention(teacher):
    teacher = _local_teacher(teacher)
    student = nystromer.convert(copy.deepcopy(teacher), num_landmarks=M, conv_kernel_size=K)
    held_out = _batch([48, 48, 40], seed=1)

    def error():
        with torch.no_grad():
            a = student(**held_out).last_hidden_state
            b = teacher(**held_out).last_hidden_state
        real = held_out["attention_mask"].bool()
        return (a - b)[real].square().mean().item()

    before = error()
    result = calibrate(student, [_batch([48, 48, 44, 40], seed=s) for s in range(3)])
    assert all(((e >= 0) & (e <= 1)).all() for e in result.explained)
    # A local kernel removes a clear share of the local heads' error (in this model 0.13 to
    # 0.20; random heads, as in a random BERT, give below 0.02).
    assert all((e[:2] > 0.1).all() for e in result.explained), result.explained
    # Layer outputs nearer to exact attention on other inputs: the model's squared error
    # falls (by 17% here, in line with the shares above).
    assert error() < 0.9 * before
    assert student.training is False  # the mode it had (convert keeps it)


def test_padding_does_not_change_the_fit(teacher):
    # Two sequences padded into one batch fit the same kernel as each run on its own.
    together = nystromer.convert(copy.deepcopy(teacher), num_landmarks=M, conv_kernel_size=K)
    apart = nystromer.convert(copy.deepcopy(teacher), num_landmarks=M, conv_kernel_size=K)
    batch = _batch([44, 30], seed=2)
    calibrate(together, [batch])
    alone = [{k: v[i : i + 1, : int(batch["attention_mask"][i].sum())] for k, v in batch.items()}
             for i in range(2)]  # fmt: skip
    calibrate(apart, alone)
    for a, b in zip(together.modules(), apart.modules(), strict=True):
        if hasattr(a, "nystrom_conv"):
            torch.testing.assert_close(a.nystrom_conv.weight, b.nystrom_conv.weight)


def test_errors_name_what_is_wrong(teacher):
    plain = nystromer.convert(copy.deepcopy(teacher), num_landmarks=M)
    with pytest.raises(ValueError, match=r"no Nyström convolution skip.*conv_kernel_size=35"):
        calibrate(plain, [_batch([40])])
    student = nystromer.convert(copy.deepcopy(teacher), num_landmarks=M, conv_kernel_size=K)
    with pytest.raises(ValueError, match="inputs must be a non-empty sequence of batches"):
        calibrate(student, [])
    with pytest.raises(ValueError, match="inputs must be a non-empty sequence of batches"):
        calibrate(student, _batch([40]))
    for bad in (-1.0, float("inf")):  # an infinite ridge wrote NaN weights into the model
        with pytest.raises(ValueError, match="ridge must be a finite number ≥ 0"):
            calibrate(student, [_batch([40])], ridge=bad)
    with pytest.raises(ValueError, match="never reached a Nyström attention layer"):
        calibrate(student, [_batch([M])])  # n ≤ m: exact attention, nothing to fit


def test_output_projection_fit_is_the_shrunk_least_squares_map(teacher):
    # Layer 0 from its definition: Y = Nyström + fitted convolution (heads concatenated, a 1
    # appended), E = exact attention; A minimises ‖E − A·Y‖² + μ‖A − [I 0]‖², and the output
    # projection W, b becomes W·A.
    student = nystromer.convert(copy.deepcopy(teacher), num_landmarks=M, conv_kernel_size=K)
    batch = _batch([40, 33])
    dense = student.encoder.layer[0].attention.output.dense
    w0, b0 = dense.weight.detach().clone(), dense.bias.detach().clone()
    result = calibrate(student, [batch], output_projection=0.3)
    assert len(result.output_explained) == 2 and all(0 < e < 1 for e in result.output_explained)

    q, k, v, mask, exact = _layer0_attention(student, batch)
    b, _, n, _ = q.shape
    with torch.no_grad():
        y = nystromer.nystrom_attention(q, k, v, num_landmarks=M, mask=mask)
        y = y + student.encoder.layer[0].attention.self.nystrom_conv(v, mask)
    y = y.transpose(1, 2).reshape(b * n, -1)[mask.reshape(-1)]
    e = exact.transpose(1, 2).reshape(b * n, -1)[mask.reshape(-1)]
    y1 = torch.cat([y, torch.ones(len(y), 1, dtype=y.dtype)], 1)
    width = y.shape[1]
    prior = torch.eye(width, width + 1, dtype=y.dtype)
    mu = 0.3 * (y * y).sum(0).mean()
    # Normal equations of the shrunk problem, written out: A (YᵀY + μI) = EᵀY + μ[I 0].
    a = torch.linalg.solve(
        y1.T @ y1 + mu * torch.eye(width + 1, dtype=y.dtype), (e.T @ y1 + mu * prior).T
    ).T
    torch.testing.assert_close(dense.weight, w0 @ a[:, :width], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense.bias, b0 + w0 @ a[:, width], rtol=1e-8, atol=1e-10)


def test_output_projection_fit_brings_the_model_closer_and_errors_are_clear(teacher):
    teacher = _local_teacher(teacher)
    held_out = _batch([48, 48, 40], seed=1)
    fits = [_batch([48, 48, 44, 40], seed=s) for s in range(3)]

    def error(model):
        with torch.no_grad():
            a = model(**held_out).last_hidden_state
            b = teacher(**held_out).last_hidden_state
        return (a - b)[held_out["attention_mask"].bool()].square().mean().item()

    conv_only = nystromer.convert(copy.deepcopy(teacher), num_landmarks=M, conv_kernel_size=K)
    calibrate(conv_only, fits)
    both = nystromer.convert(copy.deepcopy(teacher), num_landmarks=M, conv_kernel_size=K)
    calibrate(both, fits, output_projection=0.3)
    assert error(both) < error(conv_only)
    for bad in (0.0, -1.0, True, float("inf")):
        with pytest.raises(ValueError, match="output_projection must be a finite number > 0"):
            calibrate(both, fits, output_projection=bad)


def test_albert_shared_layer_is_fitted_on_all_its_uses():
    # ALBERT runs one layer's weights num_hidden_layers times: its one convolution serves
    # every use, so the fit is the least-squares kernel over all uses pooled (fitting the first
    # use alone, as before, leaves the others out).
    torch.manual_seed(0)
    config = transformers.AlbertConfig(
        vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    albert = transformers.AlbertModel(config).double().eval()
    with torch.no_grad():  # peaked attention, so Nyström attention differs from exact
        attn = albert.encoder.albert_layer_groups[0].albert_layers[0].attention
        attn.query.weight.mul_(20)
        attn.key.weight.mul_(20)
    student = nystromer.convert(albert, num_landmarks=M, conv_kernel_size=K)
    batch = _batch([40, 33])

    calls = []

    def keep(call):
        calls.append((call.query, call.key, call.value, call.mask, call.output.clone()))

    with nystromer.patching.attention_probe(keep), torch.no_grad():
        student(**batch)  # convolution still zero: every use sees the inputs the fit sees
    assert len(calls) == 3

    result = calibrate(student, [batch], ridge=0.0)
    assert len(result.explained) == 1 and result.tokens == 3 * 73
    fitted = attn.nystrom_conv.weight[:, 0, :, 0]
    for h_ in range(4):
        rows, target = [], []
        for q, k, v, mask, out in calls:
            more_rows, more_target = _skip_equations(v, _exact(q, k, v, mask), out, mask, h_)
            rows += more_rows
            target += more_target
        x, y = torch.cat(rows).double(), torch.cat(target).double()
        w = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
        torch.testing.assert_close(fitted[h_], w, rtol=1e-8, atol=1e-10)

"""The attention, the module and a training run on a CUDA device (skipped without one).

The results are compared with the float64 CPU references of tests/reference.py. Setting
``NYSTROMER_TEST_DEVICE=cpu`` runs these tests on the CPU. That checks the tests themselves on a
machine without a GPU. ``benchmarks/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from nystromer import NystromAttention, nystrom_attention

from .reference import nystrom_reference
from .test_attention import fit
from .test_functional import qkv, rel_err
from .test_functional import right_padded_mask as padded

DEVICE = os.environ.get("NYSTROMER_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="needs CUDA (or NYSTROMER_TEST_DEVICE)")


def on(*tensors, dtype=None):
    return tuple(t.to(device=DEVICE, dtype=dtype or t.dtype) for t in tensors)


def cpu64(t):
    return t.cpu().double()


def test_float64_on_the_device_equals_the_papers_formula():
    q, k, v = qkv(b=3, n=70)
    mask = padded([70, 41, 9], 70)  # Nyström, Nyström over a padded row, exact (9 ≤ m)
    out = nystrom_attention(*on(q, k, v), num_landmarks=8, mask=mask.to(DEVICE))
    assert out.device.type == torch.device(DEVICE).type
    ref = nystrom_reference(q, k, v, 8, mask=mask)
    # Float64 kernels on both sides: only summation order differs (tests/test_functional.py
    # holds the CPU to the same 1e-10).
    assert (out.cpu() - ref).abs().max().item() <= 1e-10


def test_float32_on_the_device_is_close_to_float64():
    q, k, v = qkv(b=2, h=4, n=300, d=32)
    mask = padded([300, 250], 300)
    out = nystrom_attention(*on(q, k, v, dtype=torch.float32), num_landmarks=16, mask=on(mask)[0])
    # Float32 carries 6e-8 relative rounding, which the pinv iterations amplify: on the CPU
    # this error is 4e-7. 1e-4 leaves room for other kernels' summation order, and none for
    # TF32 (~1e-3), which must stay off for float32 attention.
    assert rel_err(cpu64(out), nystrom_reference(q, k, v, 16, mask=mask)) <= 1e-4


def test_padding_and_batch_invariance_on_the_device():
    q, k, v = qkv(b=3, n=90)
    q[2] *= 30  # a very different neighbour must not change the others
    k[2] *= 30
    mask = padded([61, 90, 90], 90)
    batched = nystrom_attention(*on(q, k, v), num_landmarks=8, mask=on(mask)[0]).cpu()
    alone = nystrom_attention(*on(q[:1, :, :61], k[:1, :, :61], v[:1, :, :61]), num_landmarks=8)
    assert (batched[:1, :, :61] - alone.cpu()).abs().max().item() <= 1e-10
    second = nystrom_attention(*on(q[1:2], k[1:2], v[1:2]), num_landmarks=8)
    assert (batched[1:2] - second.cpu()).abs().max().item() <= 1e-10


def test_few_real_tokens_give_exact_attention_in_float32():
    q, k, v = on(*qkv(b=2, h=4, n=200, d=16), dtype=torch.float32)
    mask = padded([200, 10], 200).to(DEVICE)
    out = nystrom_attention(q, k, v, num_landmarks=16, mask=mask)
    sdpa = F.scaled_dot_product_attention(q[1:, :, :10], k[1:, :, :10], v[1:, :, :10])
    # The required bound: float32 rounding of a 10-term softmax average.
    assert (out[1:, :, :10] - sdpa).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_are_finite_and_close_to_float32(dtype):
    q, k, v = qkv(b=2, h=4, n=300, d=32, dtype=torch.float32)
    mask = on(padded([300, 250], 300))[0]
    ref = nystrom_attention(*on(q, k, v), num_landmarks=16, mask=mask)
    try:
        out = nystrom_attention(*on(q, k, v, dtype=dtype), num_landmarks=16, mask=mask)
    except RuntimeError as e:  # float16 kernels are missing on some CPUs
        if DEVICE == "cpu" and dtype == torch.float16:
            pytest.skip(f"float16 not supported here: {e}")
        raise
    assert out.dtype == dtype and torch.isfinite(out).all()
    # An 8-bit (bf16) or 11-bit (fp16) mantissa: a few roundings stay within the required 2e-2.
    assert rel_err(cpu64(out), cpu64(ref)) <= 2e-2


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA's sync debug mode")
@pytest.mark.parametrize("kmeans", [0, 2])
def test_no_host_sync_per_call_on_cuda(kmeans):
    # A host read of a GPU value waits for all queued work; the CUDA path must make none
    # (tests/test_functional.py forces the same branch on the CPU with host reads refused).
    q, k, v = (t.requires_grad_() for t in on(*qkv(b=3, h=2, n=90, d=16)))
    mask = on(padded([90, 61, 7], 90))[0]  # full, padded, and at most m real tokens
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = nystrom_attention(q, k, v, num_landmarks=8, mask=mask, kmeans_iterations=kmeans)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = nystrom_reference(
        *(t.detach().cpu() for t in (q, k, v)), 8, mask=mask.cpu(), kmeans_iterations=kmeans
    )
    assert (out.detach().cpu() - ref).abs().max().item() <= 1e-10


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA's sync debug mode")
def test_no_host_sync_per_call_in_the_models_on_cuda():
    # The model and nn.TransformerEncoder with the drop-in layer, padded, forward and backward
    # under bf16 autocast, must not wait for the device either (tests/models/test_modeling.py
    # and tests/test_patch.py check the same on the meta device, where a read raises).
    from torch import nn

    from nystromer import patch
    from nystromer.models import NystromformerForSequenceClassification

    from .models.tiny import batch, tiny_config

    torch.manual_seed(0)
    model = NystromformerForSequenceClassification(tiny_config(num_landmarks=8)).to(DEVICE)
    kwargs, labels = batch("NystromformerForSequenceClassification", 40, pad=True)
    kwargs, labels = ({k: t.to(DEVICE) for k, t in d.items()} for d in (kwargs, labels))
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = patch(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), num_landmarks=8)
    encoder = encoder.to(DEVICE)
    x = torch.randn(2, 40, 32, device=DEVICE)
    pad = (torch.arange(40) >= torch.tensor([[40], [29]])).to(DEVICE)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**kwargs, **labels).loss + encoder(x, src_key_padding_mask=pad).sum()
        loss.backward()

    step()  # first calls: lazy initialisation of the libraries may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_the_landmark_work_in_float32_on_the_device(dtype):
    # Under autocast the m×m pseudo-inverse and the k-means distances stay in float32:
    # half-precision inputs give the same bits with and without it.
    q, k, v = on(*qkv(b=2, h=4, n=300, d=32), dtype=dtype)
    settings = dict(num_landmarks=16, mask=on(padded([300, 250], 300))[0], kmeans_iterations=2)
    plain = nystrom_attention(q, k, v, **settings)
    try:
        with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
            auto = nystrom_attention(q, k, v, **settings)
    except RuntimeError as e:  # float16 autocast or kernels are missing on some CPUs
        if DEVICE == "cpu" and dtype == torch.float16:
            pytest.skip(f"float16 autocast not supported here: {e}")
        raise
    assert torch.equal(auto, plain)


def test_packed_sequences_are_refused_on_the_device():
    # transformers folds packed sequences (restarting position ids) into a mask function over
    # a tensor on the model's device; the mask builder evaluates it on the CPU's positions.
    transformers = pytest.importorskip("transformers")
    from transformers import AutoModel, BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=90, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    cfg.nystrom = {"num_landmarks": 16}
    model = AutoModel.from_config(cfg, attn_implementation="nystrom").to(DEVICE).eval()
    assert isinstance(model, transformers.BertModel)
    packed = torch.cat([torch.arange(6), torch.arange(6)]).to(DEVICE)
    ids = torch.randint(3, 90, (2, 12), device=DEVICE)
    with pytest.raises(ValueError, match="key padding and bidirectional local windows"):
        model(input_ids=ids, position_ids=torch.stack([torch.arange(12, device=DEVICE), packed]))


def test_gradcheck_float64_on_the_device():
    q, k, v = (t.requires_grad_() for t in on(*qkv(b=2, h=1, n=14, d=3, seed=1)))
    mask = on(padded([14, 11], 14))[0]

    def f(q, k, v):
        return nystrom_attention(q, k, v, num_landmarks=4, mask=mask)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)


def test_module_trains_and_compiles_on_the_device():
    torch.manual_seed(0)
    attn = NystromAttention(32, 4, num_landmarks=8, conv_kernel_size=3).to(DEVICE)
    x, target = torch.randn(4, 64, 32, device=DEVICE), torch.randn(4, 64, 32, device=DEVICE)
    losses = fit(attn, x, target)
    assert losses[-1] < 0.9 * losses[0]
    attn.eval()
    mask = (torch.arange(64)[None] < torch.tensor([[64], [40], [64], [7]])).to(DEVICE)
    compiled = torch.compile(attn, dynamic=False)
    with torch.no_grad():
        # 1e-4: inductor fuses and reorders float32 reductions, and cuDNN may run the
        # convolution skip in TF32 (10-bit mantissa) on one side and not the other.
        assert torch.allclose(compiled(x, mask=mask), attn(x, mask=mask), atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_lra_training_runs_on_the_device(tmp_path, precision):
    if precision == "fp16" and DEVICE == "cpu":
        pytest.skip("fp16 training needs CUDA (the trainer refuses it elsewhere)")
    from nystromer.lra.model import build_model, classification_objective, collate
    from nystromer.train import TrainConfig, train

    from .lra_train.synthetic import TokenDataset, tiny_model_config

    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    cfg = TrainConfig(
        steps=12, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=6, seed=3,
        device=DEVICE, precision=precision, progress=False,
    )  # fmt: skip
    result = train(
        model, classification_objective, TokenDataset(40, seed=0), cfg, tmp_path,
        val_data=TokenDataset(16, seed=1), test_data=TokenDataset(16, seed=2),
        collate_fn=collate,
    )  # fmt: skip
    assert result.status == "completed" and result.step == 12
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in lines)


@pytest.mark.parametrize("numerics", ["nystromer", "lucidrains"])
def test_compat_layer_on_the_device_equals_the_cpu(numerics):
    from nystromer.compat import NystromAttention as CompatAttention

    torch.manual_seed(0)
    layer = CompatAttention(dim=32, dim_head=8, heads=4, num_landmarks=8, numerics=numerics)
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    mask = padded([70, 29], 70)
    want, want_attn = layer.double()(x, mask=mask, return_attn=True)
    moved = layer.to(DEVICE)
    got, attn = moved(*on(x), mask=mask.to(DEVICE), return_attn=True)
    # float64 on both sides: only summation order differs.
    assert rel_err(cpu64(got), want) < 1e-10
    assert rel_err(cpu64(attn[:, :, 0]), want_attn[:, :, 0]) < 1e-10

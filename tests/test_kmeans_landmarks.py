"""k-means landmarks (kmeans_iterations) against the float64 references of reference.py."""

from __future__ import annotations

import pytest
import torch

from nystromer import NystromAttention, _cpu, nystrom_attention
from nystromer.functional import refine_landmarks, segment_means

from .reference import kmeans_landmarks, nystrom_reference
from .test_functional import FUSED_TOL, qkv, right_padded_mask


def clustered_qkv(b=2, h=2, n=96, d=6, clusters=5, seed=0, spread=3.0):
    # Tokens around a few centres, as trained queries and keys are: there k-means moves
    # landmarks far from the segment means, so these tests see the refinement do something.
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, h, clusters, d, generator=g, dtype=torch.float64) * spread

    def draw():
        pick = torch.randint(clusters, (b, h, n), generator=g)
        noise = 0.1 * spread * torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
        return torch.gather(centres, 2, pick[..., None].expand(b, h, n, d)) + noise

    q, k = draw(), draw()
    v = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("block", [None, 112], ids=["one-block", "blocks-of-7-rows"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_refined_landmarks_are_lloyd_iterations_over_real_tokens(iterations, block, monkeypatch):
    # On the CPU the nearest landmarks are found a block of rows at a time (rows = block //
    # (heads · m)): 7 rows leave a short last block, and must give the same iterations.
    if block is not None:
        monkeypatch.setattr(_cpu, "_GATHER_BLOCK", block)
    q, _, _ = clustered_qkv(b=2, h=2, n=70)
    lengths = [70, 45]
    mask = right_padded_mask(lengths, 70)
    from nystromer.functional import landmark_assignment

    index, counts = landmark_assignment(mask, 70, 8, q.device)
    start = segment_means(q, index, counts, 8, torch.float64)
    got = refine_landmarks(q, start, mask, iterations)
    for i, length in enumerate(lengths):
        for j in range(2):
            ref = kmeans_landmarks(q[i, j, :length], 8, iterations)
            torch.testing.assert_close(got[i, j], ref, rtol=0, atol=FUSED_TOL)
    # The refinement moved them: these tests would pass vacuously otherwise.
    assert (got - start).abs().max() > 0.1


@pytest.mark.parametrize("n", [64, 97])
def test_fast_formulation_equals_three_matrix_formula_with_kmeans_landmarks(n):
    q, k, v = clustered_qkv(n=n)
    out = nystrom_attention(q, k, v, num_landmarks=8, kmeans_iterations=3)
    ref = nystrom_reference(q, k, v, 8, kmeans_iterations=3)
    assert (out - ref).abs().max().item() <= FUSED_TOL
    plain = nystrom_attention(q, k, v, num_landmarks=8)
    assert (out - plain).abs().max().item() > 1e-3


def test_padded_batch_with_kmeans_equals_reference_at_real_positions():
    q, k, v = clustered_qkv(b=3, n=90)
    mask = right_padded_mask([90, 61, 6], 90)  # the last one is short: exact attention
    out = nystrom_attention(q, k, v, num_landmarks=8, mask=mask, kmeans_iterations=2)
    ref = nystrom_reference(q, k, v, 8, mask=mask, kmeans_iterations=2)
    assert (out - ref).abs().max().item() <= FUSED_TOL


def test_kmeans_is_padding_and_batch_invariant():
    q, k, v = qkv(b=3, n=90)
    q[1:] *= 30
    k[1:] *= 30
    mask = right_padded_mask([61, 90, 40], 90)
    batched = nystrom_attention(q, k, v, num_landmarks=8, mask=mask, kmeans_iterations=3)
    alone = nystrom_attention(
        q[:1, :, :61], k[:1, :, :61], v[:1, :, :61], num_landmarks=8, kmeans_iterations=3
    )
    assert (batched[:1, :, :61] - alone).abs().max().item() <= FUSED_TOL


def test_kmeans_lowers_the_error_on_clustered_inputs():
    # What the option is for: landmarks where the tokens are. Exact attention is the truth.
    # Six clusters, eight landmarks, attention sharp enough that segment means (each a blend
    # of clusters) miss most of it: relative error 0.95 with segment means, 0.21 after three
    # iterations (measured).
    q, k, v = clustered_qkv(b=2, h=2, n=256, clusters=6, spread=1.5)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def err(it):
        out = nystrom_attention(q, k, v, num_landmarks=8, kmeans_iterations=it)
        return ((out - exact).norm() / exact.norm()).item()

    assert err(3) < 0.5 * err(0)


def test_gradcheck_float64_with_kmeans():
    # The assignment is piecewise constant; at generic points gradcheck's 1e-6 steps do not
    # move any token across a cluster boundary, so the function is smooth there.
    q, k, v = qkv(b=2, h=1, n=14, d=3, seed=1)
    mask = right_padded_mask([14, 11], 14)
    for t in (q, k, v):
        t.requires_grad_(True)

    def f(q, k, v):
        return nystrom_attention(q, k, v, num_landmarks=4, mask=mask, kmeans_iterations=2)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)


def test_float32_and_bfloat16_finite_and_module_passes_it_on():
    torch.manual_seed(0)
    module = NystromAttention(16, 2, num_landmarks=4, kmeans_iterations=2)
    assert "kmeans_iterations=2" in repr(module)
    x = torch.randn(2, 30, 16)
    mask = right_padded_mask([30, 20], 30)
    out = module(x, mask=mask)
    assert torch.isfinite(out).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(x, mask=mask)
    assert torch.isfinite(low).all()
    module.kmeans_iterations = 0
    assert (module(x, mask=mask) - out).abs().max() > 1e-4


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_kmeans_iterations_is_refused(bad):
    q, k, v = qkv(n=20)
    with pytest.raises(ValueError, match="kmeans_iterations"):
        nystrom_attention(q, k, v, num_landmarks=4, kmeans_iterations=bad)
    with pytest.raises(ValueError, match="kmeans_iterations"):
        NystromAttention(8, 2, kmeans_iterations=bad)


def test_kmeans_keeps_no_copy_of_queries_or_keys_for_backward():
    # Only the assignments (int64 per token) may be kept beyond what segment means keep: a
    # copy of q or k per iteration would grow a model's training memory by a layer's inputs.
    b, h, n, d = 1, 4, 512, 16

    def saved_bytes(iterations):
        g = torch.Generator().manual_seed(0)
        # (B, n, H, d) transposed, as attention layers produce: reshapes copy.
        q, k, v = (torch.randn(b, n, h, d, generator=g, requires_grad=True) for _ in range(3))
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            nystrom_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                num_landmarks=8, kmeans_iterations=iterations,
            )  # fmt: skip
        return sum(seen.values())

    assignments = 2 * 3 * b * h * n * 8  # q and k, 3 iterations, int64
    one_input = b * h * n * d * 4
    extra = saved_bytes(3) - saved_bytes(0)
    assert extra < assignments + one_input // 4


def test_kmeans_any_memory_layout():
    # Attention layers hand over (B, n, H, d) memory viewed as (B, H, n, d); k-means sums the
    # tokens in that order, and must give what it gives on contiguous inputs (gradients too).
    q, k, v = clustered_qkv(b=3, h=2, n=70)
    mask = right_padded_mask([70, 45, 9], 70)
    outs, grads = [], []
    for split in (False, True):
        inputs = [t.transpose(1, 2).contiguous().transpose(1, 2) if split else t.clone()
                  for t in (q, k, v)]  # fmt: skip
        assert inputs[0].is_contiguous() != split
        for t in inputs:
            t.requires_grad_(True)
        out = nystrom_attention(*inputs, num_landmarks=8, mask=mask, kmeans_iterations=3)
        out.backward(torch.ones_like(out))
        outs.append(out)
        grads.append([t.grad for t in inputs])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

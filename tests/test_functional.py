"""nystrom_attention against the float64 references of tests/reference.py."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import nystromer.functional as fn
from nystromer import _cpu, iterative_pinv, nystrom_attention

from .reference import landmarks, newton_pinv, nystrom_one_head, nystrom_reference


def qkv(b=2, h=3, n=50, d=8, n_k=None, d_v=None, dtype=torch.float64, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k
    d_v = d if d_v is None else d_v
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype) * spread
    k = torch.randn(b, h, n_k, d, generator=g, dtype=dtype) * spread
    v = torch.randn(b, h, n_k, d_v, generator=g, dtype=dtype)
    return q, k, v


def right_padded_mask(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# Float64 through both paths: only rounding differs, and the pinv iteration amplifies it by at
# most the condition number of the 8×8 kernel, well under 1e-10 (measured ~1e-14).
FUSED_TOL = 1e-10


@pytest.mark.parametrize("n", [64, 50, 97])
def test_fast_formulation_equals_three_matrix_formula(n):
    q, k, v = qkv(n=n)
    out = nystrom_attention(q, k, v, num_landmarks=8)
    ref = nystrom_reference(q, k, v, 8)
    assert (out - ref).abs().max().item() <= FUSED_TOL


def test_padded_batch_equals_reference_at_real_positions():
    q, k, v = qkv(b=3, n=70)
    mask = right_padded_mask([70, 41, 33], 70)
    mask[2, 5] = False  # an interior hole, not only right padding
    out = nystrom_attention(q, k, v, num_landmarks=8, mask=mask)
    ref = nystrom_reference(q, k, v, 8, mask=mask)
    assert (out - ref).abs().max().item() <= FUSED_TOL
    assert out[~mask[:, None, :, None].expand_as(out)].abs().max() == 0


def test_cross_attention_different_lengths():
    q, k, v = qkv(n=30, n_k=77, d_v=5)
    mask = right_padded_mask([77, 60], 77)
    out = nystrom_attention(q, k, v, num_landmarks=6, mask=mask)
    assert out.shape == (2, 3, 30, 5)
    ref = nystrom_reference(q, k, v, 6, mask=mask)
    assert (out - ref).abs().max().item() <= FUSED_TOL


@pytest.mark.parametrize("n,m", [(64, 8), (50, 8), (7, 3), (100, 100)])
def test_landmarks_are_masked_segment_means(n, m):
    x = torch.randn(2, 2, n, 4, dtype=torch.float64)
    mask = right_padded_mask([n, max(1, n - n // 3)], n)
    index, counts = fn.landmark_assignment(mask, n, m, x.device)
    got = fn.segment_means(x, index, counts, m, torch.float64)
    for i in range(2):
        real = x[i, :, mask[i]]
        for j in range(2):
            want = landmarks(real[j], m)
            nonempty = counts[i, :m] > 0
            assert torch.allclose(got[i, j, nonempty], want, atol=1e-14)
    # Chunk sizes differ by at most one.
    sizes = counts[:, :m][counts[:, :m] > 0]
    for i in range(2):
        s = counts[i, :m][counts[i, :m] > 0]
        assert s.max() - s.min() <= 1
    assert sizes.sum() == mask.sum()


def test_unpadded_divisible_landmarks_are_the_papers_segment_means():
    x = torch.randn(2, 3, 96, 5, dtype=torch.float64)
    index, counts = fn.landmark_assignment(None, 96, 8, x.device)
    got = fn.segment_means(x, index, counts, 8, torch.float64)
    assert torch.equal(got, x.view(2, 3, 8, 12, 5).mean(3))
    # The masked path with an all-True mask gives the same segments.
    mask = torch.ones(2, 96, dtype=torch.bool)
    index, counts = fn.landmark_assignment(mask, 96, 8, x.device)
    assert torch.allclose(fn.segment_means(x, index, counts, 8, torch.float64), got, atol=1e-15)


def test_few_real_tokens_give_exact_attention_float32():
    # Sample 0 is long (Nyström), sample 1 has 10 ≤ m real tokens (exact), in one batch.
    q, k, v = qkv(b=2, h=4, n=200, d=16, dtype=torch.float32)
    mask = right_padded_mask([200, 10], 200)
    out = nystrom_attention(q, k, v, num_landmarks=16, mask=mask)
    sdpa = F.scaled_dot_product_attention(q[1:, :, :10], k[1:, :, :10], v[1:, :, :10])
    # 1e-6 is float32 rounding of a 10-term softmax average (the required bound).
    assert (out[1:, :, :10] - sdpa).abs().max().item() <= 1e-6
    # n ≤ m without a mask: exact too.
    out = nystrom_attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], num_landmarks=16)
    sdpa = F.scaled_dot_product_attention(q[:, :, :16], k[:, :, :16], v[:, :, :16])
    assert (out - sdpa).abs().max().item() <= 1e-6


def test_padding_invariance():
    q, k, v = qkv(b=1, n=90)
    alone = nystrom_attention(q[:, :, :61], k[:, :, :61], v[:, :, :61], num_landmarks=8)
    mask = right_padded_mask([61], 90)
    padded = nystrom_attention(q, k, v, num_landmarks=8, mask=mask)
    assert (padded[:, :, :61] - alone).abs().max().item() <= FUSED_TOL


@pytest.mark.parametrize("kmeans", [0, 2])
def test_padded_queries_of_cross_attention_change_nothing(kmeans):
    # Sample 0 has 5 ≤ m real queries (exact attention alone), sample 1 has 20 (Nyström), the
    # padding is at the start and in a hole; the 30 keys are real. Each sample's real rows must
    # be what its real queries give alone.
    q, k, v = qkv(b=2, n=24, n_k=30, d_v=5)
    query_mask = torch.ones(2, 24, dtype=torch.bool)
    query_mask[0, :19] = False
    query_mask[1, [0, 1, 7, 23]] = False
    settings = dict(num_landmarks=8, kmeans_iterations=kmeans)
    out = nystrom_attention(q, k, v, query_mask=query_mask, **settings)
    ref = nystrom_reference(q, k, v, 8, query_mask=query_mask, kmeans_iterations=kmeans)
    assert (out - ref).abs().max().item() <= FUSED_TOL
    for i in range(2):
        real = query_mask[i]
        alone = nystrom_attention(q[i : i + 1, :, real], k[i : i + 1], v[i : i + 1], **settings)
        assert (out[i : i + 1, :, real] - alone).abs().max().item() <= FUSED_TOL


def test_padded_queries_on_the_gpu_branch(monkeypatch):
    # The exact rows of samples with few real queries are chosen without a host read.
    q, k, v = qkv(b=2, n=24, n_k=30)
    query_mask = right_padded_mask([5, 20], 24)
    monkeypatch.setattr(_cpu, "reads_are_cheap", lambda x: False)
    monkeypatch.setattr(_cpu, "applies", lambda x: False)
    ref = nystrom_reference(q, k, v, 8, query_mask=query_mask)
    _forbid_host_reads(monkeypatch)
    out = nystrom_attention(q, k, v, num_landmarks=8, query_mask=query_mask)
    monkeypatch.undo()
    assert (out - ref).abs().max().item() <= FUSED_TOL


def test_batch_invariance():
    q, k, v = qkv(b=4, n=80)
    q[2:] *= 30  # very different neighbours must not change sample 0
    k[2:] *= 30
    mask = right_padded_mask([80, 70, 80, 15], 80)
    batched = nystrom_attention(q, k, v, num_landmarks=8, mask=mask)
    for i in range(4):
        alone = nystrom_attention(
            q[i : i + 1], k[i : i + 1], v[i : i + 1], num_landmarks=8, mask=mask[i : i + 1]
        )
        assert (batched[i : i + 1] - alone).abs().max().item() <= FUSED_TOL


def test_no_real_token_gives_zeros_and_finite_gradients():
    q, k, v = qkv(b=2, n=40)
    for t in (q, k, v):
        t.requires_grad_(True)
    mask = right_padded_mask([40, 0], 40)
    out = nystrom_attention(q, k, v, num_landmarks=8, mask=mask)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_finite_and_low_precision_close_to_float32(dtype):
    q, k, v = qkv(b=2, h=4, n=300, d=32, dtype=torch.float32)
    mask = right_padded_mask([300, 250], 300)
    ref = nystrom_attention(q, k, v, num_landmarks=16, mask=mask)
    try:
        out = nystrom_attention(q.to(dtype), k.to(dtype), v.to(dtype), num_landmarks=16, mask=mask)
    except RuntimeError as e:  # float16 kernels are missing on some CPUs
        if dtype == torch.float16:
            pytest.skip(f"float16 not supported here: {e}")
        raise
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    if dtype in (torch.bfloat16, torch.float16):
        # bf16 has an 8-bit mantissa (relative step 2^-8 ≈ 4e-3); a few roundings of inputs,
        # landmarks and SDPA outputs stay within the required 2e-2.
        assert rel_err(out.float(), ref) <= 2e-2


def test_pinv_runs_in_float32_for_half_inputs(monkeypatch):
    seen = []

    def spy(a, iterations=6):
        seen.append(a.dtype)
        return iterative_pinv(a, iterations)

    monkeypatch.setattr(fn, "iterative_pinv", spy)
    q, k, v = qkv(n=100, d=16, dtype=torch.bfloat16)
    nystrom_attention(q, k, v, num_landmarks=8)
    assert seen == [torch.float32]


@pytest.mark.parametrize("kmeans", [0, 2])
def test_autocast_leaves_the_landmark_work_in_float32(kmeans):
    # Mixed-precision training runs the model under autocast (bf16/fp16 on CUDA, bf16 here),
    # which lowers every product to the half dtype, the m×m pseudo-inverse and the k-means
    # distances included; they must stay in float32 as without autocast. With bf16 inputs
    # autocast then changes nothing: the two results are the same bits.
    q, k, v = qkv(b=2, h=2, n=100, d=16, dtype=torch.bfloat16)
    settings = dict(num_landmarks=8, mask=right_padded_mask([100, 70], 100))
    plain = nystrom_attention(q, k, v, kmeans_iterations=kmeans, **settings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = nystrom_attention(q, k, v, kmeans_iterations=kmeans, **settings)
    assert auto.dtype == torch.bfloat16
    assert torch.equal(auto, plain)


def test_iterative_pinv_matches_reference_and_is_per_matrix():
    a = torch.softmax(torch.randn(3, 2, 6, 6, dtype=torch.float64), -1)
    z = iterative_pinv(a, 6)
    for i in range(3):
        for j in range(2):
            assert torch.allclose(z[i, j], newton_pinv(a[i, j], 6), atol=1e-12)
    # Many iterations converge to the Moore–Penrose pseudo-inverse of a well-conditioned matrix.
    well = torch.eye(5, dtype=torch.float64) * 0.6 + 0.4 / 5
    assert torch.allclose(iterative_pinv(well, 30), torch.linalg.pinv(well), atol=1e-10)
    # Zero iterations: the initial guess Aᵀ/(‖A‖₁‖A‖∞).
    assert torch.allclose(iterative_pinv(well, 0), well.T / (well.sum(0).max() * 1.0))


def test_gradcheck_float64():
    q, k, v = qkv(b=2, h=1, n=14, d=3, seed=1)
    mask = right_padded_mask([14, 11], 14)
    for t in (q, k, v):
        t.requires_grad_(True)

    def f(q, k, v):
        return nystrom_attention(q, k, v, num_landmarks=4, mask=mask)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)


def test_scale_and_pinv_iterations_are_used():
    q, k, v = qkv(n=60)
    out = nystrom_attention(q, k, v, num_landmarks=8, scale=0.3, pinv_iterations=2)
    b, h = q.shape[:2]
    ref = torch.stack(
        [
            torch.stack(
                [nystrom_one_head(q[i, j], k[i, j], v[i, j], 8, 2, scale=0.3) for j in range(h)]
            )
            for i in range(b)
        ]
    )
    assert (out - ref).abs().max().item() <= FUSED_TOL


def test_dropout_changes_output_only_in_training_use():
    q, k, v = qkv(n=60, dtype=torch.float32)
    torch.manual_seed(0)
    a = nystrom_attention(q, k, v, num_landmarks=8, dropout_p=0.5)
    b = nystrom_attention(q, k, v, num_landmarks=8, dropout_p=0.0)
    assert not torch.allclose(a, b)
    assert torch.isfinite(a).all()


def test_is_causal_is_refused_with_explanation():
    q, k, v = qkv(n=20)
    with pytest.raises(ValueError, match="future"):
        nystrom_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (lambda q, k, v, m: dict(query=q[0]), ValueError, r"query.*4 dimensions.*\(3, 20, 8\)"),
        (lambda q, k, v, m: dict(key=k[:1]), ValueError, r"key must have shape \(2, 3, n_k, 8\)"),
        (lambda q, k, v, m: dict(key=k[..., :5]), ValueError, r"key must have shape"),
        (lambda q, k, v, m: dict(value=v[:, :, :7]), ValueError, r"value must have shape"),
        (lambda q, k, v, m: dict(value=v[:, :2]), ValueError, r"value must have shape"),
        (lambda q, k, v, m: dict(mask=m[:, :5]), ValueError, r"mask must have shape \(2, 20\)"),
        (lambda q, k, v, m: dict(mask=m.long()), TypeError, r"mask must be a bool tensor"),
        (lambda q, k, v, m: dict(query_mask=m[:1]), ValueError, r"query_mask must have shape"),
        (lambda q, k, v, m: dict(num_landmarks=0), ValueError, r"num_landmarks.*≥ 1.*0"),
        (lambda q, k, v, m: dict(pinv_iterations=-1), ValueError, r"pinv_iterations.*-1"),
        (lambda q, k, v, m: dict(dropout_p=1.5), ValueError, r"dropout_p"),
        (lambda q, k, v, m: dict(dropout_p=None), ValueError, r"dropout_p must be in \[0, 1\)"),
        (lambda q, k, v, m: dict(query=q[..., :0], key=k[..., :0]), ValueError, r"query.*feature"),
        (lambda q, k, v, m: dict(value=v.float()), TypeError, r"share one dtype"),
        (lambda q, k, v, m: dict(query=q.long()), TypeError, r"query must be a floating"),
        (lambda q, k, v, m: dict(scale=float("nan")), ValueError, r"scale must be a finite.*nan"),
        (lambda q, k, v, m: dict(scale=float("inf")), ValueError, r"scale must be a finite.*inf"),
        (lambda q, k, v, m: dict(scale=True), ValueError, r"scale must be a finite.*True"),
        (lambda q, k, v, m: dict(scale="0.5"), ValueError, r"scale must be a finite.*'0.5'"),
    ],
)
def test_bad_input_errors_name_argument_and_shapes(change, exc, pattern):
    q, k, v = qkv(n=20)
    m = torch.ones(2, 20, dtype=torch.bool)
    kwargs = dict(query=q, key=k, value=v, mask=m)
    kwargs.update(change(q, k, v, m))
    with pytest.raises(exc, match=pattern):
        nystrom_attention(**kwargs)


def test_segment_means_any_memory_layout():
    # Projections give (B, n, H, d) memory viewed as (B, H, n, d); both layouts must agree.
    x = torch.randn(2, 37, 3, 4, dtype=torch.float64).transpose(1, 2)
    mask = right_padded_mask([37, 20], 37)
    for msk in (mask, None):
        index, counts = fn.landmark_assignment(msk, 37, 5, x.device)
        a = fn.segment_means(x, index, counts, 5, torch.float64)
        b = fn.segment_means(x.contiguous(), index, counts, 5, torch.float64)
        assert torch.allclose(a, b, atol=1e-15)


@pytest.mark.parametrize("split", [False, True], ids=["contiguous", "head-split"])
def test_equal_segments_gradients_in_the_inputs_layout(split):
    # n divisible by m, no mask: the landmarks are plain segment means, whose gradient must
    # be the mean's and reach the inputs in their own layout.
    q, k, v = qkv(b=2, h=3, n=16, d=5, seed=2)
    if split:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    for t in (q, k, v):
        t.requires_grad_(True)

    def f(q, k, v):
        return nystrom_attention(q, k, v, num_landmarks=4)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)
    x = q.detach().clone().requires_grad_(True)
    index, counts = fn.landmark_assignment(None, 16, 4, x.device)
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    (fn.segment_means(x, index, counts, 4, torch.float64) * g).sum().backward()
    assert torch.equal(x.grad, g.repeat_interleave(4, dim=2) / 4)
    assert x.grad.stride() == x.stride()
    # A non-dense input (a slice) gets a dense gradient.
    y = torch.randn(2, 3, 32, 5, dtype=torch.float64)[:, :, ::2].requires_grad_(True)
    (fn.segment_means(y, index, counts, 4, torch.float64) * g).sum().backward()
    assert torch.equal(y.grad, g.repeat_interleave(4, dim=2) / 4)


@pytest.mark.parametrize("split", [False, True], ids=["contiguous", "head-split"])
@pytest.mark.parametrize(
    "n, lengths", [(16, None), (18, None), (16, [16, 11])], ids=["equal", "uneven", "padded"]
)
def test_landmark_gradient_is_added_in_place_only_where_safe(monkeypatch, split, n, lengths):
    # Without k-means, q and k pass through one node that also gives their segment means,
    # and its backward adds the means' gradient into the attention's gradient in place. The
    # result must be what autograd gives for the two uses taken separately, in x's layout,
    # and nothing saved for a second backward may be disturbed.
    q, k, v = qkv(b=2, h=3, n=n, d=5, seed=3)
    if split:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    mask = None if lengths is None else right_padded_mask(lengths, n)
    g = torch.randn(2, 3, n, 5, dtype=torch.float64)
    # Blocks of 3 rows, the last one short, where segments are gathered block by block.
    monkeypatch.setattr(_cpu, "_GATHER_BLOCK", 2 * 3 * 5 * 3)

    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = nystrom_attention(*leaves, num_landmarks=4, mask=mask)
        out.backward(g, retain_graph=True)
        first = [t.grad.clone() for t in leaves]
        out.backward(g)  # the graph's saved tensors must be intact for a second pass
        for t, f in zip(leaves, first, strict=True):
            assert torch.allclose(t.grad, 2 * f, rtol=1e-12, atol=1e-12)
        return first, [t.grad.stride() for t in leaves]

    fused, strides = grads()
    assert strides == [q.stride(), k.stride(), v.stride()]
    # The reference: the same math with the means as a separate use of x (autograd sums).
    monkeypatch.setattr(
        _cpu,
        "shared_segment_means",
        lambda x, index, counts, m, dtype: (x, _cpu.segment_means(x, index, counts, m, dtype)),
    )
    reference, _ = grads()
    for a, b in zip(fused, reference, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)

    # The node alone: an expanded incoming gradient (from a sum) is never written to, and a
    # missing one (only the means used) gives the means' gradient alone.


def test_shared_landmark_node_with_an_unwritable_or_missing_gradient():
    # An expanded incoming gradient (from a sum) is never written to, and a missing one (only
    # the means used) gives the means' gradient alone, with and without padding.
    x = torch.randn(2, 3, 16, 5, dtype=torch.float64, requires_grad=True)
    equal = fn.landmark_assignment(None, 16, 4, x.device)
    padded = fn.landmark_assignment(right_padded_mask([16, 8], 16), 16, 4, x.device)
    share = torch.ones(2, 1, 16, 1, dtype=torch.float64) / 4  # segments of 4 tokens
    share[1, :, :8] = 1 / 2  # 8 real tokens: segments of 2
    share[1, :, 8:] = 0  # padding
    for (index, counts), means_share in ((equal, 1 / 4), (padded, share)):
        same, means = _cpu.shared_segment_means(x, index, counts, 4, torch.float64)
        (same.sum() + means.sum()).backward()
        assert torch.allclose(x.grad, (1 + means_share) * torch.ones_like(x), atol=1e-15)
        x.grad = None
        _, means = _cpu.shared_segment_means(x, index, counts, 4, torch.float64)
        means.sum().backward()
        assert torch.allclose(x.grad, means_share * torch.ones_like(x), atol=1e-15)
        x.grad = None


def _one_tensor_cases(q, v, mask):
    """Self-attention without projections: q as query, key and value (unpadded and padded),
    and q as query and key with its own v."""
    return [
        nystrom_attention(q, q, q, num_landmarks=4),
        nystrom_attention(q, q, q, num_landmarks=4, mask=mask),
        nystrom_attention(q, q, v, num_landmarks=4, mask=mask),
    ]


def _one_tensor_inputs():
    q, _, v = qkv(b=2, h=2, n=20, d=4, seed=5)
    return q.requires_grad_(True), v.requires_grad_(True), right_padded_mask([20, 13], 20)


def test_one_tensor_in_several_roles_gets_the_references_gradients():
    # On the CPU the tensor passes through the shared landmark node once per role (query,
    # key), and each node adds its means' gradient in place: both roles' gradients and the
    # value's must add up as in the reference. Float64: only rounding differs, FUSED_TOL for
    # outputs and gradients alike (gradient entries are at most ~3 here; measured ≤ 5e-15).
    q, v, mask = _one_tensor_inputs()
    want = [
        nystrom_reference(q, q, q, 4),
        nystrom_reference(q, q, q, 4, mask=mask),
        nystrom_reference(q, q, v, 4, mask=mask),
    ]
    for got, ref in zip(_one_tensor_cases(q, v, mask), want, strict=True):
        assert (got - ref).abs().max().item() <= FUSED_TOL
        g = torch.randn_like(ref)
        for a, b in zip(
            torch.autograd.grad(got, (q, v), g, allow_unused=True, materialize_grads=True),
            torch.autograd.grad(ref, (q, v), g, allow_unused=True, materialize_grads=True),
            strict=True,
        ):
            assert (a - b).abs().max().item() <= FUSED_TOL


def test_compiles_with_one_tensor_in_several_roles():
    # nystrom_attention(q, q, q) under torch.compile failed to trace: Dynamo traced the shared
    # landmark node's backward with the forward's outputs as the gradients, so its in place
    # add modified q under the view the first node had returned. aot_eager traces forward and
    # backward as torch.compile does and runs the same kernels. Traced, the masked cases take
    # the branch that reads no value on the host, which differs from eager by rounding only
    # (float64): FUSED_TOL for the outputs and the gradients (measured ≤ 3e-16).
    q, v, mask = _one_tensor_inputs()
    compiled = torch.compile(_one_tensor_cases, backend="aot_eager", fullgraph=True)
    # (The compiled outputs share one backward node: each gradient keeps it for the next.)
    grad = functools.partial(
        torch.autograd.grad, allow_unused=True, materialize_grads=True, retain_graph=True
    )
    for got, want in zip(compiled(q, v, mask), _one_tensor_cases(q, v, mask), strict=True):
        assert (got - want).abs().max().item() <= FUSED_TOL
        g = torch.randn_like(want)
        for a, b in zip(
            grad(got, (q, v), g),
            grad(want, (q, v), g),
            strict=True,
        ):
            assert (a - b).abs().max().item() <= FUSED_TOL


@pytest.mark.parametrize(
    "threads, lengths, n, blocks",
    [(2, [12], 12, 2), (4, [12, 3], 12, 2), (3, [12, 7], 12, 3), (2, [13], 13, 1)],
    ids=["1-sample-2-threads", "2-samples-4-threads", "2-samples-3-threads", "n-indivisible"],
)
def test_rows_split_among_threads(threads, lengths, n, blocks):
    # Head-split inputs with fewer samples than threads: step 3 runs each sample's rows as
    # `blocks` samples (_cpu.row_blocks) so that threads write disjoint pages. Values,
    # gradients and the output's layout must be those of the formula, short samples (≤ m
    # real keys, the masked-landmark path) included.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = (
            t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(len(lengths), 2, n, 3)
        )
        assert _cpu.row_blocks(q) == blocks
        mask = right_padded_mask(lengths, n)
        out = nystrom_attention(q, k, v, num_landmarks=4, mask=mask)
        assert (out - nystrom_reference(q, k, v, 4, mask=mask)).abs().max().item() <= FUSED_TOL
        assert out.transpose(1, 2).is_contiguous()
        for t in (q, k, v):
            t.requires_grad_(True)

        def f(q, k, v):
            return nystrom_attention(q, k, v, num_landmarks=4, mask=mask)

        assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("split", [False, True], ids=["contiguous", "head-split"])
@pytest.mark.parametrize("n, lengths", [(16, None), (18, None), (18, [18, 7])])
def test_cpu_segment_means_equal_the_plain_definition(split, n, lengths):
    # nystromer._cpu computes the same means in the CPU-friendly layouts, gradients included.
    x = torch.randn(2, 3, n, 5, dtype=torch.float64)
    if split:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    mask = None if lengths is None else right_padded_mask(lengths, n)
    index, counts = fn.landmark_assignment(mask, n, 4, x.device)
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    results = []
    for means in (fn.segment_means, _cpu.segment_means):
        leaf = x.clone().requires_grad_(True)
        out = means(leaf, index, counts, 4, torch.float64)
        (out * g).sum().backward()
        results.append((out, leaf.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def _forbid_host_reads(monkeypatch):
    """Make every way of reading a tensor's value on the host raise (a GPU sync otherwise)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "bincount", refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)


@pytest.mark.parametrize("kmeans", [0, 2])
@pytest.mark.parametrize(
    "n, lengths", [(64, None), (50, None), (70, [70, 41]), (70, [70, 41, 6])],
    ids=["equal", "uneven", "padded", "padded-with-a-short-sample"],
)  # fmt: skip
def test_gpu_branch_reads_no_value_on_the_host_and_equals_the_cpu_branch(
    monkeypatch, kmeans, n, lengths
):
    # Off the CPU (and under torch.compile) the code never looks at a tensor's value, which
    # on a GPU would wait for all queued work every call. Forced here on the CPU: the same
    # results, gradients included, with every host read refused.
    b = 1 if lengths is None else len(lengths)
    q, k, v = qkv(b=b, n=n)
    mask = None if lengths is None else right_padded_mask(lengths, n)

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = nystrom_attention(*leaves, num_landmarks=8, mask=mask, kmeans_iterations=kmeans)
        out.backward(torch.ones_like(out))
        return out.detach(), [t.grad for t in leaves]

    cpu_out, cpu_grads = run()
    with monkeypatch.context() as patch:
        patch.setattr(_cpu, "reads_are_cheap", lambda x: False)
        patch.setattr(_cpu, "applies", lambda x: False)
        _forbid_host_reads(patch)
        gpu_out, gpu_grads = run()
    assert (gpu_out - cpu_out).abs().max().item() <= FUSED_TOL
    for a, b_ in zip(gpu_grads, cpu_grads, strict=True):
        assert (a - b_).abs().max().item() <= FUSED_TOL
    if mask is not None:
        assert (
            gpu_out - nystrom_reference(q, k, v, 8, mask=mask, kmeans_iterations=kmeans)
        ).abs().max().item() <= FUSED_TOL


def test_recomputed_pseudo_inverse_gives_the_same_gradients(monkeypatch):
    # Above a size the pseudo-inverse is recomputed in the backward (checkpoint) instead of
    # keeping its products: forcing it at a tiny size must not change values or gradients.
    q, k, v = qkv(b=2, h=3, n=40, d=5, seed=4)

    def grads():
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = nystrom_attention(*inputs, num_landmarks=8)
        out.backward(torch.ones_like(out))
        return out.detach(), [t.grad for t in inputs]

    kept_out, kept_grads = grads()
    monkeypatch.setattr(fn, "_RECOMPUTE_PINV_BYTES", 0)
    out, recomputed = grads()
    torch.testing.assert_close(out, kept_out, rtol=0, atol=1e-14)
    for a, b in zip(recomputed, kept_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "a,iterations,exc,pattern",
    [
        (None, 6, TypeError, r"a must be a torch.Tensor, got NoneType"),
        (torch.ones(3, 4), 6, ValueError, r"a must have shape \(\.\.\., m, m\).*\(3, 4\)"),
        (torch.ones(4), 6, ValueError, r"a must have shape"),
        (torch.ones(2, 0, 0), 6, ValueError, r"m ≥ 1.*\(2, 0, 0\)"),
        (torch.ones(3, 3, dtype=torch.long), 6, TypeError, r"a must be a floating"),
        (torch.eye(3), -1, ValueError, r"iterations must be an integer ≥ 0, got -1"),
        (torch.eye(3), 2.0, ValueError, r"iterations must be an integer ≥ 0, got 2.0"),
        (torch.eye(3), True, ValueError, r"iterations must be an integer ≥ 0, got True"),
    ],
)
def test_iterative_pinv_errors_name_the_argument(a, iterations, exc, pattern):
    # Before: iterations=-1 and True ran (0 and 1 updates), the rest failed inside torch.
    with pytest.raises(exc, match=pattern):
        iterative_pinv(a, iterations)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's SDPA under vmap
@pytest.mark.parametrize("kmeans", [0, 2])
def test_torch_func_transforms_equal_the_reference(kmeans):
    # vmap over stacked batches (each with its own mask: a short sample, an empty one, a
    # hole), per-sample gradients (vmap of grad) and jacrev run the plain definition (the CPU
    # nodes have no vmap rule); float64, so only rounding differs from the reference.
    s, m = 3, 4
    q, k, v = qkv(b=s * 2, h=2, n=14, d=4)
    q, k, v = (t.view(s, 2, 2, 14, 4) for t in (q, k, v))
    mask = torch.ones(s, 2, 14, dtype=torch.bool)
    mask[0, 1, 9:], mask[1, 0, 3:], mask[2, 1], mask[2, 0, 5] = False, False, False, False

    def attend(q_, k_, v_, mask_):
        return nystrom_attention(q_, k_, v_, num_landmarks=m, mask=mask_, kmeans_iterations=kmeans)

    out = torch.func.vmap(attend)(q, k, v, mask)
    for i in range(s):
        ref = nystrom_reference(q[i], k[i], v[i], m, mask=mask[i], kmeans_iterations=kmeans)
        assert (out[i] - ref).abs().max().item() <= FUSED_TOL

    def loss(q_, k_, v_, mask_):
        return attend(q_, k_, v_, mask_).pow(2).sum()

    grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)))(q, k, v, mask)
    for i in range(s):
        leaves = [t[i].clone().requires_grad_() for t in (q, k, v)]
        ref = nystrom_reference(*leaves, m, mask=mask[i], kmeans_iterations=kmeans)
        expected = torch.autograd.grad(ref.pow(2).sum(), leaves)
        for got, want in zip(grads, expected, strict=True):
            assert (got[i] - want).abs().max().item() <= 1e-9

    small = [t[0, :1, :1, :7] for t in (q, k, v)]

    def attend_small(q_):
        return nystrom_attention(q_, *small[1:], num_landmarks=2, kmeans_iterations=kmeans)

    jac = torch.func.jacrev(attend_small)(small[0])
    expected = torch.autograd.functional.jacobian(attend_small, small[0])
    assert (jac - expected).abs().max().item() <= 1e-12


def test_forward_mode_ad_runs_where_torchs_attention_has_it():
    # CPU SDPA's fused kernel has no forward AD; its math backend has, and so must we.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = qkv(b=1, h=1, n=9, d=3)
    tangent = torch.randn_like(q)

    def attend(q_):
        return nystrom_attention(q_, k, v, num_landmarks=3)

    expected = torch.autograd.functional.jacobian(attend, q).flatten(4) @ tangent.flatten()
    with sdpa_kernel(SDPBackend.MATH):
        _, got = torch.func.jvp(attend, (q,), (tangent,))
        with torch.autograd.forward_ad.dual_level():
            dual = attend(torch.autograd.forward_ad.make_dual(q, tangent))
            got_dual = torch.autograd.forward_ad.unpack_dual(dual).tangent
    assert (got - expected).abs().max().item() <= 1e-12
    assert (got_dual - expected).abs().max().item() <= 1e-12

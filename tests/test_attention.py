"""NystromAttention: the module around nystrom_attention."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nystromer import (
    AttentionMap,
    NystromAttention,
    NystromMultiheadAttention,
    NystromOptions,
    _conv,
)
from nystromer.attention import (
    ValueConv,
    banded_sequence_conv,
    sequence_conv,
    value_conv,
    value_conv_skip,
)

from .reference import nystrom_matrix, nystrom_reference


def make(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_landmarks", 8)
    return NystromAttention(32, 4, **kw).double()


def test_module_equals_reference_math_on_its_projections():
    attn = make()
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    mask = torch.arange(70)[None] < torch.tensor([[70], [45]])
    out = attn(x, mask=mask)

    def heads(t):
        return t.view(2, 70, 4, 8).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    ref = nystrom_reference(q, k, v, 8, mask=mask).transpose(1, 2).reshape(2, 70, 32)
    ref = attn.out_proj(ref)
    assert torch.allclose(out[mask], ref[mask], atol=1e-10)


@pytest.mark.parametrize("conv", [None, 5])
def test_padding_invariance_with_and_without_conv_skip(conv):
    attn = make(conv_kernel_size=conv)
    x = torch.randn(1, 90, 32, dtype=torch.float64)
    alone = attn(x[:, :57])
    padded_x = x.clone()
    padded_x[:, 57:] = 100.0  # garbage in the padding must not matter
    mask = torch.arange(90)[None] < 57
    padded = attn(padded_x, mask=mask)
    assert (padded[:, :57] - alone).abs().max().item() <= 1e-10


def test_conv_skip_is_the_depthwise_convolution_of_values():
    attn = make(conv_kernel_size=3)
    no_conv = make(conv_kernel_size=None)
    no_conv.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "conv.weight"})
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    v = attn.v_proj(x).view(1, 40, 4, 8).transpose(1, 2)
    w = attn.conv.weight[:, 0, :, 0]  # (H, k)
    vp = F.pad(v, (0, 0, 1, 1))
    skip = sum(w[None, :, t, None, None] * vp[:, :, t : t + 40] for t in range(3))
    diff = attn(x) - no_conv(x)
    want = skip.transpose(1, 2).reshape(1, 40, 32) @ attn.out_proj.weight.T
    assert torch.allclose(diff, want, atol=1e-10)
    assert attn.conv.weight.shape == (4, 1, 3, 1)
    # Without autograd the skip is added in place into the attention output: same result.
    with torch.no_grad():
        inplace = attn(x)
    assert torch.equal(inplace, attn(x).detach())


@pytest.mark.parametrize(
    "n, heads, d, k",
    [(100, 3, 5, 7), (10, 2, 3, 35), (200, 2, 4, 101), (1, 2, 3, 3), (64, 2, 4, 35), (33, 1, 1, 1)],
)
def test_sequence_conv_is_the_depthwise_convolution(n, heads, d, k):
    # Kernels longer than the sequence, n a multiple of the block and not, k = 1, one head,
    # and blocks longer than 32 (k = 101): the banded products equal torch's convolution,
    # on a head split of (B, n, H, d) memory as a model hands it, with and without bias.
    g = torch.Generator().manual_seed(n + k)
    v = torch.randn(2, n, heads, d, generator=g, dtype=torch.float64).transpose(1, 2)
    w = torch.randn(heads, 1, k, 1, generator=g, dtype=torch.float64)
    bias = torch.randn(heads, generator=g, dtype=torch.float64)
    for b in (None, bias):
        want = F.conv2d(v, w, b, padding=(k // 2, 0), groups=heads)
        assert torch.allclose(sequence_conv(v, w, b), want, rtol=0, atol=1e-12)
    sv = v[:, :, :9].detach().clone().requires_grad_(True)
    sw = w.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(sequence_conv, (sv, sw))


def test_banded_conv_weight_gradient_is_accurate_in_float32():
    # The kernel's gradient sums B·n·d products per tap. In float32 the banded form keeps it
    # to ~1e-7 of float64 (sums of T-long products, then of blocks); torch's CPU depthwise
    # convolution was off by 6% at this size (torch 2.13), which is why it is not the
    # reference here. 1e-5 leaves room for a different summation order.
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 512, 12, 32, generator=g).transpose(1, 2)
    w = 0.1 * torch.randn(12, 1, 35, 1, generator=g)
    grad = torch.randn(4, 12, 512, 32, generator=g)

    def weight_grad(conv, dtype):
        ww = w.to(dtype).requires_grad_(True)
        conv(v.to(dtype), ww).backward(grad.to(dtype))
        return ww.grad.double()

    def torch_conv(x, weight):
        return F.conv2d(x, weight, padding=(17, 0), groups=12)

    exact = weight_grad(torch_conv, torch.float64)
    err = (weight_grad(sequence_conv, torch.float32) - exact).abs().max() / exact.abs().max()
    assert err.item() < 1e-5


def test_conv_skip_module_is_torchs_convolution_of_the_masked_values():
    x = torch.randn(2, 3, 50, 4)
    mask = torch.arange(50)[None] < torch.tensor([[50], [31]])
    conv = ValueConv(3, 35)
    assert isinstance(conv, torch.nn.Conv2d) and conv.weight.shape == (3, 1, 35, 1)
    # float32 and bfloat16 against torch's convolution: rounding-level differences only.
    want = F.conv2d(x * mask[:, None, :, None], conv.weight, padding=(17, 0), groups=3)
    want = want * mask[:, None, :, None]
    assert torch.allclose(conv(x, mask), want, rtol=0, atol=1e-5)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight, padding=(17, 0), groups=3), atol=1e-5)
    # bfloat16 keeps 8 significant bits (~0.4% per product), summed over up to 35 taps.
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 layer, autocast products
        auto = conv(x, mask)
    low = conv.bfloat16()(x.bfloat16(), mask)
    for y in (auto.float(), low.float()):
        assert torch.allclose(y, want, rtol=0, atol=0.1 * want.abs().max().item())


@pytest.mark.parametrize("bad", [4, 0, 2.0, True])
def test_conv_skip_module_refuses_even_kernels(bad):
    with pytest.raises(ValueError, match=f"kernel_size must be an odd integer.*{bad!r}"):
        ValueConv(2, bad)


def test_deprecated_conv_functions_warn_and_keep_their_results():
    x = torch.randn(2, 3, 50, 4)
    mask = torch.arange(50)[None] < torch.tensor([[50], [31]])
    with pytest.warns(DeprecationWarning, match="ValueConv"):
        conv = value_conv(3, 7)
    assert type(conv) is ValueConv and conv.kernel_size == (7, 1)
    with pytest.warns(DeprecationWarning, match="conv\\(value, mask\\)"):
        assert torch.equal(value_conv_skip(conv, x, mask), conv(x, mask))
    # Another convolution (here circular padding) is applied as it is.
    circular = torch.nn.Conv2d(3, 3, (5, 1), padding=(2, 0), groups=3, padding_mode="circular")
    with pytest.warns(DeprecationWarning):
        assert torch.equal(value_conv_skip(circular, x, None), circular(x))


@pytest.mark.parametrize("cls", [NystromAttention, NystromMultiheadAttention])
def test_forward_hooks_on_the_conv_skip_fire(cls):
    # The skip is called as a module: hooks see its inputs, and what a hook returns is used.
    torch.manual_seed(0)
    attn = cls(32, 4, num_landmarks=8, conv_kernel_size=3)
    torch.nn.init.normal_(attn.conv.weight)
    x = torch.randn(2, 40, 32)
    mask = torch.arange(40)[None] < torch.tensor([[40], [29]])

    def run():
        if cls is NystromAttention:
            return attn(x, mask=mask)
        xt = x.transpose(0, 1)  # (L, N, E)
        return attn(xt, xt, xt, key_padding_mask=~mask)[0].transpose(0, 1)

    seen = []

    def hook(module, args, output):
        seen.append((module, args[0].shape, args[1].shape))
        return torch.zeros_like(output)

    with_skip = run()
    handle = attn.conv.register_forward_hook(hook)
    hooked = run()
    handle.remove()
    assert seen == [(attn.conv, (2, 4, 40, 8), (2, 40))]
    with torch.no_grad():
        attn.conv.weight.zero_()
    assert torch.equal(hooked, run())
    assert not torch.allclose(hooked, with_skip)


def test_options_object_equals_the_keywords():
    opts = NystromOptions(
        num_landmarks=8, pinv_iterations=4, kmeans_iterations=1, conv_kernel_size=5
    )
    torch.manual_seed(0)
    by_keywords = NystromAttention(32, 4, **opts.to_dict())
    torch.manual_seed(0)
    by_options = NystromAttention(32, 4, options=opts)
    assert by_options.options == by_keywords.options == opts
    assert by_options.state_dict().keys() == by_keywords.state_dict().keys()
    assert by_options.conv.weight.shape == (4, 1, 5, 1)
    x = torch.randn(2, 40, 32)
    assert torch.equal(by_options(x), by_keywords(x))
    assert repr(by_options) == repr(by_keywords)
    assert (by_options.num_landmarks, by_options.conv_kernel_size) == (8, 5)
    # The attributes still set what they read, validated, through the options object.
    by_options.num_landmarks = 16
    assert by_options.options == opts.replace(num_landmarks=16)
    with pytest.raises(ValueError, match="num_landmarks"):
        by_options.num_landmarks = 0
    with pytest.raises(AttributeError):
        by_options.conv_kernel_size = 3


@pytest.mark.parametrize("cls", [NystromAttention, NystromMultiheadAttention])
def test_assigned_options_keep_the_kernel_size(cls):
    # Assigning options with another kernel size desynchronised the module: the old skip (or
    # none) kept running while options and the repr named the new size.
    attn = cls(16, 2, num_landmarks=4, conv_kernel_size=5)
    attn.options = attn.options.replace(num_landmarks=8)
    assert attn.num_landmarks == 8
    for kernel in (7, None):
        with pytest.raises(ValueError, match=r"conv_kernel_size is fixed.*\(5\); got"):
            attn.options = attn.options.replace(conv_kernel_size=kernel)
    with pytest.raises(TypeError, match="options must be a NystromOptions, got dict"):
        attn.options = {"num_landmarks": 8}
    assert attn.options == NystromOptions(num_landmarks=8, conv_kernel_size=5)
    copied = copy.deepcopy(attn)
    assert copied.options == attn.options
    assert "options" not in copied.__dict__


def test_options_and_changed_keywords_together_are_refused():
    with pytest.raises(ValueError, match="either as options or as keywords.*num_landmarks=8"):
        NystromAttention(32, 4, num_landmarks=8, options=NystromOptions())
    with pytest.raises(TypeError, match="options must be a NystromOptions"):
        NystromAttention(32, 4, options={"num_landmarks": 8})


def test_one_export_with_a_dynamic_length_serves_other_lengths():
    # torch.export with the sequence length as a Dim: the convolution skip's padding and the
    # exact-attention branch must not guard the exported length. One program, with the skip
    # and padding, against eager at a longer length and one of at most m tokens.
    torch.manual_seed(0)
    attn = NystromAttention(16, 2, num_landmarks=4, conv_kernel_size=5).double().eval()
    torch.nn.init.normal_(attn.conv.weight)

    def inputs(n):
        mask = torch.arange(n)[None] < torch.tensor([[n], [n // 2 + 1]])
        return torch.randn(2, n, 16, dtype=torch.float64), mask

    x, mask = inputs(20)
    length = torch.export.Dim("n", min=2, max=4096)
    program = torch.export.export(
        attn, (x,), {"mask": mask}, dynamic_shapes={"query": {1: length}, "mask": {1: length}}
    ).module()
    for n in (37, 3):
        x, mask = inputs(n)
        with torch.no_grad():
            want = attn(x, mask=mask)
        # float64: the exported graph and eager differ in summation order at most.
        torch.testing.assert_close(program(x, mask=mask), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(embed_dim=True, num_heads=True), r"embed_dim must be a positive integer, got True"),
        (dict(embed_dim=32.0, num_heads=4), r"embed_dim must be a positive integer, got 32.0"),
        (dict(embed_dim="32", num_heads=4), r"embed_dim must be a positive integer, got '32'"),
        (dict(embed_dim=32, num_heads=4.0), r"num_heads must be a positive integer, got 4.0"),
        (dict(embed_dim=32, num_heads=4, kdim=-1), r"kdim must be a positive integer, got -1"),
        (dict(embed_dim=32, num_heads=4, vdim=True), r"vdim must be a positive integer, got True"),
        (dict(embed_dim=32, num_heads=3), r"positive multiple of num_heads"),
    ],
)
def test_bad_sizes_are_refused_by_name(kwargs, pattern):
    # Without the checks these failed inside torch (or, num_heads=4.0, only at forward).
    with pytest.raises(ValueError, match=pattern):
        NystromAttention(**kwargs)


def test_cross_attention_with_kdim_vdim():
    torch.manual_seed(0)
    attn = NystromAttention(32, 4, num_landmarks=8, kdim=12, vdim=20)
    out = attn(torch.randn(2, 30, 32), torch.randn(2, 77, 12), torch.randn(2, 77, 20))
    assert out.shape == (2, 30, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("n", [6, 40])  # exact (n ≤ m) and Nyström
def test_cross_attention_of_equal_lengths_keeps_every_query(n):
    # The key mask says which keys are padding, not which queries: a query at the position of
    # a padding key is real and must get its attention, as with the keys' padding cut off.
    attn = make().eval()
    g = torch.Generator().manual_seed(3)
    query, key = (
        torch.randn(2, n, 32, generator=g, dtype=torch.float64),
        torch.randn(2, n, 32, generator=g, dtype=torch.float64),
    )
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, n - n // 3 :] = False
    out = attn(query, key, mask=mask)
    real = int(mask[1].sum())
    alone = attn(query[1:], key[1:, :real])
    assert (out[1:] - alone).abs().max().item() <= 1e-10
    rows = attn.attention_map(query, key, mask=mask)[1:, :, :, :real]
    assert (rows - attn.attention_map(query[1:], key[1:, :real]).full()).abs().max() <= 1e-10


def _heads(t: torch.Tensor, h: int = 4) -> torch.Tensor:
    """(B, n, E) → (B, H, n, E / H)."""
    return t.unflatten(-1, (h, -1)).transpose(1, 2)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_map_is_the_dense_nystrom_matrix_of_the_projections(masked):
    attn = make(conv_kernel_size=5)
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    mask = torch.arange(50)[None] < torch.tensor([[50], [33]]) if masked else None
    amap = attn.attention_map(x, mask=mask)
    assert isinstance(amap, AttentionMap) and amap.shape == (2, 4, 50, 50)
    q, k = _heads(attn.q_proj(x)), _heads(attn.k_proj(x))
    # The paper's F·A⁺·B in float64, per sample on its real tokens only.
    real = [50, 33] if masked else [50, 50]
    for i, n in enumerate(real):
        dense = nystrom_matrix(q[i, :, :n], k[i, :, :n], 8)
        torch.testing.assert_close(amap[i, :, :n, :n], dense, rtol=0, atol=1e-12)
        torch.testing.assert_close(amap[i, :, 0, :n], dense[:, 0], rtol=0, atol=1e-12)
        # Padding keys get no weight and padded queries no row.
        assert (amap[i, :, :, n:] == 0).all() and (amap[i, :, n:] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kmeans", [0, 2])
def test_attention_map_is_what_forward_multiplies_the_values_by(masked, kmeans):
    attn = make(conv_kernel_size=5, kmeans_iterations=kmeans).eval()
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    mask = torch.arange(50)[None] < torch.tensor([[50], [33]]) if masked else None
    merged = []  # the attention output before out_proj
    hook = attn.out_proj.register_forward_pre_hook(lambda _, args: merged.append(args[0]))
    attn(x, mask=mask)
    hook.remove()
    v = _heads(attn.v_proj(x))
    expected = attn.attention_map(x, mask=mask).full() @ v + attn.conv(v, mask)
    torch.testing.assert_close(expected.transpose(1, 2).flatten(2), merged[0], rtol=0, atol=1e-10)


def test_attention_map_of_cross_attention():
    torch.manual_seed(0)
    attn = NystromAttention(32, 4, num_landmarks=8, kdim=12, vdim=20).double()
    query = torch.randn(2, 30, 32, dtype=torch.float64)
    key = torch.randn(2, 77, 12, dtype=torch.float64)
    value = torch.randn(2, 77, 20, dtype=torch.float64)
    mask = torch.arange(77)[None] < torch.tensor([[77], [40]])
    amap = attn.attention_map(query, key, mask=mask)
    assert amap.shape == (2, 4, 30, 77)
    merged = attn(query, key, value, mask=mask) - attn.out_proj.bias
    ours = (amap.full() @ _heads(attn.v_proj(value))).transpose(1, 2).flatten(2)
    torch.testing.assert_close(ours @ attn.out_proj.weight.T, merged, rtol=0, atol=1e-10)


def test_attention_map_errors():
    attn = NystromAttention(32, 4, num_landmarks=8)
    x = torch.randn(2, 10, 32)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 10\).*got \(2, 9\)"):
        attn.attention_map(x, mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor.*float32"):
        attn.attention_map(x, mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq_len, 32\)"):
        attn.attention_map(torch.randn(2, 10, 16))
    with pytest.raises(IndexError, match="row 10 is out of bounds"):
        attn.attention_map(x)[:, :, 10]


def fit(attn: NystromAttention, x: torch.Tensor, target: torch.Tensor, steps: int = 20):
    """The losses of ``steps`` Adam steps fitting ``attn(x)`` to ``target`` (MSE)."""
    opt = torch.optim.Adam(attn.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(attn(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_module_trains():
    torch.manual_seed(0)
    attn = NystromAttention(32, 4, num_landmarks=8, conv_kernel_size=3)
    losses = fit(attn, torch.randn(4, 64, 32), torch.randn(4, 64, 32))
    assert losses[-1] < 0.9 * losses[0]


def test_dropout_only_in_training():
    torch.manual_seed(0)
    attn = NystromAttention(32, 4, num_landmarks=8, dropout=0.5).eval()
    x = torch.randn(2, 40, 32)
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.equal(attn(x), attn(x))


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    attn = NystromAttention(32, 4, num_landmarks=8, conv_kernel_size=3).eval()
    x = torch.randn(2, 50, 32)
    mask = torch.arange(50)[None] < torch.tensor([[50], [31]])
    compiled = torch.compile(attn, backend="inductor", dynamic=False)
    with torch.no_grad():
        # 1e-5: inductor may fuse and reorder float32 reductions.
        assert torch.allclose(compiled(x, mask=mask), attn(x, mask=mask), atol=1e-5)
        assert torch.allclose(compiled(x), attn(x), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(embed_dim=30, num_heads=4), r"embed_dim.*multiple of num_heads.*30.*4"),
        (dict(num_landmarks=0), r"num_landmarks.*0"),
        (dict(pinv_iterations=-2), r"pinv_iterations.*-2"),
        (dict(conv_kernel_size=4), r"conv_kernel_size.*odd.*4"),
        (dict(dropout=1.0), r"dropout"),
    ],
)
def test_constructor_errors(kwargs, pattern):
    args = dict(embed_dim=32, num_heads=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        NystromAttention(**args)


def test_forward_errors():
    attn = NystromAttention(32, 4, num_landmarks=8, conv_kernel_size=3)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq_len, 32\).*16"):
        attn(torch.randn(2, 10, 16))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 10\), got \(2, 9\)"):
        attn(torch.randn(2, 10, 32), mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="self-attention"):
        attn(torch.randn(2, 10, 32), torch.randn(2, 12, 32))
    with pytest.raises(ValueError, match="batch size"):
        attn(torch.randn(2, 10, 32), torch.randn(3, 10, 32))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block_elements", [None, 1])
def test_conv_skip_added_in_place_and_for_autograd_equals_the_module_call(
    masked, block_elements, monkeypatch
):
    # add_to_ (inference) and added_to (autograd, recomputing in the backward), both a block
    # of positions at a time, against out + conv(value, mask) with plain autograd, in
    # float64; one block, and the smallest blocks: one sample and four kernel lengths (20, 20
    # and 10 of 50 positions: edge blocks and an inner one).
    if block_elements is not None:
        monkeypatch.setattr(_conv._Rows, "block_elements", block_elements)
    conv = ValueConv(3, 5, dtype=torch.float64)
    torch.nn.init.normal_(conv.weight)
    g = torch.Generator().manual_seed(0)
    out, value, grad = (torch.randn(2, 3, 50, 4, generator=g, dtype=torch.float64) for _ in "ovg")
    mask = (torch.arange(50)[None] < torch.tensor([[50], [31]])) if masked else None
    o1, v1 = out.clone().requires_grad_(), value.clone().requires_grad_()
    expected = o1 + conv(v1, mask)
    expected.backward(grad)
    w_grad, conv.weight.grad = conv.weight.grad, None
    o2, v2 = out.clone().requires_grad_(), value.clone().requires_grad_()
    got = conv.added_to(o2, v2, mask)
    got.backward(grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for a, b in ((o2.grad, o1.grad), (v2.grad, v1.grad), (conv.weight.grad, w_grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(
            conv.add_to_(out.clone(), value, mask), expected, rtol=0, atol=1e-12
        )


def test_banded_sequence_conv_is_a_deprecated_alias():
    v, w = torch.randn(1, 2, 9, 3), torch.randn(2, 1, 3, 1)
    with pytest.warns(DeprecationWarning, match="sequence_conv"):
        assert torch.equal(banded_sequence_conv(v, w), sequence_conv(v, w))


def test_conv_skip_gradient_ignores_a_mask_changed_after_the_forward():
    # A mask buffer reused for the next batch before this one's backward: the gradient must
    # stay this forward's (the attention itself keeps no reference to the caller's mask).
    attn = make(conv_kernel_size=3)
    torch.nn.init.normal_(attn.conv.weight)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    mask = torch.arange(20)[None] < torch.tensor([[20], [13]])

    def gradients(change_mask):
        attn.zero_grad()
        x_ = x.clone().requires_grad_()
        buffer = mask.clone()
        out = attn(x_, mask=buffer)
        if change_mask:
            buffer.fill_(True)
        out.backward(torch.ones_like(out))
        return x_.grad, attn.conv.weight.grad.clone()

    for got, expected in zip(gradients(True), gradients(False), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's SDPA under vmap
@pytest.mark.parametrize("cls", [NystromAttention, NystromMultiheadAttention])
def test_per_sample_gradients_with_torch_func(cls):
    # torch.func.functional_call under vmap(grad), with the convolution skip: each sample's
    # gradients equal a backward pass over that sample alone.
    torch.manual_seed(0)
    kw = {"batch_first": True} if cls is NystromMultiheadAttention else {}
    attn = cls(8, 2, num_landmarks=4, conv_kernel_size=3, **kw).double()
    torch.nn.init.normal_(attn.conv.weight)
    x = torch.randn(3, 1, 14, 8, dtype=torch.float64)
    mask = torch.arange(14)[None] < 11

    def loss(params, x_):
        if cls is NystromAttention:
            out = torch.func.functional_call(attn, params, (x_,), {"mask": mask})
        else:
            out = torch.func.functional_call(
                attn, params, (x_, x_, x_), {"key_padding_mask": ~mask}
            )[0]
        return out.pow(2).sum()

    params = {name: p.detach() for name, p in attn.named_parameters()}
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        attn.zero_grad()
        loss(dict(attn.named_parameters()), x[i]).backward()
        for name, p in attn.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=0, atol=1e-12)

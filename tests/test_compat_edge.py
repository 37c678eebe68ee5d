"""nystromer.compat at its edges: replaced or hooked projections, empty selections of the
attention map, and indices that a tensor takes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nystromer.compat import AttentionMap, NystromAttention

DIM, HEADS, DIM_HEAD, M, KERNEL = 32, 4, 8, 8, 5
SIZES = dict(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, num_landmarks=M, residual_conv_kernel=KERNEL)
NUMERICS = ["nystromer", "lucidrains"]


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def _lengths_mask(n, lengths):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


class _LowRankAdapted(nn.Module):
    """A Linear with a low-rank update, as an adapter library (LoRA) wraps ``to_qkv``: its
    output is that of one Linear of weight W + U·V, and ``weight`` is W alone."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)

    @property
    def weight(self):
        # As adapter libraries expose it: the base weight, without the update.
        return self.base.weight

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _layer_pair(numerics):
    """A layer whose to_qkv is wrapped with a low-rank update, and the same layer with the update
    merged into a plain Linear: the two compute the same function."""
    adapted = _randomised(NystromAttention(**SIZES, numerics=numerics), 1).double().eval()
    adapted.to_qkv = _randomised(_LowRankAdapted(adapted.to_qkv), 2).double()
    merged = NystromAttention(**SIZES, numerics=numerics).double().eval()
    merged.load_state_dict(
        {k: v for k, v in adapted.state_dict().items() if not k.startswith("to_qkv")},
        strict=False,
    )
    with torch.no_grad():
        qkv = adapted.to_qkv
        merged.to_qkv.weight.copy_(qkv.base.weight + qkv.up.weight @ qkv.down.weight)
    return adapted, merged


@pytest.mark.parametrize("numerics", NUMERICS)
def test_a_replaced_to_qkv_is_called_as_the_package_calls_it(numerics):
    # The package calls self.to_qkv(x): an adapter, a quantised Linear or a hook on it must take
    # effect in both numerics, in the output, the attention map and the factors.
    adapted, merged = _layer_pair(numerics)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, DIM, generator=g, dtype=torch.float64)
    mask = _lengths_mask(30, [30, 19])
    with torch.no_grad():
        got, attn = adapted(x, mask=mask, return_attn=True)
        want, want_attn = merged(x, mask=mask, return_attn=True)
        # float64, the same products up to the adapter's summation order.
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        rows = [0, 11, -1]
        torch.testing.assert_close(attn[:, :, rows], want_attn[:, :, rows], rtol=0, atol=1e-12)
        amap = adapted.attention_map(x, mask)
        torch.testing.assert_close(amap[:, 1:3, rows], want_attn[:, 1:3, rows], rtol=0, atol=1e-12)
        factors = adapted(x, mask=mask, return_attn_matrices=True)[1]
        want_factors = merged(x, mask=mask, return_attn_matrices=True)[1]
        for f, w in zip(factors, want_factors, strict=True):
            torch.testing.assert_close(f, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("numerics", NUMERICS)
def test_hooks_on_to_qkv_and_res_conv_run_as_in_the_package(numerics):
    layer = _randomised(NystromAttention(**SIZES, numerics=numerics), 4).double().eval()
    x = torch.randn(2, 30, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        plain = layer(x)
        called = []
        # A hook that doubles the projection: the same as doubling to_qkv's weight.
        handle = layer.to_qkv.register_forward_hook(lambda m, i, out: called.append(1) or 2 * out)
        hooked = layer(x)
        handle.remove()
        assert called, "the hook on to_qkv did not run"
        layer.to_qkv.weight.mul_(2)
        doubled = layer(x)
        torch.testing.assert_close(hooked, doubled, rtol=0, atol=1e-12)
        assert (hooked - plain).abs().max() > 1e-3
        convolved = []
        layer.res_conv.register_forward_hook(lambda m, i, out: convolved.append(1))
        # The convolution called as a module computes what the direct one did.
        torch.testing.assert_close(layer(x), doubled, rtol=0, atol=1e-12)
        assert convolved, "the hook on res_conv did not run"


def test_a_dynamically_quantised_layer_runs_in_both_numerics():
    # torch.ao's dynamic quantisation replaces to_qkv by a module whose weight is a method.
    quantize_dynamic = pytest.importorskip("torch.ao.quantization").quantize_dynamic
    x = torch.randn(2, 30, DIM, generator=torch.Generator().manual_seed(6))
    for numerics in NUMERICS:
        layer = _randomised(NystromAttention(**SIZES, numerics=numerics), 7).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice
            quantised = quantize_dynamic(layer, {nn.Linear}, dtype=torch.qint8)
        with torch.no_grad():
            want = layer(x)
            got, attn = quantised(x, return_attn=True)
            row = quantised.attention_map(x)[:, :, 0]
        # int8 weights and activations: about 1% of the output's scale (measured 2e-2 at most).
        assert (got - want).abs().max() <= 0.1 * want.abs().max()
        assert torch.isfinite(attn[:, :, 0]).all() and row.shape == (2, HEADS, attn.shape[-1])


# --- the attention map: empty selections and the indices a tensor takes --------------------------


@pytest.fixture(params=NUMERICS)
def attn_and_dense(request):
    layer = _randomised(NystromAttention(**SIZES, numerics=request.param), 8).double().eval()
    x = torch.randn(3, 20, DIM, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(10)) > 0.3  # holes
    with torch.no_grad():
        attn = layer(x, mask=mask, return_attn=True)[1]
        return attn, attn.full()


def test_attention_map_takes_the_indices_a_tensor_takes(attn_and_dense):
    attn, dense = attn_and_dense
    everything = slice(None)
    indices = [
        slice(5, None),  # no sample
        (everything, slice(9, None), 0),  # no head
        (slice(1, 1), everything, [0, 2]),
        [],  # an empty list: no sample (torch makes it an int64 index)
        (everything, everything, []),
        (everything, everything, [[]]),
        (everything, everything, (1, 2)),  # a tuple inside the index is a sequence
        (everything, everything, range(3)),
        ((0, 2), 1),
        (everything, everything, True),  # a scalar bool adds an axis, as None does
        (0, True, 1, False),
        (everything, torch.tensor(True), 0),
        (Ellipsis, True, 0),
    ]
    for index in indices:
        want = dense[index]
        got = attn[index]
        assert got.shape == want.shape, index
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_attention_map_takes_numpy_indices(attn_and_dense):
    np = pytest.importorskip("numpy")
    attn, dense = attn_and_dense
    for index in [
        (slice(None), slice(None), np.array([1, 7])),
        (np.int64(2), slice(None), np.int64(-1)),
        (slice(None), slice(None), np.arange(attn.shape[2]) % 2 == 0),
    ]:
        torch.testing.assert_close(attn[index], dense[index], rtol=0, atol=1e-12)


# --- the map's inputs: inference tensors, a mask changed after the forward -----------------------


@pytest.mark.parametrize("numerics", NUMERICS)
def test_attention_map_of_inference_tensors(numerics):
    # Heatmap pipelines run under torch.inference_mode(); its tensors have no version counter.
    layer = _randomised(NystromAttention(**SIZES, numerics=numerics), 11).double().eval()
    x = torch.randn(2, 30, DIM, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    mask = _lengths_mask(30, [30, 21])
    with torch.no_grad():
        want = layer(x, mask=mask, return_attn=True)[1][:, :, [0, -1]]
    with torch.inference_mode():
        x_inference = x.clone()
        got = layer(x_inference, mask=mask, return_attn=True)[1][:, :, [0, -1]]
        alone = layer.attention_map(x_inference, mask)[:, :, [0, -1]]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(alone, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("numerics", NUMERICS)
def test_attention_map_keeps_the_mask_of_its_forward(numerics):
    # A mask buffer reused for the next bag must not change the rows of a map already made.
    layer = _randomised(NystromAttention(**SIZES, numerics=numerics), 13).double().eval()
    x = torch.randn(2, 32, DIM, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    mask = _lengths_mask(32, [32, 21])
    with torch.no_grad():
        want = layer(x, mask=mask, return_attn=True)[1].full()
        attn = layer(x, mask=mask, return_attn=True)[1]
        alone = layer.attention_map(x, mask)
        mask[1, 5:] = True
        mask[0, 3:] = False
        torch.testing.assert_close(attn.full(), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(alone.full(), want, rtol=0, atol=1e-12)


def test_nystromer_attention_map_keeps_the_mask_of_its_call():
    # The same for the module of models built on nystromer.
    from nystromer import NystromAttention as Attention

    layer = _randomised(Attention(DIM, HEADS, num_landmarks=M), 15).double().eval()
    x = torch.randn(2, 32, DIM, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    mask = _lengths_mask(32, [32, 21])
    with torch.no_grad():
        want = layer.attention_map(x, mask=mask).full()
        attn = layer.attention_map(x, mask=mask)
        mask[1, 5:] = True
        torch.testing.assert_close(attn.full(), want, rtol=0, atol=1e-12)


def test_an_empty_batch_gives_an_empty_output_and_gradient():
    # The convolution skip's blocks are sized per sample; no sample must not divide by zero.
    import nystromer

    layers = [
        NystromAttention(dim=32, dim_head=8, heads=4, num_landmarks=16),
        nystromer.NystromAttention(32, 4, num_landmarks=16, conv_kernel_size=33),
    ]
    for layer in layers:
        x = torch.randn(0, 70, 32, requires_grad=True)
        out = layer(x)
        assert out.shape == (0, 70, 32)
        out.sum().backward()
        assert x.grad.shape == (0, 70, 32)


# --- graph captures: torch.jit.trace and torch.export ------------------------------------------


@pytest.mark.parametrize("numerics", NUMERICS)
def test_a_traced_layer_gives_the_eager_outputs_for_other_masks(numerics):
    # A trace records one Python run: a branch chosen by reading the traced mask's values (no
    # sample at most m long, so no exact-attention rows) would be baked into the graph and be
    # silently wrong for the next bag's mask. The package's layer traces without such reads.
    layer = _randomised(NystromAttention(**SIZES, numerics=numerics), 21).double().eval()
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 21, DIM, generator=g, dtype=torch.float64)
    with torch.no_grad():
        traced = torch.jit.trace(layer, (x, _lengths_mask(21, [21, 15])), check_trace=False)
        for lengths in ([21, 3], [8, 21], [21, 0], [21, 21]):
            mask = _lengths_mask(21, lengths)
            y = torch.randn(2, 21, DIM, generator=g, dtype=torch.float64)
            # float64: the traced and eager runs differ in summation order only.
            torch.testing.assert_close(traced(y, mask), layer(y, mask), rtol=0, atol=1e-12)


def test_a_traced_layer_runs_bags_of_any_length():
    # One traced model serves every slide: a bag of at most m instances (exact attention in
    # eager) or a multiple of m long (equal segments) must not take the traced length's path.
    # (The package's trace, and that of numerics="lucidrains", is valid for one padding.)
    layer = _randomised(NystromAttention(**SIZES), 27).double().eval()
    g = torch.Generator().manual_seed(28)
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(1, 21, DIM, generator=g, dtype=torch.float64))
        for n in (3, M, M + 1, 2 * M, 37):
            x = torch.randn(1, n, DIM, generator=g, dtype=torch.float64)
            torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("numerics", NUMERICS)
def test_exports_with_torch_export_and_matches_eager(numerics):
    # The package's layer exports (static shapes); the CPU speed-ups' own autograd nodes made
    # data-dependent sizes that torch.export refused. As TransMIL runs it (one bag, no mask)
    # and batched with a mask.
    layer = _randomised(NystromAttention(**SIZES, numerics=numerics), 23).eval()
    g = torch.Generator().manual_seed(24)
    for b, lengths in ((1, None), (2, [21, 15])):
        x = torch.randn(b, 21, DIM, generator=g)
        args = (x,) if lengths is None else (x, _lengths_mask(21, lengths))
        exported = torch.export.export(layer, args).module()
        y = torch.randn(b, 21, DIM, generator=g)
        for other in (lengths, [21, 3]) if lengths else (None,):
            args = (y,) if other is None else (y, _lengths_mask(21, other))
            with torch.no_grad():
                want = layer(*args)
            # float32 rounding of a different summation order: 1e-6 of the largest entry.
            assert (exported(*args) - want).abs().max() <= 1e-6 * want.abs().max()


# --- the attention map used as the package's dense matrix is used ------------------------------


@pytest.mark.parametrize("numerics", NUMERICS)
def test_attention_map_rows_track_gradients_as_its_forward_did(numerics):
    # The package's matrix of a forward under no_grad or inference_mode tracks no gradient, so
    # heatmap code indexes it and calls .numpy() after the block; the map's rows must too.
    layer = _randomised(NystromAttention(**SIZES, numerics=numerics), 25).eval()
    x = torch.randn(1, 30, DIM, generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        attn = layer(x, return_attn=True)[1]
    with torch.inference_mode():
        later = layer(x.clone(), return_attn=True)[1]
    for amap in (attn, later):
        row = amap[:, :, -30, -29:]
        assert not row.requires_grad
        row.numpy()
    # A forward that tracks gradients gives rows that do (an attention loss), unless indexed
    # under no_grad.
    attn = layer(x, return_attn=True)[1]
    assert attn[:, :, 0].requires_grad
    with torch.no_grad():
        assert not attn[:, :, 0].requires_grad


def test_attention_map_tensor_methods_stay_lazy_and_index_as_on_the_dense_matrix(attn_and_dense):
    # Heatmap code written for the package's dense matrix moves, casts and averages it over the
    # heads before taking the class token's row: those calls return maps whose rows are the
    # dense result's, so the row selection after them still computes only those rows.
    attn, dense = attn_and_dense
    calls = [
        lambda a: a.detach(),
        lambda a: a.clone(),
        lambda a: a.cpu(),
        lambda a: a.to("cpu"),
        lambda a: a.to(torch.float32, copy=True),
        lambda a: a.float(),
        lambda a: a.detach().cpu().float(),
        lambda a: a.mean(1),  # over the heads: (B, n_q, n_k)
        lambda a: a.mean(dim=-3, keepdim=True),
        lambda a: a.sum(1),
        lambda a: a.float().mean(1),
        lambda a: a.mean(1, keepdim=True).mean(1),
    ]
    n = attn.shape[-1]
    for call in calls:
        got, want = call(attn), call(dense)
        assert isinstance(got, AttentionMap)
        assert got.shape == want.shape and got.dtype == want.dtype and len(got) == len(want)
        for index in [(Ellipsis, 0, slice(1, None)), -1, (Ellipsis, [0, 2], slice(None)), Ellipsis]:
            # float64 rows (or their float32 rounding): only summation order may differ.
            torch.testing.assert_close(got[index], want[index], rtol=0, atol=1e-6)
        assert got[(Ellipsis, -n, slice(None))].shape == want[..., -n, :].shape
    # A map made under no_grad stays so; detach() drops the gradient of one that tracks it.
    assert not attn.mean(1)[:, 0].requires_grad


def test_attention_map_refuses_what_needs_the_dense_matrix_with_what_to_do(attn_and_dense):
    np = pytest.importorskip("numpy")
    import copy
    import pickle

    attn, _ = attn_and_dense
    advice = r"attn\[:, :, 0\].*attn\.full\(\)"
    for call in (
        lambda a: a.numpy(),
        lambda a: a.softmax(-1),
        lambda a: a.max(),
        lambda a: a.reshape(-1),
    ):
        with pytest.raises(AttributeError, match=advice):
            call(attn)
    for call in (
        lambda a: a.mean(),  # every element: not a reduction over the heads
        lambda a: a.mean(0),
        lambda a: a.mean(1).mean(1),  # the rows of a head mean
        lambda a: torch.stack([a, a]),
        lambda a: torch.mean(a, 1),
        lambda a: a > 0.1,
        lambda a: a * 2,
        lambda a: np.asarray(a),
        lambda a: pickle.dumps(a),
    ):
        with pytest.raises(TypeError, match=r"attn\.full\(\)"):
            call(attn)
    assert not hasattr(attn, "numpy") and getattr(attn, "no_such_name", None) is None
    torch.testing.assert_close(copy.deepcopy(attn)[:, :, 0], attn[:, :, 0], rtol=0, atol=0)


def test_exports_to_onnx_as_the_packages_layer_does():
    # torch.onnx.export (the TorchScript exporter) traces the layer; the CPU speed-ups' own
    # autograd nodes had no ONNX form ("Argument passed to at() was not in the map").
    pytest.importorskip("onnx")
    import io

    layer = _randomised(NystromAttention(**SIZES), 29).eval()
    x = torch.randn(1, 21, DIM, generator=torch.Generator().manual_seed(30))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(layer, (x,), buffer, dynamo=False)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(buffer.getvalue())
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = layer(x)
    # float32 rounding of another runtime's kernels: 1e-5 of the largest entry.
    assert (torch.from_numpy(got) - want).abs().max() <= 1e-5 * want.abs().max()

"""nystromer.compat as TransMIL-style code uses it: one bag at a time (batch 1, no mask) of a
length that changes from bag to bag, compiled, heatmaps read as such code reads them."""

from __future__ import annotations

import pytest
import torch

from nystromer.compat import NystromAttention, Nystromformer

DIM, HEADS, DIM_HEAD, M, KERNEL = 32, 4, 8, 8, 5
SIZES = dict(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, num_landmarks=M, residual_conv_kernel=KERNEL)
NUMERICS = ["nystromer", "lucidrains"]


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights larger than the default initialisation, so attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def _package():
    return pytest.importorskip("nystrom_attention")


def _lengths_mask(n, lengths):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # aot_eager runs the eager kernels: compiled and eager agree to float32 rounding.
    return bool((got - want).abs().max() <= 1e-6 * want.abs().max())


def test_compiles_in_one_graph_for_an_unmasked_bag_not_a_multiple_of_m():
    # The usual MIL call, one bag without a mask, with n not a multiple of m: the segment sizes
    # were counted with bincount, whose result size torch.compile cannot trace (fullgraph
    # failed, forward and backward).
    torch._dynamo.reset()
    layer = _randomised(NystromAttention(**SIZES), 1)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randn(1, 30, DIM, generator=torch.Generator().manual_seed(2), requires_grad=True)
    got, want = compiled(x), layer(x)
    assert _close(got, want)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    (grad_want,) = torch.autograd.grad(want.square().sum(), x)
    assert _close(grad_got, grad_want)


def test_compiles_in_one_graph_with_dynamic_shapes():
    # dynamic=True, so that bags of every length share one graph: the layer's float scale is
    # then symbolic, and checking it with math.isfinite broke the graph (fullgraph failed).
    torch._dynamo.reset()
    layer = _randomised(NystromAttention(**SIZES), 3)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    x = torch.randn(1, 30, DIM, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _close(compiled(x), layer(x))


@pytest.mark.parametrize("masked", [False, True])
def test_lucidrains_map_of_an_autocast_forward_is_indexed_after_it(masked):
    # Heatmap code runs the model under autocast and reads the map afterwards. The forward
    # made A⁺ in bfloat16 (as the package does under autocast); indexing outside autocast
    # failed on the mixed dtypes of its product.
    theirs = _randomised(_package().NystromAttention(**SIZES), 5).eval()
    ours = NystromAttention(**SIZES, numerics="lucidrains").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 50, DIM, generator=torch.Generator().manual_seed(6))
    mask = _lengths_mask(50, [50, 37]) if masked else None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn = ours(x, mask=mask, return_attn=True)[1]
        dense = theirs(x, mask=mask, return_attn=True)[1]
        inside = attn[:, :, [-50, -1]]
    outside = attn[:, :, [-50, -1]]
    assert outside.dtype == inside.dtype == torch.bfloat16
    torch.testing.assert_close(outside, inside, rtol=0, atol=0)
    # The package multiplies in bfloat16, the map in float32: a few bfloat16 roundings (8-bit
    # mantissa) of the largest entry apart; measured 3.2e-3 of it, bound 2^-6.
    expected = dense[:, :, [-50, -1]].float()
    assert (outside.float() - expected).abs().max() <= 2**-6 * expected.abs().max()


def test_a_compiled_layer_takes_a_mask_after_unmasked_bags_of_changing_length():
    # Bags one at a time without a mask, of changing length (torch.compile then makes the
    # sizes symbolic), then a padded batch with a mask: the check of the mask's batch size
    # against x's refused the matching mask, "must have shape (2, 30) ..., got (2, 30)".
    torch._dynamo.reset()
    layer = _randomised(NystromAttention(**SIZES), 7)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for n in (30, 40):
            x = torch.randn(1, n, DIM, generator=g)
            assert _close(compiled(x), layer(x))
        x, mask = torch.randn(2, 30, DIM, generator=g), _lengths_mask(30, [30, 21])
        assert _close(compiled(x, mask=mask), layer(x, mask=mask))


def test_the_stack_names_x_when_its_width_is_wrong():
    # The first layer's LayerNorm raised torch's "Given normalized_shape=[32], expected input
    # with shape [*, 32]", which names no argument.
    stack = Nystromformer(dim=DIM, depth=2, heads=HEADS, dim_head=DIM_HEAD, num_landmarks=M)
    with pytest.raises(ValueError, match=rf"x must have shape \(batch, seq_len, {DIM}\)"):
        stack(torch.randn(1, 10, DIM + 1))
    with pytest.raises(ValueError, match="mask must have shape"):
        stack(torch.randn(1, 10, DIM), mask=torch.ones(1, 9, dtype=torch.bool))
    # No layers: the package returns x as it is, and so does this stack.
    x = torch.randn(1, 10, DIM)
    assert Nystromformer(dim=DIM, depth=0)(x) is x


@pytest.mark.parametrize("name", ["dim", "dim_head", "heads"])
def test_a_size_that_is_not_positive_is_refused_by_name(name):
    # heads=0 raised the convolution's "groups must be a positive integer", dim_head=0 a
    # ZeroDivisionError, dim=0 built a layer that ignores its input.
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer, got 0"):
        NystromAttention(**{**SIZES, name: 0})
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer, got 0"):
        Nystromformer(**{"dim": DIM, "depth": 1, name: 0})


@pytest.mark.parametrize("numerics", NUMERICS)
def test_an_empty_bag_gives_an_empty_output_map_and_factors(numerics):
    # A slide without a patch (n = 0): "lucidrains" numerics failed in the convolution, the
    # factors in both (the package fails too, dividing by ceil(n / m) = 0).
    layer = _randomised(NystromAttention(**SIZES, numerics=numerics), 9)
    x = torch.randn(2, 0, DIM, requires_grad=True)
    out, attn = layer(x, mask=torch.ones(2, 0, dtype=torch.bool), return_attn=True)
    assert out.shape == (2, 0, DIM) and attn.shape == (2, HEADS, 0, 0)
    assert attn[:, :, :, :].shape == (2, HEADS, 0, 0)
    assert layer.attention_map(x).shape == (2, HEADS, 0, 0)
    f, a_pinv, b = layer(x, return_attn_matrices=True)[1]
    assert (f @ a_pinv @ b).shape == (2, HEADS, 0, 0)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_an_input_of_another_dtype_than_the_layer_is_refused_by_name():
    # Features read from an array are often float64: torch's "expected m1 and m2 to have the
    # same dtype" names neither x nor the dtype the layer has.
    layer = NystromAttention(**SIZES)
    with pytest.raises(TypeError, match=r"x must have the layer's dtype torch.float32.*float64"):
        layer(torch.randn(1, 10, DIM, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x must have the layer's dtype"):
        layer.attention_map(torch.ones(1, 10, DIM, dtype=torch.long))
    # Under autocast the projection casts x itself (not float64): accepted.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(1, 10, DIM, dtype=torch.float16)).dtype == torch.bfloat16
        with pytest.raises(TypeError, match=r"x must have the layer's dtype"):
            layer(torch.randn(1, 10, DIM, dtype=torch.float64))
    # A pre-hook on to_qkv that casts its input decides for itself.
    layer.to_qkv.register_forward_pre_hook(lambda module, args: (args[0].float(),))
    assert layer(torch.randn(1, 10, DIM, dtype=torch.float64)).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        # The layer's names were in these messages, or torch's unnamed dropout one.
        (dict(attn_values_residual_conv_kernel=32), r"attn_values_residual_conv_kernel .*32"),
        (dict(attn_dropout=2.0), r"attn_dropout must be in \[0, 1\], got 2.0"),
        (dict(ff_dropout=-0.5), r"ff_dropout must be in \[0, 1\], got -0.5"),
        # range(-1) built no layer without a word.
        (dict(depth=-1), r"depth must be an integer ≥ 0, got -1"),
    ],
)
def test_the_stacks_arguments_are_refused_by_their_own_names(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Nystromformer(**{"dim": DIM, "depth": 1, **kwargs})


def test_the_layers_dropout_is_refused_by_name():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\], got 1.5"):
        NystromAttention(**SIZES, dropout=1.5)
    NystromAttention(**SIZES, dropout=1.0)  # torch's Dropout takes p = 1, as the package does

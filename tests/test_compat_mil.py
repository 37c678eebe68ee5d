"""nystromer.compat as TransMIL-style code uses it: one bag at a time (batch 1, no mask) of a
length that changes from bag to bag, compiled, heatmaps read as such code reads them."""

from __future__ import annotations

import torch

from nystromer.compat import NystromAttention

DIM, HEADS, DIM_HEAD, M, KERNEL = 32, 4, 8, 8, 5
SIZES = dict(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, num_landmarks=M, residual_conv_kernel=KERNEL)


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights larger than the default initialisation, so attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


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

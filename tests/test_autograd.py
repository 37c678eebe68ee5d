"""Second derivatives (``torch.autograd.grad(..., create_graph=True)`` and a backward through
it, as gradient penalties take them) through the attention function, the convolution skip, the
modules and the compat layer, in float64 with torch's gradcheck and gradgradcheck."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.attention import SDPBackend, sdpa_kernel

from nystromer import NystromAttention, NystromMultiheadAttention, compat, nystrom_attention
from nystromer._sdpa import sdpa
from nystromer.models import NystromformerModel

from .models.tiny import tiny_config

N, M = 9, 4  # longer than m: the Nyström path, not exact attention
PADDED = torch.tensor([[True] * N, [True] * 6 + [False] * (N - 6)])  # 6 real keys > m
SHORT = torch.tensor([[True] * N, [True] * 3 + [False] * (N - 3)])  # 3 real keys ≤ m: exact rows


def _leaf(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


def _twice_differentiable(f, inputs) -> bool:
    # fast_mode: each check projects the Jacobian on random vectors, a few calls instead of one
    # per input element (seconds, not minutes); a wrong derivative still fails it.
    return gradcheck(f, inputs, fast_mode=True) and gradgradcheck(f, inputs, fast_mode=True)


def test_sdpa_is_twice_differentiable_for_a_tensor_in_two_roles():
    # Self-attention passes one tensor as q and k: each role must get its own gradient.
    q, v = _leaf(2, 2, 5, 3, seed=1), _leaf(2, 2, 5, 3, seed=2)
    mask = PADDED[:, None, None, :5]
    assert _twice_differentiable(lambda q, v: sdpa(q, q, v, mask, 0.0, 0.7), (q, v))
    # The gradient built for a second derivative (the math form) is the fused backward's.
    out = sdpa(q, q, v, mask, 0.0, 0.7).square().sum()
    want = torch.autograd.grad(out, (q, v), retain_graph=True)
    got = torch.autograd.grad(out, (q, v), create_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "mask, kmeans",
    [(None, 0), (PADDED, 0), (SHORT, 0), (PADDED, 2)],
    ids=["no mask", "padded", "short sample", "k-means"],
)
def test_nystrom_attention_is_twice_differentiable(mask, kmeans):
    q, k, v = (_leaf(2, 2, N, 3, seed=s) for s in (3, 4, 5))

    def f(q, k, v):
        return nystrom_attention(q, k, v, num_landmarks=M, mask=mask, kmeans_iterations=kmeans)

    assert _twice_differentiable(f, (q, k, v))


@pytest.mark.parametrize("conv", [None, 3])
@pytest.mark.parametrize("mask", [None, PADDED], ids=["no mask", "mask"])
def test_modules_are_twice_differentiable(conv, mask):
    x = _leaf(2, N, 8, seed=6)
    layer = NystromAttention(8, 2, num_landmarks=M, conv_kernel_size=conv).double()
    mha = NystromMultiheadAttention(
        8, 2, num_landmarks=M, conv_kernel_size=conv, batch_first=True, dtype=torch.float64
    )
    for module in (layer, mha):
        if conv:  # (MHA's starts at zero)
            torch.nn.init.normal_(module.conv.weight)
    weights = (layer.conv.weight,) if conv else ()
    assert _twice_differentiable(lambda x, *w: layer(x, mask=mask), (x, *weights))
    padding = None if mask is None else ~mask
    assert _twice_differentiable(lambda x: mha(x, x, x, key_padding_mask=padding)[0], (x,))


@pytest.mark.parametrize("numerics", compat.NUMERICS)
def test_compat_layer_is_twice_differentiable(numerics):
    x = _leaf(2, N, 8, seed=7)
    layer = compat.NystromAttention(
        dim=8, dim_head=4, heads=2, num_landmarks=M, residual_conv_kernel=3, numerics=numerics
    ).double()
    assert _twice_differentiable(lambda x: layer(x, mask=PADDED), (x,))


def test_gradient_penalty_of_a_model_matches_the_math_kernels():
    # The fused kernels' path (a custom node that differentiates the math form under
    # create_graph) against torch's math kernel throughout, which autograd differentiates
    # twice by itself. float64: only summation order differs.
    model = NystromformerModel(tiny_config(num_landmarks=M)).double().eval()
    torch.nn.init.normal_(model.encoder.layer[0].attention.self.conv.weight)
    embeds = _leaf(2, N, 32, seed=8)
    mask = PADDED.long()

    def penalty_gradients():
        model.zero_grad()
        out = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        (grad,) = torch.autograd.grad(out.square().sum(), embeds, create_graph=True)
        grad.square().sum().backward()
        return grad.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fused = penalty_gradients()
    with sdpa_kernel(SDPBackend.MATH):
        math = penalty_gradients()
    torch.testing.assert_close(fused[0], math[0], rtol=1e-10, atol=1e-12)
    assert len(fused[1]) == len(math[1]) > 0
    for got, want in zip(fused[1], math[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_first_derivatives_unchanged_and_backward_repeatable_with_retain_graph():
    # A first-order backward runs the fused kernel's own backward; retain_graph keeps it for a
    # second backward, which must give the same gradients.
    q, k, v = (_leaf(2, 2, N, 3, seed=s) for s in (9, 10, 11))
    out = nystrom_attention(q, k, v, num_landmarks=M, mask=PADDED)
    out.square().sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out.square().sum().backward()
    for t, want in zip((q, k, v), first, strict=True):
        torch.testing.assert_close(t.grad, want, rtol=0, atol=0)


def test_second_derivative_through_attention_dropout_says_what_to_do():
    layer = NystromAttention(8, 2, num_landmarks=M, dropout=0.5).double().train()
    x = _leaf(2, N, 8, seed=12)
    # The gradient asked for with create_graph must be differentiable already.
    with pytest.raises(RuntimeError, match=r"dropout.*model\.eval\(\).*SDPBackend\.MATH"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    # Under the math kernel alone, torch differentiates dropout twice itself.
    with sdpa_kernel(SDPBackend.MATH):
        (grad,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
        grad.square().sum().backward()

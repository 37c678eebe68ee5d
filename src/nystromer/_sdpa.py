"""Scaled dot-product attention that autograd can differentiate twice.

torch's fused attention kernels (flash and memory-efficient, on the CPU as on GPUs) define no
derivative of their own backward: a second backward through ``torch.autograd.grad(...,
create_graph=True)``, as gradient penalties and meta-learning take it, fails inside torch.
:func:`sdpa` runs the same fused kernel forward and backward, and only a backward that
builds a graph (``create_graph=True``) differentiates the plain "math" form instead, on the
inputs that forward saw. Nothing is known at the forward about a later ``create_graph``, so
the choice is made in the backward, where ``torch.is_grad_enabled()`` says it: a node after
the fused call passes the gradient on to it, or, under ``create_graph``, stops it there and
returns the math form's gradients of q, k and v instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _cpu

__all__ = ["sdpa"]


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, scale=scale)``, also
    when differentiated twice (see the module docstring).

    The node that allows it is only added where autograd records the call eagerly with a fused
    kernel possible: without gradients, under torch.compile or a torch.func transform (which
    trace the plain call), and when only the math kernel is enabled (already twice
    differentiable), the plain call runs alone.
    """
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
    )
    if (
        out.requires_grad
        and not (torch.compiler.is_compiling() or _cpu.transformed())
        and _fused_kernels_enabled()
    ):
        return _TwiceDifferentiable.apply(out, q, k, v, attn_mask, dropout_p, scale)
    return out


def _fused_kernels_enabled() -> bool:
    """Whether SDPA may pick a kernel other than the math one (the flags that
    ``torch.nn.attention.sdpa_kernel`` sets; the flash flag also governs the CPU's kernel)."""
    backends = torch.backends.cuda
    return (
        backends.flash_sdp_enabled()
        or backends.mem_efficient_sdp_enabled()
        or backends.cudnn_sdp_enabled()
    )


class _TwiceDifferentiable(torch.autograd.Function):
    """The identity on the fused call's output ``out``, in the backward the switch of
    :func:`sdpa`: the gradient goes on to the fused kernel's backward, or, under
    ``create_graph``, to q, k and v through the math form recomputed on the saved inputs
    (connected to the caller's graph, so differentiable again). It saves q, k, v and the
    mask, which the fused kernel keeps anyway: no memory is added."""

    @staticmethod
    def forward(ctx, out, q, k, v, attn_mask, dropout_p: float, scale: float | None) -> Tensor:
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.dropout_p, ctx.scale = dropout_p, scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not torch.is_grad_enabled():
            return grad, *(None,) * 6
        if ctx.dropout_p:
            raise RuntimeError(
                "nystromer: a differentiable gradient (backward with create_graph=True, "
                "for a second derivative) through attention dropout is not supported: the "
                "fused attention kernel's dropout mask cannot be replayed. Take it without "
                "dropout (model.eval(), or dropout 0), or run the forward inside "
                "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)."
            )
        *saved, attn_mask = ctx.saved_tensors
        # Views, so that one tensor in two roles (q is k in self-attention) gets the gradient
        # of each role from autograd.grad, not their sum twice.
        inputs = [t.view_as(t) for t in saved]
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(*inputs, attn_mask=attn_mask, scale=ctx.scale)
        wanted = ctx.needs_input_grad[1:4]
        chosen = [t for t, w in zip(inputs, wanted, strict=True) if w]
        found = iter(torch.autograd.grad(out, chosen, grad, create_graph=True))
        # No gradient for the fused call's output: its backward is not run.
        return None, *(next(found) if w else None for w in wanted), None, None, None

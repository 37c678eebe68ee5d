"""The arithmetic of the paper's convolution skip (:class:`nystromer.attention.ValueConv`),
behind named calls.

The skip convolves each head's (n, d) values along the sequence with k taps shared by the
head's d features. Computed as torch's H-channel grouped convolution it is slow on the CPU
(and its float32 kernel gradient inaccurate); here it is the equivalent depthwise convolution
over C = H·d channels in channels-last layout, a block of samples and positions at a time,
so that temporaries stay small. What that buys, measured, is in docs/design.md
("Convolution skip").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["add_", "added", "masked_conv", "sequence_conv"]


def masked_conv(value: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None) -> Tensor:
    """:func:`sequence_conv` with padding (``mask`` False) zeroed before and after, so a real
    position sees what it would see in the unpadded sequence. value (B, H, n, d), mask (B, n)."""
    rows = _Rows(value, mask, weight.shape[2])
    weight, bias = rows.channel_weights(weight, bias, value.dtype)
    return rows.whole(weight, bias).transpose(1, 2)


def add_(out: Tensor, value: Tensor, weight: Tensor, bias: Tensor | None, mask) -> Tensor:
    """``out += masked_conv(value, weight, bias, mask)`` in place, block by block; returns out."""
    return _add_blocks(out, value, weight, bias, mask, into=out)


def added(out: Tensor, value: Tensor, weight: Tensor, bias: Tensor | None, mask) -> Tensor:
    """``out + masked_conv(value, weight, bias, mask)`` for autograd, keeping nothing of its
    own for the backward, which recomputes what it needs block by block."""
    return _Added.apply(out, value, weight, bias, mask)


def _add_blocks(out, value, weight, bias, mask, into: Tensor) -> Tensor:
    """``out + masked_conv(...)`` written into ``into`` (out itself, or a tensor of its shape)
    a block at a time: one pass over out, no copy of it first."""
    rows = _Rows(value, mask, weight.shape[2])
    weight, bias = rows.channel_weights(weight, bias, value.dtype)
    out_rows, into_rows = out.transpose(1, 2), into.transpose(1, 2)  # (B, n, H, d)
    for samples, start, stop in rows.blocks():
        block = (samples, slice(start, stop))
        y = rows.conv(weight, bias, samples, start, stop)
        torch.add(out_rows[block], y, out=into_rows[block])
    return into


class _Added(torch.autograd.Function):
    """See :func:`added`. Saves only ``value`` (which the attention keeps
    anyway), the weight and a copy of the mask. A backward under ``create_graph`` (a second
    derivative to come) differentiates the plain convolution instead (:func:`_plain_backward`).
    """

    @staticmethod
    def forward(ctx, out, value, weight, bias, mask):
        ctx.save_for_backward(value, weight, bias)
        # A copy (B·n bools): the caller may refill its mask (the next batch's) before this
        # backward, which must use this forward's.
        ctx.mask = None if mask is None else mask.clone()
        return _add_blocks(out, value, weight, bias, mask, into=torch.empty_like(out))

    @staticmethod
    def backward(ctx, grad):
        value, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            return grad, *_plain_backward(ctx, grad, value, weight, bias), None
        need_value, need_weight, need_bias = ctx.needs_input_grad[1:4]
        k = weight.shape[2]
        back, values = _Rows(grad, ctx.mask, k), _Rows(value, ctx.mask, k)
        grad_value = torch.empty_like(value) if need_value else None
        # The adjoint of a correlation is the correlation with the taps reversed.
        flipped, _ = back.channel_weights(weight.flip(2), None, grad.dtype)
        # The kernel's gradient is summed in the weight's dtype (float32 under autocast).
        channel_weight, _ = back.channel_weights(weight, None, weight.dtype)
        grad_weight = torch.zeros_like(channel_weight) if need_weight else None
        grad_rows = None if grad_value is None else grad_value.transpose(1, 2)
        for samples, start, stop in back.blocks():
            if need_value:
                grad_rows[samples, start:stop] = back.conv(flipped, None, samples, start, stop)
            if need_weight:
                grad_weight += torch.ops.aten.convolution_backward(
                    back.rows(samples, start, stop).to(weight.dtype),
                    values.rows(samples, start, stop, k // 2).to(weight.dtype),
                    channel_weight, None,
                    [1, 1], [0, 0], [1, 1], False, [0, 0], channel_weight.shape[0],
                    [False, True, False],
                )[1]  # fmt: skip
        if need_weight:
            grad_weight = grad_weight.view(weight.shape[0], -1, *weight.shape[1:]).sum(1)
        grad_bias = None
        if need_bias and bias is not None:
            keep = 1 if ctx.mask is None else ctx.mask[:, None, :, None].to(grad.dtype)
            grad_bias = (grad * keep).sum((0, 2, 3)).to(bias.dtype)
        return grad, grad_value, grad_weight, grad_bias, None


def _plain_backward(ctx, grad: Tensor, value: Tensor, weight: Tensor, bias: Tensor | None):
    """The gradients of value, weight and bias (None where not needed) of :func:`added` as a
    graph of their own, by differentiating :func:`masked_conv` with ``create_graph``: what a
    backward under ``create_graph`` needs. ``value``, ``weight`` and ``bias`` are the saved
    inputs, connected to the caller's graph."""
    # Views, so that autograd.grad gives each input's own gradient (distinct graph nodes).
    inputs = [None if t is None else t.view_as(t) for t in (value, weight, bias)]
    wanted = [w and t is not None for t, w in zip(inputs, ctx.needs_input_grad[1:4], strict=True)]
    conv = masked_conv(*inputs, ctx.mask)
    chosen = [t for t, w in zip(inputs, wanted, strict=True) if w]
    found = iter(torch.autograd.grad(conv, chosen, grad, create_graph=True))
    return [next(found) if w else None for w in wanted]


class _Rows:
    """(B, H, n, d) values as the channels-last input (B, C, n, 1) of the C = H·d channel
    convolution, which is their (B, n, H, d) memory as the projections leave it, read a block
    of samples and positions at a time (:meth:`blocks`), each with k // 2 positions either
    side. Padding (``mask`` False) is zeroed before and after the convolution.
    """

    # Values per block: about 2 MiB of float32.
    block_elements = 1 << 19

    def __init__(self, value: Tensor, mask: Tensor | None, kernel_size: int) -> None:
        self.value = value.transpose(1, 2)  # (B, n, H, d)
        self.mask, self.half = mask, kernel_size // 2
        self.batch, self.n, self.heads, self.d = self.value.shape

    def channel_weights(
        self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor | None]:
        """(H, 1, k, 1) and (H,) as the (C, 1, k, 1) and (C,) of the C-channel convolution."""
        weight = weight.repeat_interleave(self.d, 0).to(dtype)
        return weight, None if bias is None else bias.repeat_interleave(self.d).to(dtype)

    def blocks(self):
        """(samples, start, stop) of each block: a slice of the batch and positions
        [start, stop), about ``block_elements`` values. A block spans at least four kernel
        lengths of positions, so that the halo read on either side (k // 2 positions) adds at
        most about a quarter, and as many samples as then fit."""
        width, span = self.heads * self.d, 2 * self.half + 1
        step = max(self.block_elements // max(1, self.batch * width), 4 * span)  # B = 0: no block
        samples = max(1, self.block_elements // (width * (min(step, self.n) + span)))
        for first in range(0, self.batch, samples):
            for start in range(0, self.n, step):
                yield slice(first, first + samples), start, min(start + step, self.n)

    def _piece(self, samples: slice, lo: int | None, hi: int | None) -> Tensor:
        """Positions [lo, hi) of the samples as (B', C, L, 1) channels-last, padding zeroed
        (None: from the first / to the last)."""
        piece = self.value[samples, lo:hi].flatten(2)  # (B', L, C)
        if self.mask is not None:
            piece = piece * self.mask[samples, lo:hi, None].to(piece.dtype)
        return piece.unsqueeze(2).permute(0, 3, 1, 2)

    def rows(self, samples: slice, start: int, stop: int, halo: int = 0) -> Tensor:
        """Positions [start - halo, stop + halo) of the samples as (B', C, L, 1)
        channels-last, padding zeroed, and zeros beyond the sequence's ends."""
        lo, hi = max(start - halo, 0), min(stop + halo, self.n)
        before, after = halo - (start - lo), halo - (hi - stop)
        piece = self._piece(samples, lo, hi)
        return F.pad(piece, (0, 0, before, after)) if before or after else piece

    def whole(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution at every position of every sample as one block, (B, n, H, d), zero
        at padding. No position arithmetic on n (the convolution's own zero padding serves
        both ends), so that torch.export can keep the length symbolic."""
        y = F.conv2d(
            self._piece(slice(None), None, None), weight, bias, padding=(self.half, 0),
            groups=weight.shape[0],
        )  # fmt: skip
        return self._finish(y, slice(None), slice(None))

    def conv(
        self, weight: Tensor, bias: Tensor | None, samples: slice, start: int, stop: int
    ) -> Tensor:
        """The convolution at positions [start, stop) of the samples, (B', L, H, d), zero at
        padding."""
        # Inside the sequence a block reads k // 2 real positions on either side; at its ends
        # the convolution's own zero padding stands for what lies beyond (the outputs it adds
        # next to an inner edge are cut off).
        lo, hi = start - self.half, stop + self.half
        padding = 0 if lo >= 0 and hi <= self.n else self.half
        if padding:
            lo, hi = max(lo, 0), min(hi, self.n)
        y = F.conv2d(
            self._piece(samples, lo, hi), weight, bias, padding=(padding, 0),
            groups=weight.shape[0],
        )  # fmt: skip
        first = start - lo - self.half + padding
        return self._finish(y[:, :, first : first + stop - start], samples, slice(start, stop))

    def _finish(self, y: Tensor, samples: slice, positions: slice) -> Tensor:
        """(B', C, L, 1) convolution output → (B', L, H, d), padding zeroed."""
        y = y.squeeze(3).transpose(1, 2)
        if self.mask is not None:
            y = y * self.mask[samples, positions, None].to(y.dtype)
        return y.unflatten(-1, (self.heads, self.d))


def sequence_conv(value: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The skip's convolution (:class:`~nystromer.attention.ValueConv`): each head's k taps
    slide along the sequence, shared by the head's d features.

    Equals ``F.conv2d(value, weight, bias, padding=(k // 2, 0), groups=H)``, computed as the
    depthwise convolution over H·d channels in channels-last layout (see ``_Rows``),
    which the CPU runs several times faster than torch's H-channel form (docs/design.md).

    Args:
        value: (B, H, n, d).
        weight: (H, 1, k, 1), k odd.
        bias: (H,) or None.

    Returns:
        (B, H, n, d).
    """
    return masked_conv(value, weight, bias, None)

"""CPU-specific speed-ups of :mod:`nystromer.functional`, behind named calls.

Each function here computes exactly what a plain expression in ``functional`` computes (the
definition), only faster on the CPU; ``functional`` calls it where :func:`applies` says so and
runs the plain expression everywhere else. What each one buys, measured, is in docs/design.md
("CPU speed-ups").

Most of the gain is memory that is *not* freshly allocated: on the CPU the first touch of each
fresh page costs more than the arithmetic done on it, so writing a gradient in place, or
reusing one small block, beats writing a new full-size tensor.

Some calls here serve every device: :func:`sum_rows` saves memory, not time;
:func:`reads_are_cheap` says where reading a value to pick the faster branch costs nothing, and
:func:`transformed` / :func:`capturing` where a speed-up or such a branch must not be taken.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.autograd import forward_ad

# Elements per block of the blocked loops below: large enough that the Python loop costs
# little, small enough that the temporary is reused memory rather than fresh pages.
_GATHER_BLOCK = 1 << 20


_enabled = True


def applies(x: Tensor) -> bool:
    """Whether the speed-ups of this module are used for ``x``: on the CPU, unless
    :func:`plain` switched them off or a transform is active (:func:`transformed`)."""
    return _enabled and x.device.type == "cpu" and not transformed()


def transformed() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, jvp, ...), forward-mode AD or
    a graph capture that records one Python run (``torch.jit.trace``, ``torch.export``) is
    active. The autograd nodes here (and the convolution skip's) define no vmap rule and no
    jvp, and export cannot size their results; a capture would also bake a branch chosen by
    reading a value (:func:`reads_are_cheap`) into the graph. So under any of them the plain
    definition runs, as it does off the CPU."""
    # (forward_ad's level is -1 outside every ``dual_level`` block.)
    return (
        torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0 or capturing()
    )


def capturing() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.export`` is recording: the graph they keep is
    replayed for inputs of other lengths and values."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


@contextlib.contextmanager
def plain() -> Iterator[None]:
    """Run ``functional`` without these speed-ups (the plain definition) inside the block:
    what the benchmarks' ``nystromer-plain`` measures, so that each speed-up's gain stays
    measurable with a shipped command."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def reads_are_cheap(x: Tensor) -> bool:
    """Whether the host may read one of x's values (``bool()``, ``.item()``) to pick a
    faster branch: on the CPU, eagerly. On a GPU that waits for all queued work, and
    torch.compile cannot trace it, nor vmap a batched value, and a trace would keep the
    branch for every later input."""
    return x.device.type == "cpu" and not (torch.compiler.is_compiling() or transformed())


def drop_all_real(mask: Tensor) -> Tensor | None:
    """None for a key mask (True = real) that masks nothing, where :func:`reads_are_cheap`:
    the unmasked path is faster. ``mask`` itself elsewhere: the masked path gives the same
    result without waiting for the device."""
    return None if reads_are_cheap(mask) and bool(mask.all()) else mask


def _token_rows(x: Tensor) -> bool:
    """Whether each token's H·d features of (B, H, n, d) x are one contiguous row, as in
    :func:`_head_split` or in q, k or v split from a joint (B, n, 3·H·d) projection."""
    b, h, n, d = x.shape
    return (
        (d == 1 or x.stride(3) == 1)
        and (h == 1 or x.stride(1) == d)
        and (b == 1 or x.stride(0) == n * x.stride(2))
    )


def _head_split(x: Tensor) -> bool:
    """(B, n, H, d) memory viewed as (B, H, n, d), as a projection followed by a head split
    gives: whole tokens (rows of H·d features) are then contiguous."""
    return x.transpose(1, 2).is_contiguous()


# --- landmark means ---------------------------------------------------------------------------


def segment_means(x: Tensor, index: Tensor, counts: Tensor | None, m: int, dtype) -> Tensor:
    """:func:`nystromer.functional.segment_means` by ``index_add_`` over rows (the CPU's
    scatter is slower), over whole tokens for head-split inputs."""
    b, h, n, d = x.shape
    if counts is None and n % m == 0:
        # Equal segments: as functional.segment_means (a view and a mean).
        return x.reshape(b, h, m, n // m, d).mean(3, dtype=dtype)
    if _token_rows(x):
        # Whole tokens: H times fewer, longer rows than one per (token, head), which index_add_
        # handles several times faster, and no copy of x into (B, H, n, d) order.
        sums = x.new_zeros(b * (m + 1), h * d, dtype=dtype)
        tokens = x.transpose(1, 2).reshape(b * n, h * d)
        slots = _token_slots(index, b, n, m)
        # A block of rows at a time: index_add_ copies a strided source (q or k inside the
        # (B, n, 3·H·d) output of a joint projection) whole before adding it.
        rows = max(1, _GATHER_BLOCK // (h * d))
        for s in range(0, b * n, rows):
            sums.index_add_(0, slots[s : s + rows], tokens[s : s + rows].to(dtype))
        sums = sums.view(b, m + 1, h, d).transpose(1, 2)[:, :, :m]
    else:
        # Rows of d features: each (sample, head) gets its own m + 1 slots.
        rows = torch.arange(b * h, device=x.device).view(b, h, 1) * (m + 1)
        slots = rows + index.view(-1 if counts is not None else 1, 1, n)
        sums = x.new_zeros(b * h * (m + 1), d, dtype=dtype)
        sums.index_add_(0, slots.reshape(-1), x.reshape(-1, d).to(dtype))
        sums = sums.view(b, h, m + 1, d)[:, :, :m]
    return sums / segment_sizes(index, counts, m, dtype).view(-1, 1, m, 1)


def shared_segment_means(
    x: Tensor, index: Tensor, counts: Tensor | None, m: int, dtype
) -> tuple[Tensor, Tensor]:
    """``(x, segment_means(x, ...))`` as one autograd node whose backward adds the means'
    gradient in place into x's other gradient, instead of autograd summing them into a third
    full-size tensor.

    Not under torch.compile: there x and its means come from the plain calls. Dynamo traces
    the node's backward with the forward's outputs standing in for the gradients, so the in
    place add wrote into the view of x returned by the forward; with one tensor as both q and
    k (``nystrom_attention(q, q, q)``) the second node's trace thereby modified x under the
    first node's view, which autograd then refused. Compiled, the in place add is not needed:
    AOT autograd makes the traced backward out of place anyway (functionalization), and the
    compiler chooses its memory itself.
    """
    if torch.compiler.is_compiling():
        return x, segment_means(x, index, counts, m, dtype)
    return _SharedSegmentMeans.apply(x, index, counts, m, dtype)


def segment_sizes(index: Tensor, counts: Tensor | None, m: int, dtype) -> Tensor:
    """(1 or B, m) tokens per segment, at least 1 (an empty segment's mean is then 0): the
    divisor of every segment mean, on any device (here, where both the plain and the CPU
    means can reach it)."""
    if counts is None:
        # Counted into m + 1 slots on the device: bincount's result has a size read from the
        # data, which needs a host read and which torch.compile cannot know.
        counts = torch.zeros(1, m + 1, dtype=torch.long, device=index.device)
        counts.scatter_add_(1, index.view(1, -1), torch.ones_like(index).view(1, -1))
    return counts[:, :m].clamp_min(1).to(dtype)


def _token_slots(index: Tensor, b: int, n: int, m: int) -> Tensor:
    """(B·n,) row of each token in a (B·(m + 1), H·d) table that gives every sample m + 1
    segment slots (the last for padding), from a (B, n) or (n,) segment ``index``."""
    first = torch.arange(b, device=index.device).view(b, 1) * (m + 1)
    return (first + index.view(-1, n)).reshape(-1)


class _SharedSegmentMeans(torch.autograd.Function):
    """See :func:`shared_segment_means`. In place only into a dense gradient that nothing else
    can see: not under ``create_graph`` and not into an expanded or overlapping tensor (e.g.
    the broadcast one of ``out.sum().backward()``); otherwise out of place."""

    @staticmethod
    def forward(ctx, x, index, counts, m: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        n = x.shape[2]
        ctx.shape, ctx.m, ctx.x_dtype = x.shape, m, x.dtype
        ctx.layout = torch.empty_like(x, device="meta").stride()
        ctx.equal = counts is None and n % m == 0
        if not ctx.equal:
            ctx.save_for_backward(index, segment_sizes(index, counts, m, dtype))
        return x.view_as(x), segment_means(x, index, counts, m, dtype)

    @staticmethod
    def backward(ctx, grad_x: Tensor | None, grad_means: Tensor | None):
        none = (None,) * 4
        if grad_means is None:
            return grad_x, *none
        writable = grad_x is not None and not (
            torch.is_grad_enabled()
            or grad_x.dtype != ctx.x_dtype
            or not (grad_x.is_contiguous() or _head_split(grad_x))
        )
        if writable:
            into = grad_x
        else:
            into = torch.empty_strided(
                ctx.shape, ctx.layout, dtype=ctx.x_dtype, device=grad_means.device
            )
        if ctx.equal:
            b, h, n, d = ctx.shape
            m = ctx.m
            spread = (grad_means / (n // m)).to(ctx.x_dtype).unsqueeze(3).expand(b, h, m, -1, d)
            # Splitting n into (m, n // m) is a view for any strides of a dense tensor.
            target = into.view(b, h, m, n // m, d)
            target.add_(spread) if writable else target.copy_(spread)
        else:
            if not writable:
                into.zero_()
            _add_segment_gradient(into, grad_means, *ctx.saved_tensors, ctx.m)
        if grad_x is not None and not writable:
            into = grad_x + into
        return into, *none


def _add_segment_gradient(into: Tensor, grad_means: Tensor, index, sizes, m: int) -> None:
    """Add to ``into`` (B, H, n, d) each token's share of its segment's gradient,
    ``grad_means[segment] / size`` (padding, segment m, gets nothing), a block of rows at a
    time so that no full-size temporary is allocated."""
    b, h, n, d = into.shape
    share = grad_means / sizes.view(-1, 1, m, 1)
    share = torch.cat([share, share.new_zeros(share.shape[0], h, 1, d)], 2).to(into.dtype)
    share = share.expand(b, h, m + 1, d)
    if _head_split(into):
        # Whole tokens gathered by one index per token, as in segment_means.
        tokens = share.transpose(1, 2).reshape(b * (m + 1), h * d)
        slots = _token_slots(index, b, n, m)
        flat = into.transpose(1, 2).view(b * n, h * d)
        rows = max(1, _GATHER_BLOCK // (h * d))
        for s in range(0, b * n, rows):
            flat[s : s + rows].add_(tokens.index_select(0, slots[s : s + rows]))
        return
    index = index.view(-1, 1, n, 1)
    rows = max(1, _GATHER_BLOCK // max(1, b * h * d))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        into[:, :, s:e].add_(share.gather(2, index[:, :, s:e].expand(b, h, e - s, d)))


# --- k-means ----------------------------------------------------------------------------------


def nearest(x: Tensor, c: Tensor) -> Tensor:
    """:func:`nystromer.functional._nearest` a sample and a block of rows at a time: ``bmm``
    takes a head-split sample at any stride (no copy of x), and a block of distances small
    enough to stay in cache reuses freed memory instead of faulting in fresh pages."""
    b, h, n, _ = x.shape
    m = c.shape[2]
    cc = (c * c).sum(-1).unsqueeze(2)  # (B, H, 1, m)
    rows = max(1, _GATHER_BLOCK // max(1, h * m))
    out = torch.empty(b, h, n, dtype=torch.long, device=x.device)
    for i in range(b):
        ct = c[i].transpose(1, 2)
        for s in range(0, n, rows):
            dist = torch.baddbmm(cc[i], x[i, :, s : s + rows], ct, alpha=-2.0)
            out[i, :, s : s + rows] = dist.argmin(-1)
    return out


# --- step 3: many queries over the m landmark keys ---------------------------------------------


def row_blocks(q: Tensor) -> int:
    """How many row blocks step 3 splits each sample's queries into, as extra batch entries.

    torch's CPU attention kernel shares (batch, head, row block) work among its threads in that
    order and writes its output in the queries' layout. With head-split queries and fewer
    samples than threads, threads then own different heads of the same rows, write the same
    fresh pages at the same time and fault on them together, which the kernel serves about
    twice. As B·c samples, B·c a multiple of the thread count, every thread owns whole rows.
    """
    if not applies(q) or torch.compiler.is_compiling():
        return 1
    b, h, n, _ = q.shape
    if h == 1 or not _head_split(q):
        return 1
    threads = torch.get_num_threads()
    c = threads // math.gcd(b, threads)
    return c if n % c == 0 else 1


def attention_by_row_blocks(attention: Callable[..., Tensor], q: Tensor, k, v, *args) -> Tensor:
    """``attention(q, k, v, key_mask, *rest)`` with q's rows split as :func:`row_blocks` says
    (a view of q; the output keeps the memory and strides it would have had)."""
    c = row_blocks(q)
    if c == 1:
        return attention(q, k, v, *args)
    b, h, n, d = q.shape
    key_mask, *rest = args

    def per_block(t: Tensor) -> Tensor:
        return t.unsqueeze(1).expand(b, c, *t.shape[1:]).reshape(b * c, *t.shape[1:])

    q_blocks = q.transpose(1, 2).reshape(b * c, n // c, h, d).transpose(1, 2)
    mask = None if key_mask is None else per_block(key_mask)
    out = attention(q_blocks, per_block(k), per_block(v), mask, *rest)
    return out.transpose(1, 2).reshape(b, n, h, -1).transpose(1, 2)


# --- memory -----------------------------------------------------------------------------------


def sum_rows(src: Tensor, index: Tensor, rows: int) -> Tensor:
    """``zeros(rows, d).index_add_(0, index, src)`` that keeps no copy of ``src`` for the
    backward (torch's index_add does). Memory, not speed: used on every device, except under
    a transform (:func:`transformed`)."""
    if transformed():
        return src.new_zeros(rows, src.shape[1]).index_add(0, index, src)
    return _SumRows.apply(src, index, rows)


class _SumRows(torch.autograd.Function):
    """``zeros(rows, d).index_add_(0, index, src)`` whose backward keeps only ``index``.

    torch's index_add keeps ``src`` for its backward: for k-means a copy of the queries or
    keys per layer alive until the backward pass. A sum's gradient needs only which row got
    what.
    """

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, rows: int) -> Tensor:
        ctx.save_for_backward(index)
        return src.new_zeros(rows, src.shape[1]).index_add_(0, index, src)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None

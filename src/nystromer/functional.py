"""Nyström attention as a pure function (the math; modules only own parameters).

The approximation of Xiong et al. (2021), softmax(QKᵀ·s)·V ≈ F·A⁺·(B·V) with
F = softmax(s·QK̃ᵀ), A = softmax(s·Q̃K̃ᵀ), B = softmax(s·Q̃Kᵀ), is evaluated as two
ordinary attention calls around an m×m pseudo-inverse (see DESIGN.md §2):

1. ``BV  = sdpa(Q̃, K, V)``  m landmark queries attend to all keys (key padding masked);
2. ``W   = A⁺ · BV``         m×m work, in at least float32;
3. ``out = sdpa(Q, K̃, W)``  every query attends to the m landmark keys.

``scaled_dot_product_attention`` never materialises the n×m kernels in its fused kernels, so
forward and backward need O(n·d) memory beyond the inputs.

Landmarks are the paper's segment means; ``kmeans_iterations`` > 0 refines them by Lloyd
(k-means) iterations started from those means (:func:`refine_landmarks`), which places them
where the queries and keys actually are rather than at fixed positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import check_nystrom_options

__all__ = [
    "nystrom_attention",
    "segment_means",
    "iterative_pinv",
    "refine_landmarks",
    "landmark_assignment",
    "check_nystrom_options",
]


def landmark_assignment(
    mask: Tensor | None, seq_len: int, num_landmarks: int, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Which landmark segment each position belongs to.

    The ``L`` real tokens of a sequence are split, in order, into ``num_landmarks`` contiguous
    segments whose sizes differ by at most one: the token of rank ``r`` among the real tokens
    goes to segment ``⌊r·m/L⌋``. Padding goes to an extra segment ``m`` that is discarded.

    Args:
        mask: (B, n) bool, True for real tokens, or None (all tokens real).
        seq_len: n.
        num_landmarks: m.

    Returns:
        ``(index, counts)``: index is (n,) int64 when ``mask`` is None, else (B, n); counts is
        None when ``mask`` is None (every segment is non-empty iff n ≥ m), else (B, m + 1) with
        the number of real tokens in each segment (the last entry counts padding).
    """
    m = num_landmarks
    if mask is None:
        pos = torch.arange(seq_len, device=device)
        return torch.div(pos * m, seq_len, rounding_mode="floor"), None
    real = mask.long()
    rank = real.cumsum(-1) - 1
    length = real.sum(-1, keepdim=True).clamp_min(1)
    index = torch.where(mask, torch.div(rank * m, length, rounding_mode="floor"), m)
    counts = torch.zeros(mask.shape[0], m + 1, dtype=torch.long, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return index, counts


def segment_means(
    x: Tensor, index: Tensor, counts: Tensor | None, num_landmarks: int, dtype: torch.dtype
) -> Tensor:
    """Means of ``x`` over the segments given by :func:`landmark_assignment`.

    Args:
        x: (B, H, n, d).
        index, counts: from :func:`landmark_assignment` for the same n and m.
        dtype: accumulation and result dtype (float32 or wider keeps bf16/fp16 means accurate).

    Returns:
        (B, H, m, d) segment means; an empty segment gives zeros.
    """
    b, h, n, d = x.shape
    m = num_landmarks
    if counts is None and n % m == 0:
        # The paper's equal segments: a reshape, no scatter.
        return _EqualSegmentMeans.apply(x, m, dtype)
    if x.transpose(1, 2).is_contiguous():
        # (B, n, H, d) in memory, as a projection followed by a head split gives: one
        # index_add_ over whole tokens (rows of H·d features), each sample with its own m + 1
        # slots. Rows of d features, one per head, make index_add_ several times slower
        # (benchmarks/against_commit.py 735c51d: the padded forward, with step 3's row split).
        sums = x.new_zeros(b * (m + 1), h * d, dtype=dtype)
        tokens = x.transpose(1, 2).reshape(b * n, h * d).to(dtype)
        sums.index_add_(0, _token_slots(index, b, n, m), tokens)
        sums = sums.view(b, m + 1, h, d).transpose(1, 2)[:, :, :m]
    else:
        # Rows of d features: each (sample, head) gets its own m + 1 slots.
        rows = torch.arange(b * h, device=x.device).view(b, h, 1) * (m + 1)
        slots = rows + index.view(-1 if counts is not None else 1, 1, n)
        sums = x.new_zeros(b * h * (m + 1), d, dtype=dtype)
        sums.index_add_(0, slots.reshape(-1), x.reshape(-1, d).to(dtype))
        sums = sums.view(b, h, m + 1, d)[:, :, :m]
    if counts is None:
        sizes = torch.bincount(index, minlength=m).to(dtype).view(1, 1, m, 1)
    else:
        sizes = counts[:, :m].clamp_min(1).to(dtype).view(b, 1, m, 1)
    return sums / sizes


def _token_slots(index: Tensor, b: int, n: int, m: int) -> Tensor:
    """(B·n,) row of each token in a (B·(m + 1), ·) table that gives every sample m + 1
    segment slots (the last for padding), from :func:`landmark_assignment`'s (B, n) or (n,)
    ``index``: the layout of head-split memory's whole tokens."""
    first = torch.arange(b, device=index.device).view(b, 1) * (m + 1)
    return (first + index.view(-1, n)).reshape(-1)


class _EqualSegmentMeans(torch.autograd.Function):
    """``x.reshape(B, H, m, n // m, d).mean(3)`` with a one-pass backward in x's layout.

    torch's mean backward divides an expanded gradient and copies it again for the reshape:
    two passes over an n·d tensor in fresh memory, in (B, H, n, d) order even when x is a
    head split of (B, n, H, d) memory, so that adding it to the attention gradient of x
    (in x's layout) is a strided pass and the sum may still need a layout copy. Here the
    gradient is written once, into memory laid out like x.
    """

    @staticmethod
    def forward(ctx, x: Tensor, m: int, dtype: torch.dtype) -> Tensor:
        b, h, n, d = x.shape
        ctx.shape, ctx.m = x.shape, m
        ctx.x_dtype = x.dtype
        # x's strides if x is dense, else contiguous ones (empty_like's rule); no data kept.
        ctx.layout = torch.empty_like(x, device="meta").stride()
        return x.reshape(b, h, m, n // m, d).mean(3, dtype=dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        b, h, n, d = ctx.shape
        m = ctx.m
        out = torch.empty_strided(ctx.shape, ctx.layout, dtype=ctx.x_dtype, device=grad.device)
        # Splitting n into (m, n // m) is a view for any strides of a dense (B, H, n, d) tensor.
        out.view(b, h, m, n // m, d).copy_(
            (grad / (n // m)).unsqueeze(3).expand(b, h, m, n // m, d)
        )
        return out, None, None


class _SumRows(torch.autograd.Function):
    """``zeros(rows, d).index_add_(0, index, src)`` whose backward keeps only ``index``.

    torch's index_add keeps ``src`` for its backward: for k-means that is a copy of the
    queries or keys per layer, alive until the backward pass (28 MiB per layer of a 12-head
    model at 8,192 tokens). The gradient of a sum over rows needs only which row got what.
    """

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, rows: int) -> Tensor:
        ctx.save_for_backward(index)
        return src.new_zeros(rows, src.shape[1]).index_add_(0, index, src)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class _SharedSegmentMeans(torch.autograd.Function):
    """``(x, segment_means(x, index, counts, m, dtype))`` as one node: x passes through, and
    the backward adds the means' gradient in place into the gradient that arrives for x.

    Autograd would otherwise sum the two gradients of x (the attention's and the means')
    out of place: a third n·d tensor in fresh memory, besides the means' own full-size
    gradient. Fresh memory is not free on CPU: the first touch of each page costs more than
    the arithmetic (a 32 MiB gradient: ~12 ms of page faults against ~1 ms to add it).
    """

    @staticmethod
    def forward(ctx, x, index, counts, m: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        n = x.shape[2]
        ctx.shape, ctx.m, ctx.x_dtype = x.shape, m, x.dtype
        # x's strides if x is dense, else contiguous ones (empty_like's rule); no data kept.
        ctx.layout = torch.empty_like(x, device="meta").stride()
        ctx.equal = counts is None and n % m == 0
        if not ctx.equal:
            sizes = torch.bincount(index, minlength=m) if counts is None else counts[:, :m]
            ctx.save_for_backward(index, sizes)
        return x.view_as(x), segment_means(x, index, counts, m, dtype)

    @staticmethod
    def backward(ctx, grad_x: Tensor | None, grad_means: Tensor | None):
        none = (None,) * 4
        if grad_means is None:
            return grad_x, *none
        # In place only into a dense gradient that nothing else can see: not under
        # create_graph (the gradient is then part of a graph) and not into an expanded or
        # overlapping tensor (e.g. the broadcast ones of ``out.sum().backward()``).
        writable = grad_x is not None and not (
            torch.is_grad_enabled()
            or grad_x.dtype != ctx.x_dtype
            or not (grad_x.is_contiguous() or grad_x.transpose(1, 2).is_contiguous())
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
            spread = (grad_means / (n // m)).to(ctx.x_dtype).unsqueeze(3)
            spread = spread.expand(b, h, m, n // m, d)
            # Splitting n into (m, n // m) is a view for any strides of a dense tensor.
            if writable:
                into.view(b, h, m, n // m, d).add_(spread)
            else:
                into.view(b, h, m, n // m, d).copy_(spread)
        else:
            if not writable:
                into.zero_()
            _add_segment_gradient(into, grad_means, *ctx.saved_tensors, ctx.m)
        if grad_x is not None and not writable:
            into = grad_x + into
        return into, *none


# Elements per block of _add_segment_gradient's gathers and of _nearest's distances: large
# enough that the loop costs little, small enough that the temporary is reused memory rather
# than fresh pages.
_GATHER_BLOCK = 1 << 20


def _add_segment_gradient(into: Tensor, grad_means: Tensor, index, sizes, m: int) -> None:
    """Add to ``into`` (B, H, n, d) each token's share of its segment's gradient,
    ``grad_means[segment] / size``; padding (segment m) gets nothing. A block of rows at a
    time, so that no full-size temporary is allocated."""
    b, h, n, d = into.shape
    share = grad_means / sizes.clamp_min(1).to(grad_means.dtype).view(-1, 1, m, 1)
    share = torch.cat([share, share.new_zeros(share.shape[0], h, 1, d)], 2).to(into.dtype)
    share = share.expand(b, h, m + 1, d)
    if into.transpose(1, 2).is_contiguous():
        # Head-split memory: whole tokens (rows of H·d) gathered by one index per token, as
        # in segment_means.
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


def _nearest(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest of the (B, H, m, d) centres ``c`` for each of the (B, H, n, d)
    tokens ``x``: (B, H, n) int64. argmin ‖x − c‖² = argmin (‖c‖² − 2·x·c), one (n × m)
    product per head, computed sample by sample: bmm takes each sample's heads at any
    stride (no copy of a head-split x). On the CPU the distances are computed a block of rows
    at a time, small enough to stay in cache and to reuse freed memory: all of one sample's
    n×m distances are fresh pages once they pass glibc's 32 MiB mapping limit (12 heads of
    32, m = 64, 3 iterations: the forward 312 → 201 ms at n = 16,384, 139 → 118 at 8,192 by
    benchmarks/against_commit.py against the code before)."""
    b, h, n, _ = x.shape
    m = c.shape[2]
    cc = (c * c).sum(-1).unsqueeze(2)  # (B, H, 1, m)
    rows = n if x.device.type != "cpu" else max(1, _GATHER_BLOCK // max(1, h * m))
    out = torch.empty(b, h, n, dtype=torch.long, device=x.device)
    for i in range(b):
        ct = c[i].transpose(1, 2)
        for s in range(0, n, rows):
            dist = torch.baddbmm(cc[i], x[i, :, s : s + rows], ct, alpha=-2.0)
            out[i, :, s : s + rows] = dist.argmin(-1)
    return out


def refine_landmarks(x: Tensor, landmarks: Tensor, valid: Tensor | None, iterations: int) -> Tensor:
    """Lloyd (k-means) iterations on each head's tokens, started from ``landmarks``.

    Each iteration assigns every real token to its nearest landmark (Euclidean) and moves each
    landmark to the mean of its tokens; a landmark that gets no token stays where it was. The
    assignment is a constant for autograd: gradients flow through the means.

    Args:
        x: (B, H, n, d) queries or keys.
        landmarks: (B, H, m, d) starting points (the segment means), in the working dtype.
        valid: (B, n) bool, True for real tokens, or None (all real). Padding never moves a
            landmark, so the result does not depend on padding.
        iterations: number of Lloyd iterations (0 returns ``landmarks``).

    Returns:
        (B, H, m, d) landmarks in the dtype of ``landmarks``.
    """
    b, h, n, d = x.shape
    m = landmarks.shape[2]
    if iterations == 0:
        return landmarks
    xw = x.to(landmarks.dtype)
    # Each (sample, head) owns m + 1 rows of the sums; row m collects padding and is dropped.
    rows = (torch.arange(b * h, device=x.device) * (m + 1)).view(b, h, 1)
    if xw.transpose(1, 2).is_contiguous():
        # (B, n, H, d) in memory, as a projection followed by a head split gives: the tokens
        # are summed in that order (no copy of x), with the indices laid out to match.
        src, order = xw.transpose(1, 2).reshape(b * n * h, d), (lambda t: t.transpose(1, 2))
    else:
        src, order = xw.reshape(b * h * n, d), (lambda t: t)
    ones = xw.new_ones(b * h * n)
    c = landmarks
    for _ in range(iterations):
        with torch.no_grad():
            assign = _nearest(xw, c)
            if valid is not None:
                assign = assign.masked_fill(~valid[:, None, :], m)
            index = order(rows + assign).reshape(-1)
            counts = xw.new_zeros(b * h * (m + 1)).index_add_(0, index, ones)
            counts = counts.view(b, h, m + 1, 1)[:, :, :m]
        sums = _SumRows.apply(src, index, b * h * (m + 1))
        means = sums.view(b, h, m + 1, d)[:, :, :m] / counts.clamp_min(1)
        c = torch.where(counts > 0, means, c)
    return c


def iterative_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    """Approximate Moore–Penrose pseudo-inverse by the iteration of Razavi et al. (2014).

    ``Z₀ = Aᵀ / (‖A‖₁·‖A‖∞)``, scaled per matrix (so one sample never affects another), then
    ``Z ← ¼·Z·(13I − AZ·(15I − AZ·(7I − AZ)))``. A few iterations regularise the
    ill-conditioned landmark kernel; many approach the exact pseudo-inverse, which is worse.

    Args:
        a: (..., m, m).
        iterations: number of updates (≥ 0); 0 returns Z₀.

    Returns:
        (..., m, m), same dtype as ``a``.
    """
    absa = a.abs()
    norm_1 = absa.sum(-2).amax(-1)  # largest column sum
    norm_inf = absa.sum(-1).amax(-1)  # largest row sum
    denom = (norm_1 * norm_inf).clamp_min(torch.finfo(a.dtype).tiny)
    z = a.transpose(-1, -2) / denom[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        t = 7 * eye - az
        t = 15 * eye - az @ t
        t = 13 * eye - az @ t
        z = 0.25 * (z @ t)
    return z


def _check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    query_mask: Tensor | None,
    num_landmarks: int,
    pinv_iterations: int,
    dropout_p: float,
    kmeans_iterations: int,
) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (batch, heads, seq_len, features), "
                f"got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}"
        )
    b, h, _, d = query.shape
    if key.shape[:2] != (b, h) or key.shape[-1] != d:
        raise ValueError(
            f"key must have shape ({b}, {h}, n_k, {d}) to match query {tuple(query.shape)}, "
            f"got {tuple(key.shape)}"
        )
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"value must have shape ({b}, {h}, {key.shape[2]}, d_v) to match key "
            f"{tuple(key.shape)}, got {tuple(value.shape)}"
        )
    for name, mk, n in (("mask", mask, key.shape[2]), ("query_mask", query_mask, query.shape[2])):
        if mk is None:
            continue
        if not isinstance(mk, Tensor) or mk.dtype != torch.bool:
            got = mk.dtype if isinstance(mk, Tensor) else type(mk).__name__
            raise TypeError(f"{name} must be a bool tensor (True = real token), got {got}")
        if tuple(mk.shape) != (b, n):
            raise ValueError(f"{name} must have shape ({b}, {n}), got {tuple(mk.shape)}")
    check_nystrom_options(num_landmarks, pinv_iterations, kmeans_iterations=kmeans_iterations)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _exact(q, k, v, key_mask, scale, dropout_p):
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
    )


def _row_chunks(q: Tensor) -> int:
    """How many row blocks step 3 splits each sample's queries into, as extra batch entries.

    torch's CPU attention kernel shares (batch, head, row block) work among its threads in that
    order and writes its output in the queries' layout. With the model's head-split layout
    ((B, n, H, d) memory viewed as (B, H, n, d)) and fewer samples than threads, threads then
    own different heads of the same rows: they write the same pages of the fresh output at the
    same time and fault on them together, which the kernel counts and serves about twice
    (n = 16,384, B = 1, 8 heads, 2 threads: 15,700 page faults for the 8,192 pages). As B·c
    samples, B·c a multiple of the thread count, every thread owns whole rows. The split is a
    view of q, and the output keeps the memory and strides it would have had.
    """
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        return 1
    b, h, n, _ = q.shape
    if h == 1 or not q.transpose(1, 2).is_contiguous():
        return 1
    threads = torch.get_num_threads()
    c = threads // math.gcd(b, threads)
    return c if n % c == 0 else 1


def _exact_rows(q, k, v, key_mask, scale, dropout_p):
    """:func:`_exact` for many queries over few keys (step 3), split as :func:`_row_chunks` says."""
    c = _row_chunks(q)
    if c == 1:
        return _exact(q, k, v, key_mask, scale, dropout_p)
    b, h, n, d = q.shape

    def per_block(t: Tensor) -> Tensor:
        return t.unsqueeze(1).expand(b, c, *t.shape[1:]).reshape(b * c, *t.shape[1:])

    q_blocks = q.transpose(1, 2).reshape(b * c, n // c, h, d).transpose(1, 2)
    mask = None if key_mask is None else per_block(key_mask)
    out = _exact(q_blocks, per_block(k), per_block(v), mask, scale, dropout_p)
    return out.transpose(1, 2).reshape(b, n, h, -1).transpose(1, 2)


def nystrom_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    num_landmarks: int = 64,
    mask: Tensor | None = None,
    pinv_iterations: int = 6,
    scale: float | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    query_mask: Tensor | None = None,
    kmeans_iterations: int = 0,
) -> Tensor:
    """Nyström approximation of softmax attention, in O(n·m·d) time and O(n·d) memory.

    Shapes follow :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query: (B, H, n_q, d).
        key: (B, H, n_k, d).
        value: (B, H, n_k, d_v).
        num_landmarks: m, the number of landmarks (segment means) summarising queries and keys.
            A sequence with at most m real keys, or a query with at most m positions, gets exact
            softmax attention (which then costs no more than the approximation).
        mask: (B, n_k) bool, True for real key tokens, False for padding; None means no padding.
            Padding never enters a landmark or an attention weight. When n_q == n_k (self-
            attention) it is also the query mask unless ``query_mask`` is given.
        pinv_iterations: iterations of the pseudo-inverse (6 in the paper; 0 uses its initial
            guess). More is not better: a few iterations regularise.
        scale: factor on QKᵀ; defaults to 1/√d.
        dropout_p: dropout probability on the attention weights of queries to landmarks.
        is_causal: must be False: landmarks average over the whole sequence and would leak
            future tokens into every position.
        query_mask: (B, n_q) bool, True for real queries. Padded queries do not shape the query
            landmarks and their outputs are zero. Defaults to ``mask`` when n_q == n_k, else to
            all queries real.
        kmeans_iterations: Lloyd (k-means) iterations that move the query and key landmarks
            from the segment means towards cluster centres of the real tokens of each head
            (:func:`refine_landmarks`); 0, the default, keeps the paper's segment means. Each
            iteration costs about one more n·m·d product for queries and one for keys; 2–3
            lower the error on pretrained models (a converted all-MiniLM-L6-v2: mean-pooled
            cosine to exact attention 0.906 → 0.931 at 512 tokens, m = 64, with 3).

    Returns:
        (B, H, n_q, d_v) in the dtype of ``query``. Rows of padded queries, and every row of a
        sample with no real key, are zero.
    """
    _check_inputs(
        query, key, value, mask, query_mask, num_landmarks, pinv_iterations, dropout_p,
        kmeans_iterations,
    )  # fmt: skip
    if is_causal:
        raise ValueError(
            "is_causal=True is not supported: Nyström landmarks are means over the whole "
            "sequence, so every position would see future tokens through them. Use exact "
            "attention (torch.nn.functional.scaled_dot_product_attention) for causal models."
        )
    b, h, n_q, d = query.shape
    n_k = key.shape[2]
    m = num_landmarks
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if query_mask is None and mask is not None and n_q == n_k:
        query_mask = mask

    # A sample without any real key attends to everything (to stay finite) and is zeroed below.
    empty = None
    if mask is not None:
        empty = ~mask.any(-1)
        mask = mask | empty[:, None]

    if n_k <= m or n_q <= m:
        # Exact attention costs n_q·n_k ≤ m·max(n_q, n_k): no cheaper approximation exists.
        out = _exact(query, key, value, mask, scale, dropout_p)
    else:
        out = _nystrom(
            query, key, value, mask, query_mask, m, pinv_iterations, scale, dropout_p,
            kmeans_iterations,
        )  # fmt: skip

    # One multiply zeroes padded queries and samples without a real key.
    keep = None
    if query_mask is not None:
        keep = query_mask if empty is None else query_mask & ~empty[:, None]
    elif empty is not None:
        keep = (~empty)[:, None].expand(b, n_q)
    if keep is not None:
        keep = keep[:, None, :, None].to(out.dtype)
        # In place when autograd does not need the SDPA output: saves writing a new n·d tensor.
        out = out * keep if out.requires_grad else out.mul_(keep)
    return out


def _nystrom(
    query, key, value, mask, query_mask, m, pinv_iterations, scale, dropout_p, kmeans_iterations
):
    b, h, n_q, _ = query.shape
    n_k = key.shape[2]
    # The m×m part (and the landmark means) run in at least float32.
    work = torch.promote_types(query.dtype, torch.float32)

    q_index, q_counts = landmark_assignment(query_mask, n_q, m, query.device)
    k_index, k_counts = landmark_assignment(mask, n_k, m, key.device)
    if kmeans_iterations:
        q_land = segment_means(query, q_index, q_counts, m, work)
        k_land = segment_means(key, k_index, k_counts, m, work)
        q_land = _refined(query, q_land, query_mask, q_counts, m, kmeans_iterations)
        k_land = _refined(key, k_land, mask, k_counts, m, kmeans_iterations)
    else:
        # q and k have exactly two uses, their means and one attention call: one node each.
        query, q_land = _SharedSegmentMeans.apply(query, q_index, q_counts, m, work)
        key, k_land = _SharedSegmentMeans.apply(key, k_index, k_counts, m, work)

    # 1. BV = softmax(s·Q̃Kᵀ)·V: m landmark queries over all (real) keys.
    bv = _exact(q_land.to(query.dtype), key, value, mask, scale, 0.0)
    # 2. W = A⁺·BV, with A = softmax(s·Q̃K̃ᵀ) and its pseudo-inverse in `work` precision.
    logits = (q_land @ k_land.transpose(-1, -2)) * scale
    # Landmark keys need masking only if a sample has an empty segment (L ≤ m real keys);
    # outside torch.compile we look, because an unmasked SDPA is faster.
    k_nonempty = None
    if k_counts is not None:
        short = k_counts[:, :m].sum(-1) <= m
        if torch.compiler.is_compiling() or bool(short.any()):
            k_nonempty = k_counts[:, :m] > 0
            logits = logits.masked_fill(~k_nonempty[:, None, None, :], float("-inf"))
    kernel = torch.softmax(logits, dim=-1)
    if q_counts is not None:
        # An empty query segment is no landmark: its row must not enter the pseudo-inverse.
        kernel = kernel * (q_counts[:, :m] > 0)[:, None, :, None].to(work)
    w = iterative_pinv(kernel, pinv_iterations) @ bv.to(work)

    if k_nonempty is not None:
        # With L ≤ m real keys each one is its own segment, so K̃ holds the real keys
        # themselves; with their values as W, step 3 is exact softmax attention.
        v_land = segment_means(value, k_index, k_counts, m, work)
        w = torch.where(short[:, None, None, None], v_land, w)

    # 3. out = softmax(s·QK̃ᵀ)·W: every query over the m landmark keys.
    return _exact_rows(
        query, k_land.to(query.dtype), w.to(query.dtype), k_nonempty, scale, dropout_p
    )


def _refined(x, land, valid, counts, m, iterations):
    refined = refine_landmarks(x, land, valid, iterations)
    if counts is None:
        return refined
    # A sample with at most m real tokens keeps its segments (one token each): the exact-
    # attention path below, and the empty-segment masks, rely on them.
    short = counts[:, :m].sum(-1) <= m
    return torch.where(short[:, None, None, None], land, refined)

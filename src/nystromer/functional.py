"""Nyström attention as a pure function (the math; modules only own parameters).

The approximation of Xiong et al. (2021), softmax(s·QKᵀ)·V ≈ F·A⁺·(B·V) with
F = softmax(s·QK̃ᵀ), A = softmax(s·Q̃K̃ᵀ), B = softmax(s·Q̃Kᵀ) and landmarks Q̃, K̃ (m segment
means of the queries and keys), is evaluated as two ordinary attention calls around an m×m
pseudo-inverse (docs/design.md, "The fast formulation"):

1. ``BV  = sdpa(Q̃, K, V)``  m landmark queries attend to all keys (key padding masked);
2. ``W   = A⁺ · BV``         m×m work, in at least float32;
3. ``out = sdpa(Q, K̃, W)``  every query attends to the m landmark keys.

``scaled_dot_product_attention`` never materialises the n×m kernels in its fused kernels, so
forward and backward need O(n·d) memory beyond the inputs.

Landmarks are the paper's segment means; ``kmeans_iterations`` > 0 refines them by Lloyd
(k-means) iterations started from those means (:func:`refine_landmarks`).

The code below is the definition. On the CPU a few steps run faster equivalents from
:mod:`nystromer._cpu` (named where they are called); :mod:`nystromer.reference` holds the
plain float64 formula the tests hold this code to.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import _cpu
from ._checks import (
    check_int_at_least,
    check_probability,
    check_scale,
    check_shape,
    check_token_mask,
)
from ._sdpa import sdpa
from ._torchutil import without_autocast
from .options import check_nystrom_options

__all__ = [
    "nystrom_attention",
    "attention_rows",
    "segment_means",
    "iterative_pinv",
    "refine_landmarks",
    "landmark_assignment",
    "check_nystrom_options",
    "softmax_attention",
]


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
            A sample with at most m real keys, or at most m real queries, gets exact softmax
            attention (which then costs no more than the approximation).
        mask: (B, n_k) bool, True for real key tokens, False for padding; None means no padding.
            Padding never enters a landmark or an attention weight. When n_q == n_k (self-
            attention) it is also the query mask unless ``query_mask`` is given.
        pinv_iterations: iterations of the pseudo-inverse (6 in the paper; 0 uses its initial
            guess). More is not better: a few iterations regularise.
        scale: factor on QKᵀ, a finite number; defaults to 1/√d.
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
            lower the error on pretrained models (docs/design.md, "k-means landmarks").

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
    # A torch.jit.trace graph is replayed at other lengths, an export may be for any length:
    # the masked path (segments by rank, exact rows for at most m real keys) serves every
    # n without a Python branch on it, so it is taken there, with every key real.
    captured = _cpu.capturing()
    if captured and mask is None:
        mask = torch.ones(b, n_k, dtype=torch.bool, device=key.device)
    if captured and query_mask is None and n_q != n_k:
        query_mask = torch.ones(b, n_q, dtype=torch.bool, device=query.device)
    # Whether the query mask is the key mask (the same tensor, or none given: _defaults then
    # takes the key mask in self-attention, and cross-attention has no query padding). Then a
    # sample with at most m real queries also has at most m real keys and is exact already.
    query_mask_is_key_mask = query_mask is None or query_mask is mask
    scale, mask, query_mask, empty = _defaults(
        query.shape[2], query.shape[-1], key.shape[2], mask, query_mask, scale
    )

    # (captured first: a length comparison under export would guard the exported length.)
    if not captured and (n_k <= m or n_q <= m):
        # Exact attention costs n_q·n_k ≤ m·max(n_q, n_k): no cheaper approximation exists.
        out = softmax_attention(query, key, value, mask, scale, dropout_p)
    else:
        out = _nystrom(
            query, key, value, mask, query_mask, m, pinv_iterations, scale, dropout_p,
            kmeans_iterations, query_mask_is_key_mask,
        )  # fmt: skip

    # One multiply zeroes padded queries and samples without a real key.
    keep = _rows_to_keep(query_mask, empty, b, n_q)
    if keep is not None:
        keep = keep[:, None, :, None].to(out.dtype)
        # In place when autograd does not need the SDPA output: saves writing a new n·d tensor.
        out = out * keep if out.requires_grad else out.mul_(keep)
    return out


def _defaults(n_q: int, d: int, n_k: int, mask, query_mask, scale):
    """``(scale, mask, query_mask, empty)`` as both public functions use them: the 1/√d scale,
    the key mask as query mask in self-attention, and the (B,) samples without a real key,
    whose keys are all unmasked (to stay finite) so that their rows can be zeroed after."""
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        check_scale("scale", scale)
    if query_mask is None and mask is not None and n_q == n_k:
        query_mask = mask
    empty = None
    if mask is not None:
        empty = ~mask.any(-1)
        mask = mask | empty[:, None]
    return scale, mask, query_mask, empty


def _rows_to_keep(
    query_mask: Tensor | None, empty: Tensor | None, b: int, n_q: int
) -> Tensor | None:
    """(B, n_q) bool: the output rows that are not zeroed (real queries of samples with a real
    key), or None when every row is kept."""
    if query_mask is not None:
        return query_mask if empty is None else query_mask & ~empty[:, None]
    if empty is not None:
        return (~empty)[:, None].expand(b, n_q)
    return None


#: The pseudo-inverse's intermediate products are recomputed in the backward (not kept) from
#: this many bytes on; below it the recomputation's overhead outweighs the memory.
_RECOMPUTE_PINV_BYTES = 16 << 20


def _nystrom(
    query, key, value, mask, query_mask, m, pinv_iterations, scale, dropout_p, kmeans_iterations,
    query_mask_is_key_mask=True,
):  # fmt: skip
    """F·A⁺·(B·V) as two attention calls around the m×m pseudo-inverse (module docstring).
    ``query_mask_is_key_mask``: no sample has fewer real queries than real keys, so the exact
    rows of samples with at most m real queries are not looked for."""
    n_q, n_k = query.shape[2], key.shape[2]
    # The m×m part (and the landmark means) run in at least float32.
    work = torch.promote_types(query.dtype, torch.float32)

    # Landmarks Q̃, K̃: means of m contiguous segments of the real tokens (optionally refined).
    q_index, q_counts = landmark_assignment(query_mask, n_q, m, query.device)
    k_index, k_counts = landmark_assignment(mask, n_k, m, key.device)
    with without_autocast(query):  # (k-means distances are products)
        query, q_land = _landmarks(query, q_index, q_counts, query_mask, m, work, kmeans_iterations)
        key, k_land = _landmarks(key, k_index, k_counts, mask, m, work, kmeans_iterations)

    # 1. BV = softmax(s·Q̃Kᵀ)·V: m landmark queries over all (real) keys.
    bv = softmax_attention(q_land.to(query.dtype), key, value, mask, scale, 0.0)

    # 2. W = A⁺·BV, with A = softmax(s·Q̃K̃ᵀ) and its pseudo-inverse in `work` precision.
    # A sample with at most m real keys ("short") has empty key segments: those landmark keys
    # are masked, and the sample gets exact attention below.
    short = k_nonempty = None
    if k_counts is not None:
        short = k_counts[:, :m].sum(-1) <= m
        # Where looking at a value is free (the CPU, eagerly), skip the mask when no sample
        # needs it: unmasked attention is faster. Elsewhere always mask (no host sync).
        if not _cpu.reads_are_cheap(key) or bool(short.any()):
            k_nonempty = k_counts[:, :m] > 0
    with without_autocast(query):
        kernel = _landmark_kernel(q_land, k_land, k_nonempty, q_counts, scale)
        kept = 4 * pinv_iterations * kernel.numel() * kernel.element_size()
        if (
            kernel.requires_grad
            and kept >= _RECOMPUTE_PINV_BYTES
            and not torch.compiler.is_compiling()
        ):
            # Recomputed in the backward instead of keeping the iterations' 4·iterations m×m
            # products per head (their memory matters at large m; the recomputation costs one
            # more pseudo-inverse).
            a_pinv = checkpoint(iterative_pinv, kernel, pinv_iterations, use_reentrant=False)
        else:
            a_pinv = iterative_pinv(kernel, pinv_iterations)
        w = a_pinv @ bv.to(work)
    if k_nonempty is not None:
        # With L ≤ m real keys each one is its own segment, so K̃ holds the real keys
        # themselves; with their values as W, step 3 is exact softmax attention.
        v_land = _segment_means(value, k_index, k_counts, m, work)
        w = torch.where(short[:, None, None, None], v_land, w)

    # 3. out = softmax(s·QK̃ᵀ)·W: every query over the m landmark keys.
    k_land, w = k_land.to(query.dtype), w.to(query.dtype)
    if _cpu.applies(query):
        # CPU: threads own whole rows of the fresh output instead of sharing its pages.
        out = _cpu.attention_by_row_blocks(
            softmax_attention, query, k_land, w, k_nonempty, scale, dropout_p
        )
    else:
        out = softmax_attention(query, k_land, w, k_nonempty, scale, dropout_p)
    if q_counts is not None and not query_mask_is_key_mask:
        # A sample with at most m real queries gets exact attention, as its real queries alone
        # would (padding invariance): each real query is its own segment, so Q̃ holds the
        # queries themselves and step 1 computed their exact rows; copy them to the queries.
        q_short = q_counts[:, :m].sum(-1) <= m
        if not _cpu.reads_are_cheap(query) or bool(q_short.any()):
            exact = bv
            if dropout_p:
                q_rows = q_land.to(query.dtype)
                exact = softmax_attention(q_rows, key, value, mask, scale, dropout_p)
            b, h, _, d_v = exact.shape
            # Padded queries (segment m) take any row: keep zeroes them.
            segment = q_index.clamp_max(m - 1)[:, None, :, None].expand(b, h, n_q, d_v)
            out = torch.where(q_short[:, None, None, None], exact.gather(2, segment), out)
    return out


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Exact softmax(s·QKᵀ)·V, (B, H, n_q, d) × (B, H, n_k, d) → (B, H, n_q, d_v), with the
    padding keys (False in the (B, n_k) ``key_mask``) masked out: what Nyström attention
    approximates, e.g. to compare a layer's output with it."""
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    # (torch's own call, but differentiable twice: nystromer._sdpa.)
    return sdpa(q, k, v, attn_mask, dropout_p, scale)


# --- rows of the approximated attention matrix ----------------------------------------------


def attention_rows(
    query: Tensor,
    key: Tensor,
    rows: int | Sequence[int] | Tensor,
    *,
    num_landmarks: int = 64,
    mask: Tensor | None = None,
    pinv_iterations: int = 6,
    scale: float | None = None,
    query_mask: Tensor | None = None,
    kmeans_iterations: int = 0,
) -> Tensor:
    """Rows of the attention matrix that :func:`nystrom_attention` multiplies the values by.

    Nyström attention never forms its n_q×n_k matrix F·A⁺·B; this returns r of its rows, e.g.
    ``rows=0`` for a class token's heatmap, in O((m + r)·n_k) memory per head. With the same
    settings (and no dropout), ``attention_rows(q, k, rows, ...) @ v`` equals
    ``nystrom_attention(q, k, v, ...)[:, :, rows]``: samples of at most m real keys or queries
    get exact softmax rows, as there. An approximation's rows may have negative entries and need
    not sum to exactly 1.

    Args:
        query: (B, H, n_q, d).
        key: (B, H, n_k, d).
        rows: the query positions, an int, a sequence of r ints or a 1-D integer tensor; each in
            [-n_q, n_q) (negative counts from the end).
        num_landmarks, mask, pinv_iterations, scale, query_mask, kmeans_iterations: as for
            :func:`nystrom_attention`.

    Returns:
        (B, H, r, n_k) in the dtype of ``query``, computed in at least float32. Columns of
        padding keys are zero, as are the rows of padded queries and every row of a sample
        with no real key.
    """
    _check_inputs(
        query, key, key, mask, query_mask, num_landmarks, pinv_iterations, 0.0, kmeans_iterations
    )
    index = _row_index(rows, query.shape[2], query.device)

    def query_landmarks(q_index: Tensor, q_counts: Tensor | None, valid, work) -> Tensor:
        m = num_landmarks
        return _landmarks(query, q_index, q_counts, valid, m, work, kmeans_iterations)[1]

    return rows_from_landmarks(
        query[:, :, index], query_landmarks, query.shape[2], key, index,
        num_landmarks=num_landmarks, mask=mask, pinv_iterations=pinv_iterations, scale=scale,
        query_mask=query_mask, kmeans_iterations=kmeans_iterations,
    )  # fmt: skip


def rows_from_landmarks(
    q_rows: Tensor,
    query_landmarks: Callable[[Tensor, Tensor | None, Tensor | None, torch.dtype], Tensor],
    n_q: int,
    key: Tensor,
    index: Tensor,
    *,
    num_landmarks: int,
    mask: Tensor | None,
    pinv_iterations: int,
    scale: float | None,
    query_mask: Tensor | None,
    kmeans_iterations: int,
) -> Tensor:
    """The engine of :func:`attention_rows`, for a layer that forms its own query landmarks
    (:mod:`nystromer.compat`); not part of the public API. From the requested query rows
    q_rows (B, H, r, d) (positions ``index`` of n_q) and ``query_landmarks(index, counts,
    valid, work)``, which returns the (B, H, m, d) landmarks of the whole query for
    :func:`landmark_assignment`'s segments: a module can form both from its input without
    projecting every query (the segment means of a linear projection are the projection of the
    input's means). Inputs already checked."""
    b, h, _, d = q_rows.shape
    n_k, m = key.shape[2], num_landmarks
    scale, mask, query_mask, empty = _defaults(n_q, d, n_k, mask, query_mask, scale)

    work = torch.promote_types(q_rows.dtype, torch.float32)
    out_dtype = q_rows.dtype
    q_rows = q_rows.to(work)
    with without_autocast(key):  # every product in the working precision
        if n_k <= m or n_q <= m:
            out = _softmax_rows(q_rows, key.to(work), mask, scale)
        else:
            # The kernels of _nystrom, with F limited to the requested rows; B is never formed
            # whole (_rows_of_product).
            q_index, q_counts = landmark_assignment(query_mask, n_q, m, key.device)
            k_index, k_counts = landmark_assignment(mask, n_k, m, key.device)
            q_land = query_landmarks(q_index, q_counts, query_mask, work)
            _, k_land = _landmarks(key, k_index, k_counts, mask, m, work, kmeans_iterations)
            k_nonempty = None if k_counts is None else k_counts[:, :m] > 0
            kernel = _landmark_kernel(q_land, k_land, k_nonempty, q_counts, scale)
            f = _softmax_rows(q_rows, k_land, k_nonempty, scale)
            out = _rows_of_product(
                f @ iterative_pinv(kernel, pinv_iterations), q_land, key, mask, scale
            )
            if k_counts is not None or q_counts is not None:
                # Samples with at most m real keys or queries get exact attention (see _nystrom).
                short = torch.zeros(b, dtype=torch.bool, device=key.device)
                for counts in (k_counts, q_counts):
                    if counts is not None:
                        short |= counts[:, :m].sum(-1) <= m
                exact = _softmax_rows(q_rows, key.to(work), mask, scale)
                out = torch.where(short[:, None, None, None], exact, out)
    keep = _rows_to_keep(query_mask, empty, b, n_q)
    if keep is not None:
        out = out * keep[:, index][:, None, :, None].to(work)
    return out.to(out_dtype)


def _row_index(rows: int | Sequence[int] | Tensor, n: int, device: torch.device) -> Tensor:
    """``rows`` as a 1-D int64 tensor of positions in [0, n); errors name ``rows``."""
    if isinstance(rows, Tensor):
        if rows.dtype in (torch.bool,) or rows.is_floating_point() or rows.is_complex():
            raise TypeError(f"rows must hold integers, got a tensor of dtype {rows.dtype}")
        if rows.dim() > 1:
            raise ValueError(f"rows must be an int or 1-D, got shape {tuple(rows.shape)}")
        index = rows.reshape(-1).long()
    else:
        # operator.index: any integer, numpy's included; bools are no positions.
        try:
            values = [_position(rows)]
        except TypeError:
            try:
                values = [_position(r) for r in rows]
            except TypeError:
                raise TypeError(
                    f"rows must be an int or a sequence of ints, got {rows!r}"
                ) from None
        index = torch.tensor(values, dtype=torch.long)
    if index.numel() == 0:
        raise ValueError("rows must name at least one query position, got none")
    # Checked where the positions lie, before they move: rows given as ints or a CPU tensor
    # cost the device no wait.
    bad = (index < -n) | (index >= n)
    if bool(bad.any()):
        raise ValueError(
            f"rows must be query positions in [-{n}, {n}) (n_q = {n}), got "
            f"{index[bad].tolist()[:5]}"
        )
    return (index % n).to(device)


def _position(r: object) -> int:
    """``r`` as an int (operator.index), refusing bools; TypeError otherwise."""
    if isinstance(r, bool):  # (numpy's bool has no __index__)
        raise TypeError("a bool is no position")
    return operator.index(r)


def _masked_logits(q: Tensor, k: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    """s·QKᵀ with the keys that are False in the (B, n_k) ``key_mask`` at -inf."""
    logits = (q @ k.transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits


def _softmax_rows(q: Tensor, k: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    """softmax(s·QKᵀ) with the keys that are False in the (B, n_k) ``key_mask`` masked out."""
    return torch.softmax(_masked_logits(q, k, key_mask, scale), dim=-1)


def _landmark_kernel(
    q_land: Tensor, k_land: Tensor, k_nonempty: Tensor | None, q_counts: Tensor | None, scale
) -> Tensor:
    """A = softmax(s·Q̃K̃ᵀ), (B, H, m, m), with the landmark keys of empty segments (False in
    the (B, m) ``k_nonempty``) masked out and the rows of empty query segments (zero in the
    (B, ≥m) ``q_counts``) zeroed: an empty segment is no landmark, and its row must not enter
    the pseudo-inverse."""
    kernel = _softmax_rows(q_land, k_land, k_nonempty, scale)
    if q_counts is not None:
        m = q_land.shape[2]
        kernel = kernel * (q_counts[:, :m] > 0)[:, None, :, None].to(kernel.dtype)
    return kernel


#: Elements of one block of the (B, H, m, block) kernel in :func:`_rows_of_product`.
_ROWS_BLOCK = 1 << 20


def _rows_of_product(
    c: Tensor, q_land: Tensor, key: Tensor, key_mask: Tensor | None, scale: float
) -> Tensor:
    """``c @ softmax(s·Q̃Kᵀ)`` without the (B, H, m, n_k) kernel: two passes over blocks of
    keys, the first for each landmark row's log-normaliser, the second for the product, so
    that memory stays O(m·block) per head. c (B, H, r, m) and q_land (B, H, m, d) in the
    working precision; returns (B, H, r, n_k) in it."""
    b, h, m, _ = q_land.shape
    n_k = key.shape[2]
    block = max(1, _ROWS_BLOCK // max(1, b * h * m))

    def logits(s: int) -> Tensor:
        mask = None if key_mask is None else key_mask[:, s : s + block]
        return _masked_logits(q_land, key[:, :, s : s + block].to(c.dtype), mask, scale)

    lse = torch.logsumexp(logits(0), -1)
    for s in range(block, n_k, block):
        lse = torch.logaddexp(lse, torch.logsumexp(logits(s), -1))
    out = c.new_empty(*c.shape[:3], n_k)
    for s in range(0, n_k, block):
        out[..., s : s + block] = c @ (logits(s) - lse[..., None]).exp_()
    return out


# --- landmarks and the pseudo-inverse --------------------------------------------------------


def _landmarks(x, index, counts, valid, m, work, kmeans_iterations):
    """``(x, landmarks)``: the segment means of x, refined by k-means if asked. x is returned
    because on the CPU it passes through the node that computes its means (in place gradient)."""
    if kmeans_iterations:
        means = _segment_means(x, index, counts, m, work)
        refined = refine_landmarks(x, means, valid, kmeans_iterations)
        if counts is None:
            return x, refined
        # A sample with at most m real tokens keeps its segments (one token each): the exact
        # fallback and the empty-segment masks of step 2 rely on them.
        short = counts[:, :m].sum(-1) <= m
        return x, torch.where(short[:, None, None, None], means, refined)
    if _cpu.applies(x):
        # CPU: q and k have exactly two uses, their means and one attention call; one node
        # adds the means' gradient in place into the attention's (no third n·d tensor).
        return _cpu.shared_segment_means(x, index, counts, m, work)
    return x, segment_means(x, index, counts, m, work)


def _segment_means(x, index, counts, m, dtype):
    """:func:`segment_means`; on the CPU in x's memory layout (whole tokens, own backward)."""
    if _cpu.applies(x):
        return _cpu.segment_means(x, index, counts, m, dtype)
    return segment_means(x, index, counts, m, dtype)


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
        device: where to put the result.

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
    # Out of place: under torch.func.vmap over masks, zeros are not batched but the index is.
    counts = torch.zeros(mask.shape[0], m + 1, dtype=torch.long, device=device)
    counts = counts.scatter_add(1, index, torch.ones_like(index))
    return index, counts


def segment_means(
    x: Tensor, index: Tensor, counts: Tensor | None, num_landmarks: int, dtype: torch.dtype
) -> Tensor:
    """Means of ``x`` over the segments given by :func:`landmark_assignment`.

    Args:
        x: (B, H, n, d).
        index, counts: from :func:`landmark_assignment` for the same n and m.
        num_landmarks: m.
        dtype: accumulation and result dtype (float32 or wider keeps bf16/fp16 means accurate).

    Returns:
        (B, H, m, d) segment means; an empty segment gives zeros.
    """
    b, h, n, d = x.shape
    m = num_landmarks
    if counts is None and n % m == 0:
        # The paper's equal segments: a reshape (a view for any strides) and a mean.
        return x.reshape(b, h, m, n // m, d).mean(3, dtype=dtype)
    # Sums over m + 1 segments per (sample, head); segment m collects padding and is dropped.
    sums = x.new_zeros(b, h, m + 1, d, dtype=dtype)
    sums.scatter_add_(2, index.view(-1, 1, n, 1).expand(b, h, n, d), x.to(dtype))
    return sums[:, :, :m] / _cpu.segment_sizes(index, counts, m, dtype).view(-1, 1, m, 1)


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
        # (B, n, H, d) memory, as a projection followed by a head split gives: sum the tokens
        # in that order (no copy of x), with the indices laid out to match.
        src, order = xw.transpose(1, 2).reshape(b * n * h, d), (lambda t: t.transpose(1, 2))
    else:
        src, order = xw.reshape(b * h * n, d), (lambda t: t)
    ones = xw.new_ones(b * h * n)
    nearest = _cpu.nearest if _cpu.applies(x) else _nearest  # CPU: blocked distances
    c = landmarks
    for _ in range(iterations):
        with torch.no_grad():
            assign = nearest(xw, c)
            if valid is not None:
                assign = assign.masked_fill(~valid[:, None, :], m)
            index = order(rows + assign).reshape(-1)
            counts = xw.new_zeros(b * h * (m + 1)).index_add_(0, index, ones)
            counts = counts.view(b, h, m + 1, 1)[:, :, :m]
        # The sums keep no copy of x for the backward (a plain index_add_ would).
        sums = _cpu.sum_rows(src, index, b * h * (m + 1))
        means = sums.view(b, h, m + 1, d)[:, :, :m] / counts.clamp_min(1)
        c = torch.where(counts > 0, means, c)
    return c


def _nearest(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest of the (B, H, m, d) centres ``c`` for each of the (B, H, n, d)
    tokens ``x``: (B, H, n) int64, by argmin ‖x − c‖² = argmin (‖c‖² − 2·x·c). Sample by
    sample: bmm takes a sample's heads at any stride (no copy of a head-split x)."""
    cc = (c * c).sum(-1).unsqueeze(2)  # (B, H, 1, m)
    dist = [torch.baddbmm(cc[i], x[i], c[i].transpose(1, 2), alpha=-2.0) for i in range(len(x))]
    return torch.stack([d.argmin(-1) for d in dist])


def iterative_pinv(a: Tensor, iterations: int = 6, *, initial_scale: str = "matrix") -> Tensor:
    """Approximate Moore–Penrose pseudo-inverse by the iteration of Razavi et al. (2014).

    ``Z₀ = Aᵀ / (‖A‖₁·‖A‖∞)``, scaled per matrix (so one sample never affects another), then
    ``Z ← ¼·Z·(13I − AZ·(15I − AZ·(7I − AZ)))``. A few iterations regularise the
    ill-conditioned landmark kernel; many approach the exact pseudo-inverse, which is worse.

    Args:
        a: (..., m, m).
        iterations: number of updates (≥ 0); 0 returns Z₀.
        initial_scale: ``"matrix"`` (default) takes the two norms of each matrix alone;
            ``"batch"`` takes the largest column and row sums over the whole of ``a`` (every
            sample and head), as the ``nystrom-attention`` package does. Only for reproducing
            that package: it makes one sample's result depend on the others.

    Returns:
        (..., m, m), same dtype as ``a``.
    """
    if not isinstance(a, Tensor):
        raise TypeError(f"a must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() < 2 or a.shape[-1] != a.shape[-2] or a.shape[-1] == 0:
        raise ValueError(f"a must have shape (..., m, m) with m ≥ 1, got {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"a must be a floating-point tensor, got dtype {a.dtype}")
    check_int_at_least("iterations", iterations, 0)
    if initial_scale not in ("matrix", "batch"):
        raise ValueError(f'initial_scale must be "matrix" or "batch", got {initial_scale!r}')
    absa = a.abs()
    norm_1 = absa.sum(-2).amax(-1)  # largest column sum
    norm_inf = absa.sum(-1).amax(-1)  # largest row sum
    if initial_scale == "batch":
        norm_1, norm_inf = norm_1.amax(), norm_inf.amax()
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
    """Raise a TypeError or ValueError naming the first bad argument and the shapes."""
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
    if d == 0:
        raise ValueError(
            f"query and key must have at least one feature (d ≥ 1), got query shape "
            f"{tuple(query.shape)}"
        )
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
        check_token_mask(name, mk)
        check_shape(name, mk, (b, n))
    check_nystrom_options(num_landmarks, pinv_iterations, kmeans_iterations=kmeans_iterations)
    check_probability("dropout_p", dropout_p)

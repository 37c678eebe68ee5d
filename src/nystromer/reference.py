"""Nyström attention written plainly from the paper: the definition the fast code must meet.

Every function works on one head's real tokens (any leading dimensions are carried along as
independent heads) and keeps the paper's dense kernels F (n×m), A (m×m) and B (m×n) in memory,
so it costs O(n·m) memory per head for the output and O(n²) for :func:`nystrom_matrix`. It is
meant for tests, baselines and pictures, not for models: use
:func:`nystromer.nystrom_attention`. Pass float64 tensors for a reference to compare against;
any floating dtype works.

This module does not use :mod:`nystromer.functional`, so that the tests hold the fast code to
an independent definition. The semantics (segments over real tokens, per-matrix pseudo-inverse
scale, exact attention when m ≥ L) are those of docs/design.md, "Semantics".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "exact_attention",
    "softmax_kernel",
    "segment_bounds",
    "landmarks",
    "kmeans_landmarks",
    "newton_pinv",
    "nystrom_kernels",
    "nystrom_matrix",
    "nystrom_one_head",
    "nystrom_reference",
]


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def softmax_kernel(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """softmax(s·QKᵀ) (rows sum to 1): q (..., n_q, d), k (..., n_k, d) → (..., n_q, n_k)."""
    return torch.softmax((q @ k.transpose(-1, -2)) * _scale(q, scale), dim=-1)


def exact_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(s·QKᵀ)·V: q (..., n_q, d), k (..., n_k, d), v (..., n_k, d_v), s = 1/√d."""
    return softmax_kernel(q, k, scale) @ v


def segment_bounds(length: int, m: int) -> list[tuple[int, int]]:
    """L tokens in m contiguous chunks whose sizes differ by at most one: chunk c holds the
    ranks [⌈cL/m⌉, ⌈(c+1)L/m⌉) (empty chunks when L < m)."""
    return [(-((-c * length) // m), -((-(c + 1) * length) // m)) for c in range(m)]


def landmarks(x: Tensor, m: int) -> Tensor:
    """Means of x's rows (..., L, d) over the non-empty chunks of :func:`segment_bounds`.

    Written as the averaging matrix (one row per chunk, 1/size on its columns) times x: the
    same means, and a backward that is one product rather than a full-size gradient per chunk,
    so that the benchmarks' naive baseline measures the formula, not slicing.
    """
    chunks = [(lo, hi) for lo, hi in segment_bounds(x.shape[-2], m) if hi > lo]
    average = x.new_zeros(len(chunks), x.shape[-2])
    for row, (lo, hi) in enumerate(chunks):
        average[row, lo:hi] = 1.0 / (hi - lo)
    return average @ x


def kmeans_landmarks(x: Tensor, m: int, iterations: int) -> Tensor:
    """Lloyd's k-means on the rows of x (L, d, all real), started from :func:`landmarks`:
    each row joins its nearest centre (squared Euclidean distance, first on ties), each centre
    with rows moves to their mean, a centre without rows stays. Leading dimensions of x are
    independent heads."""
    if x.dim() > 2:
        heads = [kmeans_landmarks(h, m, iterations) for h in x.reshape(-1, *x.shape[-2:])]
        return torch.stack(heads).reshape(*x.shape[:-2], -1, x.shape[-1])
    c = landmarks(x, m)
    for _ in range(iterations):
        nearest = torch.cdist(x, c).argmin(1)
        c = torch.stack(
            [x[nearest == j].mean(0) if (nearest == j).any() else c[j] for j in range(len(c))]
        )
    return c


def newton_pinv(a: Tensor, iterations: int) -> Tensor:
    """Razavi et al.'s iteration for the pseudo-inverse of each m×m matrix in a (..., m, m):
    Z₀ = Aᵀ/(‖A‖₁‖A‖∞) with the norms of that matrix alone, then
    Z ← ¼·Z·(13I − AZ·(15I − AZ·(7I − AZ)))."""
    norm_1 = a.abs().sum(-2).amax(-1)[..., None, None]  # largest column sum
    norm_inf = a.abs().sum(-1).amax(-1)[..., None, None]  # largest row sum
    z = a.transpose(-1, -2) / (norm_1 * norm_inf)
    i = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * i - az @ (15 * i - az @ (7 * i - az)))
    return z


def nystrom_kernels(
    q: Tensor,
    k: Tensor,
    m: int,
    iterations: int = 6,
    scale: float | None = None,
    kmeans_iterations: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's F = softmax(s·QK̃ᵀ), A⁺ (the iterated pseudo-inverse of A = softmax(s·Q̃K̃ᵀ))
    and B = softmax(s·Q̃Kᵀ), with segment means (or, with ``kmeans_iterations``, k-means
    centres) of q and k as the landmarks Q̃, K̃. Needs more than m rows in q and k.

    Returns:
        (..., n_q, m), (..., m, m), (..., m, n_k).
    """
    q_l = kmeans_landmarks(q, m, kmeans_iterations) if kmeans_iterations else landmarks(q, m)
    k_l = kmeans_landmarks(k, m, kmeans_iterations) if kmeans_iterations else landmarks(k, m)
    f = softmax_kernel(q, k_l, _scale(q, scale))
    a = softmax_kernel(q_l, k_l, _scale(q, scale))
    b = softmax_kernel(q_l, k, _scale(q, scale))
    return f, newton_pinv(a, iterations), b


def nystrom_matrix(
    q: Tensor, k: Tensor, m: int, iterations: int = 6, scale: float | None = None
) -> Tensor:
    """The (..., n_q, n_k) matrix F·A⁺·B that Nyström attention applies to V in place of
    softmax(s·QKᵀ) (rows sum to about 1). Needs more than m rows in q and k."""
    f, a_pinv, b = nystrom_kernels(q, k, m, iterations, scale)
    return f @ a_pinv @ b


def nystrom_one_head(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    m: int,
    iterations: int = 6,
    scale: float | None = None,
    kmeans_iterations: int = 0,
) -> Tensor:
    """F·A⁺·(B·V) for the real tokens of one head (q (n_q, d), k (n_k, d), v (n_k, d_v); leading
    dimensions are independent heads); exact attention when n_q or n_k is at most m."""
    if k.shape[-2] <= m or q.shape[-2] <= m:
        return exact_attention(q, k, v, scale)
    f, a_pinv, b = nystrom_kernels(q, k, m, iterations, scale, kmeans_iterations)
    return (f @ a_pinv) @ (b @ v)


def nystrom_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    m: int,
    mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    iterations: int = 6,
    kmeans_iterations: int = 0,
    scale: float | None = None,
) -> Tensor:
    """Nyström attention of a padded batch, sample by sample over its real tokens only.

    Args:
        q, k, v: (B, H, n_q, d), (B, H, n_k, d), (B, H, n_k, d_v).
        m: number of landmarks.
        mask: (B, n_k) bool, True for real keys (None: all real).
        query_mask: (B, n_q) bool, True for real queries; defaults to ``mask`` when
            n_q == n_k, else all real.
        iterations, kmeans_iterations, scale: as in :func:`nystromer.nystrom_attention`.

    Returns:
        (B, H, n_q, d_v); rows of padded queries, and of samples without a real key, are zero.
    """
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    if mask is None:
        mask = torch.ones(b, n_k, dtype=torch.bool, device=q.device)
    if query_mask is None:
        query_mask = mask if n_q == n_k else torch.ones(b, n_q, dtype=torch.bool, device=q.device)
    out = q.new_zeros(b, h, n_q, v.shape[-1], dtype=torch.promote_types(q.dtype, v.dtype))
    for i in range(b):
        kr, qr = _real(mask[i]), _real(query_mask[i])
        if _count(kr) == 0:
            continue
        # q[i][:, idx], not q[i, :, idx]: numpy's rules would move the indexed axis first.
        out[i][:, qr] = nystrom_one_head(
            q[i][:, qr], k[i][:, kr], v[i][:, kr], m, iterations, scale, kmeans_iterations
        )
    return out


def _real(keep: Tensor) -> slice | Tensor:
    """Index of the real positions: a slice (so a view) when they are a prefix."""
    length = int(keep.sum())
    if bool(keep[:length].all()):
        return slice(0, length)
    return keep.nonzero().flatten()


def _count(index: slice | Tensor) -> int:
    return index.stop if isinstance(index, slice) else len(index)

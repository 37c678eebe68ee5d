"""Float64 references written from the paper's formulas, independent of nystromer's code.

Everything here loops over samples and slices out the real tokens, so padding can never leak
into a reference result: it is the definition the fast code must meet.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def exact_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(s·QKᵀ)·V for one head: q (n_q, d), k (n_k, d), v (n_k, d_v)."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax((q @ k.T) * s, dim=-1) @ v


def segment_bounds(length: int, m: int) -> list[tuple[int, int]]:
    """DESIGN.md §3: L tokens in m contiguous chunks, chunk c = ranks [⌈cL/m⌉, ⌈(c+1)L/m⌉)."""
    bounds = []
    for c in range(m):
        lo = -((-c * length) // m)
        hi = -((-(c + 1) * length) // m)
        bounds.append((lo, hi))
    return bounds


def landmarks(x: Tensor, m: int) -> Tensor:
    """Segment means of the rows of x (L, d) over the non-empty chunks of segment_bounds."""
    rows = [x[lo:hi].mean(0) for lo, hi in segment_bounds(x.shape[0], m) if hi > lo]
    return torch.stack(rows)


def kmeans_landmarks(x: Tensor, m: int, iterations: int) -> Tensor:
    """Lloyd's k-means on the rows of x (L, d, all real), started from :func:`landmarks`:
    each row joins its nearest centre (squared Euclidean distance, first on ties), each centre
    with rows moves to their mean, a centre without rows stays."""
    c = landmarks(x, m)
    for _ in range(iterations):
        nearest = torch.cdist(x, c).argmin(1)
        c = torch.stack(
            [x[nearest == j].mean(0) if (nearest == j).any() else c[j] for j in range(len(c))]
        )
    return c


def newton_pinv(a: Tensor, iterations: int) -> Tensor:
    """Razavi et al. iteration with the per-matrix initial scale, for one m×m matrix."""
    z = a.T / (a.abs().sum(0).max() * a.abs().sum(1).max())
    i = torch.eye(a.shape[0], dtype=a.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * i - az @ (15 * i - az @ (7 * i - az)))
    return z


def nystrom_one_head(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    m: int,
    iterations: int = 6,
    scale: float | None = None,
    kmeans_iterations: int = 0,
) -> Tensor:
    """The paper's three-matrix formula F·A⁺·(B·V) for one head of real tokens only, with
    segment means (or, with ``kmeans_iterations``, k-means centres) as landmarks."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k.shape[0] <= m or q.shape[0] <= m:
        return exact_attention(q, k, v, s)
    q_l = kmeans_landmarks(q, m, kmeans_iterations)
    k_l = kmeans_landmarks(k, m, kmeans_iterations)
    f = torch.softmax(s * q @ k_l.T, dim=-1)
    a = torch.softmax(s * q_l @ k_l.T, dim=-1)
    b = torch.softmax(s * q_l @ k.T, dim=-1)
    return f @ newton_pinv(a, iterations) @ (b @ v)


def nystrom_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    m: int,
    mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    iterations: int = 6,
    kmeans_iterations: int = 0,
) -> Tensor:
    """(B, H, n_q, d) inputs → (B, H, n_q, d_v); padded query rows are left at zero."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    if mask is None:
        mask = torch.ones(b, n_k, dtype=torch.bool)
    if query_mask is None:
        query_mask = mask if n_q == n_k else torch.ones(b, n_q, dtype=torch.bool)
    out = torch.zeros(b, h, n_q, v.shape[-1], dtype=q.dtype)
    for i in range(b):
        kr, qr = mask[i].nonzero().flatten(), query_mask[i].nonzero().flatten()
        if len(kr) == 0:
            continue
        for j in range(h):
            out[i, j, qr] = nystrom_one_head(
                q[i, j, qr],
                k[i, j, kr],
                v[i, j, kr],
                m,
                iterations,
                kmeans_iterations=kmeans_iterations,
            )
    return out

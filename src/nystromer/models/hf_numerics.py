"""COMPATIBILITY PATH: transformers' Nyströmformer attention numerics, reproduced on purpose.

Used only with ``NystromformerConfig(numerics="hf")``, to get the outputs of
``transformers.NystromformerModel`` (checked against transformers 5.24) from the same weights.
It keeps that implementation's behaviour, which nystromer's own attention corrects
(docs/models.md has the table):

- ``num_landmarks == segment_means_seq_len`` selects exact O(n²) softmax attention, at any
  length: the branch every published checkpoint runs.
- Otherwise the input length must equal ``segment_means_seq_len``; landmarks are plain means of
  equal segments, padding included.
- The pseudo-inverse starts from one scale for the whole batch (``inv_coeff_init_option=False``),
  so a sample's output depends on the other samples in the batch.
- Padding is masked in the B kernel (landmark queries over keys) only; the convolution skip sees
  the unmasked values.
- The operations run in transformers' order and materialise the n×m kernels.

Nothing else in the package calls this; the default path is :func:`nystromer.nystrom_attention`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["hf_additive_mask", "hf_attention_rows", "hf_self_attention"]


def _hf_iterative_inv(a: Tensor, iterations: int, per_matrix_init: bool) -> Tensor:
    # Not nystromer.iterative_pinv: the initial scale differs and the update is associated
    # as transformers does, (0.25·Z)·(…), which the parity tests reproduce to rounding.
    # transformers' initial scale is 1/max column sum (the softmax rows make the row norm 1);
    # without per_matrix_init the max runs over the whole (B, H) batch.
    col_sums = a.sum(-2)
    if per_matrix_init:
        z = a.transpose(-1, -2) / col_sums.amax(-1)[..., None, None]
    else:
        z = a.transpose(-1, -2) / col_sums.max()
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = (0.25 * z) @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def hf_additive_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """transformers' additive key mask: (B, n) bool (True = real) → (B, 1, 1, n) in ``like``'s
    dtype, 0 for real keys and the dtype's most negative number for padding; None stays None."""
    if mask is None:
        return None
    neg = torch.finfo(like.dtype).min
    return like.new_zeros(mask.shape[0], 1, 1, mask.shape[1]).masked_fill(
        ~mask[:, None, None, :], neg
    )


def _scaled(x: Tensor) -> Tensor:
    # transformers scales Q and K by d^(-1/4) each; kept for bit-level agreement.
    return x / math.sqrt(math.sqrt(x.shape[-1]))


def _segment_means(x: Tensor, num_landmarks: int) -> Tensor:
    """Means of ``num_landmarks`` equal segments of (B, H, n, d), padding included."""
    b, h, n, d = x.shape
    return x.reshape(b, h, num_landmarks, n // num_landmarks, d).mean(-2)


def _exact_probs(q: Tensor, k: Tensor, additive: Tensor | None) -> Tensor:
    """softmax(QKᵀ + mask) of scaled q (B, H, r, d) and k (B, H, n, d)."""
    scores = q @ k.transpose(-1, -2)
    if additive is not None:
        scores = scores + additive
    return torch.softmax(scores, dim=-1)


def _check_length(n: int, num_landmarks: int, segment_means_seq_len: int) -> None:
    if n != segment_means_seq_len:
        raise ValueError(
            f"numerics='hf' with num_landmarks ({num_landmarks}) < segment_means_seq_len "
            f"({segment_means_seq_len}) needs inputs of exactly {segment_means_seq_len} "
            f"tokens, as transformers does; got {n}. Pad the input to that length, or use "
            "numerics='nystromer', which takes any length."
        )


def hf_self_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    additive_mask: Tensor | None,
    *,
    num_landmarks: int,
    segment_means_seq_len: int,
    pinv_iterations: int = 6,
    per_matrix_init: bool = False,
    conv: nn.Conv2d | None = None,
) -> Tensor:
    """Self-attention as transformers' NystromformerSelfAttention computes it.

    Args:
        query, key, value: (B, H, n, d) projections of the same sequence.
        additive_mask: (B, 1, 1, n) float, 0 for real keys and a large negative number for
            padding (:func:`hf_additive_mask`), or None.
        num_landmarks, segment_means_seq_len: select the branch (see the module docstring).
        pinv_iterations: iterations of the pseudo-inverse (transformers: 6).
        per_matrix_init: transformers' ``inv_coeff_init_option``.
        conv: the depthwise (H, 1, k, 1) convolution skip, applied to the unmasked values.

    Returns:
        (B, H, n, d).
    """
    q, k = _scaled(query), _scaled(key)
    if num_landmarks == segment_means_seq_len:
        context = _exact_probs(q, k, additive_mask) @ value
    else:
        _check_length(query.shape[2], num_landmarks, segment_means_seq_len)
        q_land, k_land = _segment_means(q, num_landmarks), _segment_means(k, num_landmarks)
        kernel_1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)
        kernel_2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)
        kernel_3 = _exact_probs(q_land, k, additive_mask)
        probs = kernel_1 @ _hf_iterative_inv(kernel_2, pinv_iterations, per_matrix_init)
        context = probs @ (kernel_3 @ value)
    if conv is not None:
        context = context + conv(value)
    return context


def hf_attention_rows(
    query: Tensor,
    key: Tensor,
    additive_mask: Tensor | None,
    rows: Tensor,
    *,
    batch: slice = slice(None),
    heads: slice = slice(None),
    num_landmarks: int,
    segment_means_seq_len: int,
    pinv_iterations: int = 6,
    per_matrix_init: bool = False,
) -> Tensor:
    """Rows of the matrix that :func:`hf_self_attention` multiplies the values by.

    Exact branch: softmax(QKᵀ + mask). Nyström branch: F·Z·B of transformers' three kernels
    (F = kernel_1 limited to the requested rows, Z its pseudo-inverse of kernel_2, B = kernel_3),
    (B', H', r, n), O(m·n) per head. transformers' ``output_attentions`` gives F·Z there,
    (B, H, n, m), which is no attention matrix.

    Args:
        query, key, additive_mask, num_landmarks, segment_means_seq_len, pinv_iterations,
            per_matrix_init: as for :func:`hf_self_attention` (the whole batch).
        rows: 1-D int64 query positions.
        batch, heads: the samples and heads to compute. The pseudo-inverse is computed for the
            whole batch, whose global scale (``per_matrix_init=False``) couples the samples.

    Returns:
        (B', H', r, n).
    """
    mask = None if additive_mask is None else additive_mask[batch]
    q_rows = _scaled(query[batch, heads][:, :, rows])
    if num_landmarks == segment_means_seq_len:
        return _exact_probs(q_rows, _scaled(key[batch, heads]), mask)
    _check_length(query.shape[2], num_landmarks, segment_means_seq_len)
    # Landmarks of the whole batch: the pseudo-inverse's start may be scaled over all of it.
    q, k = _scaled(query), _scaled(key)
    q_land, k_land = _segment_means(q, num_landmarks), _segment_means(k, num_landmarks)
    kernel_2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)
    z = _hf_iterative_inv(kernel_2, pinv_iterations, per_matrix_init)[batch, heads]
    q_land, k_land = q_land[batch, heads], k_land[batch, heads]
    kernel_1 = torch.softmax(q_rows @ k_land.transpose(-1, -2), dim=-1)
    return (kernel_1 @ z) @ _exact_probs(q_land, k[batch, heads], mask)

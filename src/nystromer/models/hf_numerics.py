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

__all__ = ["hf_self_attention"]


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
            padding, or None.
        num_landmarks, segment_means_seq_len: select the branch (see the module docstring).
        pinv_iterations: iterations of the pseudo-inverse (transformers: 6).
        per_matrix_init: transformers' ``inv_coeff_init_option``.
        conv: the depthwise (H, 1, k, 1) convolution skip, applied to the unmasked values.

    Returns:
        (B, H, n, d).
    """
    b, h, n, d = query.shape
    # transformers scales Q and K by d^(-1/4) each; kept for bit-level agreement.
    quarter = math.sqrt(math.sqrt(d))
    q = query / quarter
    k = key / quarter
    if num_landmarks == segment_means_seq_len:
        scores = q @ k.transpose(-1, -2)
        if additive_mask is not None:
            scores = scores + additive_mask
        context = torch.softmax(scores, dim=-1) @ value
    else:
        if n != segment_means_seq_len:
            raise ValueError(
                f"numerics='hf' with num_landmarks ({num_landmarks}) < segment_means_seq_len "
                f"({segment_means_seq_len}) needs inputs of exactly {segment_means_seq_len} "
                f"tokens, as transformers does; got {n}. Pad the input to that length, or use "
                "numerics='nystromer', which takes any length."
            )
        seg = segment_means_seq_len // num_landmarks
        q_land = q.reshape(b, h, num_landmarks, seg, d).mean(-2)
        k_land = k.reshape(b, h, num_landmarks, seg, d).mean(-2)
        kernel_1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)
        kernel_2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)
        scores_3 = q_land @ k.transpose(-1, -2)
        if additive_mask is not None:
            scores_3 = scores_3 + additive_mask
        kernel_3 = torch.softmax(scores_3, dim=-1)
        probs = kernel_1 @ _hf_iterative_inv(kernel_2, pinv_iterations, per_matrix_init)
        context = probs @ (kernel_3 @ value)
    if conv is not None:
        context = context + conv(value)
    return context

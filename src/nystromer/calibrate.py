"""Fit the convolution skips of a converted model to exact attention, in closed form.

A converted encoder (:func:`nystromer.convert` with ``conv_kernel_size=k``) adds to every
attention layer the paper's depthwise convolution of the values, starting at zero so that the
model begins as the plain Nyström approximation. Much of what that approximation misses in a
pretrained encoder is local: heads that attend to the previous or next tokens, or to a short
window, which 64 segment means blur away. A depthwise convolution of the values is exactly such
a fixed local mixing, so its weights can be *fitted* instead of trained: for each head, the k
weights that bring the layer's output closest, in least squares, to exact softmax attention on
the same queries, keys and values. On all-MiniLM-L6-v2 at 512 tokens and m = 64 this raises the
cosine of mean-pooled embeddings to the exact model from 0.906 to 0.941 in about 30 seconds of
CPU, before any training (docs/results.md).

Layers are fitted in order, each on the inputs it receives once the layers below it have been
fitted, so that the fit sees the activations the calibrated model will produce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .functional import _exact
from .patch import _ATTENTION_PROBE

__all__ = ["calibrate", "CalibrationResult"]


@dataclass
class CalibrationResult:
    """What :func:`calibrate` fitted.

    Attributes:
        explained: per layer, a (H,) tensor: the share of the squared difference between exact
            and Nyström attention outputs that the fitted convolution removes, on the
            calibration inputs (0 = none, 1 = all).
        tokens: real query tokens the fit used per layer.
    """

    explained: list[Tensor]
    tokens: int


class _Stop(Exception):
    """Ends a forward pass once the layer being fitted has been seen."""


def calibrate(
    model: nn.Module,
    inputs: Sequence[Mapping[str, Tensor]],
    *,
    ridge: float = 1e-3,
    chunk_size: int = 2048,
) -> CalibrationResult:
    """Set every convolution skip of ``model`` to its least-squares fit to exact attention.

    For attention layer ℓ and head h, with Nyström output Y (n, d), exact softmax attention
    output E (n, d) on the same queries, keys and values, and the values shifted by
    t − k//2 positions X_t (n, d, zero outside the sequence and at padding), the kernel
    w ∈ ℝᵏ minimises ``Σ_real i ‖E_i − Y_i − Σ_t w_t·X_t,i‖² + λ‖w‖²``, with λ = ``ridge`` ×
    the mean of the diagonal of the normal equations (a scale-free regulariser). The model is
    run in eval mode without gradients; its mode is restored afterwards.

    Args:
        model: a transformers BERT/RoBERTa model converted or patched with
            ``conv_kernel_size`` (its attention modules have ``nystrom_conv``).
        inputs: batches of keyword arguments for ``model(**batch)``, e.g.
            ``{"input_ids": (B, n), "attention_mask": (B, n)}``; run once per layer.
        ridge: relative weight of the regulariser (≥ 0).
        chunk_size: positions per block when building the normal equations (bounds the
            extra memory to about B·H·chunk_size·d·k floats).

    Returns:
        :class:`CalibrationResult`.

    Raises:
        ValueError: no convolution skip in ``model``, empty ``inputs``, a bad ``ridge`` or
            ``chunk_size``, or inputs no longer than ``num_landmarks`` (exact attention, so
            nothing to fit).
    """
    # Registration order is the order of the layers in BERT and RoBERTa: bottom-up.
    modules = [
        m for m in model.modules() if isinstance(getattr(m, "nystrom_conv", None), nn.Conv2d)
    ]
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no Nyström convolution skip to calibrate; convert it "
            "first with a kernel, e.g. nystromer.convert(model, conv_kernel_size=35)"
        )
    if isinstance(inputs, Mapping) or len(inputs) == 0:
        raise ValueError(
            "inputs must be a non-empty sequence of batches (dicts of model keyword "
            f"arguments), got {type(inputs).__name__}"
        )
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"ridge must be a number ≥ 0, got {ridge!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")

    was_training = model.training
    model.eval()
    explained: list[Tensor] = []
    tokens = 0
    try:
        for target in modules:
            normal = _NormalEquations(target.nystrom_conv, chunk_size)

            def probe(module, query, key, value, mask, scale, out, m, *, _t=target, _n=normal):
                if module is _t:
                    _n.add(query, key, value, mask, scale, out, m)
                    raise _Stop

            token = _ATTENTION_PROBE.set(probe)
            try:
                with torch.no_grad():
                    for batch in inputs:
                        try:
                            model(**batch)
                        except _Stop:
                            pass
            finally:
                _ATTENTION_PROBE.reset(token)
            if normal.tokens == 0:
                raise ValueError(
                    "the calibration inputs never reached a Nyström attention layer with a "
                    "convolution skip (is the model converted with conv_kernel_size, and are "
                    "its inputs longer than num_landmarks?)"
                )
            explained.append(normal.solve_into(target.nystrom_conv, ridge))
            tokens = normal.tokens
    finally:
        model.train(was_training)
    return CalibrationResult(explained=explained, tokens=tokens)


class _NormalEquations:
    """Per-head sums XᵀX (H, k, k), Xᵀr (H, k) and rᵀr (H,) in float64."""

    def __init__(self, conv: nn.Conv2d, chunk_size: int) -> None:
        self.k = conv.kernel_size[0]
        self.heads = conv.weight.shape[0]
        self.chunk_size = chunk_size
        device = conv.weight.device  # the sums live where the activations are
        self.gram = torch.zeros(self.heads, self.k, self.k, dtype=torch.float64, device=device)
        self.rhs = torch.zeros(self.heads, self.k, dtype=torch.float64, device=device)
        self.rr = torch.zeros(self.heads, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, query, key, value, mask, scale, out, num_landmarks) -> None:
        b, _, n, _ = query.shape
        if key.shape[2] != n:
            return  # the skip exists for self-attention only
        real = torch.ones(b, n, dtype=torch.bool, device=query.device) if mask is None else mask
        # A sequence of at most m tokens gets exact attention: it has nothing to correct and
        # would only pull the kernel towards zero.
        real = real & (real.sum(-1, keepdim=True) > num_landmarks)
        if not real.any():
            return
        exact = _exact(query, key, value, mask, scale, 0.0)
        keep = real[:, None, :, None].to(value.dtype)
        residual = (exact - out) * keep
        # Padding is zero for the convolution, as in value_conv_skip.
        values = value if mask is None else value * mask[:, None, :, None].to(value.dtype)
        self.tokens += int(real.sum())
        half = self.k // 2
        # Row i of the padded values, unfolded over k, is [v_{i−half}, …, v_{i+half}]: the
        # same taps the (cross-correlating) convolution weights, so no flip is needed.
        padded = nn.functional.pad(values, (0, 0, half, half))
        n = value.shape[2]
        for start in range(0, n, self.chunk_size):
            stop = min(start + self.chunk_size, n)
            taps = padded[:, :, start : stop + 2 * half].unfold(2, self.k, 1).double()
            # A padded query is no equation: its taps may read real neighbours.
            taps = taps * keep[:, :, start:stop, :, None].double()
            r = residual[:, :, start:stop].double()
            self.gram += torch.einsum("bhndk,bhndl->hkl", taps, taps)
            self.rhs += torch.einsum("bhndk,bhnd->hk", taps, r)
            self.rr += r.square().sum((0, 2, 3))

    def solve_into(self, conv: nn.Conv2d, ridge: float) -> Tensor:
        diag = self.gram.diagonal(dim1=-2, dim2=-1)
        lam = ridge * diag.mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
        eye = torch.eye(self.k, dtype=torch.float64, device=self.gram.device)
        w = torch.linalg.solve(self.gram + lam[:, None, None] * eye, self.rhs[..., None])[..., 0]
        # ‖r − Xw‖² = rᵀr − 2wᵀXᵀr + wᵀXᵀXw
        left = self.rr - 2 * (w * self.rhs).sum(-1) + torch.einsum("hk,hkl,hl->h", w, self.gram, w)
        explained = 1 - left / self.rr.clamp_min(torch.finfo(torch.float64).tiny)
        with torch.no_grad():
            conv.weight.copy_(w.view(self.heads, 1, self.k, 1).to(conv.weight))
        return explained.float()

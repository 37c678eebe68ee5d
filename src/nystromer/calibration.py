"""Fit the convolution skips of a converted model to exact attention, in closed form.

A converted encoder (:func:`nystromer.convert` with ``conv_kernel_size=k``) adds to every
attention layer the paper's depthwise convolution of the values, starting at zero so that the
model begins as the plain Nyström approximation. Much of what that approximation misses in a
pretrained encoder is local: heads that attend to the previous or next tokens, or to a short
window, which 64 segment means blur away. A depthwise convolution of the values is exactly such
a fixed local mixing, so its weights can be *fitted* instead of trained: for each head, the k
weights that bring the layer's output closest, in least squares, to exact softmax attention on
the same queries, keys and values. This brings a converted sentence encoder measurably closer
to the exact model before any training (docs/results.md has the figures).

With ``output_projection`` set, each layer's attention output projection is fitted too: the
linear map, shrunk towards the identity, that takes the layer's Nyström output (convolution
included) closest to exact attention, folded into the projection's weight and bias. It
corrects what the convolution cannot: mixing across heads and channels.

Layers are fitted in order, each on the inputs it receives once the layers below it have been
fitted, so that the fit sees the activations the calibrated model will produce. What a layer
computed reaches the fit through :func:`nystromer.patching.attention_probe`.

A module that serves several layers (ALBERT shares one layer's weights across all of them)
has one convolution for all its uses, so it is fitted once, on the statistics pooled over
every use in a forward pass: the kernel that minimises the squared error summed over the
layers it serves. Each use contributes the inputs it receives before the fit (its later uses
read activations the fitted skip will change; the layer-by-layer order cannot help there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import check_positive_int, is_number
from .attention import ValueConv
from .functional import softmax_attention
from .patching import AttentionCall, attention_probe

__all__ = ["calibrate", "CalibrationResult"]


@dataclass
class CalibrationResult:
    """What :func:`calibrate` fitted.

    Attributes:
        explained: per layer (per attention module: a shared one, as in ALBERT, once), a (H,)
            tensor: the share of the squared difference between exact and Nyström attention
            outputs that the fitted convolution removes, on the calibration inputs (0 = none,
            1 = all).
        tokens: real query tokens the fit used per layer (a shared module: over all its uses).
        output_explained: with ``output_projection``, per layer, the share of the squared
            difference between exact and Nyström (+ convolution) attention outputs that the
            fitted output map removes; else None.
    """

    explained: list[Tensor]
    tokens: int
    output_explained: list[float] | None = None


class _Stop(Exception):
    """Ends a forward pass once the layer being fitted has been seen."""


def calibrate(
    model: nn.Module,
    inputs: Sequence[Mapping[str, Tensor]],
    *,
    ridge: float = 1e-3,
    chunk_size: int = 2048,
    output_projection: float | None = None,
) -> CalibrationResult:
    """Set every convolution skip of ``model`` to its least-squares fit to exact attention.

    For attention layer ℓ and head h, with Nyström output Y (n, d), exact softmax attention
    output E (n, d) on the same queries, keys and values, and the values shifted by
    t − k//2 positions X_t (n, d, zero outside the sequence and at padding), the kernel
    w ∈ ℝᵏ minimises ``Σ_real i ‖E_i − Y_i − Σ_t w_t·X_t,i‖² + λ‖w‖²``, with λ = ``ridge`` ×
    the mean of the diagonal of the normal equations (a scale-free regulariser). The model is
    run in eval mode without gradients; each module's mode is restored afterwards.

    Args:
        model: a transformers BERT/RoBERTa model converted or patched with
            ``conv_kernel_size`` (its attention modules have ``nystrom_conv``).
        inputs: batches of keyword arguments for ``model(**batch)``, e.g.
            ``{"input_ids": (B, n), "attention_mask": (B, n)}``; run once per layer (a
            DataLoader is iterated once per layer; an iterator is read into a list first).
        ridge: relative weight of the regulariser (≥ 0).
        chunk_size: positions per block when building the normal equations (bounds the
            extra memory to about B·H·chunk_size·d·k floats).
        output_projection: if set (> 0), after each layer's convolution also fit its attention
            output projection (BERT/RoBERTa ``attention.output.dense``): with Y the layer's
            attention output (Nyström + convolution, heads concatenated, a 1 appended) and E
            exact attention, the map A minimises ``Σ‖E_i − A·Y_i‖² + μ‖A − [I 0]‖²``, μ =
            ``output_projection`` × the mean of diag(YᵀY); the projection W, b becomes W·A.
            The shrinkage towards the identity matters: an unshrunk fit over-fits the
            calibration inputs and lowers the model's quality (0.3 did best on MiniLM).

    A module shared by several layers (ALBERT's) is fitted on all its uses pooled (module
    docstring); it has one entry in the result.

    Returns:
        :class:`CalibrationResult`.

    Raises:
        ValueError: no convolution skip in ``model``, empty ``inputs``, a bad ``ridge`` or
            ``chunk_size``, or inputs no longer than ``num_landmarks`` (exact attention, so
            nothing to fit).
    """
    # Registration order is the order of the layers in BERT and RoBERTa: bottom-up.
    modules = [
        m for m in model.modules() if isinstance(getattr(m, "nystrom_conv", None), ValueConv)
    ]
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no Nyström convolution skip to calibrate; convert it "
            "first with a kernel, e.g. nystromer.convert(model, conv_kernel_size=35)"
        )
    if not isinstance(inputs, Mapping) and isinstance(inputs, Iterator):
        # A generator or iterator would be used up by the first layer: every layer reads all.
        inputs = list(inputs)
    if isinstance(inputs, Mapping) or not isinstance(inputs, Sized) or len(inputs) == 0:
        raise ValueError(
            "inputs must be a non-empty sequence of batches (dicts of model keyword "
            f"arguments), got {type(inputs).__name__}"
        )
    # Finite: an infinite weight makes the solves NaN, and they would be written into the model.
    if not is_number(ridge) or not 0 <= ridge < math.inf:
        raise ValueError(f"ridge must be a finite number ≥ 0, got {ridge!r}")
    check_positive_int("chunk_size", chunk_size)
    projections = {}
    if output_projection is not None:
        if not is_number(output_projection) or not 0 < output_projection < math.inf:
            raise ValueError(
                f"output_projection must be a finite number > 0 (or None), got "
                f"{output_projection!r}"
            )
        projections = _output_projections(model, modules)

    # Each module's own mode: a model may be in training with some parts frozen in eval.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    explained: list[Tensor] = []
    output_explained: list[float] = []
    tokens = 0
    try:
        uses = _uses(model, next(iter(inputs)))
        for target in modules:
            normal = _NormalEquations(target.nystrom_conv, chunk_size)
            _feed_layer(model, inputs, target, normal.add, uses.get(target, 1))
            if normal.tokens == 0:
                raise ValueError(
                    "the calibration inputs never reached a Nyström attention layer with a "
                    "convolution skip (is the model converted with conv_kernel_size, and are "
                    "its inputs longer than num_landmarks?)"
                )
            explained.append(normal.solve_into(target.nystrom_conv, ridge))
            tokens = normal.tokens
            if projections:
                fit = _OutputMap(projections[target])
                _feed_layer(model, inputs, target, fit.add, uses.get(target, 1))
                output_explained.append(fit.solve_into(float(output_projection)))
    finally:
        for m, training in modes:
            m.training = training
    return CalibrationResult(
        explained=explained,
        tokens=tokens,
        output_explained=output_explained if projections else None,
    )


def _uses(model: nn.Module, batch) -> dict[nn.Module, int]:
    """Attention module → how many times one forward pass calls it (more than once: a layer
    shared by several, as in ALBERT)."""
    counts: dict[nn.Module, int] = {}

    def probe(call: AttentionCall) -> None:
        counts[call.module] = counts.get(call.module, 0) + 1

    _run(model, [batch], probe)
    return counts


def _feed_layer(model: nn.Module, inputs, target: nn.Module, add, uses: int) -> None:
    """Run ``inputs`` through ``model`` up to the ``uses``-th call of the attention module
    ``target`` and hand what each call computed to ``add(call)`` (an
    :class:`~nystromer.patching.AttentionCall`); the rest of each forward pass is skipped."""
    seen = 0

    def probe(call: AttentionCall) -> None:
        nonlocal seen
        if call.module is target:
            add(call)
            seen += 1
            if seen == uses:
                raise _Stop

    def restart() -> None:
        nonlocal seen
        seen = 0

    _run(model, inputs, probe, restart)


def _run(model: nn.Module, inputs, probe, before_each=None) -> None:
    """``model(**batch)`` for each batch under ``probe``, without gradients; a probe raising
    :class:`_Stop` ends that batch's pass."""
    with attention_probe(probe), torch.no_grad():
        for i, batch in enumerate(inputs):
            if not isinstance(batch, Mapping):
                raise ValueError(
                    f"inputs[{i}] must be a dict of keyword arguments for model(**batch), got "
                    f"{type(batch).__name__}"
                )
            if before_each is not None:
                before_each()
            try:
                model(**batch)
            except _Stop:
                pass


def _fitted_queries(call: AttentionCall):
    """(B, n) bool: the queries a fit learns from, or None when there are none.

    Self-attention only (the skip exists for it); a sequence of at most m tokens gets exact
    attention, so it has nothing to correct and would only pull a fit towards zero.
    """
    b, _, n, _ = call.query.shape
    if call.key.shape[2] != n:
        return None
    mask = call.mask
    real = torch.ones(b, n, dtype=torch.bool, device=call.query.device) if mask is None else mask
    real = real & (real.sum(-1, keepdim=True) > call.options.num_landmarks)
    return real if real.any() else None


def _output_projections(model: nn.Module, modules: list[nn.Module]) -> dict:
    """Attention module → the Linear its (heads-concatenated) output goes through next."""
    found = {}
    for parent in model.modules():
        child = getattr(parent, "self", None)
        dense = getattr(getattr(parent, "output", None), "dense", None)
        if any(child is m for m in modules) and isinstance(dense, nn.Linear):
            found[child] = dense
    missing = [m for m in modules if m not in found]
    if missing:
        raise ValueError(
            "output_projection needs BERT/RoBERTa-style attention blocks (attention.self and "
            f"attention.output.dense); found none for {len(missing)} attention modules of "
            f"{type(model).__name__}"
        )
    return found


class _OutputMap:
    """Normal equations of the map from Nyström (+ convolution) outputs to exact attention."""

    def __init__(self, dense: nn.Linear) -> None:
        self.dense = dense
        width = dense.weight.shape[1]
        device = dense.weight.device
        self.yy = torch.zeros(width + 1, width + 1, dtype=torch.float64, device=device)
        self.ey = torch.zeros(width, width + 1, dtype=torch.float64, device=device)
        self.ee = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, call: AttentionCall) -> None:
        real = _fitted_queries(call)
        if real is None:
            return
        b, _, n, _ = call.query.shape
        y = call.output + call.module.nystrom_conv(call.value, call.mask)
        e = softmax_attention(call.query, call.key, call.value, call.mask, call.scale, 0.0)
        keep = real.reshape(-1)
        y = y.transpose(1, 2).reshape(b * n, -1)[keep].double()
        e = e.transpose(1, 2).reshape(b * n, -1)[keep].double()
        y = torch.cat([y, y.new_ones(len(y), 1)], 1)
        self.yy += y.T @ y
        self.ey += e.T @ y
        self.ee += e.square().sum()

    def solve_into(self, shrinkage: float) -> float:
        width = self.ey.shape[0]
        eye = torch.eye(width, width + 1, dtype=torch.float64, device=self.yy.device)
        mu = shrinkage * self.yy.diagonal()[:width].mean()
        reg = mu * torch.eye(width + 1, dtype=torch.float64, device=self.yy.device)
        a = torch.linalg.solve(self.yy + reg, (self.ey + mu * eye).T).T

        # Squared error before (A = [I 0]) and after: ‖E‖² − 2⟨EYᵀ, A⟩ + ⟨A·YYᵀ, A⟩.
        def err(m):
            return self.ee - 2 * (m * self.ey).sum() + ((m @ self.yy) * m).sum()

        before, after = err(eye), err(a)
        w = self.dense.weight.double()
        with torch.no_grad():
            if self.dense.bias is not None:
                self.dense.bias.add_((w @ a[:, width]).to(self.dense.bias))
            self.dense.weight.copy_((w @ a[:, :width]).to(self.dense.weight))
        return float(1 - after / before.clamp_min(torch.finfo(torch.float64).tiny))


class _NormalEquations:
    """Per-head sums XᵀX (H, k, k), Xᵀr (H, k) and rᵀr (H,) in float64."""

    def __init__(self, conv: ValueConv, chunk_size: int) -> None:
        self.k = conv.kernel_size[0]
        self.heads = conv.weight.shape[0]
        self.chunk_size = chunk_size
        device = conv.weight.device  # the sums live where the activations are
        self.gram = torch.zeros(self.heads, self.k, self.k, dtype=torch.float64, device=device)
        self.rhs = torch.zeros(self.heads, self.k, dtype=torch.float64, device=device)
        self.rr = torch.zeros(self.heads, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, call: AttentionCall) -> None:
        real = _fitted_queries(call)
        if real is None:
            return
        value, mask, out = call.value, call.mask, call.output
        exact = softmax_attention(call.query, call.key, value, mask, call.scale, 0.0)
        keep = real[:, None, :, None].to(value.dtype)
        residual = (exact - out) * keep
        # Padding is zero for the convolution, as in ValueConv.
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

    def solve_into(self, conv: ValueConv, ridge: float) -> Tensor:
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

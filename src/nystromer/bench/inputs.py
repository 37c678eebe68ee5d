"""Benchmark inputs: random query/key/value tensors, right-padding masks, and the q, k, v that a
model's projections compute."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["INPUT_STYLES", "padding_mask", "random_qkv", "relative_error", "captured_heads"]

#: ``gaussian``: i.i.d. N(0, 1) entries (attention logits of standard deviation 1, nearly
#: uniform attention). ``structured``: shaped like a trained model's, see :func:`random_qkv`.
INPUT_STYLES = ("gaussian", "structured")


def padding_mask(batch: int, seq_len: int, padding: float, device="cpu") -> Tensor | None:
    """A right-padding key mask (B, n), True = real token, or None when ``padding`` is 0.

    Sample i has ``round(2·padding·n·(i+1)/(B+1))`` padding positions at its end, so the
    lengths differ across the batch and padding makes up ``padding`` of the batch on average
    (for B = 1: exactly the last ``padding`` fraction).
    """
    if not 0.0 <= padding < 1.0:
        raise ValueError(f"padding must be a fraction in [0, 1), got {padding!r}")
    if padding == 0.0:
        return None
    pads = [
        min(seq_len - 1, round(2 * padding * seq_len * (i + 1) / (batch + 1))) for i in range(batch)
    ]
    lengths = torch.tensor([seq_len - p for p in pads], device=device)
    return torch.arange(seq_len, device=device)[None, :] < lengths[:, None]


def random_qkv(
    batch: int,
    heads: int,
    seq_len: int,
    head_dim: int,
    *,
    style: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
    logit_std: float = 2.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random (B, H, n, d) query, key and value tensors, generated in float32 on the CPU from
    ``seed`` (reproducible across devices), then cast. ``gaussian``: i.i.d. N(0, 1).

    ``structured`` imitates what trained attention layers see: neighbouring tokens are
    similar (each of q, k, v is half a smooth signal along the sequence, a random walk
    low-pass filtered over ~n/64 positions, and half token-specific noise), every head has a
    shared offset direction (as LayerNorm'd hidden states give), and q, k are scaled so that
    the attention logits q·k/√d have standard deviation ``logit_std`` (the default 2 is about a
    trained model's per-head median, e.g. all-MiniLM-L6-v2's on English text).
    """
    if style not in INPUT_STYLES:
        raise ValueError(f"style must be one of {INPUT_STYLES}, got {style!r}")
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, seq_len, head_dim)
    if style == "gaussian":
        q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    else:
        width = max(1, seq_len // 64)

        def smooth_plus_noise() -> Tensor:
            walk = torch.randn(shape, generator=gen).cumsum(2)
            # Moving average over `width` positions turns the walk into a slow signal.
            c = torch.nn.functional.pad(walk.cumsum(2), (0, 0, width, 0))
            slow = c[:, :, width:] - c[:, :, :-width]
            slow = slow - slow.mean(2, keepdim=True)
            slow = slow / slow.std(2, keepdim=True).clamp_min(1e-6)
            offset = torch.randn(batch, heads, 1, head_dim, generator=gen)
            noise = torch.randn(shape, generator=gen)
            return (slow + noise) / math.sqrt(2.0) + 0.5 * offset

        q, k, v = smooth_plus_noise(), smooth_plus_noise(), smooth_plus_noise()
        # Measure the logit spread on a sample of rows and rescale q and k equally to hit it.
        rows = torch.randperm(seq_len, generator=gen)[:256]
        logits = q[:, :, rows] @ k[:, :, rows].transpose(-1, -2) / math.sqrt(head_dim)
        factor = math.sqrt(logit_std / float(logits.std().clamp_min(1e-6)))
        q, k = q * factor, k * factor
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def relative_error(approx: Tensor, exact: Tensor, mask: Tensor | None = None) -> float:
    """‖approx − exact‖_F / ‖exact‖_F over (B, H, n, d) outputs, real query rows only."""
    diff, ref = approx.double() - exact.double(), exact.double()
    if mask is not None:
        diff, ref = diff * mask[:, None, :, None], ref * mask[:, None, :, None]
    return float(diff.norm() / ref.norm().clamp_min(1e-300))


def captured_heads(
    run: Callable[[], object], projections: dict[str, list[nn.Module]], heads: int
) -> list[Tensor]:
    """What the named projection layers output while ``run()`` runs (without autograd).

    Each layer's (B, n, H·d) output becomes (B, H, n, d) float32; per name, the outputs of its
    layers are concatenated along the first axis (e.g. every layer of a model, as a batch).
    """
    caught: dict[str, list[Tensor]] = {name: [] for name in projections}
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out, got=got: got.append(out.detach().float()))
        for name, got in caught.items()
        for layer in projections[name]
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return [
        torch.cat([t.view(*t.shape[:2], heads, -1).transpose(1, 2) for t in caught[name]])
        for name in projections
    ]

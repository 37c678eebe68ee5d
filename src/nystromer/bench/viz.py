"""``nystromer viz attention``: one head's exact n×n attention matrix softmax(s·QKᵀ) beside
the F·A⁺·B that Nyström attention applies to V (never formed there; here, for a small n),
with the same colour scale and the landmark segments marked on both.
"""

from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path

import torch
from torch import Tensor

from .. import reference
from .._io import atomic_path, atomic_write
from .._machine import machine_info, machine_label
from .inputs import random_qkv, relative_error

__all__ = ["attention_matrices", "attention_figure", "plot_attention"]


def attention_matrices(
    q: Tensor, k: Tensor, num_landmarks: int, pinv_iterations: int = 6
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact and Nyström attention matrices of one head from its (n, d) queries and keys,
    n > num_landmarks: ``(exact, approx, boundaries)``, two (n, n) matrices (rows of ``exact``
    sum to 1, rows of ``approx`` to about 1) and the (m + 1,) segment boundaries in positions."""
    n, m = q.shape[0], num_landmarks
    if n <= m:
        raise ValueError(f"q: need more positions than num_landmarks={m}, got n={n}")
    starts = [lo for lo, _ in reference.segment_bounds(n, m)]
    approx = reference.nystrom_matrix(q, k, m, pinv_iterations)
    return reference.softmax_kernel(q, k), approx, torch.tensor([*starts, n])


def colour_limit(matrix: Tensor, q: float = 0.995) -> float:
    """The ``q``-quantile of the entries of ``matrix`` (linear interpolation, as
    ``torch.quantile``), of any size: ``torch.quantile`` refuses more than 2²⁴ entries, which
    an n×n matrix passes above n = 4,096."""
    import numpy as np

    return float(np.quantile(matrix.detach().cpu().numpy().ravel(), q))


def plot_attention(
    path: str | os.PathLike[str],
    *,
    seq_len: int = 256,
    num_landmarks: int = 16,
    pinv_iterations: int = 6,
    head_dim: int = 64,
    seed: int = 0,
    q: Tensor | None = None,
    k: Tensor | None = None,
    title: str | None = None,
    window: int | None = None,
) -> dict:
    """Write a PNG (``path``) with the exact and the Nyström attention matrix (m landmarks,
    ``pinv_iterations``) side by side, of one head's (n, d) ``q`` and ``k``, or of structured
    random ones of ``seq_len``, ``head_dim`` and ``seed``; ``title`` defaults to describing them.
    ``window`` draws only the first that many positions (long sequences stay readable). Returns
    ``{"path", "relative_error", "seq_len", "num_landmarks", "title", "window"}``, the error
    ‖approx − exact‖_F / ‖exact‖_F of the whole matrices."""
    from matplotlib.figure import Figure

    if (q is None) != (k is None):
        raise ValueError("q and k must be given together")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of positions, got {window!r}")
    if q is None:
        q4, k4, _ = random_qkv(1, 1, seq_len, head_dim, style="structured", seed=seed)
        q, k = q4[0, 0], k4[0, 0]
        title = title or f"structured random q, k (n = {seq_len}, d = {head_dim})"
    title = title or f"q, k of one head (n = {q.shape[0]}, d = {q.shape[1]})"
    exact, approx, bounds = attention_matrices(
        q.double(), k.double(), num_landmarks, pinv_iterations
    )
    error = relative_error(approx, exact)
    n_all = exact.shape[0]
    n = min(window or n_all, n_all)
    if n < n_all:
        title = f"{title}; positions 0–{n - 1} of {n_all} shown"
    vmax = colour_limit(exact[:n, :n])
    # Landmarks sit at the centres of their segments; inside a window, those that fall in it.
    centres = ((bounds[:-1] + bounds[1:]).double() - 1) / 2
    centres = centres[centres <= n - 1]
    inner = bounds[(bounds > 0) & (bounds < n)]
    fig = Figure(figsize=(11, 5.2))
    axes = fig.subplots(1, 2)
    panels = (
        ("exact softmax(QKᵀ/√d)", exact),
        (f"Nyström F·A⁺·B, m = {num_landmarks}, {pinv_iterations} pinv iterations", approx),
    )
    for ax, (name, mat) in zip(axes, panels, strict=True):
        mat = mat[:n, :n].numpy()
        im = ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        for b in inner.tolist():
            ax.axhline(b - 0.5, color="white", linewidth=0.4, alpha=0.5)
            ax.axvline(b - 0.5, color="white", linewidth=0.4, alpha=0.5)
        ax.plot(centres, [-1.5] * len(centres), "rv", markersize=3, clip_on=False)
        ax.plot([n + 0.5] * len(centres), centres, "r<", markersize=3, clip_on=False)
        ax.set(xlim=(-0.5, n - 0.5), ylim=(n - 0.5, -0.5))
        ax.set(xlabel="key position", ylabel="query position")
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight (clipped at 99.5th pct)")
    fig.suptitle(
        f"{title}\nrelative error ‖approx − exact‖/‖exact‖ = {error:.3f}; "
        "lines: landmark segments, red marks: landmarks",
        fontsize=9,
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return {
        "path": str(Path(path)),
        "relative_error": error,
        "seq_len": q.shape[0],
        "num_landmarks": num_landmarks,
        "title": title,
        "window": n,
    }


def _too_many_landmarks(m: int, n: int, where: str):
    raise ValueError(f"--num-landmarks: expected fewer than the n = {n} positions {where}, got {m}")


def attention_figure(
    path: str | os.PathLike[str],
    *,
    source: str = "random",
    seq_len: int = 256,
    num_landmarks: int = 16,
    pinv_iterations: int = 6,
    model_source: str = "auto",
    lra_run: str | os.PathLike[str] | None = None,
    lra_checkpoint: str = "auto",
    layer: int | None = None,
    head: int = 0,
    window: int | None = None,
) -> dict:
    """``nystromer viz attention``: :func:`plot_attention` on one head of the inputs of
    ``source``: ``random`` (structured random q, k), ``lm`` (a language model's,
    :func:`~nystromer.bench.approx.model_qkv`) or ``lra`` (a trained LRA model's,
    :func:`~nystromer.bench.lra_inputs.lra_qkv`); ``layer`` defaults to 2 for lm and the last
    for lra; ``seq_len`` is n of the random and lm inputs. Writes the result beside the PNG as
    JSON (``.json``) and returns it with ``pinv_iterations``, ``date``, ``machine_label`` and
    ``json`` (that file's path) added."""
    if source not in ("random", "lm", "lra"):
        raise ValueError(f"source must be random, lm or lra, got {source!r}")
    chosen = [flag for flag, given in (("--layer", layer is not None), ("--head", head)) if given]
    if source == "random" and chosen:
        # They would be ignored: the plot would not show what was asked for.
        raise ValueError(
            f"{' and '.join(chosen)}: the random inputs are one head of no model; a layer and "
            "a head are chosen among a model's (--source lm or lra)"
        )
    if source != "lra" and num_landmarks >= seq_len:
        _too_many_landmarks(num_landmarks, seq_len, "(--seq-len)")
    q = k = title = None
    if source == "lm":
        from .approx import model_qkv

        layer = 2 if layer is None else layer
        mq, mk, _, description = model_qkv(seq_len, source=model_source)
        if not 0 <= layer < mq.shape[0]:
            raise ValueError(f"--layer: the model has {mq.shape[0]} layers, got {layer}")
        q, k, about = mq[layer], mk[layer], f"{description}, layer {layer}"
    elif source == "lra":
        from .lra_inputs import lra_qkv

        layer = -1 if layer is None else layer
        lra = lra_qkv(lra_run, layer=layer, checkpoint=lra_checkpoint, num_landmarks=num_landmarks)
        # Sample 0: a whole validation example without padding.
        q, k, about = lra.query[0], lra.key[0], lra.description.split(";")[0]
    if q is not None:  # (H, n, d) of a model: one head
        if not 0 <= head < q.shape[0]:
            raise ValueError(f"--head: the model has {q.shape[0]} heads, got {head}")
        q, k = q[head], k[head]
        title = f"{about}, head {head}, n = {q.shape[0]}"
    if source == "lra" and num_landmarks >= q.shape[0]:
        _too_many_landmarks(num_landmarks, q.shape[0], "of the LRA example")
    found = plot_attention(
        path,
        seq_len=seq_len,
        num_landmarks=num_landmarks,
        pinv_iterations=pinv_iterations,
        q=q,
        k=k,
        title=title,
        window=window,
    )
    found |= {"pinv_iterations": pinv_iterations, "date": date.today().isoformat()}
    found["machine_label"] = machine_label(machine_info())
    sidecar = Path(path).with_suffix(".json")
    with atomic_write(sidecar) as f:
        json.dump(found, f, indent=2)
    return found | {"json": str(sidecar)}

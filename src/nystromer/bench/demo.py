"""``nystromer demo``, part 1: forward time, peak memory (fresh process each) and output error of
exact and Nyström attention as n grows (docs/results.md, "make demo").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .._machine import machine_info, machine_label
from .._markdown import table
from ..functional import nystrom_attention, softmax_attention
from .inputs import random_qkv, relative_error
from .measure import CaseSpec, fmt, measure_case

__all__ = ["DemoRow", "DEMO_LENGTHS", "run_attention_demo", "format_demo_table"]

DEMO_LENGTHS = (1024, 2048, 4096, 8192, 16384)


@dataclass
class DemoRow:
    """One sequence length: forward ms and peak MiB of exact and Nyström, and the error.

    ``matrix_mib`` is computed, not measured: the size of the H·n×n float32 attention matrix
    that exact attention without a fused kernel stores (torch's SDPA never forms it).
    """

    seq_len: int
    exact_ms: float | None
    nystrom_ms: float | None
    exact_mib: float | None
    nystrom_mib: float | None
    relative_error: float
    matrix_mib: float = 0.0


def format_demo_table(rows: Sequence[DemoRow]) -> str:
    """Markdown table of :func:`run_attention_demo`'s rows with speed-up and memory ratio."""
    header = ["n", "exact ms", "Nyström ms", "speed-up", "exact MiB", "Nyström MiB"]
    cells = []
    for r in rows:
        speed = r.exact_ms / r.nystrom_ms if r.exact_ms and r.nystrom_ms else None
        times = [fmt(r.exact_ms), fmt(r.nystrom_ms), f"{fmt(speed, '.1f')}×"]
        sizes = [fmt(r.exact_mib), fmt(r.nystrom_mib), fmt(r.matrix_mib, ",.0f")]
        cells.append([f"{r.seq_len:,}", *times, *sizes, f"{r.relative_error:.3f}"])
    return "\n".join(table([*header, "n×n matrix MiB", "relative error"], cells, left=0))


def run_attention_demo(
    lengths: Sequence[int] = DEMO_LENGTHS,
    *,
    heads: int = 8,
    head_dim: int = 64,
    num_landmarks: int = 64,
    threads: int | None = None,
    repeats: int = 2,
    out: Callable[[str], None] | None = print,
) -> list[DemoRow]:
    """Compare exact and Nyström attention (batch 1, H heads of d, m landmarks) for each length
    n; print (to ``out``, None: silent) and return one :class:`DemoRow` per length. ``threads``:
    torch threads (None: torch's default); ``repeats``: timed forward calls per measurement
    (median; one warm-up call before)."""
    say = out or (lambda _line: None)
    say(
        f"Exact vs Nyström attention (m = {num_landmarks}), batch 1, {heads} heads × {head_dim}, "
        f"float32 forward; {machine_label(machine_info('cpu', threads))}."
    )
    say(
        "Time: median forward. Memory: peak above the inputs, fresh process each. Error: "
        "‖Nyström − exact‖/‖exact‖ on random q, k, v with smooth structure along the sequence "
        "and attention logits of standard deviation 2 (a trained model's median). torch's "
        "SDPA is a fused kernel that never stores the n×n matrix; the last-but-one column is "
        "what storing it (as the paper's Transformer did) would take."
    )
    rows = []
    for n in lengths:
        base = CaseSpec(
            "exact", 1, heads, n, head_dim, num_landmarks, threads=threads, repeats=repeats
        )
        exact, ours = (
            measure_case(dataclasses.replace(base, impl=impl), backward=False)
            for impl in ("exact", "nystromer")
        )
        for r in (exact, ours):
            if r.status != "ok":
                say(f"  n = {n}: {r.spec.impl} {r.status}: {r.note}")
        if threads is not None:
            torch.set_num_threads(threads)
        q, k, v = random_qkv(1, heads, n, head_dim, style="structured", seed=base.seed)
        with torch.no_grad():
            ours_out = nystrom_attention(q, k, v, num_landmarks=num_landmarks)
            error = relative_error(ours_out, softmax_attention(q, k, v))
        ms, mib = zip(*((r.forward_ms, r.forward_peak_mib) for r in (exact, ours)), strict=True)
        row = DemoRow(n, *ms, *mib, error, matrix_mib=heads * n * n * 4 / 2**20)
        rows.append(row)
        say(
            f"  n = {n:>6,}: exact {row.exact_ms or float('nan'):8.1f} ms, Nyström "
            f"{row.nystrom_ms or float('nan'):6.1f} ms, error {row.relative_error:.3f}"
        )
    say("")
    say(format_demo_table(rows))
    return rows

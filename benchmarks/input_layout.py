#!/usr/bin/env python
"""Input layout benchmark: our attention on contiguous vs head-split (B, H, n, d) inputs.

    python benchmarks/input_layout.py                        # n = 16,384, 1 × 8 heads × 64
    python benchmarks/input_layout.py --write-docs docs/benchmarks.md

A model hands attention (B, n, H, d) memory viewed as (B, H, n, d) (a projection, then a head
split); tests and micro-benchmarks usually pass contiguous (B, H, n, d) tensors. The attention
core benchmark uses the model's layout since 2026-12-01; this one shows what that choice does to
our times: both layouts are timed in one process, alternating round by round, so that the
machine's drift hits both alike. Forward runs without autograd; forward+backward
back-propagates an output gradient in the same layout as the inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from nystromer import nystrom_attention
from nystromer.bench.measure import (
    add_core_problem_arguments,
    emit_section,
    machine_info,
    machine_label,
    recorded_command,
    require_positive,
    time_alternating,
)

LAYOUTS = ("contiguous", "head-split")
BEGIN = "<!-- input-layout:begin (written by benchmarks/input_layout.py) -->"
END = "<!-- input-layout:end -->"


def make_inputs(layout: str, batch: int, heads: int, n: int, d: int, seed: int = 0) -> list:
    """q, k, v and an output gradient, (B, H, n, d) each, in ``layout``."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return [torch.randn(batch, heads, n, d, generator=gen) for _ in range(4)]
    return [torch.randn(batch, n, heads, d, generator=gen).transpose(1, 2) for _ in range(4)]


def time_layouts(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Milliseconds per call: ``{layout: {"forward": [...], "forward_backward": [...]}}``."""
    inputs = {
        layout: make_inputs(layout, args.batch, args.heads, args.seq_len, args.head_dim)
        for layout in LAYOUTS
    }
    for q, k, v, _ in inputs.values():
        for t in (q, k, v):
            t.requires_grad_(True)

    def forward(qkvg):
        q, k, v, _ = qkvg
        with torch.no_grad():
            nystrom_attention(q, k, v, num_landmarks=args.num_landmarks)

    def forward_backward(qkvg):
        q, k, v, grad = qkvg
        for t in (q, k, v):
            t.grad = None
        nystrom_attention(q, k, v, num_landmarks=args.num_landmarks).backward(grad)

    tasks = {"forward": forward, "forward_backward": forward_backward}
    return time_alternating(tasks, inputs, args.repeats)


def render(times: dict, command: str, label: str, args: argparse.Namespace) -> str:
    med = {lay: {t: statistics.median(v) for t, v in times[lay].items()} for lay in LAYOUTS}
    lines = [
        "## Input layout: contiguous vs head-split inputs",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `{command}`.",
        f"Machine: {label}.",
        "",
        f"Ours only, n = {args.seq_len:,}, batch {args.batch}, {args.heads} heads × "
        f"{args.head_dim}, m = {args.num_landmarks}, float32; median of {args.repeats} calls "
        "per layout, the layouts alternating in one process.",
        "",
        "| inputs | forward ms | forward+backward ms |",
        "|---|--:|--:|",
    ]
    for lay in LAYOUTS:
        lines.append(
            f"| {lay} | {med[lay]['forward']:,.1f} | {med[lay]['forward_backward']:,.1f} |"
        )
    ratio = {t: med["head-split"][t] / med["contiguous"][t] for t in med["contiguous"]}
    lines.append(
        f"| head-split ÷ contiguous | {ratio['forward']:.2f} | {ratio['forward_backward']:.2f} |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_core_problem_arguments(p)
    p.add_argument("--repeats", type=int, default=9, help="timed calls per layout (median)")
    p.add_argument("--write-docs", metavar="FILE", help="write/replace the section in FILE")
    args = p.parse_args(argv)
    require_positive(p, args, ("seq_len", "batch", "heads", "head_dim", "num_landmarks", "repeats"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = recorded_command("benchmarks/input_layout.py", argv, drop=())
    print(f"input layout benchmark: {command}", flush=True)
    markdown = render(time_layouts(args), command, machine_label(machine_info()), args)
    emit_section(markdown, args.write_docs, BEGIN, END, "input-layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())

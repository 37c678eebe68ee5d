#!/usr/bin/env python
"""Our attention at a git revision against the working tree, side by side in one process.

    python benchmarks/against_commit.py 735c51d                  # n = 16,384, 1 × 8 heads × 64
    python benchmarks/against_commit.py HEAD~1 --kmeans-iterations 3 --heads 12 --head-dim 32

Speed changes to ``nystromer.functional`` are small against this machine's drift, so they are
measured this way: ``src/nystromer/functional.py`` as it was at REV is imported beside the
current one, and both run on the same head-split inputs ((B, n, H, d) memory, as a model
hands them over), alternating call by call. Forward runs without autograd; forward+backward
back-propagates an output gradient to q, k and v. Both are timed without padding and with
the last ``--padding`` fraction of every sequence padded, and the page faults of an unpadded
forward are counted (fresh memory is what costs most on this machine). The table it prints
is what the docs quote for such a change, with this command.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nystromer import functional
from nystromer.bench.measure import (
    add_core_problem_arguments,
    machine_info,
    machine_label,
    recorded_command,
    require_positive,
    time_alternating,
)

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src/nystromer/functional.py"


def functional_at(rev: str):
    """``nystromer.functional`` as it was at git revision ``rev`` (a module of its own)."""
    try:
        text = subprocess.run(
            ["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise ValueError(f"cannot read {SOURCE} at revision {rev!r}: {exc.stderr.strip()}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "functional_at_rev.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"functional_at_{rev}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def time_revisions(args: argparse.Namespace) -> tuple[dict, dict[str, float]]:
    """``({revision: {task: [ms, ...]}}, {revision: page faults})``: tasks "forward",
    "forward+backward" and their padded variants; the median minor page faults of three
    unpadded forwards."""
    b, h, n, d = args.batch, args.heads, args.seq_len, args.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(b, n, h, d, generator=gen).transpose(1, 2) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    real = n - int(n * args.padding)
    masks = {"": None, ", padded": torch.arange(n)[None].expand(b, n) < real}
    options = {"num_landmarks": args.num_landmarks, "kmeans_iterations": args.kmeans_iterations}

    def forward(attention, mask):
        with torch.no_grad():
            attention(q, k, v, mask=mask, **options)

    def forward_backward(attention, mask):
        for t in (q, k, v):
            t.grad = None
        attention(q, k, v, mask=mask, **options).backward(grad)

    tasks = {}
    for suffix, mask in masks.items():
        tasks[f"forward{suffix}"] = lambda fn, mask=mask: forward(fn, mask)
        tasks[f"forward+backward{suffix}"] = lambda fn, mask=mask: forward_backward(fn, mask)
    variants = {
        args.rev: functional_at(args.rev).nystrom_attention,
        "working tree": functional.nystrom_attention,
    }
    times = time_alternating(tasks, variants, args.repeats)
    faults = {}
    for name, attention in variants.items():
        counts = []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            forward(attention, None)
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        faults[name] = statistics.median(counts)
    return times, faults


def render(
    times: dict, faults: dict[str, float], command: str, label: str, args: argparse.Namespace
) -> str:
    old, new = times[args.rev], times["working tree"]
    lines = [
        f"Measured with `{command}`.",
        f"Machine: {label}.",
        "",
        f"n = {args.seq_len:,}, batch {args.batch}, {args.heads} heads × {args.head_dim}, "
        f"m = {args.num_landmarks}, {args.kmeans_iterations} k-means iterations, float32, "
        f"head-split inputs, padded: the last {args.padding:.0%} of each sequence; median of "
        f"{args.repeats} calls per revision, the revisions alternating in one process.",
        "",
        f"| ms | {args.rev} | working tree | {args.rev} ÷ working tree |",
        "|---|--:|--:|--:|",
    ]
    for task in old:
        a, b = statistics.median(old[task]), statistics.median(new[task])
        lines.append(f"| {task} | {a:,.1f} | {b:,.1f} | {a / b:.2f} |")
    a, b = faults[args.rev], faults["working tree"]
    ratio = f"{a / b:.2f}" if b else "—"
    lines.append(f"| page faults per forward | {a:,.0f} | {b:,.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rev", help="git revision whose functional.py is timed against the tree")
    add_core_problem_arguments(p)
    p.add_argument("--kmeans-iterations", type=int, default=0)
    p.add_argument("--padding", type=float, default=0.1, help="padded fraction (default 0.1)")
    p.add_argument("--repeats", type=int, default=11, help="timed calls per revision (median)")
    args = p.parse_args(argv)
    require_positive(p, args, ("seq_len", "batch", "heads", "head_dim", "num_landmarks", "repeats"))
    if not 0.0 <= args.padding < 1.0:
        p.error(f"--padding must be in [0, 1), got {args.padding}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = recorded_command("benchmarks/against_commit.py", argv, drop=())
    try:
        times, faults = time_revisions(args)
    except ValueError as exc:
        p.error(str(exc))
    print(render(times, faults, command, machine_label(machine_info()), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Forward parts: where our forward's time goes, against the work any implementation must do.

    python benchmarks/forward_parts.py                       # n = 16,384, 1 × 8 heads × 64
    python benchmarks/forward_parts.py --threads 2 --write-docs docs/benchmarks.md

The attention core benchmark compares whole forwards; this one splits ours into its two
``scaled_dot_product_attention`` calls (m landmark queries over the n keys; the n queries over
the m landmark keys) and the rest (landmark means, pseudo-inverse, small products), and times,
at the same sizes and with torch's own kernels, the work every Nyström forward must do:

* the four matrix products: Q̃Kᵀ and P·V (step 1), QK̃ᵀ and P·W (step 3), each a batched
  product into a preallocated result;
* the 2·B·H·n·m exponentials of the two softmaxes;
* the first write of a fresh (B, n, H·d) output, which on a machine that maps large
  allocations fresh costs page faults as well as the write.

Their sum is what the same work costs as separate torch kernels; a fused kernel can beat it
only by keeping the score blocks in cache. Everything is timed in one process, the parts
alternating call by call, so that the machine's drift hits all of them alike. The FLOP limit
(8·B·H·n·m·d FLOPs at the rate of a 4096² GEMM) is the one the core benchmark checks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from nystromer import functional, nystrom_attention
from nystromer.bench.measure import (
    add_core_problem_arguments,
    emit_section,
    machine_info,
    machine_label,
    matmul_flop_rate,
    recorded_command,
    require_positive,
    time_alternating,
)

BEGIN = "<!-- forward-parts:begin (written by benchmarks/forward_parts.py) -->"
END = "<!-- forward-parts:end -->"

#: Ours and its parts, then the work every implementation must do (rows of the table).
OURS = "ours: whole forward"
STEP1 = "ours, step 1: SDPA of the m landmark queries over the n keys"
STEP3 = "ours, step 3: SDPA of the n queries over the m landmark keys, rows split per thread"
PRODUCTS1 = "products of step 1: Q̃Kᵀ and P·V"
PRODUCTS3 = "products of step 3: QK̃ᵀ and P·W"
EXP = "exponentials: B·H·n·m, once"
FIRST_WRITE = "first write of a fresh (B, n, H·d) output"


def products(a: Tensor, b: Tensor, c: Tensor, scores: Tensor, out: Tensor) -> Tensor:
    """(a·b)·c as two batched products into the preallocated ``scores`` and ``out``: one
    attention step's matrix work without its softmax (a fresh result would add page faults)."""
    torch.bmm(a, b, out=scores)
    return torch.bmm(scores, c, out=out)


def make_parts(args: argparse.Namespace) -> dict[str, object]:
    """Name → a no-argument callable for each timed part, on inputs of ``args``' sizes.

    q, k, v are in a projection's head-split layout ((B, n, H, d) memory viewed as
    (B, H, n, d)), as in a model and in the attention core benchmark.
    """
    b, h, n, d, m = args.batch, args.heads, args.seq_len, args.head_dim, args.num_landmarks
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=gen).transpose(1, 2) for _ in range(3))
    q_land, k_land, w = (torch.randn(b, h, m, d, generator=gen) for _ in range(3))
    bh = b * h
    # The products get contiguous (B·H, ·, ·) operands: they measure torch's rate, not a layout.
    qc, kc, vc = (t.reshape(bh, n, d) for t in (q, k, v))
    land_q, land_k_t, small = (t.reshape(bh, m, d) for t in (q_land, k_land, w))
    land_k_t = land_k_t.mT
    scores_mn = torch.empty(bh, m, n)  # step 1's scores, one row per landmark query
    scores_nm = torch.empty(bh, n, m)  # step 3's scores, one row per query
    out_small, out_big = torch.empty(bh, m, d), torch.empty(bh, n, d)
    # Softmax exponentiates logits minus their row maximum: values ≤ 0.
    exp_in, exp_out = -8 * torch.rand(bh, n, m, generator=gen), torch.empty(bh, n, m)

    def ours():
        with torch.no_grad():
            nystrom_attention(q, k, v, num_landmarks=m)

    return {
        OURS: ours,
        STEP1: lambda: F.scaled_dot_product_attention(q_land, k, v),
        STEP3: lambda: functional._exact_rows(q, k_land, w, None, None, 0.0),
        PRODUCTS1: lambda: products(land_q, kc.mT, vc, scores_mn, out_small),
        PRODUCTS3: lambda: products(qc, land_k_t, small, scores_nm, out_big),
        EXP: lambda: torch.exp(exp_in, out=exp_out),
        FIRST_WRITE: lambda: torch.empty(b, n, h * d).zero_(),
    }


def time_parts(args: argparse.Namespace) -> dict[str, list[float]]:
    """Milliseconds per call of every part, the parts alternating: ``{part: [ms, ...]}``."""
    parts = make_parts(args)
    times = time_alternating({"time": lambda call: call()}, parts, args.repeats)
    return {name: t["time"] for name, t in times.items()}


def render(times: dict[str, list[float]], gemm_flops: float, command: str, label: str, args) -> str:
    med = {name: statistics.median(t) for name, t in times.items()}
    b, h, n, d, m = args.batch, args.heads, args.seq_len, args.head_dim, args.num_landmarks
    product_flops = 4.0 * b * h * n * m * d  # two products of 2·n·m·d FLOPs per head
    rest = med[OURS] - med[STEP1] - med[STEP3]
    # One softmax per step: the exponentials are timed once and needed twice.
    mandatory = med[PRODUCTS1] + med[PRODUCTS3] + 2 * med[EXP] + med[FIRST_WRITE]
    flop_limit = 2 * product_flops / gemm_flops * 1e3

    def rate(ms: float) -> str:
        return f"{product_flops / (ms * 1e-3) / 1e9:,.0f} GFLOP/s"

    rows = [
        (OURS, med[OURS], ""),
        (STEP1, med[STEP1], rate(med[STEP1]) + " counting its products only"),
        (STEP3, med[STEP3], rate(med[STEP3]) + " counting its products only"),
        ("ours, rest: landmark means, pseudo-inverse, small products", rest, "the difference"),
        (PRODUCTS1, med[PRODUCTS1], rate(med[PRODUCTS1])),
        (PRODUCTS3, med[PRODUCTS3], rate(med[PRODUCTS3])),
        (EXP, med[EXP], "counted twice below: one softmax per step"),
        (FIRST_WRITE, med[FIRST_WRITE], ""),
        ("**work every implementation must do, as separate torch kernels**", mandatory, ""),
        (f"FLOP limit: 8·B·H·n·m·d at the {args.gemm_size}² GEMM rate", flop_limit, ""),
    ]
    lines = [
        "## Forward parts: where the forward's time goes",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `{command}`.",
        f"Machine: {label}.",
        "",
        f"n = {n:,}, batch {b}, {h} heads × {d}, m = {m}, float32, head-split inputs; median "
        f"of {args.repeats} calls per part, the parts alternating in one process. FP32 GEMM "
        f"{args.gemm_size}²: {gemm_flops / 1e9:,.1f} GFLOP/s.",
        "",
        "| part | ms | note |",
        "|---|--:|---|",
    ]
    # Three decimals below 1 ms, so that a tiny problem's rows are not all 0.0.
    lines += [f"| {name} | {ms:,.{1 if ms >= 1 else 3}f} | {note} |" for name, ms, note in rows]
    lines += [
        "",
        f"Ours ÷ the work every implementation must do: {med[OURS] / mandatory:.2f}; that work "
        f"÷ the FLOP limit: {mandatory / flop_limit:.2f}; ours ÷ the FLOP limit: "
        f"{med[OURS] / flop_limit:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_core_problem_arguments(p)
    p.add_argument("--repeats", type=int, default=9, help="timed calls per part (median)")
    p.add_argument("--gemm-size", type=int, default=4096, help="GEMM that measures the rate")
    p.add_argument("--write-docs", metavar="FILE", help="write/replace the section in FILE")
    args = p.parse_args(argv)
    require_positive(
        p, args, ("seq_len", "batch", "heads", "head_dim", "num_landmarks", "repeats", "gemm_size")
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = recorded_command("benchmarks/forward_parts.py", argv, drop=())
    print(f"forward parts benchmark: {command}", flush=True)
    times = time_parts(args)
    gemm = matmul_flop_rate(args.gemm_size, 3, "cpu", "float32")
    markdown = render(times, gemm, command, machine_label(machine_info()), args)
    emit_section(markdown, args.write_docs, BEGIN, END, "forward-parts")
    return 0


if __name__ == "__main__":
    sys.exit(main())

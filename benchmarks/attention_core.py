#!/usr/bin/env python
"""Attention core benchmark: nystromer vs the naive formula, exact SDPA and the peers.

    python benchmarks/attention_core.py                       # n = 16,384, 1 × 8 heads × 64
    python benchmarks/attention_core.py --write-docs docs/benchmarks.md
    python benchmarks/attention_core.py --seq-len 4096 --impl nystromer --impl exact

Each implementation runs in fresh processes (see ``nystromer.bench.measure``). Prints the
table of times, peak memory and their ratios to ours.
"""

from __future__ import annotations

import argparse
import json
import sys

from nystromer._io import atomic_write
from nystromer.bench.cli import add_script_args, call_with
from nystromer.bench.core import CoreReport, format_report, run_core, write_docs_section
from nystromer.bench.implementations import IMPLEMENTATIONS
from nystromer.bench.measure import DTYPES, CaseSpec, recorded_command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", "-n", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--padding", type=float, default=0.1, help="padding fraction of the padded row")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measure every implementation this many times, in turn (median over rounds)",
    )
    p.add_argument("--exact-repeats", type=int, default=2, help="timed calls of exact SDPA")
    p.add_argument(
        "--impl",
        action="append",
        choices=list(IMPLEMENTATIONS),
        help="only these implementations (repeatable; default: all but exact-matmul)",
    )
    p.add_argument("--json", help="also write the full report as JSON here")
    add_script_args(p, repeats=5, timeout=1800, saved="a report saved earlier with --json")
    args = p.parse_args(argv)

    # The rows' implementation and padding are set per row.
    base = call_with(CaseSpec, args, impl="nystromer", padding=0.0)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            report = CoreReport.from_dict(json.load(f))
        return _emit(report, args)
    command = recorded_command("benchmarks/attention_core.py", argv, drop=("--json",))
    print(f"attention core benchmark: {command}", flush=True)
    report = call_with(
        run_core,
        args,
        base,
        implementations=args.impl,
        command=command,
        progress=lambda line: print(line, flush=True),
    )
    return _emit(report, args)


def _emit(report: CoreReport, args: argparse.Namespace) -> int:
    print()
    print(format_report(report))
    if args.json:
        with atomic_write(args.json) as f:
            json.dump(report.to_dict(), f, indent=2)
    if args.write_docs:
        write_docs_section(args.write_docs, report)
        print(f"\nwrote the attention-core section of {args.write_docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

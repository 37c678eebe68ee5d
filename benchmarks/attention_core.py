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
from pathlib import Path

from nystromer._io import atomic_write
from nystromer.bench.cli import add_script_args, call_with
from nystromer.bench.core import CoreReport, format_report, run_core, write_docs_section
from nystromer.bench.implementations import IMPLEMENTATIONS
from nystromer.bench.measure import DTYPES, CaseSpec, recorded_command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--seq-len", "-n", type=int, default=16384)
    add("--heads", type=int, default=8)
    add("--head-dim", type=int, default=64)
    add("--dtype", choices=sorted(DTYPES), default="float32")
    add("--padding", type=float, default=0.1, help="padding fraction of the padded row")
    add("--rounds", type=int, default=3, help="each implementation in turn, median over rounds")
    add("--exact-repeats", type=int, default=2, help="timed calls of exact SDPA")
    impls = list(IMPLEMENTATIONS)
    add("--impl", action="append", choices=impls, help="repeatable (default: all but exact-matmul)")
    add("--json", help="also write the full report as JSON here")
    add_script_args(p, repeats=5, timeout=1800, saved="a report saved earlier with --json")
    args = p.parse_args(argv)

    if args.from_json:
        report = CoreReport.from_dict(json.loads(Path(args.from_json).read_text(encoding="utf-8")))
    else:
        command = recorded_command(
            ["python", "benchmarks/attention_core.py"], argv, drop=("--json",)
        )
        print(f"attention core benchmark: {command}", flush=True)
        base = call_with(CaseSpec, args, impl="nystromer", padding=0.0)  # rows set their own
        report = call_with(
            run_core, args, base, implementations=args.impl, command=command,
            progress=lambda line: print(line, flush=True),
        )  # fmt: skip
    print(f"\n{format_report(report)}")
    if args.json:
        with atomic_write(args.json) as f:
            json.dump(report.to_dict(), f, indent=2)
    if args.write_docs:
        write_docs_section(args.write_docs, report)
        print(f"\nwrote the attention-core section of {args.write_docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

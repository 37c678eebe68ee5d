#!/usr/bin/env python
"""Allocator benchmark: the attention core's times under glibc's defaults and with memory reused.

    python benchmarks/allocator.py --threads 2                # n = 16,384, 1 × 8 heads × 64
    python benchmarks/allocator.py --threads 2 --write-docs docs/benchmarks.md
    python benchmarks/allocator.py --threads 2 \
        --preload tcmalloc=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

On Linux, glibc serves every allocation of 32 MiB or more with a fresh mapping and gives it back
when it is freed, so each such tensor pays a page fault per 4 KiB page on its first write
(~12 ms per 32 MiB on the benchmark machine). Implementations that materialise large
intermediates pay that many times per call; a caching allocator (tcmalloc, or torch's own on
CUDA) does not. This script times the same implementations (forward without autograd, and
forward+backward) under:

* ``glibc``: the C library's defaults (every allocator variable removed);
* ``glibc-reuse``: glibc told to keep freed memory for reuse
  (``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184``), which any user can
  set; the price is a process that keeps its high-water mark of memory;
* each ``--preload LABEL=PATH``: another allocator loaded with ``LD_PRELOAD``.

Every (implementation, allocator) pair runs in a fresh process (the variables act at process
start), all pairs in turn, ``--rounds`` times; each cell is the median over the rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from nystromer.bench.core import OURS, median_result
from nystromer.bench.implementations import IMPLEMENTATIONS, PEERS
from nystromer.bench.measure import (
    CaseResult,
    CaseSpec,
    add_core_problem_arguments,
    allocator_settings,
    core_problem_spec,
    emit_section,
    machine_info,
    machine_label,
    measure_case,
    recorded_command,
    require_positive,
)

BEGIN = "<!-- allocator:begin (written by benchmarks/allocator.py) -->"
END = "<!-- allocator:end -->"
#: glibc tunables that keep freed memory in the heap: no allocation is served by mmap below
#: 4 GiB, and the heap's top is given back only above 16 GiB.
REUSE = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
TASKS = (("forward", "forward_ms"), ("forward+backward", "backward_ms"))


def allocators(preloads: list[str]) -> dict[str, dict[str, str | None]]:
    """Allocator label → the worker environment's changes (None removes a variable).

    Raises:
        ValueError: a preload that is not ``LABEL=PATH`` with an existing file, or a label
            given twice.
    """
    clean: dict[str, str | None] = {key: None for key in allocator_settings()}
    found: dict[str, dict[str, str | None]] = {"glibc": clean, "glibc-reuse": {**clean, **REUSE}}
    for item in preloads:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--preload: expected LABEL=PATH, got {item!r}")
        if not os.path.isfile(path):
            raise ValueError(f"--preload {label}: no file at {path!r}")
        if label in found:
            raise ValueError(f"--preload: the label {label!r} is used twice")
        found[label] = {**clean, "LD_PRELOAD": path}
    return found


def measure(
    base: CaseSpec,
    implementations: list[str],
    envs: dict[str, dict[str, str | None]],
    rounds: int,
    timeout: float | None = None,
    progress=print,
) -> dict[str, dict[str, CaseResult]]:
    """``{implementation: {allocator: result}}``: the rounds of each pair combined as the
    attention-core benchmark combines them (:func:`nystromer.bench.core.median_result`); a
    pair that failed in its first round keeps that result and is not run again. An
    implementation that is not installed is left out."""
    runs: dict[tuple[str, str], list[CaseResult]] = {}
    skipped: set[str] = set()
    for r in range(rounds):
        for alloc, env in envs.items():
            for impl in implementations:
                earlier = runs.get((impl, alloc))
                if impl in skipped or (earlier and earlier[0].status != "ok"):
                    continue
                spec = dataclasses.replace(base, impl=impl)
                result = measure_case(spec, memory=False, timeout=timeout, env=env)
                if result.status == "skipped":  # not installed: no row at all
                    skipped.add(impl)
                    if progress is not None:
                        progress(f"  {impl:<18} skipped: {result.note}")
                    continue
                runs.setdefault((impl, alloc), []).append(result)
                if progress is not None:
                    said = (
                        f"forward {result.forward_ms:,.1f} ms, "
                        f"forward+backward {result.backward_ms:,.1f} ms"
                        if result.status == "ok"
                        else f"{result.status}: {result.note}"
                    )
                    progress(f"  {impl:<18} {alloc:<12} {said} (round {r + 1}/{rounds})")
    out: dict[str, dict[str, CaseResult]] = {}
    for (impl, alloc), results in runs.items():
        out.setdefault(impl, {})[alloc] = median_result(results)
    return out


def _ok(row: CaseResult | None) -> CaseResult | None:
    return row if row is not None and row.status == "ok" else None


def _ms(row: CaseResult | None, attr: str) -> str:
    return "n/a" if _ok(row) is None else f"{getattr(row, attr):,.1f}"


def render(
    found: dict[str, dict[str, CaseResult]],
    envs: dict[str, dict[str, str | None]],
    base: CaseSpec,
    rounds: int,
    command: str,
    label: str,
) -> str:
    allocs = list(envs)
    lines = [
        "## Allocator: fresh pages against reused memory",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `{command}`.",
        f"Machine: {label}.",
        "",
        f"n = {base.seq_len:,}, batch {base.batch}, {base.heads} heads × {base.head_dim}, "
        f"m = {base.num_landmarks}, {base.dtype}, inputs as in the attention core table. Each "
        f"cell: the median over {rounds} rounds of the median of {base.repeats} calls, every "
        "(implementation, allocator) pair in a fresh process, the pairs in turn. Allocators:",
        "",
    ]
    for alloc, env in envs.items():
        settings = " ".join(f"{k}={v}" for k, v in env.items() if v is not None)
        lines.append(
            f"- `{alloc}`: " + (f"`{settings}`" if settings else "the C library's defaults")
        )
    header = " | ".join(f"{task} ms, {alloc}" for task, _ in TASKS for alloc in allocs)
    lines += ["", f"| implementation | {header} |", "|---|" + "--:|" * (len(TASKS) * len(allocs))]
    for impl, by_alloc in found.items():
        cells = " | ".join(_ms(by_alloc.get(a), attr) for _, attr in TASKS for a in allocs)
        lines.append(f"| {impl} | {cells} |")
    ours = found.get(OURS, {})
    peers = [impl for impl in found if impl in PEERS]
    if ours and peers:
        cells = []
        for _, attr in TASKS:
            for alloc in allocs:
                mine = _ok(ours.get(alloc))
                theirs = [_ok(found[p].get(alloc)) for p in peers]
                if mine is None or any(t is None for t in theirs):
                    cells.append("n/a")
                else:
                    best = min(getattr(t, attr) for t in theirs)
                    cells.append(f"{best / getattr(mine, attr):.2f}")
        lines.append(f"| faster peer ÷ ours | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_core_problem_arguments(p)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per process (median)")
    p.add_argument("--rounds", type=int, default=3, help="processes per pair, taken in turn")
    p.add_argument(
        "--impl",
        action="append",
        choices=list(IMPLEMENTATIONS),
        help=f"only these implementations (repeatable; default: {OURS} and the peers)",
    )
    p.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also time with this allocator library loaded through LD_PRELOAD (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument("--write-docs", metavar="FILE", help="write/replace the section in FILE")
    args = p.parse_args(argv)
    require_positive(
        p, args, ("seq_len", "batch", "heads", "head_dim", "num_landmarks", "repeats", "rounds")
    )
    try:
        envs = allocators(args.preload)
    except ValueError as exc:
        p.error(str(exc))
    base = core_problem_spec(args, OURS, repeats=args.repeats)
    implementations = args.impl or [OURS, *PEERS]
    command = recorded_command("benchmarks/allocator.py", argv, drop=())
    print(f"allocator benchmark: {command}", flush=True)
    found = measure(base, implementations, envs, args.rounds, args.timeout)
    # The parent's own allocator variables do not describe the workers: label without them.
    info = {k: v for k, v in machine_info("cpu", args.threads).items() if k != "allocator"}
    markdown = render(found, envs, base, args.rounds, command, machine_label(info))
    emit_section(markdown, args.write_docs, BEGIN, END, "allocator")
    return 0


if __name__ == "__main__":
    sys.exit(main())

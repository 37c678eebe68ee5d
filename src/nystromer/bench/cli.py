"""``nystromer bench {speed,table,approx,report,transmil}``, and the options that ``demo``,
``viz attention`` and the scripts in benchmarks/ share with them (the argument types are
``nystromer._args``'s, re-exported here for those scripts)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from .._args import (
    add_list_option,
    call_with,
    existing_file,
    file_to_write,
    flag,
    folder,
    int_at_least,
    int_list,
    name_list,
    names_from,
    naming_flags,
    odd_kernel_or_zero,
    positive_number,
    torch_device,
)

__all__ = [
    "register",
    "int_list",
    "int_at_least",
    "odd_kernel_or_zero",
    "name_list",
    "add_input_source_args",
    "add_script_args",
    "call_with",
    "spelled_command",
]

_DEFAULT_OUT = Path("bench-out")
#: Short dtype names accepted besides the full ones.
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def _dtype(text: str) -> str:
    from .measure import DTYPES

    name = _DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"expected one of {sorted(DTYPES)} or {sorted(_DTYPE_ALIASES)}, got {text!r}"
        )
    return name


def _add_case_args(p: argparse.ArgumentParser, *, repeats: int, timeout: float) -> None:
    """Measurement settings named as :class:`~nystromer.bench.measure.CaseSpec`'s fields."""
    p.add_argument(
        "--device", type=torch_device(), default="cpu", help="cpu, cuda, cuda:N, mps, ..."
    )
    p.add_argument("--batch", type=int_at_least(1), default=1)
    p.add_argument("--num-landmarks", "-m", type=int_at_least(1), default=64)
    p.add_argument("--threads", type=int_at_least(1), help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int_at_least(1), default=repeats, help="timed calls (median)")
    p.add_argument(
        "--timeout", type=positive_number, default=timeout, help="seconds per worker process"
    )


def add_script_args(p: argparse.ArgumentParser, *, repeats: int, timeout: float, saved: str):
    """The options of the measuring scripts in benchmarks/ and of ``bench transmil``: the
    measurement settings, the worker timeout, and where the Markdown section goes (``saved``:
    what ``--from-json`` reads)."""
    _add_case_args(p, repeats=repeats, timeout=timeout)
    p.add_argument("--pinv-iterations", type=int_at_least(0), default=6)
    p.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed calls before timing")
    p.add_argument(
        "--write-docs", type=file_to_write, metavar="FILE", help="write/replace the section in FILE"
    )
    p.add_argument(
        "--from-json",
        type=existing_file,
        metavar="FILE",
        help=f"measure nothing: print (and --write-docs) {saved}",
    )


def _add_problem_args(p: argparse.ArgumentParser, lengths, impls) -> None:
    from .implementations import IMPLEMENTATIONS

    add_list_option(p, "--lengths", int_list, lengths, "n")
    implementations = names_from(IMPLEMENTATIONS, "implementations")
    add_list_option(p, "--impl", implementations, impls, "implementations, by registry name")
    p.add_argument(
        "--dtype", type=_dtype, default="float32", help="float32 (fp32), bfloat16 (bf16), ..."
    )
    p.add_argument("--heads", type=int_at_least(1), default=8)
    p.add_argument("--head-dim", type=int_at_least(1), default=64)
    _add_case_args(p, repeats=3, timeout=1800)


def spelled_command(words: list[str], args: argparse.Namespace, names: str) -> list[str]:
    """``words`` and then ``--name value`` for each option of ``names`` (space-separated
    destinations, in that order) that is set: the command a report records, every setting
    spelled out. Lists are comma-joined, floats written with ``g``."""
    argv = list(words)
    for name in names.split():
        if (value := getattr(args, name)) is not None:
            if isinstance(value, list):
                value = ",".join(map(str, value))
            argv += [
                flag(name),
                f"{value:g}" if isinstance(value, float) else str(value),
            ]
    return argv


def _problem_command(args: argparse.Namespace, backward: bool) -> str:
    """The ``bench speed``/``bench table`` command with every setting spelled out."""
    spelled = "device dtype lengths impl batch heads head_dim num_landmarks repeats threads"
    argv = spelled_command(["nystromer", "bench", args.bench_command], args, spelled)
    if args.bench_command == "speed":
        argv += ["--max-seconds", f"{args.max_seconds:g}"] + ([] if backward else ["--no-backward"])
    return shlex.join([*argv, "--out", str(args.out)])


def _speed(args: argparse.Namespace) -> int:
    """``bench speed`` and ``bench table``: measure, print the Markdown and write its files."""
    from .._io import atomic_write
    from .measure import CaseSpec
    from .speed import format_speed, format_table1, run_speed, write_speed_outputs

    table = args.bench_command == "table"
    backward = not (table or args.no_backward)
    base = call_with(CaseSpec, args, impl=args.impl[0])
    report = call_with(run_speed, args, base, implementations=args.impl, backward=backward)
    report["command"] = _problem_command(args, backward)
    markdown = format_table1(report) if table else format_speed(report)
    text = f"Machine: {report['machine_label']}.\n\n{markdown}\n"
    print("\n" + text)
    if not table:
        for path in write_speed_outputs(report, args.out):
            print(f"wrote {path}")
        return 0
    with atomic_write(args.out / "table1.json") as f:
        json.dump(report, f, indent=2)
    with atomic_write(args.out / "table1.md") as f:
        f.write(text)
    print(f"wrote {args.out / 'table1.md'} and {args.out / 'table1.json'}")
    return 0


def _approx(args: argparse.Namespace) -> int:
    from .approx import run_approx, write_approx_outputs

    # The LRA model's messages name lra_qkv's arguments.
    flags = {"layer": "--lra-layer", **({"run_dir": "--lra-run"} if args.lra_run else {})}
    with naming_flags(flags):
        found = call_with(run_approx, args)
    for path in write_approx_outputs(found, args.out):
        print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command and its own sub-commands."""
    from .approx import ITERATIONS, LANDMARKS, SOURCES
    from .report import register_report
    from .speed import SPEED_IMPLEMENTATIONS, SPEED_LENGTHS, TABLE1_LENGTHS
    from .transmil import register as register_transmil

    bench = subparsers.add_parser(
        "bench",
        help="measure speed, memory and approximation error",
        description="Benchmarks against exact attention and the peers; docs/benchmarks.md "
        "shows their results with the commands that made them.",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    s = bench_sub.add_parser(
        "speed",
        help="time and peak memory against n, fitted exponents, plots",
        description="Time and peak memory (fresh process per measurement) against n for each "
        "implementation; writes speed.json, speed.md, speed.csv and log-log plots.",
    )
    _add_problem_args(s, SPEED_LENGTHS, SPEED_IMPLEMENTATIONS)
    s.add_argument(
        "--max-seconds",
        type=positive_number,
        default=10.0,
        help="stop growing n for an implementation after a forward slower than this",
    )
    s.add_argument("--no-backward", action="store_true", help="forward only")
    s.add_argument(
        "--out", type=folder, default=_DEFAULT_OUT / "speed", help="output folder (%(default)s)"
    )
    s.set_defaults(func=_speed)

    t = bench_sub.add_parser(
        "table",
        help="the paper's Table 1: memory and time per instance, n = 512 … 8192",
        description="Forward peak memory and time per instance against the paper's Table 1; "
        "writes table1.json and table1.md.",
    )
    _add_problem_args(t, TABLE1_LENGTHS, ("exact-matmul", "exact", "nystromer"))
    t.add_argument(
        "--out", type=folder, default=_DEFAULT_OUT / "table1", help="output folder (%(default)s)"
    )
    t.set_defaults(func=_speed, max_seconds=float("inf"))

    a = bench_sub.add_parser(
        "approx",
        help="approximation error against landmarks, pinv iterations, peers",
        description="Relative output error vs exact attention on random q, k, v, on those of "
        "a trained LRA model and of a language model; writes approx.json, approx.md and plots.",
    )
    a.add_argument("--seq-len", type=int_at_least(1), default=1024, help="n of the random inputs")
    a.add_argument("--heads", type=int_at_least(1), default=4)
    a.add_argument("--head-dim", type=int_at_least(1), default=64)
    a.add_argument(
        "--num-landmarks", type=int_at_least(1), default=64, help="m of the non-m sweeps"
    )
    add_list_option(a, "--landmarks", int_list, LANDMARKS, "m of the landmarks sweep")
    a.add_argument(
        "--iterations",
        type=int_list,
        default=list(ITERATIONS),
        help="comma-separated pinv iteration counts of that sweep (default: "
        f"{ITERATIONS[0]} to {ITERATIONS[-1]})",
    )
    add_list_option(a, "--sources", names_from(SOURCES, "input kinds"), SOURCES, "input kinds")
    a.add_argument(
        "--model-seq-len", type=int_at_least(1), default=512, help="n of the language model"
    )
    add_input_source_args(a)
    a.add_argument(
        "--out", type=folder, default=_DEFAULT_OUT / "approx", help="output folder (%(default)s)"
    )
    a.set_defaults(func=_approx)
    register_report(bench_sub)
    register_transmil(bench_sub)


def add_input_source_args(p: argparse.ArgumentParser, *, layer: bool = True) -> None:
    """The language-model and LRA-model options of ``bench approx`` and ``viz attention``."""
    from .lra_inputs import DEFAULT_LRA_RUN, FALLBACK_LRA_DIR

    p.add_argument("--model-source", choices=("auto", "minilm", "random-bert"), default="auto")
    p.add_argument(
        "--lra-run",
        type=Path,
        help="a trained LRA run directory to read (read-only), as `nystromer train` or "
        f"`nystromer demo` write them (default: {DEFAULT_LRA_RUN}, else "
        f"{FALLBACK_LRA_DIR}/run; nothing is trained here)",
    )
    p.add_argument("--lra-checkpoint", choices=("auto", "best", "last"), default="auto")
    if layer:
        p.add_argument("--lra-layer", type=int, default=-1, help="layer (-1: the last)")

"""The ``nystromer`` command. Thin: it parses and calls the modules that do the work.

Each feature package registers its own sub-commands: a module named in ``_COMMANDS``
defines ``register(subparsers)``, which adds its sub-parser(s) and sets ``func`` (called with the
parsed ``argparse.Namespace``, returning an exit code) as the parser default. ``demo`` and
``viz`` are registered here: ``demo`` runs the benchmarks' attention comparison and then a short
LRA training run, so it belongs to neither package.

Every command runs through ``nystromer._args.exit_code``: an input error it raises (a
``ValueError``, ...) is one line on stderr and exit code 2, as argparse's own errors are; a
``--device`` this machine lacks is one of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from ._args import call_with
    from .bench.demo import run_attention_demo

    call_with(run_attention_demo, args)
    if args.listops_steps > 0:
        from .lra.demo import run_listops_demo

        # Kept after the demo so the run can be inspected or re-evaluated (`nystromer eval`).
        run_listops_demo(args.listops_dir, steps=args.listops_steps)
    return 0


def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    from ._args import add_list_option, folder, int_at_least, int_list
    from .bench.demo import DEMO_LENGTHS

    d = subparsers.add_parser(
        "demo",
        help="compare exact and Nyström attention as n grows, then train a short ListOps run",
        description="Exact vs Nyström attention (m = 64) for n = 1k … 16k: forward time, peak "
        "memory (fresh process each) and relative output error; then a short ListOps training "
        "run on generated data (--listops-steps).",
    )
    add_list_option(d, "--lengths", int_list, DEMO_LENGTHS, "n")
    d.add_argument("--threads", type=int_at_least(1), help="torch threads (default: torch's)")
    d.add_argument("--repeats", type=int_at_least(1), default=2, help="timed calls per measurement")
    d.add_argument(
        "--listops-steps",
        type=int_at_least(0),
        default=700,
        help="steps of the ListOps training run that follows (default: %(default)s; 0 skips it)",
    )
    d.add_argument(
        "--listops-dir",
        type=folder,
        default=Path("runs/demo"),
        help="where the ListOps run writes its data and run files (%(default)s)",
    )
    d.set_defaults(func=_demo)


def _viz_attention(args: argparse.Namespace) -> int:
    from ._args import call_with, naming_flags
    from .bench.viz import attention_figure

    # The LRA model's messages name lra_qkv's arguments.
    flags = {"layer": "--layer", **({"run_dir": "--lra-run"} if args.lra_run else {})}
    with naming_flags(flags):
        found = call_with(attention_figure, args, args.out)
    print(f"wrote {found['path']} (relative error of the matrix {found['relative_error']:.3f})")
    print(f"wrote {found['json']}")
    return 0


def _register_viz(subparsers: argparse._SubParsersAction) -> None:
    from ._args import file_to_write, int_at_least
    from .bench.cli import add_input_source_args

    viz = subparsers.add_parser(
        "viz", help="plot attention matrices", description="Plot attention matrices."
    )
    viz_sub = viz.add_subparsers(dest="viz_command", metavar="WHAT", required=True)
    v = viz_sub.add_parser(
        "attention",
        help="exact vs Nyström attention matrix, side by side (PNG)",
        description="Plot one head's exact attention matrix beside its Nyström approximation; "
        "writes the PNG (--out) and its numbers in a .json beside it.",
    )
    v.add_argument(
        "--out",
        type=file_to_write,
        default=Path("bench-out/attention.png"),
        help="the PNG (%(default)s)",
    )
    v.add_argument("--seq-len", type=int_at_least(1), default=256, help="n (random and lm)")
    v.add_argument("--num-landmarks", type=int_at_least(1), default=16)
    v.add_argument("--pinv-iterations", type=int_at_least(0), default=6)
    v.add_argument(
        "--source",
        choices=("random", "lm", "lra"),
        default="random",
        help="structured random q, k; a language model's (lm); a trained LRA model's (lra)",
    )
    add_input_source_args(v, layer=False)
    v.add_argument("--layer", type=int, help="model layer (default: lm 2, lra the last)")
    v.add_argument("--head", type=int_at_least(0), default=0)
    v.add_argument(
        "--window", type=int_at_least(1), help="draw only the first WINDOW positions (default: all)"
    )
    v.set_defaults(func=_viz_attention)


#: In the order of ``nystromer --help``: modules with a ``register`` function, or the
#: registering functions of the commands defined here.
_COMMANDS = (
    "nystromer.lra.cli",
    _register_demo,
    "nystromer.bench.cli",
    _register_viz,
    "nystromer.lra.data.cli",
    "nystromer.distill.cli",
    "nystromer.distill.long_inputs",
)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="nystromer",
        description="Nyström attention for PyTorch: the demo, benchmarks, Long Range Arena data "
        "and training, and the distillation and long-input evaluation of converted encoders.",
    )
    parser.add_argument("--version", action="version", version=f"nystromer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in _COMMANDS:
        register = importlib.import_module(entry).register if isinstance(entry, str) else entry
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ._args import EXIT_USAGE, check_device, exit_code

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # as typed after `nystromer`, for the commands that record it
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    def run() -> int | None:
        if getattr(args, "device", None) is not None:  # every command's --device
            check_device(args.device)
        return args.func(args)

    return exit_code(run)

"""The ``nystromer`` command. Thin: each feature module registers its own sub-commands.

A module listed in ``_COMMAND_MODULES`` defines ``register(subparsers)``, which adds its
sub-parser(s) and sets ``func`` (called with the parsed ``argparse.Namespace``, returning an
exit code) as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

_COMMAND_MODULES: tuple[str, ...] = (
    "nystromer.lra.cli",
    "nystromer.bench.cli",
    "nystromer.lra.data.cli",
    "nystromer.distill.cli",
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="nystromer",
        description="Nyström attention: demo, benchmarks, LRA training, distillation.",
    )
    parser.add_argument("--version", action="version", version=f"nystromer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)

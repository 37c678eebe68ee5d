"""``nystromer data listops`` and ``nystromer data pathfinder``: write LRA data sets."""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..._args import folder, int_at_least, naming_flags
from ...train.cli import run_command
from . import listops, pathfinder

__all__ = ["register"]


_count, _positive = int_at_least(0), int_at_least(1)


# Each generator's options as (flag, type, help). A flag's name, dashes read as underscores,
# is the generator's keyword argument, and its default (shown in the help) is the generator's,
# so an option and its default are written down once.
_Options = tuple[tuple[str, Callable[[str], Any], str], ...]
_LISTOPS_OPTIONS: _Options = (
    ("--train", _count, "training examples"),
    ("--val", _count, "validation examples"),
    ("--test", _count, "test examples"),
    ("--seed", _count, "random seed"),
    ("--min-length", int, "tokens > this"),
    ("--max-length", int, "tokens < this"),
    ("--max-depth", int, "depth of digits-only nodes"),
    ("--max-args", int, "most operator arguments"),
)
_PATHFINDER_OPTIONS: _Options = (
    ("--images", _positive, "images"),
    ("--resolution", int, "image side in pixels"),
    ("--contour-length", int, "paddles per path"),
    ("--seed", _count, "random seed"),
    ("--images-per-batch", _positive, "images per batch folder"),
)


def _defaults(generator: Callable[..., Any]) -> dict[str, Any]:
    """The keyword defaults of ``generator``'s signature."""
    parameters = inspect.signature(generator).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` sub-command with its ``listops`` and ``pathfinder`` commands."""
    data = subparsers.add_parser(
        "data",
        help="generate LRA data (ListOps, Pathfinder) in the official layout",
        description="Generate Long Range Arena data sets in the layout of the official release.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="DATASET")
    data.set_defaults(func=lambda args: _usage(data))
    _add_generator(
        commands,
        "listops",
        help="basic_{train,val,test}.tsv (LRA's ListOps)",
        description="Write basic_{train,val,test}.tsv like LRA's ListOps release: expressions "
        "of min_length < tokens < max_length, no duplicates, targets computed exactly.",
        out_help="output folder",
        options=_LISTOPS_OPTIONS,
        defaults={**listops.SPLIT_SIZES, **_defaults(listops.write_splits)},
        write=_listops,
    )
    _add_generator(
        commands,
        "pathfinder",
        help="curv_contour_length_<L>/{imgs,metadata} (LRA's Pathfinder)",
        description="Write a Pathfinder set like LRA's release into "
        "OUT/curv_contour_length_<L>/: imgs/<batch>/sample_<k>.png and metadata/<batch>.npy. "
        "Re-running with the same arguments resumes: complete batches are kept.",
        out_help="parent output folder",
        options=_PATHFINDER_OPTIONS,
        defaults=_defaults(pathfinder.write_dataset),
        write=_pathfinder,
    )


def _add_generator(
    commands: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    description: str,
    out_help: str,
    options: _Options,
    defaults: Mapping[str, Any],
    write: Callable[[argparse.Namespace], None],
) -> None:
    """One generator's command: ``--out``, its own options, ``--no-progress``."""
    parser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("--out", type=folder, required=True, help=out_help)
    for flag, type_, help_ in options:
        default = defaults[_keyword(flag)]
        parser.add_argument(flag, type=type_, default=default, help=f"{help_} (%(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def work(args: argparse.Namespace) -> None:
        # The generator's messages name its keywords; the defaults go together, so a message
        # about a setting is about one the command line changed.
        changed = {
            _keyword(f): f
            for f, *_ in options
            if getattr(args, _keyword(f)) != defaults[_keyword(f)]
        }
        with naming_flags(changed):
            write(args)

    parser.set_defaults(func=lambda args: run_command(lambda: work(args)))


def _keywords(args: argparse.Namespace, options: _Options) -> dict[str, Any]:
    """The parsed values of ``options``, keyed by the generator's keyword names."""
    names = (_keyword(flag) for flag, *_ in options)
    return {name: getattr(args, name) for name in names}


def _keyword(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _listops(args: argparse.Namespace) -> None:
    settings = _keywords(args, _LISTOPS_OPTIONS)
    sizes = {split: settings.pop(split) for split in listops.SPLITS}
    t0 = time.perf_counter()
    paths = listops.write_splits(args.out, sizes, **settings, progress=not args.no_progress)
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.1f} s")


def _pathfinder(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    settings = _keywords(args, _PATHFINDER_OPTIONS)
    folder = pathfinder.write_dataset(args.out, **settings, progress=not args.no_progress)
    print(f"wrote {args.images} images to {folder} in {time.perf_counter() - t0:.1f} s")

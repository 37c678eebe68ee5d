"""``nystromer data listops`` and ``nystromer data pathfinder``: write LRA data sets."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ...train.cli import run_command

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` sub-command with its ``listops`` and ``pathfinder`` commands."""
    data = subparsers.add_parser(
        "data",
        help="generate LRA data (ListOps, Pathfinder) in the official layout",
        description="Generate Long Range Arena data sets in the layout of the official release.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="DATASET")
    data.set_defaults(func=lambda args: _usage(data))

    lo = commands.add_parser(
        "listops",
        help="basic_{train,val,test}.tsv (LRA's ListOps)",
        description="Write basic_{train,val,test}.tsv like LRA's ListOps release: expressions "
        "of min_length < tokens < max_length, no duplicates, targets computed exactly.",
    )
    lo.add_argument("--out", type=Path, required=True, help="output folder")
    lo.add_argument("--train", type=_count, default=96000, help="training examples (96000)")
    lo.add_argument("--val", type=_count, default=2000, help="validation examples (2000)")
    lo.add_argument("--test", type=_count, default=2000, help="test examples (2000)")
    lo.add_argument("--seed", type=_count, default=0, help="random seed (0)")
    lo.add_argument("--min-length", type=int, default=500, help="tokens > this (500)")
    lo.add_argument("--max-length", type=int, default=2000, help="tokens < this (2000)")
    lo.add_argument("--max-depth", type=int, default=10, help="depth of digits-only nodes (10)")
    lo.add_argument("--max-args", type=int, default=10, help="most operator arguments (10)")
    lo.add_argument("--no-progress", action="store_true", help="no progress bar")
    lo.set_defaults(func=lambda args: run_command(lambda: _listops(args)))

    pf = commands.add_parser(
        "pathfinder",
        help="curv_contour_length_<L>/{imgs,metadata} (LRA's Pathfinder)",
        description="Write a Pathfinder set like LRA's release into "
        "OUT/curv_contour_length_<L>/: imgs/<batch>/sample_<k>.png and metadata/<batch>.npy. "
        "Re-running with the same arguments resumes: complete batches are kept.",
    )
    pf.add_argument("--out", type=Path, required=True, help="parent output folder")
    pf.add_argument("--images", type=_positive, default=200_000, help="images (200000)")
    pf.add_argument("--resolution", type=int, default=32, help="image side in pixels (32)")
    pf.add_argument("--contour-length", type=int, default=14, help="paddles per path (14)")
    pf.add_argument("--seed", type=_count, default=0, help="random seed (0)")
    pf.add_argument(
        "--images-per-batch", type=_positive, default=1000, help="images per batch folder (1000)"
    )
    pf.add_argument("--no-progress", action="store_true", help="no progress bar")
    pf.set_defaults(func=lambda args: run_command(lambda: _pathfinder(args)))


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _listops(args: argparse.Namespace) -> None:
    from .listops import write_splits

    t0 = time.perf_counter()
    paths = write_splits(
        args.out,
        {"train": args.train, "val": args.val, "test": args.test},
        seed=args.seed,
        min_length=args.min_length,
        max_length=args.max_length,
        max_depth=args.max_depth,
        max_args=args.max_args,
        progress=not args.no_progress,
    )
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.1f} s")


def _pathfinder(args: argparse.Namespace) -> None:
    from .pathfinder import write_dataset

    t0 = time.perf_counter()
    folder = write_dataset(
        args.out,
        images=args.images,
        resolution=args.resolution,
        contour_length=args.contour_length,
        seed=args.seed,
        images_per_batch=args.images_per_batch,
        progress=not args.no_progress,
    )
    print(f"wrote {args.images} images to {folder} in {time.perf_counter() - t0:.1f} s")

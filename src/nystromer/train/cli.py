"""Command-line options that every training command shares (``nystromer train``,
``nystromer distill``): where to run, when to pause and checkpoint, progress display."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_runtime_arguments", "runtime_options"]


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--device``, ``--stop-at``, ``--checkpoint-every``, ``--eval-batch-size``,
    ``--micro-batches`` and ``--no-progress``: options that change how a run executes, not
    what it computes (``--micro-batches`` up to rounding and dropout's draws)."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--stop-at", type=int, help="pause after this step (resume later)")
    parser.add_argument("--checkpoint-every", type=int, help="write `last` every N steps")
    parser.add_argument("--eval-batch-size", type=int, help="batch size for evaluation")
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="split each batch into N parts and accumulate their gradients (less memory; "
        "faster on a CPU when activations are large)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`add_runtime_arguments` as keyword arguments of the trainers
    (:class:`nystromer.train.TrainConfig`'s runtime fields)."""
    return {
        "device": args.device,
        "stop_at": args.stop_at,
        "checkpoint_every": args.checkpoint_every,
        "eval_batch_size": args.eval_batch_size,
        "progress": not args.no_progress,
        "micro_batches": args.micro_batches,
    }

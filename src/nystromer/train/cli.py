"""What the training and data commands share (``nystromer train``, ``eval``, ``distill``,
``data``): the runtime options (where to run, when to pause and checkpoint, progress display),
:func:`run_command`, which turns their failures into messages and exit codes. The argument
types :func:`folder` and :func:`int_at_least`, and the input errors every command reports in
one line (:data:`USAGE_ERRORS`, :func:`error`), live in ``nystromer._args``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from .._args import EXIT_USAGE, USAGE_ERRORS, error, exit_code, folder, int_at_least, torch_device
from .distributed import DistInfo, init_from_env, shutdown
from .loop import NonFiniteLossError

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "USAGE_ERRORS",
    "add_runtime_arguments",
    "error",
    "folder",
    "int_at_least",
    "run_command",
    "runtime_options",
]

EXIT_FAILED = 1  # the run itself failed (a non-finite loss)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM; the run can be resumed
# EXIT_USAGE (2): bad arguments, data or run directory, as for every command (nystromer._args).

_Result = TypeVar("_Result")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--device``, ``--stop-at``, ``--checkpoint-every``, ``--eval-batch-size``,
    ``--micro-batches`` and ``--no-progress``: options that change how a run executes, not
    what it computes (``--micro-batches`` up to rounding and dropout's draws)."""
    parser.add_argument(
        "--device",
        type=torch_device(auto=True),
        default="auto",
        help="auto, cpu, cuda, cuda:N, mps, ...",
    )
    parser.add_argument(
        "--stop-at", type=int_at_least(0), help="pause after this step (resume later)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int_at_least(0), help="write `last` every N steps"
    )
    parser.add_argument("--eval-batch-size", type=int_at_least(1), help="batch size for evaluation")
    parser.add_argument(
        "--micro-batches",
        type=int_at_least(1),
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


def run_command(
    work: Callable[[], _Result],
    report: Callable[[_Result], int | None] | None = None,
    *,
    device: str | None = None,
    resume_command: str | None = None,
) -> int:
    """Run a command's ``work``, then ``report`` its result; the exit code of the whole.

    Failures become a message on stderr and an exit code:

    - :data:`USAGE_ERRORS` (``ValueError``, ``InputTypeError``, ``FileNotFoundError``), in
      ``work`` or ``report``: ``nystromer: error: <message>``, :data:`EXIT_USAGE` (2); a plain
      ``TypeError`` is a bug and propagates;
    - :class:`~nystromer.train.NonFiniteLossError`: ``nystromer: <message>``,
      :data:`EXIT_FAILED` (1);
    - ``KeyboardInterrupt``, when ``resume_command`` is given: ``nystromer: interrupted;
      continue with: <resume_command>``, :data:`EXIT_INTERRUPTED` (130). Without it the
      interrupt propagates.

    Args:
        work: the computation; it raises to fail.
        report: called with ``work``'s result on the main process only, after the process
            group is left (it must not take part in collectives); returns the exit code
            (None: 0). Without ``report`` the command exits with 0.
        device: for commands that may run under ``torchrun``: join its process group on this
            device first (:func:`~nystromer.train.distributed.init_from_env`) and leave it
            after ``work``, waiting for the other processes only when ``work`` finished.
        resume_command: the command line that continues an interrupted run.
    """
    info = init_from_env(device) if device is not None else DistInfo.current()

    def run() -> int | None:
        try:
            finished = False
            try:
                result = work()
                finished = True
            finally:
                if device is not None:
                    shutdown(synchronize=finished)
            if report is None or not info.is_main:
                return 0
            return report(result)
        except NonFiniteLossError as exc:
            print(f"nystromer: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            if resume_command is None:
                raise
            if info.is_main:
                print(f"nystromer: interrupted; continue with: {resume_command}", file=sys.stderr)
            return EXIT_INTERRUPTED

    return exit_code(run)  # the input errors, as every command reports them

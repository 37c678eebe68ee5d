"""The argparse types and helpers every ``nystromer`` command shares.

Argument types reject a bad value with argparse's usage message (exit code 2) before anything
runs; what only the command can find (a file's content, a run directory) it raises as one of
:data:`USAGE_ERRORS`, which :func:`exit_code` reports in one line, also with exit code 2.
:func:`call_with` lets a command pass its parsed options to the function that does the work,
so that each option is spelled once, where it is declared; :func:`naming_flags` puts the flag
in front of the library's message about a setting (``--num-landmarks: num_landmarks must ...``).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._checks import InputTypeError

__all__ = [
    "EXIT_USAGE",
    "USAGE_ERRORS",
    "add_list_option",
    "call_with",
    "check_device",
    "error",
    "existing_file",
    "exit_code",
    "file_to_write",
    "flag",
    "folder",
    "given_flags",
    "int_at_least",
    "int_list",
    "name_list",
    "names_from",
    "naming_flags",
    "odd_kernel_or_zero",
    "positive_number",
    "torch_device",
]

EXIT_USAGE = 2  # bad arguments, data or run directory: nothing was computed, or it was kept

# Errors that mean "the input is wrong": reported in one line, without a traceback. A plain
# TypeError is not among them: it is almost always a bug (a wrong keyword, a wrong call), and
# the checks of a file's content raise InputTypeError instead.
USAGE_ERRORS = (ValueError, InputTypeError, FileNotFoundError)


def error(message: str) -> int:
    """Print ``nystromer: error: message`` on stderr; returns :data:`EXIT_USAGE`."""
    print(f"nystromer: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def exit_code(run: Callable[[], int | None]) -> int:
    """``run()``'s exit code (None: 0); one of :data:`USAGE_ERRORS` raised in it is printed by
    :func:`error` and gives :data:`EXIT_USAGE`. Anything else (a bug) propagates, traceback
    and all. Every ``nystromer`` command runs through this (``nystromer.cli.main``)."""
    try:
        code = run()
    except USAGE_ERRORS as exc:
        return error(str(exc))
    return 0 if code is None else int(code)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer ≥ ``minimum``."""

    def parse(text: str) -> int:
        if not (text.strip().removeprefix("-").isdecimal() and int(text) >= minimum):
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {minimum}, got {text!r}")
        return int(text)

    return parse


def positive_number(text: str) -> float:
    """argparse type: a number > 0 (seconds, gigabytes)."""
    try:
        if float(text) > 0:
            return float(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")


def folder(text: str) -> Path:
    """argparse type: a folder to write into, which may not exist yet but must not be a file,
    nor lie below one (``--out``); otherwise a traceback would report it when the first file
    is written."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    _check_parents(path)
    return path


def file_to_write(text: str) -> Path:
    """argparse type: a file to write (``--write-docs``, a figure), which may not exist yet
    but must not be a folder, nor lie below a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    _check_parents(path)
    return path


def _check_parents(path: Path) -> None:
    """The nearest existing folder above ``path`` must be a folder (not a file)."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {parent} is a file, not a folder")


def existing_file(text: str) -> Path:
    """argparse type: a file to read (``--from-json``, ``--recipe``), which must exist."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"{text} is a folder, not a file" if path.is_dir() else f"{text} does not exist"
        )
    return path


def torch_device(*, auto: bool = False) -> Callable[[str], str]:
    """argparse type: a torch device (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...; with
    ``auto``, also ``auto``), returned as given. Whether this machine has that device is
    :func:`check_device`'s to say, when the command runs: a command line may be written for
    another machine."""

    def parse(text: str) -> str:
        if text == "auto" and auto:
            return text
        import torch

        try:
            torch.device(text)
        except (RuntimeError, ValueError):
            expected = f"{'auto, ' if auto else ''}cpu, cuda, cuda:N or another torch device"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return text

    return parse


def check_device(device: str, option: str = "--device") -> None:
    """ValueError naming ``option`` when ``device`` is a CUDA or MPS device this machine does
    not have; it would otherwise fail in the middle of a run or, in a benchmark, fill the
    report with failed measurements."""
    if device == "auto":
        return
    import torch

    kind = torch.device(device).type
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option}: MPS is not available here (torch {torch.__version__})")
    if kind != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"{option}: CUDA is not available here (torch {torch.__version__}), got {device!r}"
        )
    index, count = torch.device(device).index, torch.cuda.device_count()
    if index is not None and index >= count:
        here = ", ".join(f"cuda:{i}" for i in range(count))
        raise ValueError(f"{option}: the CUDA devices here are {here}; got {device!r}")


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers (``1024,2048``)."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values or not all(x.isdecimal() and int(x) > 0 for x in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers ≥ 1 such as 1024,2048, got {text!r}"
        )
    return [int(x) for x in values]


def name_list(text: str) -> list[str]:
    """argparse type: comma-separated names (``nystromer,exact``)."""
    return [x for x in text.split(",") if x]


def names_from(choices: Collection[str], what: str = "names") -> Callable[[str], list[str]]:
    """argparse type: comma-separated names (``nystromer,exact``), each one of ``choices``
    (looked up when parsing: a registry that grows later counts); ``what`` they are, for the
    message."""

    def parse(text: str) -> list[str]:
        names = name_list(text)
        unknown = [name for name in names if name not in choices]
        if names and not unknown:
            return names
        found = f"unknown {', '.join(map(repr, unknown))}" if unknown else f"got {text!r}"
        raise argparse.ArgumentTypeError(
            f"{found}; expected comma-separated {what} from {','.join(choices)}"
        )

    return parse


def odd_kernel_or_zero(text: str) -> int:
    """argparse type: an odd convolution kernel size ≥ 1, or 0 for no convolution."""
    if not (text.isdecimal() and (int(text) == 0 or int(text) % 2)):
        raise argparse.ArgumentTypeError(
            f"expected an odd integer ≥ 1, or 0 for no convolution, got {text!r}"
        )
    return int(text)


def add_list_option(
    parser: argparse.ArgumentParser,
    flag: str,
    parse: Callable[[str], list],
    default: Iterable[Any],
    what: str,
) -> None:
    """Add the comma-separated list option ``flag``, read by ``parse`` (:func:`int_list`,
    :func:`names_from`, ...); its help names ``what`` the items are and shows ``default`` as
    it is typed."""
    default = list(default)
    shown = ",".join(map(str, default))
    parser.add_argument(
        flag, type=parse, default=default, help=f"comma-separated {what} (default: {shown})"
    )


def call_with(func: Callable, args: argparse.Namespace, *positional, **given):
    """``func(*positional, **given)`` plus every parsed option named like one of its keyword
    parameters, so that an option is spelled once, where it is declared."""
    names = inspect.signature(func).parameters
    found = {k: v for k, v in vars(args).items() if k in names and k not in given}
    return func(*positional, **found, **given)


def flag(name: str) -> str:
    """The flag of the setting ``name``: its name with dashes (``num_landmarks``:
    ``--num-landmarks``)."""
    return "--" + name.replace("_", "-")


def given_flags(args: argparse.Namespace, names: Iterable[str]) -> dict[str, str]:
    """The flags of the settings ``names`` that ``args`` holds a value of (not None), by name:
    what :func:`naming_flags` takes."""
    return {name: flag(name) for name in names if getattr(args, name, None) is not None}


@contextmanager
def naming_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """Lead the message of one of :data:`USAGE_ERRORS` raised inside with the flag it is about.

    The library's messages begin with the setting they are about (``num_landmarks must be
    ...``) and spell the others they involve ``name=value`` (``embed_dim must be divisible by
    num_heads=3``); the command line spells that setting with its flag. ``flags`` maps the
    settings given on the command line to their flags (``{"num_landmarks":
    "--num-landmarks"}``): the leading setting is named if it is among them, else the first
    ``name=`` one that is; a leading ``name:`` label is replaced by the flag. Any other
    message is left as it is: a value read from a file (a ``--recipe``, a run's
    config.json) is named by the file's path and its field.
    """
    try:
        yield
    except USAGE_ERRORS as exc:
        message = str(exc)
        lead = re.match(r"[A-Za-z_]\w*", message)
        names = ([lead.group()] if lead else []) + re.findall(r"\b([A-Za-z_]\w*)=", message)
        given = next((flags[name] for name in names if name in flags), None)
        if given is None:
            raise
        if names[0] in flags and message.startswith(f"{names[0]}: "):  # a label: replaced
            message = message.split(": ", 1)[1]
        renamed = f"{given}: {message}"
        try:
            error = type(exc)(renamed)
        except Exception:  # a subclass with other arguments (json's JSONDecodeError)
            error = next(kind for kind in USAGE_ERRORS if isinstance(exc, kind))(renamed)
        raise error from exc

"""The argparse types and helpers every ``nystromer`` command shares.

Argument types reject a bad value with argparse's usage message (exit code 2) before anything
runs; :func:`call_with` lets a command pass its parsed options to the function that does the
work, so that each option is spelled once, where it is declared.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "call_with",
    "comma_default",
    "folder",
    "int_at_least",
    "int_list",
    "name_list",
    "odd_kernel_or_zero",
]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer ≥ ``minimum``."""

    def parse(text: str) -> int:
        if not (text.strip().removeprefix("-").isdecimal() and int(text) >= minimum):
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {minimum}, got {text!r}")
        return int(text)

    return parse


def folder(text: str) -> Path:
    """argparse type: a folder to write into, which may not exist yet but must not be a file
    (``--out``); otherwise a traceback would report it when the first file is written."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


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


def odd_kernel_or_zero(text: str) -> int:
    """argparse type: an odd convolution kernel size ≥ 1, or 0 for no convolution."""
    if not (text.isdecimal() and (int(text) == 0 or int(text) % 2)):
        raise argparse.ArgumentTypeError(
            f"expected an odd integer ≥ 1, or 0 for no convolution, got {text!r}"
        )
    return int(text)


def comma_default(what: str, default: Iterable[Any]) -> str:
    """Help text of a comma-separated list option, with its default written as it is typed."""
    return f"comma-separated {what} (default: {','.join(map(str, default))})"


def call_with(func: Callable, args: argparse.Namespace, *positional, **given):
    """``func(*positional, **given)`` plus every parsed option named like one of its keyword
    parameters, so that an option is spelled once, where it is declared."""
    names = inspect.signature(func).parameters
    found = {k: v for k, v in vars(args).items() if k in names and k not in given}
    return func(*positional, **found, **given)

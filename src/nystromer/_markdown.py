"""Markdown for results: tables, and rewriting one marked section of a file, leaving the rest
of it byte for byte.

The result commands (bench, lra, distill) write their tables into docs/ between marker lines, so
that a rerun replaces its own section and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ._io import atomic_write

__all__ = ["replace_section", "table"]


def replace_section(
    path: str | os.PathLike[str], begin: str, end: str, markdown: str, *, new_file: str = ""
) -> None:
    """Write ``markdown`` between the marker lines ``begin`` and ``end`` of a text file.

    A marker is a line holding nothing else (surrounding spaces aside). The marked block is
    replaced; without markers the block is appended. Everything outside it is kept byte for
    byte, line endings included (a file with CRLF endings gets a CRLF block). A missing file
    starts as ``new_file`` (e.g. a heading). The file is replaced atomically. Used by every
    command that writes results into docs/.

    Raises:
        ValueError: the file is not UTF-8, or its markers are broken (one without the other,
            in the wrong order, or more than one of either); the file is left as it was,
            since a guess could replace text that is not the section.
    """
    target = Path(path)
    try:
        with open(target, encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        text = new_file
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{target} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "its section was not written"
        ) from exc
    nl = "\r\n" if "\r\n" in text else "\n"
    body = markdown.replace("\r\n", "\n").strip("\n").replace("\n", nl)
    block = f"{begin}{nl}{body}{nl}{end}"
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    stops = [i for i, line in enumerate(lines) if line.strip() == end]
    if not starts and not stops:
        text = (text.rstrip("\r\n") + nl + nl if text.strip() else "") + block + nl
    elif len(starts) == 1 and len(stops) == 1 and starts[0] < stops[0]:
        i, j = starts[0], stops[0]
        ending = lines[j][len(lines[j].rstrip("\r\n")) :]  # the end line's own line break
        text = "".join(lines[:i]) + block + ending + "".join(lines[j + 1 :])
    else:
        order = " (end first)" if starts and stops and stops[0] < starts[0] else ""
        raise ValueError(
            f"{target}: cannot write the section between the marker lines {begin!r} and "
            f"{end!r}: the file has {len(starts)} begin and {len(stops)} end line(s){order}; "
            "expected one of each, begin first, or neither. Fix the markers (the file was "
            "not changed)."
        )
    with atomic_write(target, newline="") as f:
        f.write(text)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1) -> list[str]:
    """The lines of a Markdown table: the first ``left`` columns left-aligned, the rest (numbers)
    right-aligned. A row shorter than the header ends in empty cells."""
    rule = "|" + "---|" * left + "--:|" * (len(header) - left)
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(r) + " |" + " |" * (len(header) - len(r)) for r in rows]
    return lines

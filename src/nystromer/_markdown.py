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

    The first marked block is replaced; without markers the block is appended. Everything
    outside it is kept byte for byte. A missing file starts as ``new_file`` (e.g. a heading).
    The file is replaced atomically. Used by every command that writes results into docs/.
    """
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = new_file
    block = f"{begin}\n{markdown.strip(chr(10))}\n{end}"
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start >= 0 and stop >= 0:
        text = text[:start] + block + text[stop + len(end) :]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    with atomic_write(target) as f:
        f.write(text)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1) -> list[str]:
    """The lines of a Markdown table: the first ``left`` columns left-aligned, the rest (numbers)
    right-aligned. A row shorter than the header ends in empty cells."""
    rule = "|" + "---|" * left + "--:|" * (len(header) - left)
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(r) + " |" + " |" * (len(header) - len(r)) for r in rows]
    return lines

"""Atomic file writing: a crash never leaves a half-written file under the final name; and
reading a JSON file so that a malformed one is named.

A hard kill (SIGKILL, a power cut) runs no cleanup, so it can leave a writer's temporary
file or staging folder behind; the next write to the same destination removes those
(:func:`remove_stale`), recognising them by the writer's own naming pattern only. A
destination has one writer at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["RANDOM_PART", "atomic_write", "atomic_path", "load_json", "remove_stale"]

#: The random part of tempfile's names (mkstemp, mkdtemp), as a regular expression.
RANDOM_PART = "[a-z0-9_]{8}"


def load_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file; a malformed one is a ValueError naming the file and the place."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
            ) from exc


def remove_stale(folder: str | os.PathLike[str], pattern: str, *, folders: bool = False) -> None:
    """Remove the files (with ``folders``, the folders) of ``folder`` whose whole name matches
    ``pattern``: a temporary name of one of our atomic writes, left by a hard kill. The
    pattern must be specific to that writer and destination (a user's files never match)."""
    for entry in Path(folder).iterdir():
        if not re.fullmatch(pattern, entry.name) or entry.is_symlink():
            continue
        if folders and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif not folders and entry.is_file():
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``.

    For writers that want a file name (``torch.save``, ``safetensors.torch.save_file``,
    ``PIL.Image.save``). On an exception the temporary file is removed and ``path`` is untouched;
    one a hard kill left (``.<name>.<random>.tmp``) is removed by the next write to ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, rf"\.{re.escape(target.name)}\.{RANDOM_PART}\.tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates the file owner-only; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "w",
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; rename it to ``path`` on success.

    ``encoding`` and ``newline`` are those of :func:`open` (ignored in binary mode)."""
    if "b" in mode:
        encoding = newline = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding, newline=newline) as f:
        yield f
        f.flush()

"""Helpers for the tests that run a ``benchmarks/`` script at a tiny size and check the
Markdown section it writes."""

from __future__ import annotations

import runpy
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
#: What a docs file holds before a script writes its section into it (must survive).
KEPT = "# Benchmarks\n\nkept\n"


def load_script(name: str) -> dict:
    """The globals of ``benchmarks/<name>`` (its functions and constants), not run as main."""
    return runpy.run_path(str(BENCHMARKS / name))


def docs_file(tmp_path: Path) -> Path:
    """A docs file in ``tmp_path`` holding :data:`KEPT`."""
    docs = tmp_path / "benchmarks.md"
    docs.write_text(KEPT)
    return docs


def written_section(docs: Path, script: dict) -> str:
    """The section ``script`` wrote into ``docs``, from its BEGIN marker to its END marker,
    after checking that the text before it was kept."""
    text = docs.read_text()
    assert text.startswith(KEPT)
    return text[text.index(script["BEGIN"]) : text.index(script["END"])]

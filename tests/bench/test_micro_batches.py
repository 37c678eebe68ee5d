"""benchmarks/micro_batches.py at a tiny size: every setting timed, the section written."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "micro_batches.py"


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(SCRIPT))


def test_times_each_setting_and_writes_its_section(script, tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    argv = ["--task", "listops", "--batch-size", "4", "--parts", "1,2", "--steps", "1"]
    argv += ["--rounds", "1", "--write-docs", str(docs)]
    assert script["main"](argv) == 0
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    section = text[text.index(script["BEGIN"]) : text.index(script["END"])]
    assert "`python benchmarks/micro_batches.py --task listops --batch-size 4" in section
    rows = [line for line in section.splitlines() if line.startswith("| 1 |")]
    rows += [line for line in section.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2 and "| 2 | 2 |" in rows[1]  # 2 parts of 2 samples
    assert all(float(r.strip("|").split("|")[2]) > 0 for r in rows)
    for bad, message in (
        (["--parts", "1,x"], "--parts takes positive integers"),
        (["--steps", "0"], "--steps and --rounds must be ≥ 1"),
    ):
        with pytest.raises(SystemExit):
            script["main"](bad)
        assert message in capsys.readouterr().err

"""benchmarks/input_layout.py at a tiny size: both layouts timed, the docs section written."""

from __future__ import annotations

import pytest

from .scripts import docs_file, load_script, written_section


@pytest.fixture(scope="module")
def script():
    return load_script("input_layout.py")


def test_layouts_are_what_they_claim(script):
    contiguous = script["make_inputs"]("contiguous", 2, 3, 40, 4)
    split = script["make_inputs"]("head-split", 2, 3, 40, 4)
    for a, b in zip(contiguous, split, strict=True):
        assert a.shape == b.shape == (2, 3, 40, 4)
        assert a.is_contiguous() and not b.is_contiguous()
        assert b.transpose(1, 2).is_contiguous()


def test_times_both_layouts_and_writes_its_section(script, tmp_path, capsys):
    docs = docs_file(tmp_path)
    argv = ["-n", "128", "-m", "16", "--heads", "2", "--head-dim", "8", "--repeats", "2"]
    assert script["main"]([*argv, "--write-docs", str(docs)]) == 0
    section = written_section(docs, script)
    assert "`python benchmarks/input_layout.py -n 128 -m 16" in section
    rows = [line for line in section.splitlines() if line.startswith("| contiguous |")]
    rows += [line for line in section.splitlines() if line.startswith("| head-split |")]
    assert len(rows) == 2
    for row in rows:
        fwd, fwd_bwd = (float(x.replace(",", "")) for x in row.strip("|").split("|")[1:3])
        assert fwd > 0 and fwd_bwd > 0
    assert "| head-split ÷ contiguous |" in section
    # A second run replaces the section instead of adding one.
    assert script["main"]([*argv, "--write-docs", str(docs)]) == 0
    assert docs.read_text().count(script["BEGIN"]) == 1
    with pytest.raises(SystemExit):
        script["main"](["--repeats", "0"])
    assert "--repeats must be ≥ 1, got 0" in capsys.readouterr().err

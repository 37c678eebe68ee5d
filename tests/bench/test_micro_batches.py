"""benchmarks/micro_batches.py at a tiny size: every setting timed, the section written."""

from __future__ import annotations

import pytest

from .scripts import docs_file, load_script, written_section


@pytest.fixture(scope="module")
def script():
    return load_script("micro_batches.py")


def test_times_each_setting_and_writes_its_section(script, tmp_path, capsys):
    docs = docs_file(tmp_path)
    argv = ["--task", "listops", "--batch-size", "4", "--parts", "1,2", "--steps", "1"]
    argv += ["--rounds", "1", "--write-docs", str(docs)]
    assert script["main"](argv) == 0
    section = written_section(docs, script)
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


def test_retrieval_steps_run_the_two_tower_model_on_pairs(script, tmp_path):
    ids_1, ids_2, label = script["RandomTokens"](3, 10, 257, 2, pairs=True)[0]
    assert ids_1.shape == ids_2.shape == (10,) and not ids_1.equal(ids_2) and label in (0, 1)
    docs = docs_file(tmp_path)
    argv = ["--task", "retrieval", "--batch-size", "2", "--parts", "2", "--steps", "1"]
    assert script["main"]([*argv, "--rounds", "1", "--write-docs", str(docs)]) == 0
    section = written_section(docs, script)
    assert "batch 2 × 2 documents × 4,000 random tokens" in section
    assert "| 2 | 1 |" in section  # 2 parts of 1 pair

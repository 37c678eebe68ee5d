"""benchmarks/mil_switch.py at a tiny size: the report it writes and the lucidrains parity."""

from __future__ import annotations

import json

import pytest

from .scripts import load_script

pytest.importorskip("nystrom_attention")


def test_mil_switch_writes_its_report_and_lucidrains_numerics_match_the_package(tmp_path):
    script = load_script("mil_switch.py")
    out = tmp_path / "mil.json"
    argv = ["--dim", "32", "--landmarks", "8", "--steps", "3", "--train-sizes", "10", "30"]
    argv += ["--sizes", "20", "45", "--bags", "3", "--out", str(out)]
    script["main"](argv)
    report = json.loads(out.read_text())
    assert report["benchmark"] == "mil_switch"
    assert report["command"].startswith("python benchmarks/mil_switch.py --dim 32")
    assert [row["n"] for row in report["rows"]] == [20, 45]
    for row in report["rows"]:
        # The package's outputs to float32 rounding: the same predictions.
        assert row["lucidrains"]["max_rel_dlogit"] <= 1e-5
        assert row["lucidrains"]["changed_predictions"] == 0.0
        assert row["accuracy"]["lucidrains"] == row["accuracy"]["package"]
        # The default numerics are another computation (no front padding): logits move.
        assert row["nystromer"]["max_abs_dlogit"] > 1e-4
        assert 0.0 <= row["nystromer"]["changed_predictions"] <= 1.0
    assert "| 45 | 3 |" in script["table"](report)

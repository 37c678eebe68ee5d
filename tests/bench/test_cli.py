"""The demo, argument errors and the attention-core benchmark, through nystromer.cli.main.

bench speed/table/approx and viz attention run end to end in test_report.py (``bench report
--quick`` runs each of them once).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from nystromer._machine import machine_info
from nystromer.bench.core import (
    CoreReport,
    format_report,
    median_result,
    run_core,
    write_docs_section,
)
from nystromer.bench.demo import run_attention_demo
from nystromer.bench.measure import CaseResult, CaseSpec
from nystromer.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_demo_command_prints_the_table(capsys):
    assert (
        main(
            ["demo", "--lengths", "128", "--threads", "1", "--repeats", "1", "--listops-steps", "0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| 128 |" in out and "relative error" in out


def test_run_attention_demo_rows():
    rows = run_attention_demo([128], heads=2, head_dim=16, num_landmarks=16, threads=1, out=None)
    (row,) = rows
    assert row.seq_len == 128 and row.exact_ms > 0 and row.nystrom_ms > 0
    assert row.exact_mib >= 0 and row.nystrom_mib >= 0
    assert 0 < row.relative_error < 1


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--lengths", "12x"])
    assert info.value.code == 2
    assert "expected comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["bench", "speed", "--impl", "flash", "--out", "unused"])
    assert info.value.code == 2
    assert "argument --impl: unknown 'flash'" in capsys.readouterr().err


def _fake_report(ours_fwd=10.0, peer_fwd=30.0) -> CoreReport:
    def row(impl, fwd, bwd, mf, mb, padding=0.0):
        return CaseResult(
            CaseSpec(impl, seq_len=1024, padding=padding),
            forward_ms=fwd,
            backward_ms=bwd,
            forward_peak_mib=mf,
            backward_peak_mib=mb,
            memory_method="rss-reset",
        )

    rows = {
        "nystromer": row("nystromer", ours_fwd, 30.0, 10.0, 50.0),
        "nystrom-attention": row("nystrom-attention", peer_fwd, 70.0, 60.0, 100.0),
        "transformers": CaseResult(CaseSpec("transformers"), status="skipped", note="absent"),
        "nystromer (padded)": row("nystromer", 12.0, 33.0, 11.0, 52.0, padding=0.1),
    }
    return CoreReport(CaseSpec("nystromer", seq_len=1024), rows, machine_info(), "cmd", "today")


def test_core_table_ratios_and_docs_section(tmp_path):
    text = format_report(_fake_report())
    assert "| transformers | skipped: absent |" in text
    # Ratios are the row's value over ours: 30/10 ms, 70/30 ms, 60/10 MiB, 100/50 MiB.
    assert "| nystrom-attention | 30.0 | 70.0 | 60.0 | 100.0 | 3.00 | 2.33 | 6.00 | 2.00 |" in text
    assert "| nystromer | 10.0 | 30.0 | 10.0 | 50.0 | 1.00 | 1.00 | 1.00 | 1.00 |" in text
    assert "target" not in text and "PASS" not in text
    report = CoreReport.from_dict(_fake_report().to_dict())
    assert format_report(report) == text

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nIntro by hand.\n")
    write_docs_section(docs, _fake_report())
    write_docs_section(docs, _fake_report(ours_fwd=11.0))  # replaces, does not append
    content = docs.read_text()
    assert content.startswith("# Benchmarks\n\nIntro by hand.")
    assert content.count("attention-core:begin") == 1 and "| 11.0 |" in content


def test_a_round_that_failed_is_not_left_out_of_the_median():
    spec = CaseSpec("nystromer", seq_len=1024)

    def ok(ms):
        return CaseResult(spec, forward_ms=ms, backward_ms=3 * ms, forward_times_ms=[ms])

    row = median_result([ok(10.0), ok(14.0), ok(12.0)])
    assert (row.status, row.forward_ms, row.backward_ms) == ("ok", 12.0, 36.0)
    assert row.forward_times_ms == [10.0, 14.0, 12.0]
    # A round that timed out would otherwise vanish and the row show the faster rounds' median.
    timed_out = CaseResult(spec, "failed", "timed out after 1800 s")
    row = median_result([ok(10.0), timed_out, ok(12.0)])
    assert row.status == "failed" and row.forward_ms is None
    assert row.note == "round 2 of 3: timed out after 1800 s"
    assert "failed: round 2 of 3" in format_report(
        CoreReport(spec, {"nystromer": row}, machine_info(), "cmd", "today", rounds=3)
    )
    assert median_result([timed_out]).note == "timed out after 1800 s"


def test_attention_core_script_on_a_tiny_size(tmp_path, monkeypatch, capsys):
    docs, report = tmp_path / "benchmarks.md", tmp_path / "core.json"
    argv = ["-n", "128", "--heads", "2", "--head-dim", "16", "-m", "16", "--threads", "1"]
    argv += ["--impl", "nystromer", "--impl", "exact", "--repeats", "1"]
    argv += ["--rounds", "2", "--write-docs", str(docs), "--json", str(report)]
    monkeypatch.setattr(sys, "argv", ["attention_core.py", *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "benchmarks" / "attention_core.py"), run_name="__main__")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "| nystromer (padded) |" in out and "| exact |" in out
    data = json.loads(report.read_text())
    assert set(data["rows"]) == {"nystromer", "exact", "nystromer (padded)"}
    assert "python benchmarks/attention_core.py -n 128" in docs.read_text()
    # Two rounds, implementations in turn; exact only in the first.
    assert data["rounds"] == 2 and "in each of 2 rounds" in docs.read_text()
    assert "(round 2/2)" in out
    rows = data["rows"]
    assert len(rows["nystromer"]["forward_times_ms"]) == 2
    assert len(rows["nystromer (padded)"]["backward_times_ms"]) == 2
    assert len(rows["exact"]["forward_times_ms"]) == 1
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        run_core(CaseSpec("nystromer"), rounds=0)

    # A saved report renders again without measuring.
    monkeypatch.setattr(sys, "argv", ["attention_core.py", "--from-json", str(report)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "benchmarks" / "attention_core.py"), run_name="__main__")
    assert info.value.code == 0
    assert "| nystromer (padded) |" in capsys.readouterr().out


def test_commands_that_read_an_lra_model_refuse_a_missing_one_and_train_nothing(tmp_path, capsys):
    absent = tmp_path / "absent"
    for argv in (
        ["viz", "attention", "--source", "lra", "--out", str(tmp_path / "a.png")],
        ["bench", "approx", "--sources", "lra", "--out", str(tmp_path / "approx")],
    ):
        assert main([*argv, "--lra-run", str(absent)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nystromer: error: --lra-run: {absent} holds no trained LRA model")
        assert "nystromer train listops" in err
    assert list(tmp_path.iterdir()) == []

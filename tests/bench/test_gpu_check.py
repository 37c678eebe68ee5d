"""benchmarks/gpu_check.sh on the CPU (DEVICE=cpu): its stages run and leave what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .scripts import BENCHMARKS


def test_bench_stage_leaves_the_log_and_speed_json_and_bad_stages_fail(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", LENGTHS="128", IMPLS="nystromer", PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), str(out), "fp32", "nonsense"],
        cwd=BENCHMARKS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    log = (out / "check.log").read_text()
    assert "=== fp32" in log and "unknown stage nonsense" in log and "status 2" in log
    report = json.loads((out / "gpu" / "float32" / "speed.json").read_text())
    assert report["machine"]["device"] == "cpu" and report["base"]["dtype"] == "float32"
    assert report["lengths"] == [128] and list(report["curves"]) == ["nystromer"]
    # Only what the device tool brings back: at most 8 files, at most 2 folders down.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 2 and all(len(p.relative_to(out).parts) <= 3 for p in files)

"""Measurement code on tiny sizes: shapes and sanity of the numbers, not their values."""

from __future__ import annotations

import json
import math
import sys

import pytest

from nystromer._machine import allocator_settings, machine_info, machine_label
from nystromer.bench.measure import (
    CaseSpec,
    measure_case,
    run_in_process,
    run_worker,
)
from nystromer.bench.speed import crossover, scaling_exponent

TINY = dict(batch=1, heads=2, head_dim=16, num_landmarks=16, threads=1, warmup=1, repeats=2)


def test_fresh_process_measurement_has_every_number():
    r = measure_case(CaseSpec("nystromer", seq_len=256, padding=0.1, **TINY), timeout=300)
    assert r.status == "ok", r.note
    assert len(r.forward_times_ms) == len(r.backward_times_ms) == 2
    assert 0 < r.forward_ms < 10_000 and 0 < r.backward_ms < 10_000
    assert min(r.forward_times_ms) <= r.forward_ms <= max(r.forward_times_ms)
    assert r.forward_peak_mib >= 0 and r.backward_peak_mib >= 0
    assert r.memory_method in ("rss-reset", "rss-hwm", "cuda-allocated")
    assert r.threads == 1
    json.dumps(r.to_dict())  # serialisable as it stands


def test_quadratic_memory_shows_up_against_ours():
    # n = 1024, 2 heads: the materialised scores and probabilities take 2 × 8 MiB, ours a
    # few hundred KiB beyond its output; the gap dwarfs RSS granularity (pages of 4 KiB).
    found = {
        name: measure_case(
            CaseSpec(name, seq_len=1024, **TINY), backward=False, timing=False, timeout=300
        )
        for name in ("nystromer", "exact-matmul")
    }
    assert all(r.status == "ok" for r in found.values()), {k: r.note for k, r in found.items()}
    assert found["exact-matmul"].forward_peak_mib > 4 * found["nystromer"].forward_peak_mib
    assert found["exact-matmul"].forward_peak_mib > 8


def test_worker_errors_come_back_as_a_failed_result():
    # 95% padding leaves 13 real tokens ≤ m = 16: the naive baseline refuses that.
    r = measure_case(CaseSpec("naive", seq_len=256, padding=0.95, **TINY), timeout=300)
    assert r.status == "failed"
    assert "every sample needs more than" in r.note


def test_unsupported_or_missing_implementations_are_skipped_with_the_reason():
    r = measure_case(CaseSpec("transformers", seq_len=100, **TINY))
    assert r.status == "skipped" and "multiple of m" in r.note
    assert r.forward_ms is None


def test_in_process_timing_and_bad_arguments():
    found = run_in_process(CaseSpec("exact", seq_len=64, **TINY), ["time_forward"])
    assert found["forward_ms"] > 0 and len(found["forward_times_ms"]) == 2
    with pytest.raises(ValueError, match="tasks: unknown"):
        run_in_process(CaseSpec("exact", seq_len=64, **TINY), ["speed"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        CaseSpec("exact", dtype="float8")
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        CaseSpec("exact", seq_len=0)
    with pytest.raises(ValueError, match="unknown implementation"):
        CaseSpec("flash")


def test_machine_label():
    info = machine_info("cpu", 1)
    assert info["threads"] == 1 and info["torch"]
    assert "1 torch threads" in machine_label(info) and "device cpu" in machine_label(info)


def test_allocator_variables_label_the_machine(monkeypatch):
    environ = {"MALLOC_ARENA_MAX": "2", "LD_PRELOAD": "/x/libtcmalloc.so", "MALLOCX": "no"}
    environ |= {"TCMALLOC_RELEASE_RATE": "0", "THP_MEM_ALLOC_ENABLE": "1", "HOME": "/root"}
    assert allocator_settings(environ) == {
        "LD_PRELOAD": "/x/libtcmalloc.so",
        "MALLOC_ARENA_MAX": "2",
        "TCMALLOC_RELEASE_RATE": "0",
        "THP_MEM_ALLOC_ENABLE": "1",
    }
    for key in allocator_settings():
        monkeypatch.delenv(key)
    assert "allocator" not in machine_info() and "allocator" not in machine_label(machine_info())
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")
    assert machine_label(machine_info()).endswith(", allocator MALLOC_TRIM_THRESHOLD_=4096")


def test_worker_started_by_another_command_passes_its_result_and_threads():
    # A stand-in worker that reports its thread variable as its result.
    report = (
        "import json, os; from nystromer.bench.measure import _RESULT_MARK; "
        "print(_RESULT_MARK + json.dumps({'omp': os.environ.get('OMP_NUM_THREADS')}))"
    )
    spec = CaseSpec("exact", seq_len=64, **TINY)
    assert run_worker(spec, [], 60, command=[sys.executable, "-c", report]) == {"omp": "1"}
    failed = run_worker(spec, [], 60, command=[sys.executable, "-c", "raise SystemExit(3)"])
    assert failed == {"status": "failed", "note": "worker exit 3: no output"}


def test_scaling_exponent_and_crossover():
    lengths = [512, 1024, 2048, 4096]
    quadratic = [3.0 * n**2 for n in lengths]
    assert math.isclose(scaling_exponent(lengths, quadratic), 2.0)
    # The fit uses the larger half: a fixed overhead at small n does not bend it.
    assert math.isclose(scaling_exponent(lengths, [50.0, 50.0, 2048.0, 4096.0]), 1.0)
    assert scaling_exponent(lengths, [None, None, None, 1.0]) is None
    assert crossover(lengths, [5, 5, 5, 5], [1, 4, 16, 64]) == 2048
    assert crossover(lengths, [5, 1, 5, 5], [4, 4, 4, 64]) == 4096  # must stay ahead
    assert crossover(lengths, [5, 5, 5, 5], [1, 1, 1, 1]) is None


def test_recorded_command_leaves_out_where_copies_go():
    from nystromer.bench.measure import recorded_command

    argv = ["--json", "a b.json", "-n", "1024", "--out=dir", "--impl", "exact"]
    assert (
        recorded_command(["python", "benchmarks/x.py"], argv, drop=("--json", "--out"))
        == "python benchmarks/x.py -n 1024 --impl exact"
    )
    # A string is a script, as before commands recorded themselves.
    assert (
        recorded_command("benchmarks/x.py", ["-n", "8"], drop=()) == "python benchmarks/x.py -n 8"
    )
    assert recorded_command(["nystromer", "eval-long"], ["--out", "d"], ("--out",)) == (
        "nystromer eval-long"
    )

"""benchmarks/forward_parts.py at a tiny size: every part timed, sums right, section written."""

from __future__ import annotations

import argparse

import pytest

from .scripts import docs_file, load_script, written_section


@pytest.fixture(scope="module")
def script():
    return load_script("forward_parts.py")


def _args(**kw):
    base = dict(batch=1, heads=2, seq_len=96, head_dim=8, num_landmarks=16, repeats=2)
    base |= dict(gemm_size=4096)
    return argparse.Namespace(**(base | kw))


def test_the_products_compute_what_they_are_named_after(script):
    import torch

    parts = script["make_parts"](_args())
    names = ("OURS", "STEP1", "STEP3", "PRODUCTS1", "PRODUCTS3", "EXP", "FIRST_WRITE")
    assert set(parts) == {script[name] for name in names}
    for call in parts.values():
        call()
    a, b, c = torch.randn(2, 5, 3), torch.randn(2, 3, 4), torch.randn(2, 4, 6)
    scores, out = torch.empty(2, 5, 4), torch.empty(2, 5, 6)
    assert script["products"](a, b, c, scores, out) is out
    torch.testing.assert_close(scores, a @ b)
    torch.testing.assert_close(out, a @ b @ c)


def test_render_adds_up_the_mandatory_work(script):
    times = {
        script["OURS"]: [10.0],
        script["STEP1"]: [3.0],
        script["STEP3"]: [4.0],
        script["PRODUCTS1"]: [1.0],
        script["PRODUCTS3"]: [1.5],
        script["EXP"]: [0.5],
        script["FIRST_WRITE"]: [2.0],
    }
    args = _args(seq_len=1000, num_landmarks=10, head_dim=10, heads=1)
    # 8·n·m·d = 800,000 FLOPs at 1 GFLOP/s: 0.8 ms.
    text = script["render"](times, 1e9, "python benchmarks/forward_parts.py", "a machine", args)
    rows = {
        line.split(" | ")[0].lstrip("| "): float(line.split(" | ")[1].replace(",", ""))
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| part") and "---" not in line
    }
    assert rows["ours, rest: landmark means, pseudo-inverse, small products"] == 3.0
    assert rows["**work every implementation must do, as separate torch kernels**"] == 5.5
    assert rows["FLOP limit: 8·B·H·n·m·d at the 4096² GEMM rate"] == 0.8
    assert "Ours ÷ the work every implementation must do: 1.82" in text
    # Step 1's products: 4·n·m·d = 400,000 FLOPs in 1 ms.
    assert "| 1.0 | 0 GFLOP/s |" in text


def test_times_every_part_and_writes_its_section(script, tmp_path, capsys):
    docs = docs_file(tmp_path)
    argv = ["-n", "128", "-m", "16", "--heads", "2", "--head-dim", "8", "--repeats", "2"]
    argv += ["--gemm-size", "64"]
    assert script["main"]([*argv, "--write-docs", str(docs)]) == 0
    section = written_section(docs, script)
    assert "`python benchmarks/forward_parts.py -n 128 -m 16" in section
    for name in ("OURS", "STEP1", "STEP3", "PRODUCTS1", "PRODUCTS3", "EXP", "FIRST_WRITE"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {script[name]} |"))
        assert float(row.split(" | ")[1].replace(",", "")) > 0
    assert script["main"]([*argv, "--write-docs", str(docs)]) == 0
    assert docs.read_text().count(script["BEGIN"]) == 1
    with pytest.raises(SystemExit):
        script["main"](["--repeats", "0"])
    assert "--repeats must be ≥ 1, got 0" in capsys.readouterr().err

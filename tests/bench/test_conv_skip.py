"""benchmarks/conv_skip.py at a tiny size: both forms timed and checked, the section written."""

from __future__ import annotations

import pytest
import torch

from .scripts import docs_file, load_script, written_section


@pytest.fixture(scope="module")
def script():
    return load_script("conv_skip.py")


def test_both_forms_compute_the_same_convolution(script):
    value, weight, _ = script["_inputs"](2, 50, 3, 4, 7, torch.float64)
    forms = script["_forms"]()
    assert torch.allclose(forms["banded"](value, weight), forms["torch conv2d"](value, weight))
    errors = script["weight_grad_error"](2, 50, 3, 4, 7)
    assert set(errors) == {"torch conv2d", "banded"}
    assert 0 <= errors["banded"] < 1e-5  # float32 against float64


def test_times_both_forms_and_writes_its_section(script, tmp_path, monkeypatch, capsys):
    docs = docs_file(tmp_path)
    argv = ["--case", "2,64,2,4", "--kernel-size", "5", "--repeats", "2", "--steps", "1"]
    # The ListOps step at full size takes seconds: time it on a short batch.
    real = script["time_listops_steps"]
    monkeypatch.setitem(
        script["main"].__globals__, "time_listops_steps", lambda n: real(n, batch=2, length=128)
    )
    assert script["main"]([*argv, "--write-docs", str(docs)]) == 0
    section = written_section(docs, script)
    assert "`python benchmarks/conv_skip.py --case 2,64,2,4 --kernel-size 5" in section
    row = next(line for line in section.splitlines() if line.startswith("| custom (2, 64, 2, 4)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(float(c.replace(",", "")) > 0 for c in cells[1:5])
    assert cells[5].endswith("×") and float(cells[7]) < 1e-5
    assert "s with torch's convolution" in section and "s with the banded form" in section
    assert script["main"]([*argv, "--write-docs", str(docs)]) == 0
    assert docs.read_text().count(script["BEGIN"]) == 1
    for bad, message in (
        (["--kernel-size", "4"], "--kernel-size must be an odd integer"),
        (["--case", "1,2,3"], "--case takes four positive integers"),
        (["--repeats", "0"], "--repeats must be ≥ 1"),
    ):
        with pytest.raises(SystemExit):
            script["main"](bad)
        assert message in capsys.readouterr().err

"""benchmarks/mil_switch.py at a tiny size: the report it writes on a model the TransMIL example
saved, the lucidrains parity, and its errors on a missing or foreign --model."""

from __future__ import annotations

import json
import runpy

import pytest
import torch

from .scripts import BENCHMARKS, load_script

pytest.importorskip("nystrom_attention")
pytest.importorskip("matplotlib")  # the example draws its heatmap after saving


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny TransMIL trained on the package for 3 steps by ``examples/transmil.py --save``."""
    folder = tmp_path_factory.mktemp("mil")
    example = runpy.run_path(str(BENCHMARKS.parent / "examples" / "transmil.py"))
    argv = ["--dim", "32", "--landmarks", "8", "--steps", "3", "--train-sizes", "10", "30"]
    argv += ["--attention", "nystrom-attention", "--bag-size", "20", "--eval-bags", "2"]
    example["main"]([*argv, "--out", str(folder / "heat.png"), "--save", str(folder / "m.pt")])
    return folder / "m.pt"


def test_mil_switch_writes_its_report_and_lucidrains_numerics_match_the_package(
    tmp_path, saved_model
):
    script = load_script("mil_switch.py")
    out = tmp_path / "mil.json"
    argv = ["--model", str(saved_model), "--sizes", "20", "45", "--bags", "3", "--out", str(out)]
    script["main"](argv)
    report = json.loads(out.read_text())
    assert report["benchmark"] == "mil_switch"
    assert report["command"].startswith("python benchmarks/mil_switch.py --model ")
    # What the example saved comes along: the settings that rebuilt the model, its training.
    assert report["model"] == {
        "features": 64, "dim": 32, "landmarks": 8, "attention": "nystrom-attention"
    }  # fmt: skip
    training = report["training"]
    assert training["steps"] == 3 and training["command"].startswith("python examples/transmil")
    assert training["first_loss"] > 0 and training["mean_loss_last_50"] > 0
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


def test_mil_switch_names_model_when_the_file_is_missing_or_foreign(tmp_path, capsys):
    main = load_script("mil_switch.py")["main"]
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "none.pt")])
    assert "--model" in capsys.readouterr().err
    foreign = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, foreign)
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    for path in (foreign, text):
        with pytest.raises(SystemExit, match="--model: .* not written by examples/transmil.py"):
            main(["--model", str(path), "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()

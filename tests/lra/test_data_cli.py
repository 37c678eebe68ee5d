"""``nystromer data listops|pathfinder`` through the real command-line entry point."""

from __future__ import annotations

from pathlib import Path

from nystromer.cli import main
from nystromer.lra.data import load_split


def test_listops_command(tmp_path: Path, capsys):
    args = ["data", "listops", "--out", str(tmp_path), "--train", "20", "--val", "4"]
    args += ["--test", "3", "--min-length", "10", "--max-length", "60", "--max-depth", "4"]
    assert main([*args, "--no-progress", "--seed", "3"]) == 0
    assert "basic_test.tsv" in capsys.readouterr().out
    sizes = [len(load_split("listops", tmp_path, s)) for s in ("train", "val", "test")]
    assert sizes == [20, 4, 3]


def test_listops_command_reports_bad_settings(tmp_path: Path, capsys):
    code = main(["data", "listops", "--out", str(tmp_path), "--max-depth", "2", "--no-progress"])
    assert code == 2 and "no tree satisfies" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_pathfinder_command(tmp_path: Path):
    args = ["data", "pathfinder", "--out", str(tmp_path), "--images", "10"]
    assert main([*args, "--images-per-batch", "5", "--seed", "1", "--no-progress"]) == 0
    folder = tmp_path / "curv_contour_length_14"
    assert sorted(p.name for p in (folder / "metadata").iterdir()) == ["0.npy", "1.npy"]
    assert len(list((folder / "imgs" / "1").glob("sample_*.png"))) == 5
    test = load_split("pathfinder", tmp_path, "test")
    assert len(test) == 1 and test[0][0].shape == (1024,)


def test_data_without_dataset_prints_usage(capsys):
    assert main(["data"]) == 2
    assert "listops" in capsys.readouterr().err


def test_a_malformed_settings_record_is_named(tmp_path: Path, capsys):
    # The record of the arguments a folder's set was made with, edited by hand: one error line
    # naming it (it was json's bare "Expecting value: line 1 column 1").
    (tmp_path / "nystromer_listops.json").write_text("{")
    assert main(["data", "listops", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "nystromer_listops.json is not valid JSON" in capsys.readouterr().err
    folder = tmp_path / "curv_contour_length_14"
    folder.mkdir()
    (folder / "nystromer_pathfinder.json").write_text("")
    assert main(["data", "pathfinder", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "nystromer_pathfinder.json is not valid JSON" in capsys.readouterr().err

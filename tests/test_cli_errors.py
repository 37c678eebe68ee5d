"""Bad input to every ``nystromer`` command, through ``nystromer.cli.main``: exit code 2 and an
error line that names the argument, no traceback. argparse finds what a type can check (usage,
then ``nystromer COMMAND: error: argument --x: ...``); the rest the command finds and reports
in the one line ``nystromer: error: ...``. A genuine bug still raises (a traceback)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from nystromer import _args
from nystromer.cli import main
from nystromer.lra.recipes import recipe_path

# Words of a command: MISSING is a path that does not exist, FILE a text file, BAD_JSON a
# malformed JSON file, OTHER_JSON the JSON of no report, DIR an empty folder, MODEL a folder with
# a BERT config.json (and nothing else: read only once the arguments are checked), OUT a folder
# that must not be created. Files of the right kind with a value of the wrong type (a TypeError
# reported as an input error, naming the file or the field): BAD_RECIPE a recipe, BAD_RUN an LRA
# run folder whose config.json holds that recipe, BAD_LONG / BAD_TRANSMIL reports.
# BAD_VALUE_RECIPE a whole recipe with a value out of range, TEXT_RECIPE the shipped text one.
# A CUDA index no machine has: refused with or without CUDA, when the command runs (argparse
# checks the spelling only: a command may be written for another machine).
NO_GPU = "cuda:999"
CASES = {
    "demo --threads 0": (["demo", "--threads", "0"], "argument --threads"),
    "demo --listops-dir FILE": (["demo", "--listops-dir", "FILE"], "argument --listops-dir"),
    "train --device foo": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--device", "foo"],
        "argument --device",
    ),
    "train --device cuda:N": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--device", NO_GPU],
        "--device: ",
    ),
    "train --recipe MISSING": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--recipe", "MISSING"],
        "argument --recipe",
    ),
    "train --recipe BAD_JSON": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--recipe", "BAD_JSON"],
        "BAD_JSON is not valid JSON",
    ),
    "train --recipe OTHER_JSON": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--recipe", "OTHER_JSON"],
        "OTHER_JSON: unknown recipe keys ['benchmark']",
    ),
    "train --recipe BAD_RECIPE": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--recipe", "BAD_RECIPE"],
        "BAD_RECIPE: recipe field 'steps' must be int, got 'ten'",
    ),
    # A recipe setting checked by the recipe, model or trainer is named by its flag; one read
    # from a --recipe file by the file.
    "train --num-landmarks 0": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--num-landmarks", "0"],
        "--num-landmarks: num_landmarks must be an integer ≥ 1, got 0",
    ),
    "train --num-heads 3": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--num-heads", "3"],
        "--num-heads: embed_dim must be divisible by num_heads=3, got 64",
    ),
    "train --warmup-steps 5000": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--warmup-steps", "5000"],
        "--warmup-steps: warmup_steps must be an integer in [0, steps=5000), got 5000",
    ),
    "train --grad-clip 0": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--grad-clip", "0"],
        "--grad-clip: grad_clip must be > 0 or None, got 0.0",
    ),
    "train --micro-batches 64": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--micro-batches", "64"],
        "--micro-batches: micro_batches must be an integer in [1, batch_size=32], got 64",
    ),
    "train --data DIR": (
        ["train", "listops", "--data", "DIR", "--out", "OUT"],
        "--data: ListOps train split: none of ['basic_train.tsv'] in DIR",
    ),
    "train --data MISSING": (
        ["train", "listops", "--data", "MISSING", "--out", "OUT"],
        "--data: listops data folder MISSING does not exist",
    ),
    "train --recipe BAD_VALUE_RECIPE": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--recipe", "BAD_VALUE_RECIPE"]
        + ["--num-landmarks", "8"],
        "BAD_VALUE_RECIPE: num_landmarks must be an integer ≥ 1, got 0",
    ),
    "train --recipe TEXT_RECIPE": (
        ["train", "listops", "--data", "DIR", "--out", "OUT", "--recipe", "TEXT_RECIPE"],
        "--recipe: TEXT_RECIPE is for text, not listops",
    ),
    "eval --device foo": (["eval", "DIR", "--device", "foo"], "argument --device"),
    "eval BAD_RUN": (
        ["eval", "BAD_RUN"],
        "BAD_RUN/config.json: recipe field 'steps' must be int, got 'ten'",
    ),
    "data listops --max-depth 1": (
        ["data", "listops", "--out", "OUT", "--max-depth", "1"],
        "--max-depth: max_depth must be >= 2",
    ),
    "data listops --max-length 0": (
        ["data", "listops", "--out", "OUT", "--max-length", "0"],
        "--max-length: no tree satisfies min_length=500 < tokens < max_length=0",
    ),
    "data pathfinder --resolution 7": (
        ["data", "pathfinder", "--out", "OUT", "--resolution", "7"],
        "--resolution: resolution must be an integer ≥ 16, got 7",
    ),
    "distill --device cuda:N": (
        ["distill", "--out", "OUT", "--teacher", "DIR", "--text", "FILE", "--device", NO_GPU],
        "--device: ",
    ),
    "distill --teacher DIR": (
        ["distill", "--out", "OUT", "--teacher", "DIR", "--text", "FILE"],
        "--teacher: teacher must be a model folder with a config.json: DIR",
    ),
    "distill --num-landmarks 0": (
        ["distill", "--out", "OUT", "--teacher", "DIR", "--text", "FILE", "--num-landmarks", "0"],
        "--num-landmarks: num_landmarks must be an integer ≥ 1, got 0",
    ),
    "distill --micro-batches 8": (
        ["distill", "--out", "OUT", "--teacher", "DIR", "--text", "FILE", "--micro-batches", "8"],
        "--micro-batches: micro_batches must be an integer in [1, batch_size=4], got 8",
    ),
    "distill --calibrate without a skip": (
        ["distill", "--out", "OUT", "--teacher", "DIR", "--text", "FILE"]
        + ["--conv-kernel-size", "0", "--calibrate", "4"],
        "--calibrate: calibrate fits the convolution skip, which needs conv_kernel_size",
    ),
    "eval-long --model MISSING": (["eval-long", "--model", "MISSING", "--out", "OUT"], "--model:"),
    "eval-long --documents FILE": (
        ["eval-long", "--model", "MODEL", "--documents", "FILE", "--out", "OUT"],
        "--documents: FILE is not a folder",
    ),
    "eval-long --from-json BAD_JSON": (
        ["eval-long", "--from-json", "BAD_JSON"],
        "BAD_JSON is not valid JSON",
    ),
    "eval-long --from-json OTHER_JSON": (
        ["eval-long", "--from-json", "OTHER_JSON"],
        "--from-json: OTHER_JSON is not a long_inputs report",
    ),
    "eval-long --from-json BAD_LONG": (
        ["eval-long", "--from-json", "BAD_LONG"],
        "--from-json: BAD_LONG is not a report this version reads (TypeError: ",
    ),
    "eval-long --from-json MISSING": (
        ["eval-long", "--from-json", "MISSING"],
        "argument --from-json",
    ),
    "eval-long --reuse MISSING": (["eval-long", "--reuse", "MISSING"], "argument --reuse"),
    "bench speed --impl foo": (
        ["bench", "speed", "--impl", "foo"],
        "argument --impl: unknown 'foo'",
    ),
    "bench speed --impl ''": (["bench", "speed", "--impl", ""], "argument --impl"),
    "bench speed --device foo": (["bench", "speed", "--device", "foo"], "argument --device"),
    "bench speed --device cuda:N": (["bench", "speed", "--device", NO_GPU], "--device: "),
    "bench speed --out FILE": (["bench", "speed", "--out", "FILE"], "argument --out"),
    "bench speed --timeout 0": (["bench", "speed", "--timeout", "0"], "argument --timeout"),
    "bench speed --max-seconds -1": (
        ["bench", "speed", "--max-seconds", "-1"],
        "argument --max-seconds: expected a positive number",
    ),
    "bench report --docs DIR": (
        ["bench", "report", "--docs", "DIR"],
        "argument --docs: DIR is a folder, not a file",
    ),
    "bench report --out FILE": (["bench", "report", "--out", "FILE"], "argument --out"),
    "bench table --impl foo": (["bench", "table", "--impl", "nystromer,foo"], "argument --impl"),
    "bench approx --sources foo": (["bench", "approx", "--sources", "foo"], "argument --sources"),
    "bench approx --seq-len 0": (["bench", "approx", "--seq-len", "0"], "argument --seq-len"),
    "bench approx --lra-run MISSING": (
        ["bench", "approx", "--sources", "lra", "--lra-run", "MISSING", "--out", "OUT"],
        "--lra-run: MISSING holds no trained LRA model",
    ),
    "bench report --only foo": (["bench", "report", "--only", "foo"], "argument --only"),
    "bench transmil --from-json BAD_JSON": (
        ["bench", "transmil", "--from-json", "BAD_JSON", "--out", "OUT"],
        "BAD_JSON is not valid JSON",
    ),
    "bench transmil --from-json OTHER_JSON": (
        ["bench", "transmil", "--from-json", "OTHER_JSON", "--out", "OUT"],
        "--from-json: OTHER_JSON is not a transmil report",
    ),
    "bench transmil --from-json BAD_TRANSMIL": (
        ["bench", "transmil", "--from-json", "BAD_TRANSMIL", "--out", "OUT"],
        "--from-json: BAD_TRANSMIL is not a report this version reads (TypeError: ",
    ),
    "bench transmil --device cuda:N": (
        ["bench", "transmil", "--device", NO_GPU, "--out", "OUT"],
        "--device: ",
    ),
    "viz attention --lra-run MISSING": (
        ["viz", "attention", "--source", "lra", "--lra-run", "MISSING", "--out", "OUT/a.png"],
        "--lra-run: MISSING holds no trained LRA model",
    ),
    "viz attention --lra-run FILE": (
        ["viz", "attention", "--source", "lra", "--lra-run", "FILE", "--out", "OUT/a.png"],
        "--lra-run: FILE holds no trained LRA model",
    ),
    "viz attention --seq-len 0": (["viz", "attention", "--seq-len", "0"], "argument --seq-len"),
    "viz attention --out DIR": (
        ["viz", "attention", "--out", "DIR"],
        "argument --out: DIR is a folder, not a file",
    ),
    "viz attention --out FILE/a.png": (
        ["viz", "attention", "--out", "FILE/a.png"],
        "argument --out: FILE/a.png: FILE is a file, not a folder",
    ),
    "bench transmil --write-docs DIR": (
        ["bench", "transmil", "--write-docs", "DIR", "--out", "OUT"],
        "argument --write-docs: DIR is a folder",
    ),
    "train --out FILE/run": (
        ["train", "listops", "--data", "DIR", "--out", "FILE/run"],
        "argument --out: FILE/run: FILE is a file, not a folder",
    ),
    "eval --write-docs FILE/x.md": (
        ["eval", "DIR", "--write-docs", "FILE/x.md"],
        "argument --write-docs: FILE/x.md: FILE is a file",
    ),
    "viz attention --head 3 of random inputs": (
        ["viz", "attention", "--head", "3", "--out", "OUT/a.png"],
        "--head: the random inputs are one head",
    ),
    "viz attention --layer 1 of random inputs": (
        ["viz", "attention", "--layer", "1", "--out", "OUT/a.png"],
        "--layer: the random inputs are one head",
    ),
    "viz attention --num-landmarks ≥ n": (
        ["viz", "attention", "--seq-len", "64", "--num-landmarks", "64", "--out", "OUT/a.png"],
        "--num-landmarks: expected fewer than the n = 64 positions (--seq-len), got 64",
    ),
}


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("some words\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "speed"}))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bad_recipe.json").write_text(json.dumps({"steps": "ten"}))
    (tmp_path / "bad_run").mkdir()
    run_config = {"task": "listops", "recipe": {"steps": "ten"}, "model": {}}
    (tmp_path / "bad_run" / "config.json").write_text(json.dumps(run_config))
    bad_value = {**json.loads(recipe_path("listops").read_text()), "num_landmarks": 0}
    (tmp_path / "bad_value_recipe.json").write_text(json.dumps(bad_value))
    for name, benchmark in (("bad_long", "long_inputs"), ("bad_transmil", "transmil")):
        report = {"benchmark": benchmark, "settings": 5, "documents": 5, "systems": 5}
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    return {
        "MISSING": tmp_path / "missing",
        "FILE": tmp_path / "file.txt",
        "BAD_JSON": tmp_path / "bad.json",
        "OTHER_JSON": tmp_path / "other.json",
        "DIR": tmp_path / "dir",
        "MODEL": tmp_path / "model",
        "OUT": tmp_path / "out",
        "BAD_RECIPE": tmp_path / "bad_recipe.json",
        "BAD_VALUE_RECIPE": tmp_path / "bad_value_recipe.json",
        "TEXT_RECIPE": recipe_path("text"),
        "BAD_RUN": tmp_path / "bad_run",
        "BAD_LONG": tmp_path / "bad_long.json",
        "BAD_TRANSMIL": tmp_path / "bad_transmil.json",
    }


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


@pytest.mark.parametrize("argv, expected", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_error_line_naming_the_argument(paths, capsys, argv, expected):
    def spelled(word: str) -> str:
        for name, path in paths.items():
            word = word.replace(name, str(path))
        return word

    assert _exit_code([spelled(w) for w in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert re.match(r"nystromer( [a-z-]+)*: error: ", last), err
    assert spelled(expected) in last
    if not expected.startswith("argument "):  # found by the command, not by argparse: no usage
        assert err.startswith("nystromer: error: ") and err.count("\n") == 1, err
    assert not paths["OUT"].exists()  # nothing was written


@pytest.mark.parametrize("bug", [KeyError, TypeError])
def test_a_bug_in_a_command_still_raises(monkeypatch, tmp_path, bug):
    # A TypeError is what a wrong keyword or a wrong call raises: not an input error, although
    # the checks of a file's content raise one (nystromer._checks.InputTypeError).
    from nystromer.bench import viz

    def broken(*args, **kwargs):
        raise bug("a bug")

    monkeypatch.setattr(viz, "attention_figure", broken)
    with pytest.raises(bug, match="a bug"):
        main(["viz", "attention", "--out", str(tmp_path / "a.png")])


def test_an_input_error_of_any_command_exits_with_one_line(monkeypatch, tmp_path, capsys):
    from nystromer.bench import viz

    def refuses(*args, **kwargs):
        raise ValueError("--window: too wide")

    monkeypatch.setattr(viz, "attention_figure", refuses)
    assert main(["viz", "attention", "--out", str(tmp_path / "a.png")]) == 2
    assert capsys.readouterr().err == "nystromer: error: --window: too wide\n"


def test_device_type_and_check(monkeypatch):
    parse, parse_auto = _args.torch_device(), _args.torch_device(auto=True)
    assert [parse(d) for d in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda", "cuda:1"]
    assert parse_auto("auto") == "auto"
    assert parse("mps") == "mps"  # any device torch knows; check_device says if it is here
    for text in ("auto", "gpu", "cuda:", "cuda:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected cpu, cuda, cuda:N or"):
            parse(text)
    with pytest.raises(argparse.ArgumentTypeError, match="expected auto, cpu, cuda, cuda:N"):
        parse_auto("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        _args.check_device(device)
    message = "--device: the CUDA devices here are cuda:0, cuda:1; got 'cuda:2'"
    with pytest.raises(ValueError, match=message):
        _args.check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device: CUDA is not available here"):
        _args.check_device("cuda")
    _args.check_device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device: MPS is not available here"):
        _args.check_device("mps")


def test_naming_flags_leads_with_the_flag_of_a_setting_given():
    flags = {"num_heads": "--num-heads", "data_dir": "--data"}

    def raised(exc: Exception) -> str:
        with pytest.raises(type(exc)) as info, _args.naming_flags(flags):
            raise exc
        return str(info.value)

    # The leading setting, else the first one spelled name=value, that was given.
    assert raised(ValueError("num_heads must be ≥ 1")) == "--num-heads: num_heads must be ≥ 1"
    message = "embed_dim must be divisible by num_heads=3, got 64"
    assert raised(ValueError(message)) == f"--num-heads: {message}"
    assert raised(FileNotFoundError("data_dir: no x.tsv")) == "--data: no x.tsv"  # a label
    assert raised(ValueError("run_dir: num_heads=3 too many")) == (
        "--num-heads: run_dir: num_heads=3 too many"  # the label of another setting stays
    )
    # Not about a setting given (a default, a file's value): as it was.
    for message in ("embed_dim must be ≥ 1", "mine.json: num_heads must be ≥ 1", "a bug"):
        assert raised(ValueError(message)) == message
    with pytest.raises(KeyError), _args.naming_flags(flags):  # not an input error: untouched
        raise KeyError("num_heads")
    # A subclass that takes other arguments becomes the input error it is an instance of.
    decode_error = json.JSONDecodeError("num_heads=x is no JSON", "doc", 0)
    with pytest.raises(ValueError, match="^--num-heads: num_heads=x is no JSON"):
        with _args.naming_flags(flags):
            raise decode_error

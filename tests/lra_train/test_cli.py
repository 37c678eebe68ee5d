"""``nystromer train`` / ``nystromer eval`` end to end (data from memory, and from ListOps TSV)."""

from __future__ import annotations

import functools
import inspect
import json
import random
import re
import shlex

import pytest

from nystromer.cli import main
from nystromer.lra.report import accuracy_interval

from .synthetic import TokenDataset

TINY = [
    "--steps", "12", "--batch-size", "8", "--eval-every", "4", "--lr", "3e-3",
    "--embed-dim", "16", "--ffn-dim", "32", "--classifier-dim", "16",
    "--num-landmarks", "8", "--conv-kernel-size", "5", "--max-length", "128",
    "--device", "cpu", "--no-progress",
]  # fmt: skip
SYNTHETIC = [*TINY, "--num-classes", "3"]


@pytest.fixture
def memory_data(monkeypatch):
    """Serve the synthetic splits instead of reading files."""
    splits = {"train": TokenDataset(40, seed=0), "val": TokenDataset(16, seed=1)}
    splits["test"] = TokenDataset(16, seed=2)

    def fake_load_splits(task, data_dir, max_length, names=("train", "val", "test")):
        return {s: splits[s] for s in names}

    monkeypatch.setattr("nystromer.lra.run.load_splits", fake_load_splits)
    return splits


def metric_lines(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        r.pop("elapsed_s")
        r.pop("train_s_per_step")  # timings differ between runs
    return lines


def test_train_eval_resume_from_the_command_line(memory_data, tmp_path, capsys):
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    assert (
        main(["train", "listops", "--data", str(tmp_path), "--out", str(straight), *SYNTHETIC]) == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((straight / "summary.json").read_text())
    assert printed["test_accuracy"] == summary["test_accuracy"]
    assert summary["config"]["recipe"]["embed_dim"] == 16
    assert summary["config"]["recipe"]["batch_size"] == 8
    assert summary["config"]["model"]["vocab_size"] == 16  # from the dataset
    assert summary["config"]["recipe"]["warmup_steps"] == 2  # 1000/5000 of 12 steps

    # eval re-computes the test accuracy of `best`.
    assert main(["eval", str(straight)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["checkpoint"] == "best" and ev["step"] == summary["best_step"]
    assert ev["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)
    assert main(["eval", str(straight), "--split", "val", "--checkpoint", "last"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["step"] == 12 and ev["accuracy"] == pytest.approx(
        metric_lines(straight)[-1]["val_accuracy"]
    )

    # --micro-batches reaches the trainer (it is a runtime option, not part of the recipe).
    split = tmp_path / "split"
    args = ["train", "listops", "--data", str(tmp_path), "--out", str(split), *SYNTHETIC]
    assert main([*args, "--micro-batches", "3"]) == 0
    capsys.readouterr()
    split_summary = json.loads((split / "summary.json").read_text())
    assert split_summary["train_config"]["micro_batches"] == 3
    assert "micro_batches" not in split_summary["config"]["recipe"]

    # Pause, then resume with nothing but --resume: the recipe comes from config.json.
    args = ["train", "listops", "--data", str(tmp_path), "--out", str(paused)]
    assert main([*args, *SYNTHETIC, "--stop-at", "6"]) == 0
    assert not (paused / "summary.json").exists()
    assert main(["train", "listops", "--out", str(paused), "--resume", "--no-progress"]) == 0
    assert metric_lines(paused) == metric_lines(straight)


def test_results_section_holds_a_command_that_reproduces_the_run(memory_data, tmp_path, capsys):
    run = tmp_path / "tiny-listops"
    docs = tmp_path / "docs" / "results.md"
    train = ["train", "listops", "--data", str(tmp_path), "--out", str(run), *SYNTHETIC]
    assert main([*train, "--write-docs", str(docs)]) == 0
    assert "wrote the results section" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    text = docs.read_text()
    assert text.count("<!-- lra:tiny-listops:begin") == 1
    # The heading tells this run from others of the same task and attention.
    assert "### ListOps: Nyström attention (m = " in text and "), seed 0\n" in text
    assert f"| listops | **{100 * summary['test_accuracy']:.2f}** | 37.15 | 37.10 |" in text
    rows = [x.split(" | ")[0] for x in text.splitlines() if x.startswith("| ") and x[2].isdigit()]
    assert rows == ["| 4", "| 8", "| 12"]  # the validation table
    assert summary["test_examples"] == 16
    low, high = accuracy_interval(summary["test_accuracy"], 16)
    assert "On 16 test examples the 95% interval of this accuracy (Wilson) is " in text
    assert f"{100 * low:.2f}–{100 * high:.2f}%; the paper's 37.15 lies " in text
    assert (docs.parent / "results" / "tiny-listops_accuracy.png").stat().st_size > 0

    # The recorded command, run again into another folder, trains the same recipe to the
    # same result (CPU training is deterministic for a seed).
    command = re.search(r"with `(nystromer train [^`]*)`", text).group(1)
    argv = shlex.split(command)[1:]
    again = tmp_path / "again"
    argv[argv.index("--out") + 1] = str(again)
    assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    redo = json.loads((again / "summary.json").read_text())
    assert redo["config"]["recipe"] == summary["config"]["recipe"]
    assert redo["test_accuracy"] == summary["test_accuracy"]

    # eval --write-docs rewrites the section in place; an unfinished run is refused.
    assert main(["eval", str(run), "--write-docs", str(docs)]) == 0
    capsys.readouterr()
    assert docs.read_text().count("<!-- lra:tiny-listops:begin") == 1
    paused = tmp_path / "paused"
    assert main([*train[:5], str(paused), *SYNTHETIC, "--stop-at", "4"]) == 0
    capsys.readouterr()
    assert main(["eval", str(paused), "--write-docs", str(docs)]) == 2
    assert "summary.json is missing" in capsys.readouterr().err


def test_accuracy_interval_is_wilsons():
    # Reference values of the Wilson score interval (Newcombe 1998, Table I; Brown, Cai and
    # DasGupta 2001): 50/100 and 0/10 at 95%.
    assert accuracy_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=5e-5)
    low, high = accuracy_interval(0.0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=5e-5)
    # ListOps: 2,000 test examples at 36% leave about ±2.1 points.
    low, high = accuracy_interval(0.36, 2000)
    assert 100 * (high - low) / 2 == pytest.approx(2.1, abs=0.05)
    with pytest.raises(ValueError, match="accuracy must be a fraction"):
        accuracy_interval(36.0, 2000)
    with pytest.raises(ValueError, match="n .the number of examples"):
        accuracy_interval(0.4, 0)


def test_command_line_errors(memory_data, monkeypatch, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "listops", "--data", str(tmp_path), "--out", str(out), *SYNTHETIC]
    assert main([*base, "--stop-at", "2"]) == 0
    capsys.readouterr()
    assert main(base) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "listops", "--out", str(out), "--resume", "--steps", "20"]) == 2
    assert "different training schedule" in capsys.readouterr().err
    assert main(["train", "text", "--out", str(out), "--resume"]) == 2
    assert "is a listops run" in capsys.readouterr().err
    assert main(["train", "listops", "--out", str(out), "--resume", "--dropout", "0.2"]) == 2
    assert "model differs from the checkpoint's (dropout: 0.1 → 0.2)" in capsys.readouterr().err
    assert main(["train", "listops", "--out", str(tmp_path / "x"), "--resume"]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "x")]) == 2
    monkeypatch.undo()  # the data loaders read --data again
    capsys.readouterr()
    assert main(["eval", str(out), "--checkpoint", "last", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"nystromer: error: --data: ListOps test split: none of ['basic_test.tsv'] in {tmp_path}\n"
    )
    with pytest.raises(SystemExit):
        main(["train", "listops", "--out", str(out), "--attention", "linear"])


def test_a_new_run_keeps_the_config_of_another_run_in_out(memory_data, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    base = ["train", "listops", "--data", str(tmp_path), "--out", str(out), *SYNTHETIC]
    assert main([*base, "--stop-at", "2"]) == 0
    # What a run killed before its first checkpoint and validation leaves: config.json alone.
    shutil.rmtree(out / "last")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    config = (out / "config.json").read_bytes()
    capsys.readouterr()
    assert main([*base, "--lr", "1e-3", "--stop-at", "2"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == config
    # The same run started again: nothing of another run is lost, so it may.
    assert main([*base, "--stop-at", "2"]) == 0
    # A folder with another trainer's results and no config.json gets none added.
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 5}\n')
    capsys.readouterr()
    assert main(["train", "listops", "--data", str(tmp_path), "--out", str(other), *SYNTHETIC]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize(
    "flags",
    [
        ["eval", "RUN", "--batch-size", "0"],
        ["eval", "RUN", "--max-batches", "0"],
        ["eval", "RUN", "--num-workers", "-1"],
        ["train", "listops", "--out", "RUN", "--resume", "--stop-at", "-1"],
        ["train", "listops", "--out", "RUN", "--resume", "--micro-batches", "0"],
        ["train", "listops", "--out", "RUN", "--resume", "--checkpoint-every", "-2"],
        ["train", "listops", "--out", "RUN", "--resume", "--eval-batch-size", "0"],
    ],
)
def test_bad_runtime_numbers_are_refused_naming_the_flag(tmp_path, capsys, flags):
    # eval --batch-size 0 used to fall back to the recipe's batch size silently.
    flag = next(f for f in flags if f.startswith("--") and f != "--out" and f != "--resume")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path) if f == "RUN" else f for f in flags])
    assert exc.value.code == 2
    assert f"argument {flag}: expected an integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["train", "listops", "--data", "D"],
        ["data", "listops"],
        ["data", "pathfinder"],
        ["distill", "--teacher", "T", "--text", "X"],
    ],
)
def test_out_that_is_a_file_is_refused_naming_the_flag(tmp_path, capsys, command):
    # It was a FileExistsError traceback once the first file was written.
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main([*command, "--out", str(afile)])
    assert exc.value.code == 2
    assert f"argument --out: {afile} is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "mine"


def test_malformed_run_files_are_named(memory_data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "listops", "--data", str(tmp_path), "--out", str(out), *SYNTHETIC]
    assert main([*base, "--stop-at", "4"]) == 0
    good = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(good + '{"step": 8, "val_acc\n')
    capsys.readouterr()
    resume = ["train", "listops", "--out", str(out), "--resume", "--no-progress"]
    assert main(resume) == 2
    assert "metrics.jsonl, line 2: not a JSON record" in capsys.readouterr().err
    (out / "metrics.jsonl").write_text(good)
    (out / "config.json").write_text("{")
    assert main(["eval", str(out)]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err


def test_evaluate_run_refuses_batch_size_zero(tmp_path):
    from nystromer.lra.run import evaluate_run

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_run(tmp_path, batch_size=0)


def test_resume_refuses_a_recipe_file_other_than_the_runs(memory_data, tmp_path, capsys):
    out, recipe = tmp_path / "run", tmp_path / "mine.json"
    main(["train", "listops", "--data", str(tmp_path), "--out", str(out), *SYNTHETIC,
          "--stop-at", "2"])  # fmt: skip
    saved = json.loads((out / "config.json").read_text())["recipe"]
    recipe.write_text(json.dumps({**saved, "lr": 0.5}))
    capsys.readouterr()
    resume = ["train", "listops", "--out", str(out), "--resume", "--no-progress", "--stop-at", "3"]
    # It was ignored: the run went on with its own lr.
    assert main([*resume, "--recipe", str(recipe)]) == 2
    assert "lr: 0.003 → 0.5" in capsys.readouterr().err
    recipe.write_text(json.dumps(saved))  # the same recipe: the original command repeated
    assert main([*resume, "--recipe", str(recipe)]) == 0


def test_stop_at_zero_leaves_a_run_that_resumes(memory_data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "listops", "--data", str(tmp_path), "--out", str(out), *SYNTHETIC]
    assert main([*base, "--stop-at", "0"]) == 0
    assert "continue with --resume" in capsys.readouterr().err
    assert main(["train", "listops", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


# -- the real loader on files in the official ListOps format ----------------------------------

OPS = {
    "MIN": min,
    "MAX": max,
    "MED": lambda xs: sorted(xs)[(len(xs) - 1) // 2],
    "SM": lambda xs: sum(xs) % 10,
}


def _expression(rng, depth):
    if depth >= 3 or rng.random() > 0.4:
        d = rng.randrange(10)
        return str(d), d
    op = rng.choice(list(OPS))
    args = [_expression(rng, depth + 1) for _ in range(rng.randint(2, 4))]
    text = f"( [{op} " + " ".join(a for a, _ in args) + " ] )"
    return text, OPS[op]([v for _, v in args])


def write_listops(directory, sizes, seed=0):
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rows = ["Source\tTarget"]
        while len(rows) <= n:
            text, value = _expression(rng, 0)
            if text.startswith("("):
                rows.append(f"{text}\t{value}")
        (directory / f"basic_{split}.tsv").write_text("\n".join(rows) + "\n")


def test_listops_tsv_through_load_split(tmp_path, capsys):
    from nystromer.lra import data

    write_listops(tmp_path / "data", {"train": 48, "val": 16, "test": 16})
    ds = data.load_split("listops", tmp_path / "data", "train", max_length=128)
    assert len(ds) == 48
    out = tmp_path / "run"
    args = ["train", "listops", "--data", str(tmp_path / "data"), "--out", str(out), *TINY]
    assert main(args) == 0  # the recipe's 10 classes
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["steps"] == 12
    assert main(["eval", str(out), "--split", "test"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)


def test_listops_demo_runs_end_to_end(tmp_path, capsys):
    from nystromer.lra.demo import run_listops_demo

    # The real generator with the demo's settings, on a tiny set.
    sizes = {"train": 64, "val": 16, "test": 16}
    acc = run_listops_demo(tmp_path, steps=6, sizes=sizes, progress=False)
    assert len((tmp_path / "data" / "basic_train.tsv").read_text().splitlines()) == 65
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert acc == summary["test_accuracy"] and summary["steps"] == 6
    assert "test accuracy" in capsys.readouterr().out
    # Again with another seed: the demo replaces its own data (the generator refuses to).
    run_listops_demo(tmp_path, steps=2, sizes=sizes, seed=1, progress=False)
    assert json.loads((tmp_path / "data" / "nystromer_listops.json").read_text())["seed"] == 1


def test_run_command_maps_each_failure_to_its_exit_code_and_message(capsys):
    """The shared wrapper of ``nystromer train``, ``eval``, ``distill`` and ``data``."""
    from nystromer.train import NonFiniteLossError
    from nystromer.train.cli import run_command

    def fail(exc: BaseException):
        def work():
            raise exc

        return work

    reported = []
    resume = "nystromer train listops --out run --resume"
    assert run_command(fail(ValueError("bad --steps")), reported.append) == 2
    assert capsys.readouterr().err == "nystromer: error: bad --steps\n"
    assert run_command(fail(FileNotFoundError("no data.tsv"))) == 2
    assert "nystromer: error: no data.tsv" in capsys.readouterr().err
    assert run_command(fail(NonFiniteLossError("the loss became nan"))) == 1
    assert capsys.readouterr().err == "nystromer: the loss became nan\n"
    assert run_command(fail(KeyboardInterrupt()), resume_command=resume) == 130
    assert capsys.readouterr().err == f"nystromer: interrupted; continue with: {resume}\n"
    with pytest.raises(KeyboardInterrupt):  # nothing to resume: the interrupt goes on
        run_command(fail(KeyboardInterrupt()))
    with pytest.raises(RuntimeError, match="a bug"):  # not an input error: a traceback
        run_command(fail(RuntimeError("a bug")))
    assert reported == []  # a failed work is never reported

    assert run_command(lambda: 7, reported.append) == 0 and reported == [7]
    assert run_command(lambda: 7, lambda result: result - 4) == 3
    assert run_command(lambda: 7) == 0

    def bad_report(result):
        raise ValueError(f"cannot write docs for {result}")

    assert run_command(lambda: "run", bad_report) == 2
    assert capsys.readouterr().err == "nystromer: error: cannot write docs for run\n"


def test_eval_passes_every_option_to_evaluate_run(monkeypatch, tmp_path, capsys):
    # `nystromer eval` hands its parsed options to lra.run.evaluate_run by name; a flag whose
    # name drifted from the keyword would silently keep the function's default.
    from nystromer.lra import run

    seen = {}

    @functools.wraps(run.evaluate_run)  # keeps the signature the command reads
    def fake_evaluate_run(*args, **kwargs):
        seen.update(inspect.signature(run.evaluate_run).bind(*args, **kwargs).arguments)
        return {"accuracy": 0.5}

    monkeypatch.setattr("nystromer.lra.run.evaluate_run", fake_evaluate_run)
    flags = ["--split", "val", "--checkpoint", "last", "--data", str(tmp_path / "d")]
    flags += ["--batch-size", "3", "--max-batches", "2", "--device", "cpu"]
    flags += ["--precision", "bf16", "--num-workers", "1"]
    assert main(["eval", str(tmp_path / "run"), *flags]) == 0
    assert seen == {
        "run_dir": tmp_path / "run",
        "split": "val",
        "checkpoint": "last",
        "data_dir": tmp_path / "d",
        "batch_size": 3,
        "max_batches": 2,
        "device": "cpu",
        "precision": "bf16",
        "num_workers": 1,
    }
    assert json.loads(capsys.readouterr().out) == {"accuracy": 0.5}


def test_a_run_folder_of_another_command_is_named_not_a_traceback(tmp_path, capsys):
    # A distillation run's config.json (valid JSON, no LRA keys): resuming or evaluating it as
    # an LRA run said KeyError: 'task' / 'recipe' with a traceback.
    out = tmp_path / "distilled"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"distill": {"teacher": "t"}, "data": {}}))
    for argv in (["train", "listops", "--out", str(out), "--resume"], ["eval", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert f"{out} is not an LRA run directory" in err and "config.json" in err


@pytest.mark.parametrize("command", ["train", "distill"])
def test_the_resume_command_after_an_interrupt_survives_the_shell(
    command, tmp_path, capsys, monkeypatch
):
    # An --out with a space (and a non-ASCII letter): the suggested command line must give
    # the same folder back when pasted into a shell.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "my runs" / "café"
    if command == "train":
        monkeypatch.setattr("nystromer.lra.run.train_task", interrupted)
        argv = ["train", "listops", "--data", str(tmp_path), "--out", str(out), *SYNTHETIC]
    else:
        monkeypatch.setattr("nystromer.distill.run.distill", interrupted)
        argv = ["distill", "--teacher", "t", "--text", "builtin:pydoc", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    suggested = shlex.split(err.split("continue with: ", 1)[1])
    assert suggested[suggested.index("--out") + 1] == str(out) and "--resume" in suggested

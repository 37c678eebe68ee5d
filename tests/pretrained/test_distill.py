"""nystromer distill: data windows, the objective, a short run that closes the gap, resume,
the command line and its errors, on a tiny local BERT."""

from __future__ import annotations

import json

import pytest
import torch

import nystromer
from nystromer.cli import main
from nystromer.distill import DistillConfig, TokenWindows, distill, read_texts, split_corpus
from nystromer.distill.data import collate
from nystromer.distill.report import command_line
from nystromer.models import NystromformerConfig, NystromformerModel

from .tiny import make_bert, make_text

transformers = pytest.importorskip("transformers")


def test_token_windows_wrap_special_tokens_and_keep_the_tail():
    ids = list(range(10, 33))  # 23 tokens
    train = TokenWindows(ids, 8, prefix=[1], suffix=[2], pad_id=0, stride=3)
    assert len(train) == 6  # starts 0, 3, …, 15; 18 would run past the end
    assert train[1]["input_ids"].tolist() == [1, 13, 14, 15, 16, 17, 18, 2]
    held = TokenWindows(ids, 8, prefix=[1], suffix=[2], pad_id=0, keep_partial=True)
    assert [len(held[i]["input_ids"]) for i in range(len(held))] == [8, 8, 8, 7]
    assert held[3]["input_ids"].tolist() == [1, 28, 29, 30, 31, 32, 2]
    batch = collate([held[2], held[3]], pad_id=0)
    assert batch["input_ids"][1].tolist() == [1, 28, 29, 30, 31, 32, 2, 0]
    assert batch["attention_mask"].sum(1).tolist() == [8, 7]
    with pytest.raises(ValueError, match="stride must be"):
        TokenWindows(ids, 8, prefix=[1], suffix=[2], pad_id=0, stride=0)
    with pytest.raises(ValueError, match="max_length must exceed"):
        TokenWindows(ids, 2, prefix=[1], suffix=[2], pad_id=0)


def test_split_corpus_holds_out_the_tail_and_reads_texts(tmp_path):
    train, val, test = split_corpus(list(range(100)), 0.2, 5)
    assert (train[-1], val, test[0]) == (79, list(range(80, 90)), 90)
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        split_corpus(list(range(100)), 1.0, 5)
    with pytest.raises(ValueError, match="too few for one 20-token window"):
        split_corpus(list(range(100)), 0.2, 20)
    assert "Python" in read_texts(["builtin:pydoc"])[0]
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        read_texts([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_texts([tmp_path / "empty.txt"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8"):
        read_texts([tmp_path / "latin1.txt"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    # max_length 96 > the teacher's 64 positions: the run also extends the position table.
    teacher = make_bert(root / "teacher", max_position_embeddings=64)
    text = make_text(root / "text.txt", words=6000)
    config = DistillConfig(
        teacher=str(teacher),
        texts=[str(text)],
        num_landmarks=8,
        # Segment-mean landmarks: on this tiny random model k-means leaves too small a gap
        # for 24 steps to show training closing it.
        kmeans_iterations=0,
        max_length=96,
        steps=24,
        batch_size=4,
        lr=3e-4,
        eval_every=8,
    )
    return root, config


@pytest.fixture(scope="module")
def straight(setup):
    root, config = setup
    report = distill(config, root / "straight", progress=False)
    return root / "straight", report


def test_distillation_closes_most_of_the_gap_and_saves_a_usable_model(setup, straight):
    root, config = setup
    run, report = straight
    assert report["status"] == "completed"
    # The student's hidden states approach the teacher's: the squared error on held-out text
    # falls by a clear share within 24 small steps (by 24% at this size: 0.048 → 0.036), and
    # the score rises (0.9930 → 0.9965).
    assert report["mse_after"] < 0.85 * report["mse_before"]
    assert report["cosine_after"] > report["cosine_before"]
    saved = json.loads((run / "distill.json").read_text())
    assert saved["cosine_before"] == report["cosine_before"]
    # The training process records its machine (the docs section may be written later).
    assert saved["machine"]["threads"] == torch.get_num_threads()
    assert (run / "cosine.png").stat().st_size > 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [8, 16, 24]
    # The trained student: Nyström attention, 96 positions, loads with nystromer.
    student = nystromer.from_pretrained(run / "model")
    assert student.config.max_position_embeddings == 96
    assert student.config.nystrom["num_landmarks"] == 8
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "model")
    batch = tokenizer(["w1 w2 w3 " * 30], return_tensors="pt")
    assert batch["input_ids"].shape[1] > 64  # longer than the teacher could read
    assert torch.isfinite(student(**batch).last_hidden_state).all()


def test_resume_after_stop_at_equals_the_uninterrupted_run(setup, straight):
    root, config = setup
    run, report = straight
    paused = distill(config, root / "paused", progress=False, stop_at=12)
    assert paused["status"] == "stopped" and paused["cosine_after"] is None
    resumed = distill(config, root / "paused", resume=True, progress=False)
    assert resumed["status"] == "completed"
    assert (root / "paused" / "metrics.jsonl").read_text() != ""
    a = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (root / "paused" / "metrics.jsonl").read_text().splitlines()]
    drop = ("elapsed_s", "train_s_per_step")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]
    assert resumed["cosine_after"] == report["cosine_after"]
    with pytest.raises(ValueError, match=r"cannot resume .* with different settings \(lr: "):
        distill(DistillConfig(**{**config.to_dict(), "lr": 1e-4}), root / "paused", resume=True)
    with pytest.raises(ValueError, match="already holds a run"):
        distill(config, root / "paused", progress=False)


def test_resuming_a_finished_run_changes_nothing(setup, straight):
    root, config = setup
    run, report = straight
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    again = distill(config, run, resume=True, progress=False)
    assert again["status"] == "completed" and again["cosine_after"] == report["cosine_after"]
    now = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert now == files  # model/, distill.json and summary.json are not written again


def test_a_new_run_keeps_another_runs_files(setup, tmp_path):
    root, config = setup
    other = DistillConfig(**{**config.to_dict(), "steps": 2, "eval_every": 1})
    distill(other, tmp_path / "run", progress=False, stop_at=0)
    (tmp_path / "run" / "last" / "model.safetensors").unlink()  # as if killed before it
    saved = (tmp_path / "run" / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"config\.json.*differs"):
        distill(config, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "config.json").read_bytes() == saved


def test_command_line_run_and_errors(setup, tmp_path, capsys):
    root, config = setup
    out = tmp_path / "cli"
    args = ["distill", "--teacher", config.teacher, "--text", *config.texts, "--out", str(out)]
    small = ["--num-landmarks", "8", "--max-length", "64", "--steps", "2", "--batch-size", "2"]
    docs = tmp_path / "docs" / "results.md"
    docs.parent.mkdir()
    docs.write_text("# Results\n\nkept\n")
    run_args = [*args, *small, "--eval-every", "1", "--no-progress", "--layers", "all"]
    run_args += ["--conv-kernel-size", "5", "--calibrate", "3"]
    assert main([*run_args, "--write-docs", str(docs)]) == 0
    printed = capsys.readouterr().out
    assert "held-out cosine to the exact model: before" in printed
    assert "after calibrating the convolution skip: test cosine" in printed
    report = json.loads(printed.strip().splitlines()[-2])
    assert report["status"] == "completed" and report["step"] == 2
    before = json.loads((out / "before.json").read_text())
    assert before["calibrated"]["windows"] == 3 and len(before["calibrated"]["explained"]) == 2
    section = docs.read_text()
    assert section.startswith("# Results\n\nkept\n\n<!-- distill:cli:begin")
    cosines = (report["cosine_before"], report["cosine_calibrated"], report["cosine_after"])
    assert " | ".join(f"{c:.4f}" for c in cosines) + " |" in section
    assert (
        "convolution skip (k = 5) and each attention output projection (shrinkage 0.3) were "
        "fitted to exact attention on 3 training windows" in section
    )
    assert len(before["calibrated"]["output_explained"]) == 2
    assert "--layers all" in section and "| 2 |" in section
    # The heading says what sets the run apart (its section title is unique among runs).
    assert ", k-means landmarks, convolution and output fitted, dropout 0, lr " in section
    assert (docs.parent / "results" / "cli_cosine.png").is_file()
    # --resume on the finished run rewrites the section in place (no second copy).
    assert main(["distill", "--out", str(out), "--resume", "--write-docs", str(docs)]) == 0
    capsys.readouterr()
    assert docs.read_text().count("<!-- distill:cli:begin") == 1

    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "--teacher and --text required" in error(["distill", "--out", str(tmp_path / "x")])
    assert "already holds a run" in error([*args, *small])
    assert "--text: text file" in error(
        [*args[:-1], str(tmp_path / "u"), "--text", str(tmp_path / "missing.txt")]
    )
    assert "--num-landmarks: num_landmarks must be" in error(
        [*args[:-1], str(tmp_path / "y"), "--num-landmarks", "0"]
    )
    nys = tmp_path / "nys"
    NystromformerModel(
        NystromformerConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64,
        )
    ).save_pretrained(nys)  # fmt: skip
    assert "--teacher: teacher must be an exact-attention encoder" in error(
        ["distill", "--teacher", str(nys), "--text", *config.texts, "--out", str(tmp_path / "z")]
    )
    assert "too few for one" in error(
        [*args[:-1], str(tmp_path / "w"), "--max-length", "4000", "--steps", "1"]
    )
    assert "is not a distillation run" in error(["distill", "--out", str(tmp_path), "--resume"])
    assert "calibrate fits the convolution skip, which needs conv_kernel_size" in error(
        [*args[:-1], str(tmp_path / "v"), "--conv-kernel-size", "0", "--calibrate", "4"]
    )


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--eval-fraction", "1.5"], "--eval-fraction: eval_fraction must be in (0, 1), got 1.5"),
        (["--eval-fraction", "0"], "--eval-fraction: eval_fraction must be in (0, 1), got 0.0"),
        (["--text", "MISSING"], "--text: text file MISSING does not exist"),
    ],
)
def test_settings_are_checked_before_the_teacher_is_loaded(
    monkeypatch, tmp_path, capsys, flags, expected
):
    # The teacher's loading (and the tokenizing after it) is what takes time: a setting that
    # only the split of the text checked was refused after it.
    from nystromer.distill import run

    def load_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(run, "load_teacher", load_teacher)
    text, out = tmp_path / "a.txt", tmp_path / "out"
    text.write_text("some words\n")
    argv = ["distill", "--out", str(out), "--teacher", str(tmp_path), "--text", str(text)]
    with pytest.raises(AssertionError, match="the teacher was loaded"):  # good settings: it is
        main([*argv, "--device", "cpu"])
    missing = str(tmp_path / "missing.txt")
    assert main([*argv, *(missing if f == "MISSING" else f for f in flags)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nystromer: error: {expected.replace('MISSING', missing)}"), err
    assert err.count("\n") == 1


def test_runs_without_a_skip_are_recorded_and_reloaded_as_such(setup):
    root, config = setup
    # --conv-kernel-size 0 means no skip (and then no calibration by default).
    plain = DistillConfig(**{**config.to_dict(), "conv_kernel_size": None, "calibrate": 0})
    line = command_line(plain.to_dict(), "out")
    assert "--conv-kernel-size 0 --calibrate 0" in line
    # A run saved before calibration existed has no "calibrate": it reloads as uncalibrated.
    old = {k: v for k, v in plain.to_dict().items() if k != "calibrate"}
    assert DistillConfig.from_dict(old) == plain
    # Nor "kmeans_iterations", from before k-means landmarks: segment means.
    older = {k: v for k, v in old.items() if k != "kmeans_iterations"}
    assert DistillConfig.from_dict(older).kmeans_iterations == 0


def test_stdlib_docstrings_text_skips_tests_short_and_repeated_docstrings(tmp_path, monkeypatch):
    import sysconfig

    long_doc = "A docstring long enough to be prose: " + "words and more words " * 4
    (tmp_path / "mod.py").write_text(
        f'"""{long_doc}"""\n\ndef f():\n    """short"""\n\nclass C:\n    """{long_doc}"""\n'
        f'\n    def g(self):\n        """Another {long_doc}"""\n'
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""From the tests: ' + "x " * 60 + '"""\n')
    (tmp_path / "bad.py").write_text("def (:\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    (text,) = read_texts(["builtin:stdlib-docs"])
    assert text == f"{long_doc}\n\nAnother {long_doc}"


def test_a_calibrated_start_that_training_does_not_beat_is_the_result(setup, tmp_path):
    root, config = setup
    # A learning rate that wrecks the tiny student: every trained checkpoint is worse on
    # validation than the calibrated start, which must then be what the run returns.
    wrecked = DistillConfig(
        **{**config.to_dict(), "conv_kernel_size": 5, "calibrate": 4, "lr": 0.05, "steps": 4,
           "eval_every": 2}
    )  # fmt: skip
    report = distill(wrecked, tmp_path / "run", progress=False)
    before = json.loads((tmp_path / "run" / "before.json").read_text())
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["val_cosine"] for r in metrics) < before["calibrated"]["val"]["cosine"]
    assert report["best_step"] == 0
    assert report["cosine_after"] == report["cosine_calibrated"]
    # The saved model is the calibrated one: it scores what calibration scored.
    from nystromer.distill.run import _datasets, distill_objective, load_teacher

    student = nystromer.from_pretrained(tmp_path / "run" / "model")
    teacher, tokenizer = load_teacher(config.teacher, wrecked.max_length)
    splits, _ = _datasets(wrecked, read_texts(wrecked.texts), tokenizer)
    test = splits["test"]
    batch = collate([test[i] for i in range(len(test))], test.pad_id)
    with torch.no_grad():
        _, sums = distill_objective(student.eval(), batch, teacher=teacher)
    assert sums["cosine"].item() / sums["count"] == pytest.approx(report["cosine_after"], abs=1e-5)


def test_the_student_trains_without_dropout_unless_asked(setup, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from nystromer.distill import build_student

    root, config = setup
    # A teacher with BERT's usual dropout (the tiny fixture model has none).
    teacher = BertModel(
        BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        )
    ).eval()  # fmt: skip
    ids = torch.randint(5, 50, (2, 24))
    with torch.no_grad():
        exact = teacher(input_ids=ids).last_hidden_state

    def two_training_forwards(dropout):
        student = build_student(teacher, DistillConfig(**{**config.to_dict(), "dropout": dropout}))
        assert student.training
        with torch.no_grad():
            return [student(input_ids=ids).last_hidden_state for _ in range(2)]

    # Default 0: in training mode the student computes what it is evaluated with; n = 24 ≤
    # 3 × 8 landmarks is not exact, so compare the two passes, and each against eval mode.
    a, b = two_training_forwards(0.0)
    assert torch.equal(a, b)
    student = build_student(teacher, config).eval()
    with torch.no_grad():
        torch.testing.assert_close(a, student(input_ids=ids).last_hidden_state)
    # The teacher's own rates (None) and an explicit rate do drop units.
    for dropout in (None, 0.3):
        a, b = two_training_forwards(dropout)
        assert not torch.allclose(a, b)
    # The teacher keeps its rates and its eval mode.
    assert (
        all(m.p == 0.1 for m in teacher.modules() if isinstance(m, torch.nn.Dropout))
        and not teacher.training
    )
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).last_hidden_state, exact)

    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\) or None"):
            DistillConfig(**{**config.to_dict(), "dropout": bad})
    # Runs saved before the setting trained with the teacher's rates, and reload so.
    old = {k: v for k, v in config.to_dict().items() if k != "dropout"}
    assert DistillConfig.from_dict(old).dropout is None
    # The command line: a probability, or `teacher`.
    args = ["distill", "--teacher", config.teacher, "--text", *config.texts]
    args += ["--num-landmarks", "8", "--max-length", "64", "--steps", "1", "--batch-size", "2"]
    args += ["--eval-every", "1", "--no-progress", "--calibrate", "0"]
    assert main([*args, "--out", str(tmp_path / "t"), "--dropout", "teacher"]) == 0
    saved = json.loads((tmp_path / "t" / "config.json").read_text())["distill"]
    assert saved["dropout"] is None
    assert "--dropout teacher" in command_line(saved, "out")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "u"), "--dropout", "some"])
    assert "expected a probability in [0, 1) or 'teacher', got 'some'" in capsys.readouterr().err


def test_a_half_precision_teacher_is_loaded_and_distilled_in_float32(tmp_path):
    from transformers import AutoModel

    from nystromer.distill.run import build_student, load_teacher

    # Checkpoints are often stored in bfloat16; transformers 5 loads them in their stored
    # dtype, which would train the student's weights in bfloat16 (AdamW steps of lr 3e-5
    # round away) under precision "fp32".
    src = make_bert(tmp_path / "teacher32")
    AutoModel.from_pretrained(src).to(torch.bfloat16).save_pretrained(tmp_path / "teacher16")
    for f in src.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            (tmp_path / "teacher16" / f.name).write_bytes(f.read_bytes())
    teacher, _ = load_teacher(tmp_path / "teacher16", 32)
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    config = DistillConfig(teacher=str(tmp_path / "teacher16"), texts=["builtin:pydoc"])
    student = build_student(teacher, config)
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_resume_names_a_foreign_or_malformed_config(tmp_path, capsys):
    # An LRA run's config.json, then a malformed one: one error line naming the folder or
    # the file (they were KeyError: 'distill' with a traceback, and json's bare message).
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"task": "listops", "recipe": {}}))
    assert main(["distill", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{out} is not a distillation run" in err
    (out / "config.json").write_text("{")
    assert main(["distill", "--out", str(out), "--resume"]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err
    (out / "config.json").write_text(json.dumps({"task": "listops", "recipe": {}}))
    with pytest.raises(ValueError, match="is not a distillation run"):
        distill(DistillConfig(teacher="t", texts=["builtin:pydoc"]), out, resume=True)


def test_a_new_run_over_a_killed_runs_results_is_refused_before_any_work(setup, straight):
    import shutil

    root, config = setup
    run, _ = straight
    # The results of a run killed before its first `last` (checkpoint_every 0): the trainer
    # refuses the folder, but only after the new run had measured and calibrated its start and
    # rewritten before.json (and calibrated.safetensors) beside the old run's best/.
    killed = root / "killed"
    killed.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(run / name, killed / name)
    shutil.copytree(run / "best", killed / "best")
    with pytest.raises(ValueError, match=r"earlier run \(best/, metrics\.jsonl\)"):
        distill(config, killed, progress=False)
    assert sorted(p.name for p in killed.iterdir()) == ["best", "config.json", "metrics.jsonl"]


def test_resume_refuses_a_text_that_changed(setup, tmp_path):
    root, config = setup
    # The same number of tokens (so of windows) with other words: the held-out text would no
    # longer be the one before.json measured (and builtin:stdlib-docs differs between Python
    # versions), yet the run went on.
    text = tmp_path / "text.txt"
    text.write_bytes((root / "text.txt").read_bytes())
    mine = DistillConfig(**{**config.to_dict(), "texts": [str(text)], "calibrate": 0})
    distill(mine, tmp_path / "run", progress=False, stop_at=0)
    text.write_text(text.read_text().replace("w1 ", "w2 ", 1))
    with pytest.raises(ValueError, match=r"text\.txt.* changed since the run started"):
        distill(mine, tmp_path / "run", resume=True, progress=False)

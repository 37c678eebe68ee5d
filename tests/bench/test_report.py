"""``nystromer bench report --quick``: every benchmark command end to end, and the Markdown.

One quick report (tiny sizes, ~30 s on 2 busy cores) runs bench table, bench speed, bench
approx (random, LRA and language-model inputs) and viz attention as ``python -m nystromer``;
the tests below check each command's own outputs and the sections written from them.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import pytest

from nystromer.bench import report as report_mod
from nystromer.bench.report import REPORT_SECTIONS, render_gpu, write_docs_section
from nystromer.bench.viz import plot_attention
from nystromer.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory, lra_run):
    out = tmp_path_factory.mktemp("report")
    assert main(["bench", "report", "--quick", "--out", str(out), "--lra-run", str(lra_run)]) == 0
    return out


def _section(text: str, name: str) -> str:
    begin = f"<!-- bench-report:{name}:begin (written by nystromer bench report) -->"
    end = f"<!-- bench-report:{name}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, name
    return text[text.index(begin) : text.index(end)]


def test_report_writes_every_section_with_command_date_machine_and_images(quick):
    docs = quick / "benchmarks.md"  # --quick never writes docs/benchmarks.md
    text = docs.read_text(encoding="utf-8")
    starts = [text.index(f"<!-- bench-report:{name}:begin") for name in REPORT_SECTIONS]
    assert starts == sorted(starts)
    for name in ("table", "speed", "approx"):
        body = _section(text, name)
        assert re.search(r"Measured \d{4}-\d\d-\d\d with `nystromer ", body), name
        assert "Machine: " in body and "torch" in body
    assert re.search(r"Drawn \d{4}-\d\d-\d\d with `nystromer viz attention", text)
    gpu = _section(text, "gpu")
    assert "nystromer bench speed --device cuda --dtype bfloat16" in gpu and "131072" in gpu
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {Path(link).name for link in links} == {
        "speed_time.png",
        "speed_memory.png",
        "approx_landmarks.png",
        "approx_iterations.png",
        "attention.png",
        "attention_lra.png",
    }
    for link in links:
        assert (docs.parent / link).read_bytes()[:8] == PNG
        assert (docs.parent / link).parent == quick / "bench"


def test_speed_outputs_and_their_numbers_in_the_markdown(quick):
    out = quick / "speed"
    report = json.loads((out / "speed.json").read_text())
    assert report["lengths"] == [64, 128] and set(report["curves"]) == {"nystromer", "exact"}
    for impl in ("nystromer", "exact"):
        times = report["curves"][impl]["forward_ms"]
        assert len(times) == 2 and all(t > 0 for t in times)
        assert report["curves"][impl]["backward_ms"] == [None, None]  # --no-backward
        assert set(report["scaling_exponents"][impl]) >= {"forward_ms", "forward_peak_mib"}
    assert "nystromer_beats_exact_from" in report and report["machine_label"]
    assert report["command"].startswith("nystromer bench speed --device cpu --dtype float32")
    rows = list(csv.DictReader((out / "speed.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    for name in ("speed_time.png", "speed_memory.png"):
        assert (out / name).read_bytes()[:8] == PNG
    body = _section((quick / "benchmarks.md").read_text(encoding="utf-8"), "speed")
    ms = report["curves"]["nystromer"]["forward_ms"][1]
    exact_ms = report["curves"]["exact"]["forward_ms"][1]
    assert f"| 128 | {ms:,.1f} | {exact_ms:,.1f} |" in body
    assert report["machine_label"] in body
    slope = report["scaling_exponents"]["exact"]["forward_ms"]
    assert f"| exact | {slope:.2f} |" in body


def test_table_outputs_and_paper_columns(quick):
    report = json.loads((quick / "table1" / "table1.json").read_text())
    assert report["lengths"] == [64]
    assert "exact-matmul MiB / ms" in (quick / "table1" / "table1.md").read_text()
    body = _section((quick / "benchmarks.md").read_text(encoding="utf-8"), "table")
    mem = report["curves"]["nystromer"]["forward_peak_mib"][0]
    ms = report["curves"]["nystromer"]["forward_ms"][0]
    assert f"{mem:,.1f} / {ms:,.1f}" in body and "paper Transformer MB / ms" in body


def test_approx_numbers_expose_peer_defects_on_every_input_kind(quick):
    out = quick / "approx"
    report = json.loads((out / "approx.json").read_text())
    assert list(report["sources"]) == ["random", "lra", "lm"]
    random = report["sources"]["random"]
    assert random["landmarks"]["landmarks"] == [8, 16, 32]
    assert all(0 < e < 2 for e in random["landmarks"]["segment_means"])
    assert len(random["landmarks"]["kmeans"]) == 3 and random["landmarks"]["kmeans_iterations"] == 3
    assert all(0 < e < 2 for e in random["landmarks"]["kmeans"])
    assert len(random["iterations"]["error"]) == 2
    assert "randomly initialised BERT" in report["sources"]["lm"]["description"]
    lra = report["sources"]["lra"]
    assert lra["lra"]["checkpoint"] == "best" and lra["seq_len"] % 16 == 0
    assert "padding" in lra["description"]
    for kind in ("random", "lra", "lm"):
        rows = report["sources"][kind]["implementations"]
        assert rows["nystromer"]["batch_coupling"] == 0.0
        assert rows["naive"]["unpadded"] == pytest.approx(rows["nystromer"]["unpadded"], rel=1e-4)
        for peer in ("nystrom-attention", "transformers"):
            if "skipped" not in rows[peer]:
                assert rows[peer]["batch_coupling"] > 1e-6, (kind, peer)  # batch-wide pinv scale
    rows = random["implementations"]
    if "skipped" not in rows["transformers"]:
        assert rows["transformers"]["unpadded_uneven"] == "needs n to be a multiple of m " + (
            "(got n=120, m=16)"
        )
    for name in ("approx_landmarks.png", "approx_iterations.png"):
        assert (out / name).read_bytes()[:8] == PNG
    md = (out / "approx.md").read_text()
    assert "| random | nystromer |" in md and "| lra | nystromer |" in md
    body = _section((quick / "benchmarks.md").read_text(encoding="utf-8"), "approx")
    padded = lra["implementations"]["nystromer"]["padded_sample"]
    assert "| lra | nystromer | " in body and f"{padded:.3g}" in body
    assert lra["description"] in body


def test_viz_outputs(quick):
    for name, source in (("attention", None), ("attention_lra", "listops model")):
        assert (quick / f"{name}.png").read_bytes()[:8] == PNG
        info = json.loads((quick / f"{name}.json").read_text())
        assert 0 < info["relative_error"] < 2 and info["pinv_iterations"] == 6
        assert source is None or source in info["title"]
    assert info["window"] == 48 and f"positions 0–47 of {info['seq_len']} shown" in info["title"]
    body = _section((quick / "benchmarks.md").read_text(encoding="utf-8"), "viz")
    assert f"{info['relative_error']:.3f}" in body
    with pytest.raises(ValueError, match="window must be a positive"):
        plot_attention(quick / "unused.png", seq_len=32, num_landmarks=4, window=0)


def test_write_docs_section_replaces_in_place_and_keeps_the_rest(tmp_path):
    docs = tmp_path / "benchmarks.md"
    head = "# Benchmarks\n\nIntro by hand.\n\n<!-- attention-core:begin -->\nkept\n"
    tail = "<!-- attention-core:end -->\n"
    docs.write_text(head + tail)
    write_docs_section(docs, "speed", "## Speed\n\nfirst\n")
    write_docs_section(docs, "approx", "## Approx\n")
    write_docs_section(docs, "speed", "## Speed\n\nsecond\n")
    text = docs.read_text()
    assert text.startswith(head + tail)
    assert "second" in text and "first" not in text and text.count("## Speed") == 1
    assert text.index("## Speed") < text.index("## Approx")
    with pytest.raises(ValueError, match="name must be one of"):
        write_docs_section(docs, "nonsense", "x")


def test_gpu_section_names_the_device_or_gives_the_commands(tmp_path, quick):
    docs = tmp_path / "benchmarks.md"
    gpu_dir = tmp_path / "bench" / "gpu"
    empty = render_gpu(gpu_dir, docs)
    assert "Not measured yet" in empty
    assert "--device cuda --dtype float32 --lengths 512,1024" in empty
    # A CUDA result (the quick CPU report relabelled as what a GPU run writes).
    report = json.loads((quick / "speed" / "speed.json").read_text())
    cuda = copy.deepcopy(report)
    cuda["machine"].update(device="cuda", gpu="NVIDIA H100 80GB HBM3")
    cuda["machine_label"] = "test machine, device cuda (NVIDIA H100 80GB HBM3)"
    cuda["base"]["dtype"] = "bfloat16"
    (gpu_dir / "bfloat16").mkdir(parents=True)
    (gpu_dir / "bfloat16" / "speed.json").write_text(json.dumps(cuda))
    # A CPU result in the folder is not a GPU result.
    (gpu_dir / "cpu").mkdir()
    (gpu_dir / "cpu" / "speed.json").write_text(json.dumps(report))
    text = render_gpu(gpu_dir, docs)
    assert "### NVIDIA H100 80GB HBM3, bfloat16" in text
    assert text.count("### ") == 1 and "Not measured yet" not in text
    ms = cuda["curves"]["nystromer"]["forward_ms"][0]
    assert f"| 64 | {ms:,.1f} |" in text
    for name in ("speed_time.png", "speed_memory.png"):  # drawn from the JSON
        assert (gpu_dir / "bfloat16" / name).read_bytes()[:8] == PNG
        assert f"(bench/gpu/bfloat16/{name})" in text


def test_report_arguments(tmp_path):
    with pytest.raises(ValueError, match="only must name some of"):
        report_mod.run_report(out=tmp_path, quick=True, only=["speed", "plots"], progress=None)
    args = build_parser().parse_args(["bench", "speed", "--dtype", "bf16"])
    assert args.dtype == "bfloat16"
    full = report_mod.report_commands("bench-out/report")
    assert full["speed"][0][:6] == ["bench", "speed", "--device", "cpu", "--dtype", "float32"]
    assert "--lengths" not in full["speed"][0]  # the defaults: 512 … 65,536, every implementation
    assert full["table"][0][:2] == ["bench", "table"] and "--quick" not in sum(full.values(), [])
    parser = build_parser()
    for argv in [*sum(full.values(), []), *report_mod.gpu_commands("docs/bench/gpu")]:
        parser.parse_args(argv)  # every full-size command is valid as written
    # Without a trained LRA model the report leaves its inputs out instead of training one.
    bare = report_mod.report_commands("o", with_lra=False)
    assert parser.parse_args(bare["approx"][0]).sources == ["random", "lm"]
    assert [c[:2] for c in bare["viz"]] == [["viz", "attention"]] and "--source" not in bare["viz"][
        0
    ]
    gpu = parser.parse_args(report_mod.gpu_commands("g")[0])

    assert (gpu.device, gpu.dtype, gpu.lengths[-1]) == ("cuda", "bfloat16", 131072)


def test_docs_file_has_every_marker_once():
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for name in REPORT_SECTIONS:
        _section(text, name)
    assert text.count("<!-- attention-core:begin") == 1
    assert "make bench" in text.split("## Attention core")[0]

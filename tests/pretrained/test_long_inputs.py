"""``nystromer eval-long`` on a tiny random BERT (64 positions) and random-word documents:
report structure, the docs section, the query spans, the ranking and the held-out check."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nystromer import cli
from nystromer.distill import long_inputs

from ..bench.scripts import docs_file, written_section
from .tiny import make_bert, make_text

pytest.importorskip("transformers")

# The module's names, and ``main`` as the command line runs it.
SCRIPT = vars(long_inputs) | {"main": lambda argv: cli.main(["eval-long", *argv])}
SYSTEMS = [
    "truncate-64",
    "chunks-mean",
    "chunks-best",
    "exact-128",
    "converted-128",
    "exact-256",
    "converted-256",
    "tiny-converted",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT, its conversion to 192 positions saved as a checkpoint, and a folder of 5
    random-word documents of ~300–400 tokens."""
    from transformers import AutoModel

    import nystromer

    root = tmp_path_factory.mktemp("long")
    model = make_bert(root / "bert")
    converted = AutoModel.from_pretrained(model)
    nystromer.convert(converted, num_landmarks=8, max_position_embeddings=192)
    converted.save_pretrained(root / "tiny-converted")
    docs = root / "docs"
    docs.mkdir()
    for i in range(5):
        make_text(docs / f"doc{i}.txt", words=350, seed=i)
    return model, docs


def test_report_and_docs_section(tiny, tmp_path, capsys):
    model, docs = tiny
    checkpoint = model.parent / "tiny-converted"
    out, md = tmp_path / "out", docs_file(tmp_path)
    argv = [
        "--model", str(model), "--documents", str(docs), "--lengths", "128", "256",
        "--min-tokens", "150", "--query-length", "8", "--num-landmarks", "8",
        "--bootstrap", "20", "--threads", "1", "--checkpoint", str(checkpoint),
        "--out", str(out), "--write-docs", str(md),
    ]  # fmt: skip
    assert SCRIPT["main"](argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["benchmark"] == "long_inputs" and "--out" not in report["command"]
    assert report["model"]["trained_length"] == 64
    assert report["documents"]["count"] == 5
    assert [s["name"] for s in report["systems"]] == SYSTEMS
    assert [s["length"] for s in report["systems"]] == [64, 256, 256, 128, 128, 256, 256, 192]
    # Spans of document tokens: what 64 positions see (62 after [CLS]/[SEP]), then 128, 256.
    assert [q["tokens"] for q in report["query_sets"]] == [[0, 62], [62, 126], [126, 254]]
    for qs in report["query_sets"]:
        assert qs["queries"] > 0 and set(qs["results"]) == set(SYSTEMS)
        for name, r in qs["results"].items():
            for key in ("top1", "mrr"):
                lo, hi = r[f"{key}_ci"]
                assert 0.0 <= lo <= hi <= 1.0 and math.isfinite(r[key])
            # MRR ≥ top-1 always (a found-first query adds 1 to both).
            assert r["mrr"] >= r["top1"] - 1e-12
            assert ("top1_vs_reference" in r) == (name != "chunks-mean")
    section = written_section(md, SCRIPT)
    assert "Passages from tokens 128–256" in section
    assert "exact attention, 256 positions (ceiling)" in section
    # --reuse takes every system's ranks from the report: the same numbers, nothing embedded.
    again = tmp_path / "again"
    assert (
        SCRIPT["main"]([*argv[:-4], "--reuse", str(out / "results.json"), "--out", str(again)]) == 0
    )
    assert json.loads((again / "results.json").read_text())["query_sets"] == report["query_sets"]
    # other queries: refused
    assert SCRIPT["main"]([*argv[:-4], "--seed", "1", "--reuse", str(out / "results.json")]) == 2
    assert "reuse: the earlier report has other documents or queries" in capsys.readouterr().err
    # The same queries, but the systems of the same names would compute something else.
    for flag, value in (("--num-landmarks", "4"), ("--kmeans-iterations", "1")):
        assert SCRIPT["main"]([*argv[:-4], flag, value, "--reuse", str(out / "results.json")]) == 2
        assert f"{flag} " in capsys.readouterr().err
    # --from-json reprints the same section without measuring.
    md2 = docs_file(again)
    assert SCRIPT["main"](["--from-json", str(out / "results.json"), "--write-docs", str(md2)]) == 0
    assert written_section(md2, SCRIPT) == section


def test_queries_lie_in_their_span_and_document():
    Document = SCRIPT["Document"]
    docs = [Document(f"d{i}", list(range(1000 * i, 1000 * i + n))) for i, n in enumerate([90, 40])]
    within, beyond = SCRIPT["make_queries"](
        docs, [(0, 30), (30, 80)], query_length=10, per_doc=2, seed=1
    )
    assert len(within) == 4 and len(beyond) == 3  # document 1 has room for one beyond passage
    for (start, stop), queries in (((0, 30), within), ((30, 80), beyond)):
        for i, ids in queries:
            first = ids[0] - 1000 * i
            assert start <= first and first + 10 <= min(stop, len(docs[i].ids))
            assert ids == docs[i].ids[first : first + 10]
    # A passage shared with another document has no single answer and is dropped.
    shared = [Document("a", list(range(50))), Document("b", list(range(50)))]
    assert SCRIPT["make_queries"](shared, [(0, 50)], query_length=10, per_doc=2) == [[]]


def test_pieces_of_a_document():
    # Chunks of 64 positions (62 tokens between [CLS] and [SEP]) cover the first 256 positions;
    # the truncated document is the first chunk (the embedder computes it once for both).
    assert SCRIPT["_chunked"](64, 256)(300) == [(0, 62), (62, 124), (124, 186), (186, 248),
                                                (248, 254)]  # fmt: skip
    assert SCRIPT["_chunked"](64, 256)(70) == [(0, 62), (62, 70)]
    assert SCRIPT["_prefix"](64)(300) == [(0, 62)] and SCRIPT["_prefix"](128)(70) == [(0, 70)]


def test_score_ranks_ties_against_the_answer():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    docs = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    # Query 0 ties between its document 0 and document 1's second vector: rank 2.
    # Query 1 is document 1's first vector: rank 1 (a document scores its best vector).
    assert SCRIPT["score"](q, docs, [0, 1]).tolist() == [2, 1]


def test_checkpoint_distilled_on_the_documents_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"texts": ["builtin:stdlib-docs"]}))
    with pytest.raises(ValueError, match="not be held out"):
        SCRIPT["_check_held_out"](run / "model", ["stdlib"])
    SCRIPT["_check_held_out"](run / "model", ["pydoc"])  # held out: no error
    assert SCRIPT["_checkpoint_label"](run / "model") == "run"


def test_a_real_distillation_run_on_the_documents_is_refused(tmp_path):
    # config.json as `nystromer distill` writes it: the settings (and their texts) under
    # "distill", beside "data" and the versions.
    from nystromer.distill.run import DistillConfig

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    cfg = DistillConfig(teacher=str(tmp_path), texts=["builtin:stdlib-docs"])
    (run / "config.json").write_text(json.dumps({"distill": cfg.to_dict(), "data": {}}))
    with pytest.raises(ValueError, match="not be held out"):
        SCRIPT["_check_held_out"](run / "model", ["stdlib"])
    SCRIPT["_check_held_out"](run / "model", ["pydoc"])


def test_a_document_that_is_not_utf8_is_named(tiny, tmp_path, capsys):
    model, _ = tiny
    docs = tmp_path / "docs"
    docs.mkdir()
    make_text(docs / "good.txt", words=50)
    (docs / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    argv = ["--model", str(model), "--documents", str(docs), "--out", str(tmp_path)]
    assert SCRIPT["main"](argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nystromer: error: --documents: ")
    assert "--documents" in err and "latin1.txt" in err and "UTF-8" in err


def test_a_checkpoint_named_like_a_built_in_model_stays_apart(tiny, tmp_path, capsys):
    import shutil

    model, docs = tiny
    checkpoint = model.parent / "tiny-converted"
    clash = tmp_path / "converted"  # the untrained conversions' model key
    shutil.copytree(checkpoint, clash)
    argv = [
        "--model", str(model), "--documents", str(docs), "--lengths", "128", "--min-tokens",
        "150", "--query-length", "8", "--num-landmarks", "4", "--bootstrap", "10",
    ]  # fmt: skip
    reports = []
    for ckpt in (checkpoint, clash):
        out = tmp_path / ckpt.name / "out"
        assert SCRIPT["main"]([*argv, "--checkpoint", str(ckpt), "--out", str(out)]) == 0
        reports.append(json.loads((out / "results.json").read_text()))
    for a, b in zip(*(r["query_sets"] for r in reports), strict=True):
        # The untrained conversion is the same system whatever the checkpoint is called.
        assert a["ranks"]["converted-128"] == b["ranks"]["converted-128"]
        assert a["ranks"]["tiny-converted"] == b["ranks"]["converted"]
    # Two checkpoints of one name would share their rows and embeddings: refused.
    assert (
        SCRIPT["main"]([*argv, "--checkpoint", str(clash), str(clash), "--out", str(tmp_path)]) == 2
    )
    assert "two --checkpoint folders named 'converted'" in capsys.readouterr().err


def test_a_bfloat16_checkpoint_is_evaluated_in_float32(tiny, tmp_path, monkeypatch):
    # transformers 5 would load it in bfloat16, and it would be ranked against float32 systems.
    from transformers import AutoModel

    model, docs = tiny
    half = tmp_path / "half"
    AutoModel.from_pretrained(model.parent / "tiny-converted").to(torch.bfloat16).save_pretrained(
        half
    )
    seen = {}
    embed = long_inputs._embed_documents

    def recording(system, docs, model, special, memo):
        seen[system.name] = {p.dtype for p in model.parameters()}
        return embed(system, docs, model, special, memo)

    monkeypatch.setattr(long_inputs, "_embed_documents", recording)
    argv = [
        "--model", str(model), "--documents", str(docs), "--lengths", "128", "--min-tokens",
        "150", "--query-length", "8", "--num-landmarks", "4", "--bootstrap", "10",
        "--checkpoint", str(half), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert SCRIPT["main"](argv) == 0
    assert seen["half"] == {torch.float32}
    assert all(d == {torch.float32} for d in seen.values())

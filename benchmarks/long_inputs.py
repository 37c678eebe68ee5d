#!/usr/bin/env python
"""Long inputs: does a converted encoder use what lies beyond its trained length?

    python benchmarks/long_inputs.py                       # all-MiniLM-L6-v2, 2,048 and 4,096
    python benchmarks/long_inputs.py --max-docs 64 --write-docs docs/results.md
    python benchmarks/long_inputs.py --max-docs 64 --checkpoint runs/distill-2048/model \
        --reuse runs/bench/long_inputs/results.json      # add a distilled model to a table
    python benchmarks/long_inputs.py --documents DIR --model DIR     # your own texts and model

A retrieval task that needs no download. Documents are long texts that ship with CPython
(``--sources``): ``stdlib``, the docstrings of each standard-library module joined into one
document per module, and ``pydoc``, the reference manual's topics (``pydoc_data.topics``); or
the UTF-8 files of a folder (``--documents DIR``). Those of at least ``--min-tokens`` tokens are
kept. Queries are passages of ``--query-length`` tokens cut from the documents, grouped by where
they lie: within the first window of the original model (its trained length, 512 for
all-MiniLM-L6-v2: the control) and between consecutive ``--lengths`` beyond it. Each query is
embedded by the original model (queries are short); each system embeds the documents; the
task is to find a query's source document among all documents by cosine similarity of
mean-pooled, normalised last hidden states (the sentence-transformers recipe of MiniLM).
Top-1 accuracy and mean reciprocal rank come with 95% bootstrap intervals that resample
documents (a document's queries are not independent), and the top-1 difference to the
chunked baseline with its paired interval.

Systems: the original truncated at its trained length; the original on consecutive chunks of
that length, their embeddings averaged (``chunks, mean``) or each kept (``chunks, best``: a
document scores its best chunk, multi-vector retrieval); for each n of ``--lengths``, exact
attention with the position table lengthened to n (:func:`nystromer.extend_positions`, the
ceiling of the architecture) and the conversion by :func:`nystromer.convert` (no training);
and each ``--checkpoint`` (e.g. ``nystromer distill --max-length 2048``'s ``model/``) at its
own length. Documents are cut at ``--max-length`` tokens for every system.

``results.json`` keeps every query's rank per system, so ``--reuse`` adds systems to an earlier
run on the same documents and queries without embedding them again.

Writes ``results.json`` under ``--out`` and, with ``--write-docs FILE``, the section between the
``long-inputs`` markers of FILE (everything else in FILE is kept byte for byte).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from nystromer._io import atomic_write
from nystromer._machine import report_header
from nystromer._markdown import replace_section
from nystromer.bench.cli import int_at_least
from nystromer.bench.measure import recorded_command
from nystromer.bench.pretrained import default_model

__all__ = [
    "BEGIN",
    "END",
    "Document",
    "format_section",
    "load_documents",
    "make_queries",
    "run_benchmark",
    "score",
    "write_docs_section",
]

BEGIN = "<!-- long-inputs:begin (written by benchmarks/long_inputs.py) -->"
END = "<!-- long-inputs:end -->"
DEFAULT_OUT = "runs/bench/long_inputs"
DEFAULT_LENGTHS = (2048, 4096)
#: The built-in document sources and the `nystromer distill` text that contains each (a
#: checkpoint distilled on it has seen the documents; see ``_check_held_out``).
DISTILL_TEXT = {"stdlib": "builtin:stdlib-docs", "pydoc": "builtin:pydoc"}
#: The system every other one is compared with (what users do today).
REFERENCE = "chunks-mean"
# Modules the built-in ``stdlib-docs`` text leaves out are left out here too: a document set
# that differs only where the distillation text differs is easier to reason about.
_STDLIB_SKIP = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
}


# --- documents and queries ----------------------------------------------------------------------


def _stdlib_documents() -> list[tuple[str, str]]:
    """(module path, its docstrings joined): one document per standard-library module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately invalid or not UTF-8
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc not in docs:
                    docs.append(doc)
        if docs:
            found.append((f"stdlib:{rel.as_posix()}", "\n\n".join(docs)))
    return found


def _pydoc_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc:{name}", topics[name]) for name in sorted(topics)]


SOURCES: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "stdlib": _stdlib_documents,
    "pydoc": _pydoc_documents,
}


def _folder_documents(folder: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [(p.relative_to(folder).as_posix(), p.read_text(encoding="utf-8")) for p in files]


@dataclass
class Document:
    """A document: ``name``, and ``ids``, its tokens without special tokens."""

    name: str
    ids: list[int] = field(repr=False)


def load_documents(
    texts: Sequence[tuple[str, str]],
    tokenizer,
    *,
    min_tokens: int,
    max_docs: int | None = None,
    seed: int = 0,
) -> list[Document]:
    """Tokenize ``(name, text)`` pairs and keep those of at least ``min_tokens`` tokens, each
    text once (a few modules repeat another's docstrings); ``max_docs`` draws that many of them
    at random (``seed``), kept in name order."""
    seen: set[str] = set()
    docs = []
    for name, text in texts:
        if text in seen:
            continue
        seen.add(text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= min_tokens:
            docs.append(Document(name, ids))
    if max_docs is not None and len(docs) > max_docs:
        keep = set(random.Random(seed).sample(range(len(docs)), max_docs))
        docs = [d for i, d in enumerate(docs) if i in keep]
    return docs


def make_queries(
    docs: Sequence[Document],
    spans: Sequence[tuple[int, int]],
    *,
    query_length: int,
    per_doc: int,
    seed: int = 0,
) -> list[list[tuple[int, list[int]]]]:
    """Passages to look up: for each span ``(start, stop)`` of token indices, up to ``per_doc``
    non-overlapping passages of ``query_length`` tokens from each document, lying wholly within
    the span and the document, at random places (``seed``).

    A passage that also occurs in another document (a docstring shared by two modules) has no
    single right answer and is dropped.

    Returns:
        per span, a list of ``(document index, passage ids)``.
    """
    rng = random.Random(seed)
    # Token ids as characters: "is this passage in that document" becomes a substring test.
    as_text = ["".join(map(chr, d.ids)) for d in docs]
    sets = []
    for start, stop in spans:
        queries = []
        for i, doc in enumerate(docs):
            room = min(stop, len(doc.ids)) - start
            slots = room // query_length
            if slots < 1:
                continue
            offset = rng.randrange(room - slots * query_length + 1)
            for slot in sorted(rng.sample(range(slots), min(per_doc, slots))):
                s = start + offset + slot * query_length
                passage = doc.ids[s : s + query_length]
                key = "".join(map(chr, passage))
                if any(key in t for j, t in enumerate(as_text) if j != i):
                    continue
                queries.append((i, passage))
        sets.append(queries)
    return sets


# --- embedding ----------------------------------------------------------------------------------


@torch.no_grad()
def _embed(
    model: nn.Module, pieces: Sequence[Sequence[int]], cls: int, sep: int, pad: int, batch: int
) -> Tensor:
    """Mean-pooled, normalised last hidden states of ``[cls] + piece + [sep]`` for each piece:
    (len(pieces), d). Pieces are batched by length so that long ones are not padded much."""
    from nystromer.distill.run import mean_pool

    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))
    out: list[Tensor | None] = [None] * len(pieces)
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        n = max(len(pieces[i]) for i in idx) + 2
        ids = torch.full((len(idx), n), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = [cls, *pieces[i], sep]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = torch.nn.functional.normalize(mean_pool(hidden, mask).float(), dim=-1)
        for row, i in enumerate(idx):
            out[i] = pooled[row]
    return torch.stack(out)  # type: ignore[arg-type]


def score(queries: Tensor, doc_vectors: Sequence[Tensor], answers: Sequence[int]) -> Tensor:
    """Rank of each query's own document: 1 + the number of other documents that score at
    least as high (ties count against the answer). A document scores its best vector.

    Args:
        queries: (Q, d), normalised.
        doc_vectors: per document, (k_i, d) normalised vectors (k_i = 1 for one embedding).
        answers: (Q,) document index of each query.

    Returns:
        (Q,) ranks, 1 = found first.
    """
    scores = torch.stack([(queries @ v.T).amax(dim=1) for v in doc_vectors], dim=1)  # (Q, D)
    answers_t = torch.as_tensor(list(answers), dtype=torch.long)
    own = scores.gather(1, answers_t[:, None])
    return (scores >= own).sum(dim=1)  # own document included: rank ≥ 1


def _bootstrap(
    ranks: dict[str, Tensor], answers: Tensor, draws: int, seed: int
) -> dict[str, dict[str, float | list[float]]]:
    """Top-1 and MRR of every system with 95% intervals that resample documents, and the
    top-1 difference to :data:`REFERENCE` on the same draws (a paired interval)."""
    gen = torch.Generator().manual_seed(seed)
    docs = torch.unique(answers)
    # counts[b, j]: how often draw b picked document docs[j]; a query weighs as its document.
    picks = torch.randint(len(docs), (draws, len(docs)), generator=gen)
    counts = torch.zeros(draws, len(docs)).scatter_add_(1, picks, torch.ones(draws, len(docs)))
    position = torch.searchsorted(docs, answers)
    weights = counts[:, position].double()  # (draws, Q)

    def stats(x: Tensor) -> tuple[float, Tensor]:
        x = x.double()
        return float(x.mean()), (weights * x).sum(1) / weights.sum(1)

    def interval(samples: Tensor) -> list[float]:
        lo, hi = torch.quantile(samples, torch.tensor([0.025, 0.975], dtype=samples.dtype))
        return [float(lo), float(hi)]

    found = {}
    ref_top1 = stats(ranks[REFERENCE] == 1)[1] if REFERENCE in ranks else None
    for name, r in ranks.items():
        top1, top1_s = stats(r == 1)
        mrr, mrr_s = stats(1.0 / r.double())
        found[name] = {
            "top1": top1,
            "top1_ci": interval(top1_s),
            "mrr": mrr,
            "mrr_ci": interval(mrr_s),
        }
        if ref_top1 is not None and name != REFERENCE:
            diff = top1_s - ref_top1
            found[name]["top1_vs_reference"] = float((ranks[name] == 1).double().mean()) - float(
                (ranks[REFERENCE] == 1).double().mean()
            )
            found[name]["top1_vs_reference_ci"] = interval(diff)
    return found


# --- systems ------------------------------------------------------------------------------------


def _reserved_positions(config) -> int:
    """Rows of the position table that are never a position (RoBERTa's up to pad_token_id)."""
    return config.pad_token_id + 1 if config.model_type == "roberta" else 0


def _trained_length(config) -> int:
    return config.max_position_embeddings - _reserved_positions(config)


@dataclass
class System:
    """A way to embed a document: the pieces ``(start, stop)`` of its tokens that ``model``
    embeds, kept as they are (``combine="all"``: a document scores its best piece) or averaged
    (``"mean"``)."""

    name: str
    label: str
    length: int
    model_key: str
    pieces: Callable[[int], list[tuple[int, int]]]  # document length → pieces
    combine: str = "all"


class _Embedder:
    """Embeds pieces of documents, each (model, document, piece) once: a 4,096-position model
    embeds a 1,500-token document as the 2,048-position one does (the lengthened tables share
    their first rows), and a truncated document is the first of its chunks. Remembers the
    seconds each piece took, so a system's cost counts the pieces it reused."""

    def __init__(self, models: dict[str, nn.Module], special: tuple[int, int, int]) -> None:
        self.models, self.special = models, special
        self.memo: dict[tuple[str, int, int, int], tuple[Tensor, float]] = {}

    def __call__(self, system: System, docs: Sequence[Document]) -> tuple[list[Tensor], float]:
        found, seconds = [], 0.0
        for i, doc in enumerate(docs):
            vectors = []
            for start, stop in system.pieces(len(doc.ids)):
                key = (system.model_key, i, start, stop)
                if key not in self.memo:
                    began = time.perf_counter()
                    vector = _embed(
                        self.models[system.model_key], [doc.ids[start:stop]], *self.special, 1
                    )
                    self.memo[key] = (vector, time.perf_counter() - began)
                vector, took = self.memo[key]
                vectors.append(vector)
                seconds += took
            stacked = torch.cat(vectors)
            if system.combine == "mean":
                stacked = torch.nn.functional.normalize(stacked.mean(0, keepdim=True), dim=-1)
            found.append(stacked)
        return found, seconds


def _prefix(length: int) -> Callable[[int], list[tuple[int, int]]]:
    """The document's first ``length`` positions, [CLS] and [SEP] included."""
    return lambda n: [(0, min(n, length - 2))]


def _chunked(window: int, max_length: int) -> Callable[[int], list[tuple[int, int]]]:
    """Consecutive ``window``-position chunks of the document's first ``max_length``."""
    body = window - 2

    def pieces(n: int) -> list[tuple[int, int]]:
        n = min(n, max_length - 2)
        return [(s, min(s + body, n)) for s in range(0, n, body)]

    return pieces


def _check_held_out(checkpoint: Path, sources: Sequence[str]) -> None:
    """Refuse a checkpoint whose `nystromer distill` run read one of the document sources."""
    run_config = checkpoint.parent / "config.json"
    if not (checkpoint.name == "model" and run_config.is_file()):
        return
    texts = json.loads(run_config.read_text(encoding="utf-8")).get("texts") or []
    seen = [s for s in sources if DISTILL_TEXT.get(s) in texts]
    if seen:
        raise ValueError(
            f"--checkpoint {checkpoint} was distilled on {', '.join(texts)}, which holds the "
            f"documents of --sources {' '.join(seen)}: the evaluation would not be held out; "
            "evaluate it on another source (e.g. --sources stdlib for a builtin:pydoc run)"
        )


def _checkpoint_label(checkpoint: Path) -> str:
    return checkpoint.parent.name if checkpoint.name == "model" else checkpoint.name


def _reusable(
    reuse: dict | None,
    docs: Sequence[Document],
    query_sets: Sequence[Sequence[tuple[int, list[int]]]],
    spans: Sequence[tuple[int, int]],
    query_length: int,
    seed: int,
) -> dict[str, dict]:
    """From an earlier report on the same documents and queries: per system, its ``seconds``
    and its ``ranks`` per query set (None where the set is empty)."""
    if reuse is None:
        return {}
    same = (
        reuse["documents"]["names"] == [d.name for d in docs]
        and reuse["settings"]["query_length"] == query_length
        and reuse["settings"]["seed"] == seed
        and [q["tokens"] for q in reuse["query_sets"]] == [list(span) for span in spans]
        and [q.get("answers") for q in reuse["query_sets"]]
        == [[i for i, _ in qs] for qs in query_sets]
    )
    if not same:
        raise ValueError(
            "reuse: the earlier report has other documents or queries (its --sources, "
            "--documents, --max-docs, --min-tokens, --lengths, --query-length, "
            "--queries-per-doc and --seed must be this run's)"
        )
    found = {}
    for system in reuse["systems"]:
        name = system["name"]
        found[name] = {
            "seconds": system["seconds"],
            "ranks": [q["ranks"].get(name) if q["queries"] else None for q in reuse["query_sets"]],
        }
    return found


def run_benchmark(
    model_dir: str,
    texts: Sequence[tuple[str, str]],
    *,
    model_label: str,
    sources: Sequence[str] = (),
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    max_length: int | None = None,
    checkpoints: Sequence[str] = (),
    min_tokens: int = 1200,
    max_docs: int | None = None,
    query_length: int = 96,
    queries_per_doc: int = 2,
    num_landmarks: int = 64,
    kmeans_iterations: int = 3,
    batch: int = 8,
    bootstrap: int = 2000,
    seed: int = 0,
    reuse: dict | None = None,
    command: str = "",
    progress: Callable[[str], None] = print,
) -> dict:
    """Run the retrieval evaluation; returns the report (what ``results.json`` holds).

    Args:
        model_dir: the original model (a transformers BERT/RoBERTa folder with its tokenizer).
        texts: ``(name, text)`` documents before the length filter.
        sources: names of the built-in sources ``texts`` came from (recorded, and checked
            against each checkpoint's distillation text).
        lengths: n of the lengthened exact and converted systems (each > the trained length).
        max_length: tokens of a document that any system sees (default: the largest n).
        checkpoints: converted (e.g. distilled) model folders, loaded with
            :func:`nystromer.from_pretrained`, each run at its own length (≤ ``max_length``).
        min_tokens: shortest document kept, in tokens.
        max_docs: keep this many documents at most (drawn at random).
        query_length, queries_per_doc: passage length in tokens, passages per document and span.
        num_landmarks, kmeans_iterations: of the untrained conversions.
        batch: queries per forward call (documents and chunks go one at a time: no padding).
        bootstrap: bootstrap draws for the intervals.
        seed: document draw, passages and bootstrap.
        reuse: an earlier report on the same documents and queries: its systems' ranks are
            taken from it instead of embedding again (e.g. to add a checkpoint to a table).

    Raises:
        ValueError: a length at most the trained one or above ``max_length``, or a checkpoint
            distilled on the documents' source.
    """
    import nystromer
    from nystromer.distill.run import load_teacher

    original, tokenizer = load_teacher(model_dir, 1)  # as trained: no table to lengthen
    trained = _trained_length(original.config)
    lengths = sorted(set(lengths))
    max_length = max(lengths) if max_length is None else max_length
    if not lengths or lengths[0] <= trained or lengths[-1] > max_length:
        raise ValueError(
            f"lengths must be > the model's trained length {trained} and ≤ max_length "
            f"{max_length}, got {lengths}"
        )
    for c in checkpoints:
        _check_held_out(Path(c), sources)
    special = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id or 0)

    docs = load_documents(texts, tokenizer, min_tokens=min_tokens, max_docs=max_docs, seed=seed)
    if len(docs) < 2:
        raise ValueError(
            f"{len(docs)} documents of ≥ {min_tokens} tokens: retrieval needs at least 2 "
            "(lower --min-tokens or give more documents)"
        )
    # Spans of document tokens (special tokens excluded): what the trained window sees, then
    # what each longer window adds.
    stops = [trained - 2, *(n - 2 for n in lengths)]
    spans = list(zip([0, *stops[:-1]], stops, strict=True))
    span_labels = [f"within the first {trained:,}"] + [
        f"{a + 2:,}–{b + 2:,}" for a, b in zip(stops[:-1], stops[1:], strict=True)
    ]
    query_sets = make_queries(
        docs, spans, query_length=query_length, per_doc=queries_per_doc, seed=seed
    )
    progress(
        f"{len(docs)} documents, queries per span: {', '.join(str(len(q)) for q in query_sets)}"
    )
    all_queries = [ids for qs in query_sets for _, ids in qs]
    query_vectors = _embed(original, all_queries, *special, batch=batch)

    chunks = _chunked(trained, max_length)
    systems = [
        System(f"truncate-{trained}", f"original, first {trained:,} tokens", trained,
               "original", _prefix(trained)),
        System(REFERENCE, f"original, {trained:,}-token chunks, mean", max_length,
               "original", chunks, "mean"),
        System("chunks-best", f"original, {trained:,}-token chunks, best chunk", max_length,
               "original", chunks),
    ]  # fmt: skip
    # One model per kind with the longest table: on n tokens it computes what a model with an
    # n-position table computes (extend_positions keeps the first rows).
    rows = _reserved_positions(original.config) + lengths[-1]
    models = {
        "original": original,
        "exact": nystromer.extend_positions(copy.deepcopy(original), rows),
        "converted": nystromer.convert(
            copy.deepcopy(original),
            num_landmarks=num_landmarks,
            kmeans_iterations=kmeans_iterations,
            max_position_embeddings=rows,
        ),
    }
    for n in lengths:
        systems += [
            System(f"exact-{n}", f"exact attention, {n:,} positions (ceiling)", n,
                   "exact", _prefix(n)),
            System(f"converted-{n}", f"converted, {n:,} positions, no training", n,
                   "converted", _prefix(n)),
        ]  # fmt: skip
    for c in checkpoints:
        name = _checkpoint_label(Path(c))
        models[name] = model = nystromer.from_pretrained(c).eval()
        n = min(_trained_length(model.config), max_length)
        systems.append(System(name, f"{name} ({n:,} positions)", n, name, _prefix(n)))

    embedder = _Embedder(models, special)
    ranks: list[dict[str, Tensor]] = [{} for _ in query_sets]
    timing = {}
    reused = _reusable(reuse, docs, query_sets, spans, query_length, seed)
    for system in systems:
        if system.name in reused:
            timing[system.name] = reused[system.name]["seconds"]
            for k, found in enumerate(reused[system.name]["ranks"]):
                if found is not None:
                    ranks[k][system.name] = torch.as_tensor(found, dtype=torch.long)
            progress(f"{system.name}: ranks reused")
            continue
        progress(f"{system.name}: embedding {len(docs)} documents ...")
        vectors, timing[system.name] = embedder(system, docs)
        first = 0
        for k, qs in enumerate(query_sets):
            block = query_vectors[first : first + len(qs)]
            first += len(qs)
            if qs:
                ranks[k][system.name] = score(block, vectors, [i for i, _ in qs])
        top1 = [float((r[system.name] == 1).double().mean()) for r in ranks if system.name in r]
        progress(
            f"{system.name}: {timing[system.name]:.0f} s, top-1 per span "
            + " / ".join(f"{t:.3f}" for t in top1)
        )

    sets_report = []
    for k, (qs, (start, stop)) in enumerate(zip(query_sets, spans, strict=True)):
        answers = torch.as_tensor([i for i, _ in qs], dtype=torch.long)
        found = _bootstrap(ranks[k], answers, bootstrap, seed) if qs else {}
        sets_report.append(
            {
                "name": "within" if k == 0 else f"beyond-{stops[k] + 2}",
                "label": span_labels[k],
                "tokens": [start, stop],
                "queries": len(qs),
                "documents": len({i for i, _ in qs}),
                "answers": answers.tolist(),
                "results": found,
                "ranks": {name: r.tolist() for name, r in ranks[k].items()},
            }
        )
    lengths_doc = [len(d.ids) for d in docs]
    return report_header("long_inputs", command, "cpu", torch.get_num_threads()) | {
        "model": {"label": model_label, "path": str(model_dir), "trained_length": trained},
        "settings": {
            "sources": list(sources),
            "lengths": lengths,
            "max_length": max_length,
            "min_tokens": min_tokens,
            "max_docs": max_docs,
            "query_length": query_length,
            "queries_per_doc": queries_per_doc,
            "num_landmarks": num_landmarks,
            "kmeans_iterations": kmeans_iterations,
            "bootstrap": bootstrap,
            "seed": seed,
            "reference": REFERENCE,
        },
        "documents": {
            "count": len(docs),
            "tokens_min": min(lengths_doc),
            "tokens_median": statistics.median(lengths_doc),
            "tokens_max": max(lengths_doc),
            "longer_than_max_length": sum(n > max_length - 2 for n in lengths_doc),
            "names": [d.name for d in docs],
        },
        "systems": [
            {"name": s.name, "label": s.label, "length": s.length, "seconds": timing[s.name]}
            for s in systems
        ],
        "query_sets": sets_report,
    }


# --- report -------------------------------------------------------------------------------------


def _cell(result: dict | None, key: str) -> str:
    if result is None:
        return "—"
    lo, hi = result[f"{key}_ci"]
    return f"{result[key]:.2f} ({lo:.2f}–{hi:.2f})"


def _diff_cell(result: dict | None) -> str:
    if result is None or "top1_vs_reference" not in result:
        return "—"
    lo, hi = result["top1_vs_reference_ci"]
    return f"{result['top1_vs_reference']:+.2f} ({lo:+.2f} to {hi:+.2f})"


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:,.0f} s"


def format_section(report: dict) -> str:
    """The Markdown section for docs: command, date, machine, data, one table per query set."""
    s, d = report["settings"], report["documents"]
    sources = " and ".join(s["sources"]) or "the given folder"
    ref = next(x["label"] for x in report["systems"] if x["name"] == s["reference"])
    lines = [
        f"### Retrieval of long documents: {report['model']['label']}",
        "",
        f"Command: `{report['command']}`; measured {report['date']} on {report['machine_label']}.",
        "",
        f"{d['count']} documents from {sources} of {d['tokens_min']:,}–{d['tokens_max']:,} "
        f"tokens (median {d['tokens_median']:,.0f}; {d['longer_than_max_length']} cut at "
        f"{s['max_length']:,}); queries are {s['query_length']}-token passages, up to "
        f"{s['queries_per_doc']} per document and span, embedded by the original model; the "
        f"untrained conversions use m = {s['num_landmarks']} and {s['kmeans_iterations']} "
        f"k-means iterations. Cells: value (95% interval, {s['bootstrap']} bootstrap draws "
        f"over documents); Δ top-1 is the difference to “{ref}” on the same queries.",
    ]
    for qs in report["query_sets"]:
        lines += [
            "",
            f"Passages from tokens {qs['label']} ({qs['queries']} queries from "
            f"{qs['documents']} documents):",
            "",
            "| system | top-1 | MRR | Δ top-1 |",
            "|---|--:|--:|--:|",
        ]
        for system in report["systems"]:
            r = qs["results"].get(system["name"])
            lines.append(
                f"| {system['label']} | {_cell(r, 'top1')} | {_cell(r, 'mrr')} | {_diff_cell(r)} |"
            )
    lines += [
        "",
        "Time to embed all documents, per system (a piece two systems share, such as the first "
        "chunk and the truncated document, counts for both): "
        + "; ".join(f"{x['label']} {_seconds(x['seconds'])}" for x in report["systems"])
        + ".",
    ]
    return "\n".join(lines)


def write_docs_section(path: str | os.PathLike[str], report: dict) -> None:
    """Write or replace the long-inputs section between the markers of ``path``."""
    replace_section(path, BEGIN, END, format_section(report), new_file="# Results\n")


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", metavar="DIR", help="BERT/RoBERTa folder (default: all-MiniLM-L6-v2)")
    p.add_argument(
        "--sources",
        nargs="+",
        choices=sorted(SOURCES),
        default=["stdlib"],
        help="built-in documents (default: stdlib; held out from `nystromer distill --text "
        "builtin:pydoc`)",
    )
    p.add_argument("--documents", metavar="DIR", help="UTF-8 files of DIR as the documents")
    p.add_argument(
        "--lengths",
        type=int_at_least(1),
        nargs="+",
        default=list(DEFAULT_LENGTHS),
        metavar="N",
        help="positions of the lengthened exact and converted models (default 2048 4096)",
    )
    p.add_argument(
        "--max-length",
        type=int_at_least(3),
        metavar="N",
        help="tokens of a document any system sees (default: the largest --lengths)",
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        default=[],
        metavar="DIR",
        help="converted/distilled model folders (e.g. a distill run's model/), each at its length",
    )
    p.add_argument("--min-tokens", type=int_at_least(1), default=1200, metavar="N")
    p.add_argument("--max-docs", type=int_at_least(2), metavar="N", help="documents drawn")
    p.add_argument("--query-length", type=int_at_least(1), default=96, metavar="N")
    p.add_argument("--queries-per-doc", type=int_at_least(1), default=2, metavar="N")
    p.add_argument("--num-landmarks", type=int_at_least(1), default=64, metavar="M")
    p.add_argument("--kmeans-iterations", type=int_at_least(0), default=3, metavar="K")
    p.add_argument("--batch", type=int_at_least(1), default=8, help="queries per forward call")
    p.add_argument("--bootstrap", type=int_at_least(10), default=2000, metavar="B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_at_least(1), help="torch threads (default: torch's)")
    p.add_argument(
        "--reuse",
        metavar="JSON",
        help="an earlier results.json on the same documents and queries: its systems are not "
        "embedded again (e.g. to add --checkpoint to a table)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json")
    p.add_argument("--write-docs", metavar="FILE", help="write/replace the section in FILE")
    p.add_argument(
        "--from-json", metavar="FILE", help="measure nothing: print (and --write-docs) a report"
    )
    args = p.parse_args(argv)

    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            report = json.load(f)
    else:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.model is None:
            model_dir, label = default_model(p), "all-MiniLM-L6-v2"
        else:
            model_dir, label = args.model, Path(args.model).resolve().name
        if not (Path(model_dir) / "config.json").is_file():
            p.error(f"--model: {model_dir} is not a Hugging Face model folder (no config.json)")
        if args.documents is not None:
            folder = Path(args.documents)
            if not folder.is_dir():
                p.error(f"--documents: {folder} is not a folder")
            texts, sources = _folder_documents(folder), []
        else:
            texts = [t for s in args.sources for t in SOURCES[s]()]
            sources = args.sources
        reuse = None
        if args.reuse is not None:
            with open(args.reuse, encoding="utf-8") as f:
                reuse = json.load(f)
        command = recorded_command("benchmarks/long_inputs.py", argv, drop=("--out", "--reuse"))
        print(f"long-inputs benchmark: {command}", flush=True)
        try:
            report = run_benchmark(
                model_dir,
                texts,
                model_label=label,
                sources=sources,
                lengths=args.lengths,
                max_length=args.max_length,
                checkpoints=args.checkpoint,
                min_tokens=args.min_tokens,
                max_docs=args.max_docs,
                query_length=args.query_length,
                queries_per_doc=args.queries_per_doc,
                num_landmarks=args.num_landmarks,
                kmeans_iterations=args.kmeans_iterations,
                batch=args.batch,
                bootstrap=args.bootstrap,
                seed=args.seed,
                reuse=reuse,
                command=command,
                progress=lambda line: print(line, flush=True),
            )
        except ValueError as e:
            p.error(str(e))
        path = Path(args.out) / "results.json"
        with atomic_write(path) as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
    print()
    print(format_section(report))
    if args.write_docs:
        write_docs_section(args.write_docs, report)
        print(f"\nwrote the long-inputs section of {args.write_docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

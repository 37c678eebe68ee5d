#!/usr/bin/env python
"""Converted-model benchmark: a pretrained encoder with Nyström attention against the original.

    python benchmarks/converted_model.py                 # all-MiniLM-L6-v2, n = 512, 2,048, 8,192
    python benchmarks/converted_model.py --write-docs docs/results.md
    python benchmarks/converted_model.py --model DIR --lengths 1024 4096 --threads 2
    python benchmarks/converted_model.py --kmeans-iterations 3 --conv-kernel-size 35  # as distilled

The whole model on random token ids, as loaded and as :func:`nystromer.convert` converts it, each
case timed in fresh worker processes (this script with ``--worker``); the section it writes
(docs/results.md, "Converted all-MiniLM-L6-v2") says what is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
from pathlib import Path

import torch

from nystromer._machine import report_header
from nystromer.bench.cli import add_script_args, call_with, int_at_least, odd_kernel_or_zero
from nystromer.bench.implementations import AttentionRunner, Implementation
from nystromer.bench.measure import CaseSpec, fmt, measure_case, recorded_command
from nystromer.bench.pretrained import (
    model_arg,
    ratio,
    ratio_text,
    read_report,
    registered,
    report_io,
)
from nystromer.bench.worker import measure_and_report
from nystromer.conversion import reserved_positions
from nystromer.functional import check_nystrom_options

BEGIN = "<!-- converted-model:begin (written by benchmarks/converted_model.py) -->"
END = "<!-- converted-model:end -->"
#: Registry names of the two variants, (label in tables, registry name).
VARIANTS = (("exact", "model-exact"), ("nystromer", "model-nystromer"))
#: The measured quantities, as the report names them (``forward_ms``, ``forward_peak_mib``, …).
PASSES = ("forward", "forward_backward")
#: The ratios exact ÷ Nyström a row has per pass, and what they divide.
_RATIOS = (("speedup", "ms"), ("memory_ratio", "peak_mib"))
#: The measurement settings a report records, from its base case.
_SETTINGS = "batch num_landmarks pinv_iterations threads repeats warmup device dtype".split()
#: How every case runs the models, as the report's settings say.
_MODE = {
    "mode": "eval (no dropout), random token ids, no padding, no attention mask",
    "exact_attention": "sdpa",
}
#: The report's model fields and their names in the model's config.json.
_MODEL_FIELDS = {
    "model_type": "model_type",
    "layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "heads": "num_attention_heads",
    "max_position_embeddings": "max_position_embeddings",
}


# --- the whole model as a registry implementation ---------------------------------------------


class ModelRunner(AttentionRunner):
    """A whole encoder as a runner: random token ids (B, n) in place of q, k, v; the backward
    pass is the gradient of the summed last hidden state to the parameters (not the inputs)."""

    grad_args: tuple[int, ...] = ()

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.vocab_size, self.pad_id = model.config.vocab_size, model.config.pad_token_id

    def prepare(self, q, k, v, mask) -> tuple:
        gen = torch.Generator().manual_seed(0)
        b, _, n, _ = q.shape
        ids = torch.randint(0, self.vocab_size, (b, n), generator=gen)
        if isinstance(self.pad_id, int):
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


def _load_model(model_dir: str, config, nystrom: bool, **convert) -> ModelRunner:
    """The model as loaded or (``nystrom``) converted; its position table holds config.seq_len."""
    from transformers import AutoModel

    import nystromer

    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa")
    model = model.to(device=config.device, dtype=config.dtype).eval()
    with torch.no_grad():
        # transformers can leave the weights memory-mapped from model.safetensors, read in on
        # first use: the first call's peak would count the weights. Copies are resident now.
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    rows = max(model.config.max_position_embeddings, config.seq_len + reserved_positions(model))
    if nystrom:
        case = {"num_landmarks": config.num_landmarks, "pinv_iterations": config.pinv_iterations}
        nystromer.convert(model, max_position_embeddings=rows, **case, **convert)
    else:
        nystromer.extend_positions(model, rows)
    return ModelRunner(model)


def registered_model(model_dir: str, *, kmeans_iterations: int = 0, conv_kernel_size=None):
    """Within the block, ``model-exact`` and ``model-nystromer`` are the model in ``model_dir``
    as loaded and converted (m and pinv iterations from each case, the rest as given here).

    Raises:
        ValueError: a bad convert option (now, not when a worker builds the model).
    """
    # m and the pinv iterations come with each case (valid ones stand in).
    check_nystrom_options(1, 0, conv_kernel_size, kmeans_iterations)
    convert = {"kmeans_iterations": kmeans_iterations, "conv_kernel_size": conv_kernel_size}
    return registered(
        *(
            Implementation(
                name,
                f"{model_dir}, {label} attention",
                functools.partial(_load_model, model_dir, nystrom=label == "nystromer", **convert),
            )
            for label, name in VARIANTS
        )
    )


# --- fresh-process measurement ------------------------------------------------------------------


def _worker_main(argv: list[str]) -> int:
    """``--worker MODEL_DIR CONVERT_JSON SPEC_JSON TASKS``: bench.worker, the model registered."""
    # The worker is a fresh process, but a test may call it in its own: leave the registry.
    with registered_model(argv[0], **json.loads(argv[1])):
        return measure_and_report(argv[2], argv[3])


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
    """Both variants at every length, as :func:`measure_case` measures an implementation; the
    report (``results.json``). ``base`` holds the measurement settings (its implementation,
    length and head shape are set per case); ``kmeans_iterations`` and ``conv_kernel_size``
    (None: no convolution) are the other options of :func:`nystromer.convert`. Each row has
    ``seq_len``, the :class:`~nystromer.bench.measure.CaseResult` fields of ``exact`` and
    ``nystromer`` ("backward" named "forward_backward") and their ratios exact ÷ Nyström.

    Raises:
        ValueError: a bad convert option, before any worker starts (:func:`registered_model`).
    """
    convert = {"kmeans_iterations": kmeans_iterations, "conv_kernel_size": conv_kernel_size}
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    info = {"label": model_label, "path": str(model_dir)}
    info |= {key: config.get(name) for key, name in _MODEL_FIELDS.items()}
    heads = info["heads"] or 1
    shape = {"heads": heads, "head_dim": max(1, (info["hidden_size"] or 1) // heads)}
    worker = [sys.executable, str(Path(__file__).resolve()), "--worker", model_dir]
    worker.append(json.dumps(convert))
    rows, worker_threads = [], None
    with registered_model(model_dir, **convert):
        for n in lengths:
            row: dict = {"seq_len": n}
            for label, name in VARIANTS:
                spec = dataclasses.replace(base, impl=name, seq_len=n, **shape)
                progress(f"n = {n}: {label} ...")
                found = measure_case(spec, timeout=timeout, worker=worker)
                progress(f"n = {n}: {label}: {found.summary()}")
                worker_threads = worker_threads or found.threads
                # measure's "backward" is the forward+backward call.
                row[label] = {
                    k.replace("backward", "forward_backward"): v
                    for k, v in found.to_dict().items()
                    if k != "spec"
                }
            for what, (name, unit) in itertools.product(PASSES, _RATIOS):
                key = f"{what}_{unit}"
                row[f"{what}_{name}"] = ratio(row["exact"][key], row["nystromer"][key])
            rows.append(row)
    threads = base.threads if base.threads is not None else worker_threads
    return report_header("converted_model", command, base.device, threads) | {
        "model": info,
        "settings": {name: getattr(base, name) for name in _SETTINGS} | convert | _MODE,
        "rows": rows,
    }


# --- report ------------------------------------------------------------------------------------


def _convert_options_text(settings: dict) -> str:
    """Convert options in words; k-means, convolution only when set (older reports lack them)."""
    parts = [f"m = {settings['num_landmarks']}", f"{settings['pinv_iterations']} pinv iterations"]
    if kmeans := settings.get("kmeans_iterations"):
        parts.append(f"{kmeans} k-means iteration{'s' if kmeans != 1 else ''}")
    if (kernel := settings.get("conv_kernel_size")) is not None:
        parts.append(f"a zero-initialised kernel-{kernel} depthwise convolution on the values")
    return ", ".join(parts)


def format_section(report: dict) -> str:
    """The Markdown section for docs: title, command, date, machine, table, what is measured."""
    s = report["settings"]
    header = ["n"]
    for what in ("fwd", "fwd+bwd"):
        header += [f"exact {what} ms", f"Nyström {what} ms", "speed-up"]
        header += [f"exact {what} MiB", f"Nyström {what} MiB", "memory ratio"]
    lines = [
        f"## Converted {report['model']['label']}: speed and memory",
        "",
        f"Command: `{report['command']}`; measured {report['date']} on {report['machine_label']}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    notes = []
    for row in report["rows"]:
        exact, ours = row["exact"], row["nystromer"]
        cells = [f"{row['seq_len']:,}"]
        for what, (name, unit) in itertools.product(PASSES, _RATIOS):
            key = f"{what}_{unit}"
            cells += [fmt(exact[key]), fmt(ours[key]), ratio_text(row[f"{what}_{name}"])]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [
            f"n = {row['seq_len']:,}, {label}: {row[label]['note']}"
            for label, _ in VARIANTS
            if row[label]["status"] != "ok"
        ]
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


# --- command line -----------------------------------------------------------------------------


def _kernel_size(text: str) -> int | None:
    """argparse type: an odd kernel size, or 0 for none (None)."""
    return odd_kernel_or_zero(text) or None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--model", metavar="DIR", help="default: all-MiniLM-L6-v2")
    add("--lengths", "-n", type=int_at_least(1), nargs="+", default=[512, 2048, 8192], metavar="N")
    add("--kmeans-iterations", type=int_at_least(0), default=0, metavar="K", help="distill: 3")
    add("--conv-kernel-size", type=_kernel_size, metavar="K", help="odd, 0: none (distill: 35)")
    add("--out", default="runs/bench/converted_model", help="folder for results.json")
    add_script_args(p, repeats=3, timeout=3600, saved="a results.json saved earlier")
    args = p.parse_args(argv)

    def run() -> dict:
        model_dir, label = model_arg(p, args.model, bert_only=True)
        command = recorded_command(
            ["python", "benchmarks/converted_model.py"], argv, drop=("--out",)
        )
        print(f"converted-model benchmark: {command}", flush=True)
        base = call_with(CaseSpec, args, impl="exact")  # each case names its variant
        return call_with(
            run_benchmark, args, model_dir, base, model_label=label, command=command,
            progress=lambda line: print(line, flush=True),
        )  # fmt: skip

    if args.from_json:
        try:  # a wrong file ends here, with the usage, rather than in a traceback
            read_report(args.from_json, "converted_model")
        except ValueError as e:
            p.error(str(e))
    report = report_io(args, run, format_section, (BEGIN, END), "converted_model")
    return 1 if any(row[v]["status"] != "ok" for row in report["rows"] for v, _ in VARIANTS) else 0


if __name__ == "__main__":
    sys.exit(main())

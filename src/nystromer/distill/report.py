"""A finished distillation run as a Markdown section (``nystromer distill --write-docs``)."""

from __future__ import annotations

import datetime
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from .._io import atomic_path
from .._markdown import replace_section
from ..train.checkpoint import read_json
from ..train.metrics import MetricsLog

__all__ = ["command_line", "results_markdown", "write_results"]


def _load(path: Path) -> dict[str, Any]:
    return read_json(path, f"{path} is missing: is {path.parent} a finished distillation run?")


def command_line(distill_config: dict[str, Any], out: str | os.PathLike[str]) -> str:
    """The ``nystromer distill`` command that runs ``distill_config`` into ``out``."""
    argv = ["nystromer", "distill", "--teacher", distill_config["teacher"], "--text"]
    argv += list(distill_config["texts"])
    argv += ["--out", str(out)]
    for name, value in distill_config.items():
        if name in ("conv_kernel_size", "calibrate_output") and value is None:
            value = 0  # the flag's "none" (its default is not)
        if name == "dropout" and value is None:
            value = "teacher"
        if name in ("teacher", "texts") or value is None:
            continue
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(argv)


def _before_after_table(report: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    cosine = [report["cosine_before"], report["cosine_after"]]
    mse = [report["mse_before"], report["mse_after"]]
    head = ["converted, before", "distilled, after"]
    note = []
    if report.get("cosine_calibrated") is not None:
        cosine.insert(1, report["cosine_calibrated"])
        mse.insert(1, report["mse_calibrated"])
        if cfg.get("calibrate_output"):
            head.insert(1, "convolution and output fitted")
            fitted = (
                f"The convolution skip (k = {cfg['conv_kernel_size']}) and each attention "
                f"output projection (shrinkage {cfg['calibrate_output']}) were"
            )
        else:
            head.insert(1, "convolution skip fitted")
            fitted = f"The convolution skip (k = {cfg['conv_kernel_size']}) was"
        note = [
            "",
            f"{fitted} fitted to exact attention on {cfg['calibrate']} training windows "
            f"(`nystromer.calibrate`, {report['calibration_s']:.0f} s) before training.",
        ]
    return [
        f"| held-out test text | {' | '.join(head)} |",
        "|---" + "|--:" * len(head) + "|",
        "| mean cosine of mean-pooled embeddings to the exact model | "
        + " | ".join(f"{c:.4f}" for c in cosine)
        + " |",
        "| squared error of the last hidden state (per dimension) | "
        + " | ".join(f"{e:.5f}" for e in mse)
        + " |",
        *note,
    ]


def run_title(teacher: str, cfg: dict, data: dict) -> str:
    """The section heading: what sets this run apart from the others (landmarks, what was
    fitted, dropout, learning rate, text), so that every run's section has its own title."""
    landmarks = "k-means landmarks" if cfg.get("kmeans_iterations") else "segment-mean landmarks"
    if not cfg.get("conv_kernel_size"):
        skip = "no convolution"
    elif cfg.get("calibrate"):
        fitted = "convolution and output" if cfg.get("calibrate_output") else "convolution"
        skip = f"{fitted} fitted"
    else:
        skip = "convolution trained from zero"
    dropout = cfg.get("dropout", None)
    dropout = "teacher's dropout" if dropout is None else f"dropout {dropout:g}"
    return (
        f"Distillation: {teacher}, m = {cfg['num_landmarks']}, {cfg['max_length']} tokens, "
        f"{landmarks}, {skip}, {dropout}, lr {cfg['lr']:g}, {data['tokens']:,} tokens of text"
    )


def results_markdown(run_dir: str | os.PathLike[str], image: str | None = None) -> str:
    """The section: command, machine, before/after table, progress table, curve."""
    from .._machine import machine_info, machine_label

    run = Path(run_dir)
    report = _load(run / "distill.json")
    summary = _load(run / "summary.json")
    config = _load(run / "config.json")
    cfg, data = config["distill"], config["data"]
    teacher = Path(cfg["teacher"]).name
    if teacher == "model":  # a packaged model folder: name its package instead
        teacher = Path(cfg["teacher"]).parent.name
    minutes = summary["wall_time_s"] / 60
    date = datetime.date.today().isoformat()
    lines = [
        f"### {run_title(teacher, cfg, data)}",
        "",
        f"Measured {date} with `{command_line(cfg, run)}`.",
        f"Machine: {machine_label(report.get('machine') or machine_info())}"
        f"{'' if 'machine' in report else ' (of the report; the run did not record its own)'}.",
        f"Text: {', '.join(cfg['texts'])}, {data['tokens']:,} tokens; training on the first "
        f"{data['train_tokens']:,} ({data['train_windows']} windows), validation on the next "
        f"{data['val_tokens']:,} ({data['val_windows']} windows), test on the last "
        f"{data['test_tokens']:,} ({data['test_windows']} windows).",
        "",
        *_before_after_table(report, cfg),
        "",
        f"{summary['steps']} steps of {cfg['batch_size']} windows in {minutes:.1f} min "
        f"({summary['steps'] / summary['wall_time_s']:.2f} steps/s, validation included); the "
        "after column is "
        + (
            "the calibrated model: no trained checkpoint beat it on validation."
            if report["best_step"] == 0
            else f"the best validation checkpoint (step {report['best_step']})."
        ),
        "",
        "| step | minutes | validation cosine |",
        "|--:|--:|--:|",
    ]
    before = run / "before.json"
    if before.is_file():
        start = _load(before)
        lines.append(f"| 0 | 0.0 | {start.get('calibrated', start)['val']['cosine']:.4f} |")
    for r in MetricsLog(run / "metrics.jsonl").records:
        if "val_cosine" in r:
            lines.append(
                f"| {r['step']} | {r['elapsed_s'] / 60:.1f} | {float(r['val_cosine']):.4f} |"
            )
    if image is not None:
        lines += ["", f"![validation cosine against steps]({image})"]
    return "\n".join(lines)


def write_results(run_dir: str | os.PathLike[str], docs_file: str | os.PathLike[str]) -> Path:
    """Write the run's section into ``docs_file`` (between markers named after the run
    folder, replacing an earlier version) and copy its curve to
    ``<docs dir>/results/<run>_cosine.png``. Returns the docs file."""
    run, docs = Path(run_dir), Path(docs_file)
    image = None
    curve = run / "cosine.png"
    if curve.is_file():
        target = docs.parent / "results" / f"{run.resolve().name}_cosine.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(curve, tmp)
        image = target.relative_to(docs.parent).as_posix()
    name = run.resolve().name
    replace_section(
        docs,
        f"<!-- distill:{name}:begin (written by nystromer distill --write-docs) -->",
        f"<!-- distill:{name}:end -->",
        results_markdown(run, image),
        new_file="# Results\n",
    )
    return docs

"""A finished LRA run as a Markdown section next to the paper's numbers.

``nystromer eval RUN_DIR --write-docs FILE`` (or ``nystromer train ... --write-docs FILE``, when
the run completes) writes it between markers named after the run folder, so that rerunning the
command replaces it in place. The section holds the command that reproduces the run, the test
accuracy of the best checkpoint beside the paper's two columns, the wall time and the
validation curve (a PNG copied next to the docs file).
"""

from __future__ import annotations

import datetime
import math
import os
import shlex
from pathlib import Path
from typing import Any

from .._markdown import replace_section
from ..train.checkpoint import read_json
from ..train.metrics import MetricsLog, plot_metrics
from .recipes import load_recipe

__all__ = [
    "PAPER_ACCURACY",
    "accuracy_interval",
    "command_line",
    "results_markdown",
    "write_results",
]

# Xiong et al. 2021, the LRA table (test accuracy, %): the standard Transformer and Nyströmformer.
PAPER_ACCURACY: dict[str, dict[str, float]] = {
    "listops": {"softmax": 37.10, "nystrom": 37.15},
    "text": {"softmax": 65.02, "nystrom": 65.52},
    "retrieval": {"softmax": 79.35, "nystrom": 79.56},
    "image": {"softmax": 38.20, "nystrom": 41.58},
    "pathfinder": {"softmax": 74.16, "nystrom": 70.94},
}
_TASK_NAMES = {
    "listops": "ListOps",
    "text": "Text (IMDB, bytes)",
    "retrieval": "Retrieval (ACL Anthology)",
    "image": "Image (CIFAR-10, grey pixels)",
    "pathfinder": "Pathfinder-32",
}


def _load(path: Path) -> dict[str, Any]:
    return read_json(path, f"{path} is missing: is {path.parent} a finished training run?")


def accuracy_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of an accuracy measured on ``n`` examples (95% for z = 1.96).

    ListOps' test split of 2,000 examples alone leaves an accuracy near 37% uncertain by about
    ±2.1 points at 95%, wider than the gaps between models in the paper's table; the interval
    says how far one run can be read.

    Args:
        accuracy: fraction correct, in [0, 1].
        n: number of examples (≥ 1).

    Returns:
        (low, high) as fractions.
    """
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {accuracy!r}")
    if n < 1:
        raise ValueError(f"n (the number of examples) must be at least 1, got {n!r}")
    z2n = z * z / n
    centre = (accuracy + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z2n / (4 * n)) / (1 + z2n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _test_examples(summary: dict[str, Any]) -> int | None:
    """The test split's size: recorded by the trainer, or (runs finished before it was) counted
    from the run's data directory; None if neither is available."""
    if summary.get("test_examples"):
        return int(summary["test_examples"])
    config = summary["config"]
    try:
        from .run import load_splits

        split = load_splits(
            config["task"], config["data_dir"], config["recipe"]["max_length"], ("test",)
        )["test"]
        return len(split)  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def command_line(run_config: dict[str, Any], run_dir: str | os.PathLike[str]) -> str:
    """The ``nystromer train`` command that trains ``run_config`` (a run's config.json) into
    ``run_dir``: the task, data and every recipe value that differs from the shipped recipe."""
    recipe = run_config["recipe"]
    task = run_config["task"]
    argv = ["nystromer", "train", task, "--data", str(run_config["data_dir"])]
    argv += ["--out", str(run_dir)]
    shipped = load_recipe(task).to_dict()
    for name, value in recipe.items():
        if name in ("task", "source") or shipped.get(name) == value:
            continue
        argv += [f"--{name.replace('_', '-')}", "none" if value is None else str(value)]
    return shlex.join(argv)


def _run_suffix(recipe: dict) -> str:
    """What tells runs of one task and attention apart in their headings: the seed, and
    attention dropout when it differs from the model's dropout."""
    parts = [f"seed {recipe.get('seed', 0)}"]
    attention_dropout = recipe.get("attention_dropout")
    if attention_dropout is not None and attention_dropout != recipe.get("dropout"):
        parts.append(f"attention dropout {attention_dropout:g}")
    return ", " + ", ".join(parts)


def results_markdown(run_dir: str | os.PathLike[str], image: str | None = None) -> str:
    """The section: command, machine, accuracy against the paper, validation table, curve."""
    from .._machine import machine_info, machine_label

    run = Path(run_dir)
    summary = _load(run / "summary.json")
    config = summary["config"]
    recipe, task = config["recipe"], config["task"]
    attention = recipe["attention"]
    paper = PAPER_ACCURACY[task]
    label = "Nyström attention" if attention == "nystrom" else "softmax attention"
    if attention == "nystrom":
        label += f" (m = {recipe['num_landmarks']}, conv skip {recipe['conv_kernel_size']})"
    hours = summary["wall_time_s"] / 3600
    test = 100 * summary["test_accuracy"]
    best_val = 100 * summary["best_val_accuracy"]
    ours_col = "Nyströmformer" if attention == "nystrom" else "Transformer"
    paper_ours = paper[attention]
    n_test = _test_examples(summary)
    if n_test is None:
        spread = ""
    else:
        low, high = accuracy_interval(summary["test_accuracy"], n_test)
        inside = "inside" if 100 * low <= paper_ours <= 100 * high else "outside"
        spread = (
            f" On {n_test:,} test examples the 95% interval of this accuracy (Wilson) is "
            f"{100 * low:.2f}–{100 * high:.2f}%; the paper's {paper_ours:.2f} lies {inside} it."
        )
    lines = [
        f"### {_TASK_NAMES[task]}: {label}{_run_suffix(recipe)}",
        "",
        f"Trained with `{command_line(config, run)}`; section written "
        f"{datetime.date.today().isoformat()} on {machine_label(machine_info())} (training may "
        "have used other threads or devices: see the text around this section).",
        "",
        "| test accuracy, % | this run | paper, Nyströmformer | paper, Transformer |",
        "|---|--:|--:|--:|",
        f"| {task} | **{test:.2f}** | {paper['nystrom']:.2f} | {paper['softmax']:.2f} |",
        "",
        f"{summary['steps']} steps of {recipe['batch_size']} examples in {hours:.2f} h of "
        "wall time (validation included; across resumes). Test accuracy of the best "
        f"validation checkpoint (step {summary['best_step']}, validation {best_val:.2f}%); "
        f"the paper's row to compare with is the {ours_col} column.{spread}",
        "",
        "| step | hours | train loss | train accuracy, % | validation accuracy, % |",
        "|--:|--:|--:|--:|--:|",
    ]
    for r in MetricsLog(run / "metrics.jsonl").records:
        if "val_accuracy" in r:
            lines.append(
                f"| {r['step']} | {r['elapsed_s'] / 3600:.2f} | {float(r['train_loss']):.4f} | "
                f"{100 * float(r['train_accuracy']):.2f} | {100 * float(r['val_accuracy']):.2f} |"
            )
    if image is not None:
        lines += ["", f"![validation accuracy against steps]({image})"]
    return "\n".join(lines)


def write_results(run_dir: str | os.PathLike[str], docs_file: str | os.PathLike[str]) -> Path:
    """Write the run's section into ``docs_file`` (replacing an earlier version of it) and its
    validation curve to ``<docs dir>/results/<run>_accuracy.png``. Returns the docs file.

    Raises:
        ValueError: the run has no ``summary.json`` (not finished).
    """
    run, docs = Path(run_dir), Path(docs_file)
    summary = _load(run / "summary.json")
    name = run.resolve().name
    image = None
    target = docs.parent / "results" / f"{name}_accuracy.png"
    try:
        task = summary["config"]["task"]
        attention = summary["config"]["recipe"]["attention"]
        plot_metrics(
            run / "metrics.jsonl",
            "val_accuracy",
            target,
            title=f"LRA {_TASK_NAMES[task]}: validation accuracy "
            f"(paper, test: {PAPER_ACCURACY[task][attention]:.2f}%)",
            ylabel="validation accuracy",
        )
        image = target.relative_to(docs.parent).as_posix()
    except ImportError:
        pass  # matplotlib is optional: the table has the numbers
    replace_section(
        docs,
        f"<!-- lra:{name}:begin (written by nystromer eval --write-docs) -->",
        f"<!-- lra:{name}:end -->",
        results_markdown(run, image),
        new_file="# Results\n",
    )
    return docs

"""``nystromer distill``: distil an exact pretrained encoder into its Nyström conversion.

Works under ``torchrun --nproc_per_node N -m nystromer distill ...`` like ``nystromer train``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields
from typing import Any

from .._args import file_to_write, flag, folder, given_flags, naming_flags
from ..train.cli import add_runtime_arguments, run_command, runtime_options
from ..train.loop import PRECISIONS
from .run import LAYERS, LOSSES, DistillConfig, read_run_config

__all__ = ["register"]


def _dropout(text: str) -> float | str:
    if text == "teacher":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a probability in [0, 1) or 'teacher', got {text!r}"
        ) from None


# DistillConfig fields given on the command line, as (type, help); a field's flag is its name
# with dashes for underscores (num_landmarks: --num-landmarks). None = keep the default (or,
# with --resume, the saved value).
_FLAGS: dict[str, tuple[Any, str]] = {
    "teacher": (
        str,
        "the pretrained exact-attention encoder's folder, with its tokenizer (BERT, RoBERTa, "
        "…: docs/models.md); required unless --resume",
    ),
    "num_landmarks": (int, "m, landmarks per head (64)"),
    "pinv_iterations": (int, "pseudo-inverse iterations (6)"),
    "kmeans_iterations": (
        int,
        "k-means iterations refining the landmarks; 0: the paper's segment means (3)",
    ),
    "conv_kernel_size": (int, "value convolution skip; 0: none (35)"),
    "calibrate": (
        int,
        "fit the convolution skip to exact attention on N training windows first; 0: no (16)",
    ),
    "calibrate_output": (
        float,
        "with --calibrate, also fit each attention output projection, shrunk towards the "
        "identity by MU; 0: no (0.3)",
    ),
    "max_length": (int, "tokens per window (512)"),
    "steps": (int, "optimiser steps (800)"),
    "batch_size": (int, "windows per step (4)"),
    "lr": (float, "peak learning rate (3e-5)"),
    "warmup_steps": (int, "warm-up steps (a tenth of --steps)"),
    "weight_decay": (float, "AdamW weight decay (0)"),
    "dropout": (
        _dropout,
        "dropout probability of the student while it trains, or 'teacher' for the "
        "teacher's own rates (0)",
    ),
    "eval_fraction": (float, "share of the text held out, a tail (0.1)"),
    "stride": (int, "tokens between training windows (half a window)"),
    "eval_every": (int, "validate every N steps (50)"),
    "seed": (int, "seed (0)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``distill`` sub-command."""
    p = subparsers.add_parser(
        "distill",
        help="train a pretrained encoder's Nyström conversion to match the exact model",
        description=(
            "Convert a pretrained encoder (BERT, RoBERTa, …; nystromer.convert) and train it to "
            "reproduce the exact model's hidden states on unlabeled text. Prints and saves the "
            "held-out cosine of mean-pooled embeddings before and after; the trained model is "
            "written to OUT/model."
        ),
    )
    p.add_argument("--out", type=folder, required=True, help="run directory")
    p.add_argument(
        "--text",
        nargs="+",
        dest="texts",
        metavar="FILE",
        help="UTF-8 text files, or builtin:pydoc / builtin:stdlib-docs (texts shipped with "
        "CPython: the reference manual's topics, the standard library's docstrings); required "
        "unless --resume",
    )
    for name, (typ, help_) in _FLAGS.items():
        p.add_argument(flag(name), dest=name, type=typ, help=help_)
    p.add_argument("--layers", choices=LAYERS, help="match all layers or the last one (all)")
    p.add_argument("--loss", choices=LOSSES, help="per-token loss on hidden states (cosine)")
    p.add_argument(
        "--precision", choices=[x for x in PRECISIONS if x != "fp16"], help="precision (fp32)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_runtime_arguments(p)
    p.add_argument(
        "--write-docs",
        type=file_to_write,
        metavar="FILE",
        help="when done, write the results section into FILE (e.g. docs/results.md); with "
        "--resume on a finished run, (re)writes it",
    )
    p.set_defaults(func=_distill)


def _config(args: argparse.Namespace) -> DistillConfig:
    given = {
        f.name: getattr(args, f.name)
        for f in fields(DistillConfig)
        if getattr(args, f.name, None) is not None
    }
    if given.get("dropout") == "teacher":
        given["dropout"] = None
    if given.get("calibrate_output") == 0:
        given["calibrate_output"] = None
    if given.get("conv_kernel_size") == 0:
        # No skip, and so nothing to calibrate unless asked (which then fails clearly).
        given["conv_kernel_size"] = None
        given.setdefault("calibrate", 0)
    if args.resume:
        saved = read_run_config(args.out)["distill"]
        return DistillConfig.from_dict({**saved, **given})
    missing = [
        flag for flag, name in (("--teacher", "teacher"), ("--text", "texts")) if name not in given
    ]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required (unless --resume)")
    return DistillConfig(**given)


def _given_flags(args: argparse.Namespace) -> dict[str, str]:
    """The settings given on the command line, by name, and their flags (``texts``, and
    ``text`` as read_texts says, are ``--text``)."""
    # (runtime_options' "progress" is --no-progress, which has no attribute of that name.)
    flags = given_flags(args, [*_FLAGS, "layers", "loss", "precision", *runtime_options(args)])
    if args.texts is not None:
        flags.update(text="--text", texts="--text")
    return flags


def _distill(args: argparse.Namespace) -> int:
    def work() -> dict[str, Any]:
        from .run import distill

        with naming_flags(_given_flags(args)):
            config = _config(args)
            return distill(config, args.out, resume=args.resume, **runtime_options(args))

    def report(result: dict[str, Any]) -> None:
        if result["status"] != "completed":
            print(f"paused at step {result['step']}; continue with --resume", file=sys.stderr)
            return
        fitted = result.get("cosine_calibrated")
        fitted = "" if fitted is None else f", convolution fitted {fitted:.4f}"
        print(
            f"held-out cosine to the exact model: before {result['cosine_before']:.4f}"
            f"{fitted}, after {result['cosine_after']:.4f} (best step {result['best_step']}, "
            f"{result['wall_time_s']:.0f} s); model in {args.out / 'model'}"
        )
        print(json.dumps(result))
        if args.write_docs is not None:
            from .report import write_results

            write_results(args.out, args.write_docs)
            print(f"wrote the results section of {args.write_docs}")

    return run_command(
        work,
        report,
        device=args.device,
        resume_command=f"nystromer distill --out {shlex.quote(str(args.out))} --resume",
    )

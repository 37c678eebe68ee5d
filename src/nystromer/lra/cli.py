"""``nystromer train`` and ``nystromer eval``: LRA runs from the command line.

Every recipe field has a flag (``--batch-size``, ``--attention``, ``--num-landmarks``, ...);
a nullable one is cleared with ``none``. Under ``torchrun --nproc_per_node N -m nystromer
train ...`` the run uses DistributedDataParallel (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from .._args import (
    call_with,
    existing_file,
    file_to_write,
    flag,
    folder,
    given_flags,
    int_at_least,
    naming_flags,
    torch_device,
)
from ..train import TrainResult
from ..train import checkpoint as ckpt
from ..train.cli import add_runtime_arguments, run_command, runtime_options
from ..train.loop import PRECISIONS
from .model import ATTENTIONS
from .recipes import FIELDS, TASKS, load_recipe

__all__ = ["register"]

_NOT_FLAGS = ("task", "source")
_CHOICES = {"attention": ATTENTIONS, "precision": PRECISIONS}


def _parser_for(typ: type, nullable: bool):
    def parse(text: str) -> Any:
        if nullable and text.lower() == "none":
            return "none"  # Recipe.with_overrides turns it into None
        return typ(text)

    parse.__name__ = typ.__name__  # argparse names the type in its error messages
    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``eval`` sub-commands."""
    p = subparsers.add_parser(
        "train",
        help="train an LRA classifier with the Nyströmformer paper's recipes",
        description="Train the authors' LRA model on one task. Flags override the recipe.",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("--data", type=Path, help="the task's data directory")
    p.add_argument("--out", type=folder, required=True, help="run directory (checkpoints, logs)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--recipe", type=existing_file, help="a recipe JSON file instead of the shipped one"
    )
    add_runtime_arguments(p)
    _add_loader_and_docs_args(
        p,
        "when the run completes, write its results section (test accuracy next to the "
        "paper's, curve, command) into FILE, e.g. docs/results.md",
    )
    group = p.add_argument_group("recipe overrides (default: the task's recipe)")
    for name, (typ, nullable) in FIELDS.items():
        if name in _NOT_FLAGS:
            continue
        group.add_argument(
            flag(name),
            dest=f"recipe_{name}",
            type=_parser_for(typ, nullable),
            choices=_CHOICES.get(name),
            metavar=None if name in _CHOICES else typ.__name__.upper(),
        )
    p.set_defaults(func=_train)

    e = subparsers.add_parser(
        "eval",
        help="evaluate a trained LRA run's checkpoint on a split",
        description="Evaluate a run's checkpoint (best by default) on a split.",
    )
    e.add_argument("run_dir", type=Path, help="the run directory (`nystromer train --out`)")
    e.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="(default: test)"
    )
    e.add_argument(
        "--checkpoint",
        default="best",
        choices=("best", "last"),
        help="the one with the best validation accuracy, or the last saved (default: best)",
    )
    e.add_argument("--data", type=Path, help="data directory (default: the one trained on)")
    e.add_argument("--batch-size", type=int_at_least(1), help="batch size (default: the recipe's)")
    e.add_argument("--max-batches", type=int_at_least(1), help="only the first N batches")
    e.add_argument(
        "--device",
        type=torch_device(auto=True),
        default="auto",
        help="auto, cpu, cuda, cuda:N, mps, ...",
    )
    e.add_argument("--precision", choices=PRECISIONS, help="(default: the recipe's)")
    _add_loader_and_docs_args(
        e, "also write the finished run's results section into FILE (e.g. docs/results.md)"
    )
    e.set_defaults(func=_eval)


def _add_loader_and_docs_args(p: argparse.ArgumentParser, write_docs_help: str) -> None:
    p.add_argument(
        "--num-workers", type=int_at_least(0), default=0, help="DataLoader worker processes"
    )
    p.add_argument("--write-docs", type=file_to_write, metavar="FILE", help=write_docs_help)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, f"recipe_{name}")
        for name in FIELDS
        if name not in _NOT_FLAGS and getattr(args, f"recipe_{name}") is not None
    }


def _given_flags(args: argparse.Namespace, names: list[str]) -> dict[str, str]:
    """The settings among ``names`` given on the command line, and ``data_dir`` if --data
    was, by name, with their flags (:func:`~nystromer._args.naming_flags`)."""
    flags = given_flags(args, names)
    if args.data is not None:
        flags["data_dir"] = "--data"
    return flags


def _train(args: argparse.Namespace) -> int:
    def work() -> TrainResult:
        from .run import read_run_config, saved_recipe, train_task

        # (runtime_options' "progress" is --no-progress, which has no attribute of that name.)
        flags = _given_flags(args, [*runtime_options(args), "num_workers"])
        flags.update((name, flag(name)) for name in _overrides(args))
        with naming_flags(flags):
            data = args.data
            if args.resume:
                saved = read_run_config(args.out)
                if saved["task"] != args.task:
                    raise ValueError(f"{args.out} is a {saved['task']} run, not {args.task}")
                recipe = saved_recipe(args.out, saved).with_overrides(**_overrides(args))
                if args.recipe is not None:
                    # The run's recipe is config.json's; a file that says otherwise is a mistake,
                    # not an override (a file that agrees is the original command repeated).
                    given = load_recipe(args.recipe, **_overrides(args)).to_dict()
                    differ = [
                        f"{k}: {v!r} → {given[k]!r}"
                        for k, v in recipe.to_dict().items()
                        if given[k] != v
                    ]
                    if differ:
                        raise ValueError(
                            f"--recipe {args.recipe} differs from the recipe of the run in "
                            f"{args.out} ({'; '.join(differ)}); resume without --recipe"
                        )
                data = data if data is not None else saved.get("data_dir")
            else:
                if ckpt.find(args.out, "last") is not None:
                    raise ValueError(
                        f"{args.out} already holds a run: add --resume or pick a new --out"
                    )
                recipe = load_recipe(args.recipe or args.task, **_overrides(args))
                if recipe.task != args.task:
                    raise ValueError(
                        f"--recipe: {args.recipe} is for {recipe.task}, not {args.task}"
                    )
            if data is None:
                raise ValueError("--data is required")
            runtime = {**runtime_options(args), "num_workers": args.num_workers}
            return train_task(recipe, data, args.out, resume=args.resume, **runtime)

    def report(result: TrainResult) -> int:
        if result.status != "completed":
            print(f"paused at step {result.step}; continue with --resume", file=sys.stderr)
            return 0
        keys = ("test_accuracy", "best_val_accuracy", "best_step", "steps", "wall_time_s")
        print(json.dumps({k: result.summary.get(k) for k in keys}))
        return _write_docs(args.out, args.write_docs)

    return run_command(
        work,
        report,
        device=args.device,
        resume_command=f"nystromer train {args.task} --out {shlex.quote(str(args.out))} --resume",
    )


def _eval(args: argparse.Namespace) -> int:
    def work() -> dict[str, Any]:
        from .run import evaluate_run

        with naming_flags(_given_flags(args, ["batch_size", "max_batches", "num_workers"])):
            return call_with(evaluate_run, args, data_dir=args.data)

    def report(out: dict[str, Any]) -> int:
        print(json.dumps(out))
        return _write_docs(args.run_dir, args.write_docs)

    return run_command(work, report, device=args.device)


def _write_docs(run_dir: Path, docs: Path | None) -> int:
    if docs is None:
        return 0
    from .report import write_results

    write_results(run_dir, docs)
    print(f"wrote the results section of {docs}")
    return 0

#!/usr/bin/env python
"""Micro-batch benchmark: one LRA recipe's training steps with its batch split into parts.

    python benchmarks/micro_batches.py                              # Pathfinder-32's recipe
    python benchmarks/micro_batches.py --task listops --parts 1,2,4
    python benchmarks/micro_batches.py --write-docs docs/benchmarks.md

``--micro-batches N`` (``TrainConfig.micro_batches``) splits every batch into N parts and
accumulates their gradients: the same update with a fraction of the activation memory. This
script runs ``nystromer.train.train`` for a few steps of the recipe's model on random tokens of
the recipe's length and batch, once per setting, the settings alternating round by round in
one process, and reports the median wall time per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from nystromer.bench.measure import emit_section, machine_info, machine_label, recorded_command
from nystromer.lra.model import build_model, classification_objective, collate
from nystromer.lra.recipes import load_recipe
from nystromer.train import TrainConfig, train

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
BEGIN = "<!-- micro-batches:begin (written by benchmarks/micro_batches.py) -->"
END = "<!-- micro-batches:end -->"


class RandomTokens(torch.utils.data.Dataset):
    """``count`` random examples of ``length`` tokens in [1, vocab) with labels: one sequence
    each, or a pair of sequences (retrieval's two documents) when ``pairs``."""

    def __init__(
        self, count: int, length: int, vocab: int, classes: int, *, pairs: bool = False
    ) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (count, 1 + pairs, length), generator=gen)
        self.labels = torch.randint(0, classes, (count,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return *self.ids[i].unbind(0), int(self.labels[i])


def seconds_per_step(
    task: str, parts: int, steps: int, batch_size: int | None = None, device: str = "cpu"
) -> float:
    """Wall seconds per step of a ``train`` run of ``steps`` steps (its set-up included),
    after an untimed run of one step."""
    recipe = load_recipe(task)
    batch = batch_size or recipe.batch_size
    cfg = recipe.model_config(vocab_size=257)
    data = RandomTokens(batch * steps, recipe.max_length, 257, cfg.num_classes, pairs=cfg.two_tower)
    torch.manual_seed(0)
    model = build_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in (("warm-up", 1), ("timed", steps)):
            config = TrainConfig(
                steps=n, batch_size=batch, micro_batches=parts, device=device, progress=False
            )
            t0 = time.perf_counter()
            run_dir = f"{tmp}/{name}"
            train(model, classification_objective, data, config, run_dir, collate_fn=collate)
            elapsed = time.perf_counter() - t0
    return elapsed / steps


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=TASKS, default="pathfinder")
    p.add_argument("--parts", default="1,2,4,8", help="micro-batch counts, comma-separated")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=3, help="runs per setting (median)")
    p.add_argument("--batch-size", type=int, help="instead of the recipe's")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--write-docs", metavar="FILE", help="write/replace the section in FILE")
    args = p.parse_args(argv)
    try:
        parts = [int(x) for x in args.parts.split(",")]
    except ValueError:
        parts = []
    if not parts or min(parts) < 1:
        p.error(f"--parts takes positive integers separated by commas, got {args.parts!r}")
    if args.steps < 1 or args.rounds < 1:
        p.error(f"--steps and --rounds must be ≥ 1, got {args.steps} and {args.rounds}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = recorded_command("benchmarks/micro_batches.py", argv, drop=())
    print(f"micro-batch benchmark: {command}", flush=True)
    times: dict[int, list[float]] = {k: [] for k in parts}
    for _ in range(args.rounds):
        for k in parts:
            times[k].append(
                seconds_per_step(args.task, k, args.steps, args.batch_size, args.device)
            )
    recipe = load_recipe(args.task)
    batch = args.batch_size or recipe.batch_size
    base = statistics.median(times[parts[0]])
    pair = "2 documents × " if args.task == "retrieval" else ""
    lines = [
        "## Micro-batches: one training step split into parts",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `{command}`.",
        f"Machine: {machine_label(machine_info(args.device))}.",
        "",
        f"The {args.task} recipe's model, batch {batch} × {pair}{recipe.max_length:,} random "
        "tokens, fp32: seconds per step of `nystromer.train.train` (forward, backward, "
        f"AdamW), median of {args.rounds} runs of {args.steps} steps per setting, the "
        "settings alternating.",
        "",
        f"| micro-batches | samples per part | s/step | speed-up over {parts[0]} |",
        "|--:|--:|--:|--:|",
    ]
    for k in parts:
        med = statistics.median(times[k])
        lines.append(f"| {k} | {-(-batch // k)} | {med:.2f} | {base / med:.2f} |")
    emit_section("\n".join(lines) + "\n", args.write_docs, BEGIN, END, "micro-batches")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What switching a trained TransMIL-style model from ``nystrom-attention`` to nystromer changes.

    python benchmarks/mil_switch.py --out runs/bench/mil_switch.json
    python benchmarks/mil_switch.py --dim 512 --landmarks 256 --steps 1000   # TransMIL's width

The model and the synthetic bags are ``examples/transmil.py``'s (a bag is positive when it holds
a few key instances). The model is trained with the package's ``NystromAttention``, then its
state dict is loaded with ``strict=True`` into the same model built on
``nystromer.compat.NystromAttention``, and the same evaluation bags (batch 1, as TransMIL runs)
go through three models: the package's, ours with ``numerics="lucidrains"`` and ours with the
default ``numerics="nystromer"``. For each bag size it reports, against the package: the
largest |Δlogit| (also relative to the largest |logit|), the fraction of bags whose predicted
class changes, and each model's accuracy. docs/mil.md shows a run.
"""

from __future__ import annotations

import argparse
import json
import runpy
import shlex
import sys
import time
from pathlib import Path

import torch

from nystromer._io import atomic_write
from nystromer._machine import machine_info
from nystromer.compat import NystromAttention

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "transmil.py"
VARIANTS = ("lucidrains", "nystromer")


def evaluate(package_model, ours, make_bags, sizes, bags_per_size, features, seed) -> list[dict]:
    """One row per bag size: the package's logits against ours in both numerics."""
    rows = []
    for n in sizes:
        generator = torch.Generator().manual_seed(seed + n)
        bags, labels, _ = make_bags(bags_per_size, n, features, generator)
        logits = {"package": [], **{v: [] for v in VARIANTS}}
        with torch.no_grad():
            for bag in bags:  # batch 1: the package's pinv scale is batch-wide
                logits["package"].append(package_model(bag[None]))
                for variant in VARIANTS:
                    for layer in ours.layers:
                        layer.attn.numerics = variant
                    logits[variant].append(ours(bag[None]))
        logits = {k: torch.cat(v) for k, v in logits.items()}
        reference = logits["package"]
        scale = reference.abs().max().item()
        row = {"n": n, "bags": bags_per_size, "accuracy": {}}
        for name, found in logits.items():
            row["accuracy"][name] = (found.argmax(-1) == labels).float().mean().item()
        for variant in VARIANTS:
            diff = (logits[variant] - reference).abs().max().item()
            changed = (logits[variant].argmax(-1) != reference.argmax(-1)).float().mean().item()
            row[variant] = {
                "max_abs_dlogit": diff,
                "max_rel_dlogit": diff / scale if scale else 0.0,
                "changed_predictions": changed,
            }
        rows.append(row)
    return rows


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from nystrom_attention import NystromAttention as PackageAttention

    torch.set_num_threads(args.threads)
    example = runpy.run_path(str(EXAMPLE))
    transmil = example["TransMIL"]
    torch.manual_seed(args.seed)
    package_model = transmil(
        args.features, args.dim, landmarks=args.landmarks, attention=PackageAttention
    )
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    losses = example["train"](
        package_model, args.steps, args.train_sizes, args.features, generator, batch=args.batch
    )
    train_s = time.perf_counter() - start
    package_model.eval()
    ours = transmil(args.features, args.dim, landmarks=args.landmarks, attention=NystromAttention)
    ours.load_state_dict(package_model.state_dict(), strict=True)
    ours.eval()
    rows = evaluate(
        package_model,
        ours,
        example["make_bags"],
        args.sizes,
        args.bags,
        args.features,
        args.seed + 1,
    )
    tail = losses[-min(50, len(losses)) :]
    return {
        "benchmark": "mil_switch",
        "command": shlex.join(["python", "benchmarks/mil_switch.py", *argv]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine_info("cpu", args.threads),
        "training": {
            "first_loss": losses[0],
            "mean_loss_last_50": sum(tail) / len(tail),
            "seconds": train_s,
        },
        "rows": rows,
    }


def table(report: dict) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| n | bags | accuracy: package / lucidrains / nystromer | lucidrains: max abs Δlogit "
        "(rel) | changed | nystromer: max abs Δlogit (rel) | changed |",
        "|---:|---:|---|---|---:|---|---:|",
    ]
    for row in report["rows"]:
        acc = row["accuracy"]
        cells = [str(row["n"]), str(row["bags"])]
        cells.append(" / ".join(f"{acc[k]:.2f}" for k in ("package", *VARIANTS)))
        for variant in VARIANTS:
            found = row[variant]
            cells.append(f"{found['max_abs_dlogit']:.2g} ({found['max_rel_dlogit']:.1e})")
            cells.append(f"{found['changed_predictions']:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1500, 3000, 10000])
    parser.add_argument("--bags", type=int, default=100, help="evaluation bags per size")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch", type=int, default=4, help="bags per training step")
    parser.add_argument(
        "--train-sizes", type=int, nargs=2, default=(32, 1024), metavar=("MIN", "MAX")
    )
    parser.add_argument("--dim", type=int, default=128, help="model width (TransMIL: 512)")
    parser.add_argument("--landmarks", type=int, default=64, help="m (TransMIL: 256)")
    parser.add_argument("--features", type=int, default=64, help="instance feature width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/mil_switch.json", help="the JSON report")
    args = parser.parse_args(argv)
    if args.dim < 8 or args.dim % 8:
        parser.error(f"--dim must be a positive multiple of 8, got {args.dim}")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    report = run(args, argv)
    with atomic_write(args.out) as f:
        json.dump(report, f, indent=2)
    print(table(report))
    print(f"written: {args.out}")
    return report


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What switching a trained TransMIL-style model from ``nystrom-attention`` to nystromer changes.

    python examples/transmil.py --attention nystrom-attention --threads 1 --save model.pt
    python benchmarks/mil_switch.py --model model.pt --out runs/bench/mil_switch.json

Per bag size, how a model that ``examples/transmil.py`` trained on the package (``--model``, the
file its ``--save`` wrote) changes when its weights run on ``nystromer.compat`` in both
numerics: logits, predictions and accuracy (docs/mil.md, "Measured: what switching a trained
model changes"). ``make bench-mil-switch`` runs both steps.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

import torch

from nystromer._io import atomic_write
from nystromer._machine import report_header
from nystromer.bench.measure import recorded_command
from nystromer.compat import NystromAttention

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "transmil.py"
VARIANTS = ("lucidrains", "nystromer")


def _share(hits: torch.Tensor) -> float:
    return hits.float().mean().item()


@torch.no_grad()
def evaluate(package_model, ours, make_bags, sizes, bags_per_size, features, seed) -> list[dict]:
    """One row per bag size: the package's logits against ours in both numerics."""
    rows = []
    for n in sizes:
        generator = torch.Generator().manual_seed(seed + n)
        bags, labels, _ = make_bags(bags_per_size, n, features, generator)
        logits = {"package": [], **{v: [] for v in VARIANTS}}
        for bag in bags:  # batch 1: the package's pinv scale is batch-wide
            logits["package"].append(package_model(bag[None]))
            for variant in VARIANTS:
                for layer in ours.layers:
                    layer.attn.numerics = variant
                logits[variant].append(ours(bag[None]))
        logits = {k: torch.cat(v) for k, v in logits.items()}
        reference = logits["package"]
        scale = reference.abs().max().item()
        accuracy = {k: _share(v.argmax(-1) == labels) for k, v in logits.items()}
        row = {"n": n, "bags": bags_per_size, "accuracy": accuracy}
        for variant in VARIANTS:
            diff = (logits[variant] - reference).abs().max().item()
            row[variant] = {
                "max_abs_dlogit": diff,
                "max_rel_dlogit": diff / scale if scale else 0.0,
                "changed_predictions": _share(logits[variant].argmax(-1) != reference.argmax(-1)),
            }
        rows.append(row)
    return rows


def run(args: argparse.Namespace, command: str) -> dict:
    from nystrom_attention import NystromAttention as PackageAttention

    torch.set_num_threads(args.threads)
    example = runpy.run_path(str(EXAMPLE))
    try:
        package, saved = example["load"](args.model, PackageAttention)
    except ValueError as error:
        raise SystemExit(f"mil_switch.py: error: --model: {error}") from None
    ours, _ = example["load"](args.model, NystromAttention)
    rows = evaluate(
        package, ours, example["make_bags"], args.sizes, args.bags, saved["settings"]["features"],
        args.seed + 1,
    )  # fmt: skip
    training = saved["training"]
    losses = training.pop("losses")
    tail = losses[-50:]
    training |= {"first_loss": losses[0], "mean_loss_last_50": sum(tail) / len(tail)}
    return report_header("mil_switch", command, "cpu", args.threads) | {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": saved["settings"],
        "training": training,
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
        cells = [str(row["n"]), str(row["bags"])]
        cells.append(" / ".join(f"{row['accuracy'][k]:.2f}" for k in ("package", *VARIANTS)))
        for found in (row[v] for v in VARIANTS):
            cells.append(f"{found['max_abs_dlogit']:.2g} ({found['max_rel_dlogit']:.1e})")
            cells.append(f"{found['changed_predictions']:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--model", required=True, help="the file python examples/transmil.py --save wrote")
    add("--sizes", type=int, nargs="+", default=[100, 300, 1500, 3000, 10000], help="bag sizes")
    add("--bags", type=int, default=100, help="evaluation bags per size")
    add("--seed", type=int, default=0, help="the evaluation bags are drawn with seed + 1 + n")
    add("--threads", type=int, default=1)
    add("--out", default="runs/bench/mil_switch.json", help="the JSON report")
    args = p.parse_args(argv)
    if not Path(args.model).is_file():
        p.error(f"--model {args.model}: no such file (write one with examples/transmil.py --save)")
    report = run(args, recorded_command(["python", "benchmarks/mil_switch.py"], argv, drop=()))
    with atomic_write(args.out) as f:
        json.dump(report, f, indent=2)
    print(f"{table(report)}\nwritten: {args.out}")
    return report


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Convolution skip benchmark: torch's depthwise convolution vs our banded form.

    python benchmarks/conv_skip.py
    python benchmarks/conv_skip.py --write-docs docs/benchmarks.md

The paper's skip convolves each head's values along the sequence with k taps
(``nn.Conv2d(H, H, (k, 1), groups=H)``). ``value_conv_skip`` computes it as three products
with banded blocks (``nystromer.attention.banded_sequence_conv``). This script times both on
the layers our users run, head-split values as a model hands them, alternating call by call in
one process; gives each one's error in the kernel's gradient against float64; and times a
whole ListOps training step of the recipe's model with either form. Forward runs without
autograd; forward+backward back-propagates to the values and the kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F

from nystromer.attention import banded_sequence_conv
from nystromer.bench.measure import (
    emit_section,
    machine_info,
    machine_label,
    recorded_command,
    time_alternating,
)

BEGIN = "<!-- conv-skip:begin (written by benchmarks/conv_skip.py) -->"
END = "<!-- conv-skip:end -->"
#: (name, batch, n, heads, head_dim); k comes from --kernel-size.
CASES = (
    ("LRA ListOps layer (recipe)", 32, 2000, 2, 32),
    ("all-MiniLM-L6-v2 layer, 512 tokens", 4, 512, 12, 32),
    ("attention-core size", 1, 16384, 8, 64),
)
FORMS = ("torch conv2d", "banded")


def torch_conv(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    k = weight.shape[2]
    return F.conv2d(value, weight, padding=(k // 2, 0), groups=value.shape[1])


def _forms() -> dict[str, Callable]:
    return {"torch conv2d": torch_conv, "banded": banded_sequence_conv}


def _inputs(batch: int, n: int, heads: int, d: int, k: int, dtype=torch.float32):
    # Drawn in float64 and rounded, so that every dtype gets the same numbers.
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(batch, n, heads, d, generator=gen, dtype=torch.float64)
    weight = 0.1 * torch.randn(heads, 1, k, 1, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, n, heads, d, generator=gen, dtype=torch.float64)
    value, weight, grad = (t.to(dtype) for t in (value, weight, grad))
    return value.transpose(1, 2), weight, grad.transpose(1, 2)


def weight_grad_error(batch: int, n: int, heads: int, d: int, k: int) -> dict[str, float]:
    """Max error of each form's float32 kernel gradient, relative to the largest entry of the
    float64 gradient (torch's convolution in float64)."""

    def weight_grad(conv, dtype):
        value, weight, grad = _inputs(batch, n, heads, d, k, dtype)
        weight.requires_grad_(True)
        conv(value, weight).backward(grad)
        return weight.grad.double()

    exact = weight_grad(torch_conv, torch.float64)
    scale = exact.abs().max().item()
    return {
        form: (weight_grad(conv, torch.float32) - exact).abs().max().item() / scale
        for form, conv in _forms().items()
    }


def time_case(batch: int, n: int, heads: int, d: int, k: int, repeats: int) -> dict:
    """Milliseconds per call: ``{form: {"forward": [...], "forward_backward": [...]}}``."""
    value, weight, grad = _inputs(batch, n, heads, d, k)
    value.requires_grad_(True)
    weight.requires_grad_(True)

    def forward(conv):
        with torch.no_grad():
            conv(value, weight)

    def forward_backward(conv):
        value.grad = weight.grad = None
        conv(value, weight).backward(grad)

    tasks = {"forward": forward, "forward_backward": forward_backward}
    return time_alternating(tasks, _forms(), repeats)


def time_listops_steps(repeats: int, batch: int = 32, length: int = 2000) -> dict[str, list]:
    """Seconds per training step (forward, backward, AdamW) of the ListOps recipe's model on
    random tokens, with the skip computed by torch's convolution or by the banded form,
    alternating step by step."""
    from nystromer.lra.model import build_model
    from nystromer.lra.recipes import load_recipe

    cfg = load_recipe("listops").model_config(vocab_size=20)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(1, 20, (batch, length), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, cfg.num_classes, (batch,))

    def step():
        loss = F.cross_entropy(model(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    # torch's convolution: value_conv_skip falls back to the layer itself when the layer is
    # not the paper's one, which is what patching the check pretends.
    def using(form: str):
        if form == "banded":
            return contextlib.nullcontext()
        return mock.patch("nystromer.attention._is_value_conv", return_value=False)

    times: dict[str, list] = {form: [] for form in FORMS}
    for _ in range(repeats + 1):  # the first round warms up
        for form in FORMS:
            with using(form):
                t0 = time.perf_counter()
                step()
                times[form].append(time.perf_counter() - t0)
    return {form: t[1:] for form, t in times.items()}


def render(results: list, errors: list, steps: dict | None, command: str, label: str, args) -> str:
    lines = [
        "## Convolution skip: torch's depthwise convolution vs the banded form",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `{command}`.",
        f"Machine: {label}.",
        "",
        f"k = {args.kernel_size}, float32, head-split values; median of {args.repeats} calls per "
        "form, the forms alternating in one process. Forward without autograd; forward+backward "
        "to the values and the kernel. Kernel-gradient error: max |float32 − float64| over the "
        "largest float64 entry.",
        "",
        "| layer (B, n, H, d) | torch fwd ms | banded fwd ms | torch fwd+bwd ms "
        "| banded fwd+bwd ms | fwd+bwd speed-up | torch kernel-grad error "
        "| banded kernel-grad error |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for (name, b, n, h, d), times, err in zip(args.cases, results, errors, strict=True):
        med = {f: {t: statistics.median(v) for t, v in times[f].items()} for f in FORMS}
        torch_, banded = med["torch conv2d"], med["banded"]
        lines.append(
            f"| {name} ({b}, {n:,}, {h}, {d}) | {torch_['forward']:,.1f} | "
            f"{banded['forward']:,.1f} | {torch_['forward_backward']:,.1f} | "
            f"{banded['forward_backward']:,.1f} | "
            f"{torch_['forward_backward'] / banded['forward_backward']:.2f}× | "
            f"{err['torch conv2d']:.1e} | {err['banded']:.1e} |"
        )
    if steps is not None:
        med = {f: statistics.median(v) for f, v in steps.items()}
        lines += [
            "",
            f"A whole ListOps training step (the recipe's model, batch 32 × 2,000 random tokens, "
            f"forward, backward and AdamW; median of {len(steps['banded'])} steps per form, "
            f"alternating): **{med['torch conv2d']:.2f} s with torch's convolution, "
            f"{med['banded']:.2f} s with the banded form** "
            f"({med['torch conv2d'] / med['banded']:.2f}×).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel-size", type=int, default=35, help="k, odd (the paper's: 35)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per form (median)")
    p.add_argument("--steps", type=int, default=3, help="ListOps steps per form (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument(
        "--case",
        action="append",
        metavar="B,N,H,D",
        help="time this layer instead of the built-in ones (repeatable)",
    )
    p.add_argument("--write-docs", metavar="FILE", help="write/replace the section in FILE")
    args = p.parse_args(argv)
    if args.kernel_size < 1 or args.kernel_size % 2 == 0:
        p.error(f"--kernel-size must be an odd integer ≥ 1, got {args.kernel_size}")
    if args.repeats < 1 or args.steps < 0:
        p.error(f"--repeats must be ≥ 1 and --steps ≥ 0, got {args.repeats} and {args.steps}")
    args.cases = list(CASES)
    if args.case:
        try:
            sizes = [tuple(int(x) for x in c.split(",")) for c in args.case]
        except ValueError:
            sizes = [()]
        if any(len(s) != 4 or min(s) < 1 for s in sizes):
            p.error(f"--case takes four positive integers B,N,H,D, got {args.case}")
        args.cases = [("custom", *s) for s in sizes]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = recorded_command("benchmarks/conv_skip.py", argv, drop=())
    print(f"convolution skip benchmark: {command}", flush=True)
    k = args.kernel_size
    results, errors = [], []
    for name, b, n, h, d in args.cases:
        results.append(time_case(b, n, h, d, k, args.repeats))
        errors.append(weight_grad_error(b, n, h, d, k))
        print(f"  {name}: done", flush=True)
    steps = time_listops_steps(args.steps) if args.steps else None
    markdown = render(results, errors, steps, command, machine_label(machine_info()), args)
    emit_section(markdown, args.write_docs, BEGIN, END, "conv-skip")
    return 0


if __name__ == "__main__":
    sys.exit(main())

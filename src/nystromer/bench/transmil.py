"""``nystromer bench transmil``: :class:`nystromer.compat.NystromAttention` against the
``nystrom-attention`` package's layer, same weights, at the shape TransMIL uses, n = 2,000 …
100,000: forward, forward+backward and class-token heatmap time and peak memory, each in fresh
worker processes (this module is the worker, ``--worker``). What each measurement calls is
written out in the section it renders (docs/benchmarks.md, "TransMIL layer").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from math import ceil
from pathlib import Path

import torch
from torch import Tensor, nn

from .._args import (
    add_list_option,
    call_with,
    folder,
    int_at_least,
    int_list,
    odd_kernel_or_zero,
    positive_number,
)
from .._io import atomic_path, atomic_write
from .._machine import report_header
from .._markdown import replace_section, table
from .cli import _dtype, add_script_args, spelled_command
from .implementations import AttentionConfig, AttentionRunner, Implementation
from .measure import CaseSpec, fmt, measure_case
from .pretrained import ratio, ratio_text, read_report, reading_report, registered

__all__ = [
    "BEGIN",
    "END",
    "LAYERS",
    "TRANSMIL_LENGTHS",
    "LayerOptions",
    "format_section",
    "registered_layers",
    "run_transmil",
    "write_outputs",
]

BEGIN = "<!-- transmil:begin (written by nystromer bench transmil) -->"
END = "<!-- transmil:end -->"
TRANSMIL_LENGTHS = (2000, 5000, 8000, 20000, 50000, 100000)
#: Table label → the Python module its layer comes from.
LAYERS = {"nystrom-attention": "nystrom_attention", "nystromer": "nystromer.compat"}
#: What is measured per layer: the registry name's suffix, whether it has a backward.
MODES = {"layer": True, "heatmap": False, "map": False}
#: The package's mode that each mode is compared with (it has no ``map``).
_PACKAGE_MODE = {"layer": "layer", "heatmap": "heatmap", "map": "heatmap"}
_TITLE = "TransMIL layer: nystromer.compat against nystrom-attention"


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """What a :class:`~nystromer.bench.measure.CaseSpec` cannot carry about the layer: its input
    and output width ``dim``, ``conv_kernel`` (odd; 0: no convolution skip), and
    ``package_heatmap_limit_gb``: the package's dense (B, H, n_pad, n_pad) float32 heatmap is
    skipped where it alone would exceed this many GB."""

    dim: int = 512
    conv_kernel: int = 33
    package_heatmap_limit_gb: float = 4.0


def _registry_name(label: str, mode: str) -> str:
    return f"transmil-{label}-{mode}"


@dataclasses.dataclass
class _LayerRunner(AttentionRunner):
    """A layer as a runner: ``run(x)``, x (B, n, dim), is its forward or class-token heatmap."""

    layer: nn.Module
    dim: int
    mode: str
    package: bool
    seed: int
    grad_args = (0,)

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple:
        # The layer's input is x, not the q, k, v the measurement generates (their shape only).
        b, _, n, _ = q.shape
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(b, n, self.dim, generator=gen).to(device=q.device, dtype=q.dtype)
        return (x,)

    def output_shape(self, batch: int, heads: int, seq_len: int, head_dim: int) -> tuple:
        return (batch, seq_len, self.dim)

    def run(self, x: Tensor) -> Tensor:
        if self.mode == "layer":
            return self.layer(x)
        if self.mode == "map":
            return self.layer.attention_map(x)[:, :, 0]
        _, attn = self.layer(x, return_attn=True)
        if not self.package:
            return attn[:, :, 0]
        # The package's matrix has the front padding's rows and columns too.
        pad = attn.shape[-1] - x.shape[1]
        return attn[:, :, pad, pad:]


def _build(config: AttentionConfig, options: LayerOptions, label: str, mode: str, seed: int):
    """The layer ``label`` with the package layer's initial weights for ``seed``."""
    kwargs = dict(
        dim=options.dim,
        dim_head=config.head_dim,
        heads=config.heads,
        num_landmarks=config.num_landmarks,
        pinv_iterations=config.pinv_iterations,
        residual=options.conv_kernel > 0,
        residual_conv_kernel=max(options.conv_kernel, 1),
    )
    from nystrom_attention import NystromAttention as PackageAttention

    from ..compat import NystromAttention

    torch.manual_seed(seed)
    layer = package = PackageAttention(**kwargs)
    if label == "nystromer":
        layer = NystromAttention(**kwargs)
        layer.load_state_dict(package.state_dict(), strict=True)
    layer = layer.to(device=config.device, dtype=config.dtype).eval()
    return _LayerRunner(layer, options.dim, mode, label != "nystromer", seed)


def _supports(options: LayerOptions, label: str, mode: str, config: AttentionConfig, padded):
    """Why ``label`` in ``mode`` is not measured at ``config``; None where it is."""
    if padded:
        return "this benchmark has no mask"
    if label == "nystrom-attention" and mode == "map":
        return "the package has no heatmap without its forward"
    if label == "nystrom-attention" and mode == "heatmap":
        # The package's (1, H, n_pad, n_pad) float32 matrix (batch 1), n front-padded to m's.
        n_pad = ceil(config.seq_len / config.num_landmarks) * config.num_landmarks
        need = config.heads * n_pad * n_pad * 4 / 1e9
        if need > options.package_heatmap_limit_gb:
            return f"skipped (n×n would need {need:.1f} GB)"
    return None


def registered_layers(options: LayerOptions, seed: int = 0):
    """A context manager: within its block each layer in each mode is in the registry; the
    registry is restored after (a test keeps its own)."""
    return registered(
        *(
            Implementation(
                name=_registry_name(label, mode),
                description=f"{module}.NystromAttention, {mode}",
                build=functools.partial(_build, options=options, label=label, mode=mode, seed=seed),
                # Ours loads the package's weights: both need it.
                requires=("nystrom_attention",),
                supports=functools.partial(_supports, options, label, mode),
                is_peer=label != "nystromer",
            )
            for label, module in LAYERS.items()
            for mode in MODES
        )
    )


# --- measuring ----------------------------------------------------------------------------------


def _worker_main(argv: list[str]) -> int:
    """``--worker OPTIONS_JSON SPEC_JSON TASKS``: :mod:`.worker` with the layers registered."""
    from .worker import measure_and_report

    raw = json.loads(argv[0])
    seed = raw.pop("seed")
    with registered_layers(LayerOptions(**raw), seed):
        return measure_and_report(argv[1], argv[2])


def run_transmil(
    base: CaseSpec,
    options: LayerOptions,
    *,
    lengths: list[int],
    timeout: float | None = None,
    command: str = "",
    progress: Callable[[str], None] = print,
) -> dict:
    """Measure both layers at every n of ``lengths``; returns what ``transmil.json`` holds.

    ``base`` holds the shape and measurement settings; its implementation and n are replaced
    per case. Each row has ``seq_len``, per label of :data:`LAYERS` the
    :class:`~nystromer.bench.measure.CaseResult` dicts (without the spec) of each mode of
    :data:`MODES`, and ``ratios``: package ÷ ours per metric, ``map`` against the package's
    heatmap (None where either is missing).
    """
    payload = json.dumps(dataclasses.asdict(options) | {"seed": base.seed})
    worker = [sys.executable, "-m", "nystromer.bench.transmil", "--worker", payload]
    rows = []
    threads = base.threads
    with registered_layers(options, base.seed):
        for n in lengths:
            row: dict = {"seq_len": n}
            for label in LAYERS:
                row[label] = {}
                for mode, backward in MODES.items():
                    spec = dataclasses.replace(base, impl=_registry_name(label, mode), seq_len=n)
                    progress(f"n = {n:,}: {label} {mode} ...")
                    result = measure_case(spec, backward=backward, timeout=timeout, worker=worker)
                    threads = threads or result.threads
                    progress(f"n = {n:,}: {label} {mode}: {result.summary()}")
                    row[label][mode] = {k: v for k, v in result.to_dict().items() if k != "spec"}
            row["ratios"] = {
                f"{mode}_{metric}": ratio(
                    row["nystrom-attention"][_PACKAGE_MODE[mode]][metric],
                    row["nystromer"][mode][metric],
                )
                for mode, metric in _METRIC_COLUMNS
            }
            rows.append(row)
    # The shape and measurement settings: what a case holds but its implementation, n and mask.
    per_case = ("impl", "seq_len", "padding")
    settings = {k: v for k, v in dataclasses.asdict(base).items() if k not in per_case}
    return report_header("transmil", command, base.device, threads) | {
        "settings": settings | dataclasses.asdict(options),
        "lengths": list(lengths),
        "rows": rows,
    }


# --- report -------------------------------------------------------------------------------------

#: Per column group: its name in the tables and in the plot, the mode and the pass measured
#: (the heatmaps have a forward only).
_GROUPS = (
    ("fwd", "forward", "layer", "forward"),
    ("fwd+bwd", "forward+backward", "layer", "backward"),
    ("heatmap", "heatmap", "heatmap", "forward"),
    ("alone", "heatmap alone", "map", "forward"),
)
#: (mode, CaseResult attribute) per column: the groups' times, then their peaks.
_METRIC_COLUMNS = tuple(
    (mode, f"{what}_{unit}") for unit in ("ms", "peak_mib") for *_, mode, what in _GROUPS
)


def _table(report: dict, columns: tuple, unit: str) -> list[str]:
    header = ["n"]
    for name, *_ in _GROUPS:
        header += [f"{name} package {unit}", f"{name} ours {unit}", f"{name} ÷"]
    rows = []
    for row in report["rows"]:
        cells = [f"{row['seq_len']:,}"]
        for mode, metric in columns:
            package, ours = row["nystrom-attention"][mode], row["nystromer"][mode]
            cells += ["—" if mode == "map" else _cell(package, metric), _cell(ours, metric)]
            cells.append(ratio_text(row["ratios"][f"{mode}_{metric}"], ".1f"))
        rows.append(cells)
    return table(header, rows, left=0)


def _cell(result: dict, metric: str) -> str:
    if result["status"] != "ok":
        return result["status"]  # skipped, oom or failed
    return fmt(result[metric], ",.0f" if (result[metric] or 0) >= 100 else ",.1f")


def format_section(report: dict) -> str:
    """The Markdown section: title, command, date, machine, the time and memory tables, what
    was measured and anything not measured."""
    s = report["settings"]
    kernel = s["conv_kernel"]
    lines = [
        f"## {_TITLE}",
        "",
        f"Measured {report['date']} with `{report['command']}`.",
        f"Machine: {report['machine_label']}.",
        "",
        f"One attention layer as TransMIL builds it: `NystromAttention(dim={s['dim']}, "
        f"dim_head={s['head_dim']}, heads={s['heads']}, num_landmarks={s['num_landmarks']}, "
        f"pinv_iterations={s['pinv_iterations']}, residual={kernel > 0}"
        + (f", residual_conv_kernel={kernel}" if kernel else "")
        + f")`, batch {s['batch']}, no mask, {s['dtype']}, {s['device']}; the package's "
        "layer (`nystrom_attention`) and ours (`nystromer.compat`, default numerics) with the "
        "same weights (the package's state dict, loaded with `strict=True`). Forward: "
        "`layer(x)` without autograd; forward+backward: back to x and every parameter; "
        "heatmap: `out, attn = layer(x, return_attn=True)` then the class token's row for every "
        "head, `attn[:, :, 0]` (the package: `attn[:, :, pad, pad:]` of its front-padded "
        "matrix), without autograd; heatmap alone: ours only, `layer.attention_map(x)[:, :, 0]`, "
        "the same row without the layer's output (the package has none; ÷ against its "
        f"heatmap). Times: median of {s['repeats']} calls after "
        f"{s['warmup']} warm-up; peak memory: resident memory above the layer and its input, "
        "each in a fresh process. ÷ is the package's value over ours.",
        "",
        "Time (ms):",
        "",
        *_table(report, _METRIC_COLUMNS[: len(_GROUPS)], "ms"),
        "",
        "Peak memory (MiB):",
        "",
        *_table(report, _METRIC_COLUMNS[len(_GROUPS) :], "MiB"),
    ]
    notes = []
    for row in report["rows"]:
        for label in LAYERS:
            for mode in MODES:
                found = row[label][mode]
                if found["status"] != "ok" and (label, mode) != ("nystrom-attention", "map"):
                    notes.append(f"n = {row['seq_len']:,}, {label} {mode}: {found['note']}")
    if notes:
        lines += ["", "Not measured: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(_GROUPS), 8.5))
    axes = fig.subplots(2, len(_GROUPS))
    titles = [title for _, title, *_ in _GROUPS] * 2
    for ax, (mode, metric), title in zip(axes.flat, _METRIC_COLUMNS, titles, strict=True):
        for label in LAYERS:
            pts = [
                (row["seq_len"], row[label][mode][metric])
                for row in report["rows"]
                if row[label][mode][metric] is not None
            ]
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xlabel("bag size n")
        ax.set_ylabel("time (ms)" if metric.endswith("_ms") else "peak memory (MiB)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{_TITLE}\n{report['machine_label']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_outputs(report: dict, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``transmil.json``, ``transmil.md`` and ``transmil.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "transmil.json", out / "transmil.md", out / "transmil.png"]
    with atomic_write(written[0]) as f:
        json.dump(report, f, indent=2)
    with atomic_write(written[1]) as f:
        f.write(format_section(report) + "\n")
    _plot(report, written[2])
    return written


def write_docs_section(path: str | os.PathLike[str], report: dict, plot: Path) -> Path:
    """Write the section between the markers of ``path`` and copy the plot beside it to
    ``bench/transmil.png``; returns where the plot went."""
    image = Path(path).parent / "bench" / "transmil.png"
    with atomic_path(image) as tmp:
        shutil.copyfile(plot, tmp)
    section = format_section(report) + "\n\n![TransMIL layer](bench/transmil.png)\n"
    replace_section(path, BEGIN, END, section, new_file="# Benchmarks\n")
    return image


# --- command line -------------------------------------------------------------------------------


#: The options the recorded command spells out (not where copies go), in its order.
_SPELLED = (
    "lengths dim heads dim_head num_landmarks pinv_iterations conv_kernel batch dtype device "
    "threads repeats warmup package_heatmap_limit_gb"
)


def _command(args: argparse.Namespace) -> str:
    return shlex.join(spelled_command(["nystromer", "bench", "transmil"], args, _SPELLED))


def _run(args: argparse.Namespace) -> int:
    if args.from_json:
        report = read_report(args.from_json, "transmil")
    else:
        # Each case names its layer; the shape and settings are the options of the same names.
        base = call_with(CaseSpec, args, impl="exact", head_dim=args.dim_head)
        options = call_with(LayerOptions, args)
        report = call_with(run_transmil, args, base, options, command=_command(args))
    with reading_report(args.from_json):
        print(f"\n{format_section(report)}\n")
        written = write_outputs(report, args.out)
        if args.write_docs:
            written.append(write_docs_section(args.write_docs, report, written[2]))
            written.append(Path(args.write_docs))
    for path in written:
        print(f"wrote {path}")
    return 0


def register(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``nystromer bench transmil``."""
    p = bench_sub.add_parser(
        "transmil",
        help="TransMIL's attention layer: nystromer.compat against nystrom-attention",
        description="Forward, forward+backward and class-token heatmap time and peak memory "
        "(fresh process per measurement) of nystromer.compat.NystromAttention and the "
        "nystrom-attention package's layer with the same weights, at TransMIL's layer shape; "
        "writes transmil.json, transmil.md and transmil.png.",
    )
    add_script_args(p, repeats=3, timeout=1800, saved="FILE (a transmil.json)")
    p.set_defaults(func=_run, num_landmarks=256)
    add_list_option(p, "--lengths", int_list, TRANSMIL_LENGTHS, "n")
    p.add_argument("--dim", type=int_at_least(1), default=512)
    p.add_argument("--heads", type=int_at_least(1), default=8)
    p.add_argument("--dim-head", type=int_at_least(1), default=64)
    p.add_argument(
        "--conv-kernel",
        type=odd_kernel_or_zero,
        default=33,
        help="odd kernel size of the convolution skip; 0: none (default: 33)",
    )
    p.add_argument("--dtype", type=_dtype, default="float32", help="float32, bfloat16, ...")
    p.add_argument(
        "--package-heatmap-limit-gb", type=positive_number, default=4.0,
        help="skip the package's dense heatmap where its n×n matrix would exceed this",
    )  # fmt: skip
    p.add_argument(
        "--out",
        type=folder,
        default=Path("bench-out") / "transmil",
        help="output folder (%(default)s)",
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker_main(sys.argv[2:]))
    print("run `nystromer bench transmil` (this module is also its worker)", file=sys.stderr)
    sys.exit(2)

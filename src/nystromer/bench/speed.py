"""``nystromer bench speed`` and ``bench table``: time and peak memory against n, fitted scaling
exponents, the crossover with exact attention, the paper's Table 1 form. docs/benchmarks.md
says what they measure and write.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from .._io import atomic_path, atomic_write
from .._machine import machine_info, machine_label
from .._markdown import table
from .measure import METRICS, CaseResult, CaseSpec, fmt, measure_case

__all__ = [
    "SPEED_LENGTHS",
    "SPEED_IMPLEMENTATIONS",
    "run_speed",
    "scaling_exponent",
    "crossover",
    "write_speed_outputs",
    "format_speed",
    "PAPER_TABLE1",
    "TABLE1_LENGTHS",
    "format_table1",
]

SPEED_LENGTHS = tuple(512 * 2**i for i in range(8))  # 512 … 65,536
SPEED_IMPLEMENTATIONS = ("nystromer", "naive", "exact", "nystrom-attention", "transformers")
TABLE1_LENGTHS = (512, 1024, 2048, 4096, 8192)
#: Xiong et al. (2021), Table 1, per instance on a 1080Ti: n → ((Transformer MB, ms),
#: (Nyströmformer m = 64 MB, ms)).
PAPER_TABLE1 = {
    512: ((54, 0.8), (35, 0.7)),
    1024: ((186, 2.4), (63, 1.3)),
    2048: ((685, 10.0), (118, 2.7)),
    4096: ((2620, 32.9), (229, 5.9)),
    8192: ((10233, 155.4), (450, 12.3)),
}
#: Column names of the metrics, and their (forward, forward+backward) pairs per quantity.
_METRIC_NAMES = dict(
    zip(METRICS, ("fwd time", "fwd+bwd time", "fwd memory", "fwd+bwd memory"), strict=True)
)
_QUANTITIES = {"time (ms)": METRICS[:2], "peak memory (MiB)": METRICS[2:]}


def scaling_exponent(lengths: Sequence[int], values: Sequence[float | None]) -> float | None:
    """Least-squares slope of log(value) against log(n) over the larger half of the measured
    points (small n are dominated by fixed per-call costs); None with fewer than two points."""
    pts = sorted((n, v) for n, v in zip(lengths, values, strict=True) if v is not None and v > 0)
    if len(pts) < 2:
        return None
    pts = pts[len(pts) // 2 :] if len(pts) >= 4 else pts
    fit = statistics.linear_regression([math.log(n) for n, _ in pts], [math.log(v) for _, v in pts])
    return fit.slope


def crossover(
    lengths: Sequence[int], ours: Sequence[float | None], exact: Sequence[float | None]
) -> int | None:
    """The smallest n from which ``ours`` < ``exact`` at every larger n measured for both."""
    found = None
    for n, a, b in reversed(list(zip(lengths, ours, exact, strict=True))):
        if a is not None and b is not None:
            if a >= b:
                break
            found = n
    return found


def run_speed(
    base: CaseSpec,
    *,
    lengths: Sequence[int] = SPEED_LENGTHS,
    implementations: Sequence[str] = SPEED_IMPLEMENTATIONS,
    backward: bool = True,
    max_seconds: float = 10.0,
    timeout: float | None = 1800,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Measure every implementation (registry names) over ``lengths`` on ``base``'s problem
    (its ``impl`` and ``seq_len`` are replaced), forward and with ``backward`` forward+backward
    too; an implementation's sweep stops after a forward slower than ``max_seconds`` or out of
    memory. ``timeout`` is per worker process; ``progress`` gets one line per measurement
    (None: silent). Returns the report: settings, machine, each case's result, the curves per
    metric, their fitted exponents and the crossover with exact attention."""
    say = progress or (lambda _line: None)
    lengths = sorted(lengths)
    # Every case up front: an unknown implementation fails before anything is measured.
    cases = {
        impl: [dataclasses.replace(base, impl=impl, seq_len=n) for n in lengths]
        for impl in implementations
    }
    results: dict[str, list[CaseResult]] = {}
    for impl, specs in cases.items():
        results[impl], stop = [], None
        for n, spec in zip(lengths, specs, strict=True):
            if stop is not None:
                r = CaseResult(spec, status="skipped", note=stop)
            else:
                r = measure_case(spec, backward=backward, timeout=timeout)
                if r.status == "oom":
                    stop = f"stopped: out of memory at n = {n}"
                elif r.status == "ok" and r.forward_ms / 1e3 > max_seconds:
                    stop = f"stopped: forward took {r.forward_ms / 1e3:.1f} s at n = {n}"
            results[impl].append(r)
            say(f"  {impl:<18} n = {n:>6}: {r.summary()}")
    curves = {
        impl: {m: [getattr(r, m) if r.status == "ok" else None for r in rs] for m in METRICS}
        for impl, rs in results.items()
    }
    ours, exact = curves.get("nystromer"), curves.get("exact")
    cross = {m: crossover(lengths, ours[m], exact[m]) for m in METRICS[:2] if ours and exact}
    info = machine_info(base.device, base.threads)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "base": dataclasses.asdict(base),
        "lengths": lengths,
        "machine": info,
        "machine_label": machine_label(info),
        "results": {impl: [r.to_dict() for r in rs] for impl, rs in results.items()},
        "curves": curves,
        "scaling_exponents": {
            impl: {metric: scaling_exponent(lengths, vals) for metric, vals in c.items()}
            for impl, c in curves.items()
        },
        "nystromer_beats_exact_from": cross,
    }


def write_speed_outputs(report: dict, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``speed.json``, ``speed.md``, ``speed.csv``, ``speed_time.png`` and
    ``speed_memory.png``."""
    out = Path(out_dir)
    written = [out / name for name in ("speed.json", "speed.md", "speed.csv")]
    with atomic_write(written[0]) as f:
        json.dump(report, f, indent=2)
    with atomic_write(written[1]) as f:
        f.write(format_speed(report) + "\n")
    with atomic_write(written[2]) as f:
        w = csv.writer(f)
        w.writerow(["implementation", "n", "status", *METRICS, "memory_method", "threads"])
        w.writerows(
            [impl, r["spec"]["seq_len"], r["status"]]
            + ["" if r[m] is None else f"{r[m]:.4f}" for m in METRICS]
            + [r["memory_method"] or "", r["threads"] or ""]
            for impl, rs in report["results"].items()
            for r in rs
        )
    for (ylabel, metrics), name in zip(_QUANTITIES.items(), ("time", "memory"), strict=True):
        written.append(out / f"speed_{name}.png")
        _plot(report, metrics, ylabel, written[-1])
    return written


def _plot(report: dict, metrics: Sequence[str], ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    lengths = report["lengths"]
    for ax, metric in zip(axes[0], metrics, strict=True):
        for impl, curve in report["curves"].items():
            pts = [(n, v) for n, v in zip(lengths, curve[metric], strict=True) if v is not None]
            slope = report["scaling_exponents"][impl][metric]
            label = impl if slope is None else f"{impl} (∝ n^{slope:.2f})"
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="sequence length n", ylabel=ylabel)
        ax.set_title(metric.replace("_", " ").replace("backward", "forward+backward"))
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(report["machine_label"], fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def format_table1(report: dict) -> str:
    """Markdown in the form of the paper's Table 1 from a :func:`run_speed` report: per n, the
    forward peak memory (MiB) / time (ms) of each implementation, then the paper's numbers."""
    impls, base, curves = list(report["curves"]), report["base"], report["curves"]
    rows = []
    for i, n in enumerate(report["lengths"]):
        cells = [f"{n:,}"]
        for impl in impls:
            mem, ms = curves[impl]["forward_peak_mib"][i], curves[impl]["forward_ms"][i]
            cells.append("—" if mem is None or ms is None else f"{mem:,.1f} / {ms:,.1f}")
        paper = PAPER_TABLE1.get(n)
        rows.append(cells + ([f"{p[0]:,} / {p[1]}" for p in paper] if paper else ["—", "—"]))
    header = ["n", *(f"{impl} MiB / ms" for impl in impls)]
    header += ["paper Transformer MB / ms", "paper Nyströmformer MB / ms"]
    intro = (
        f"Forward (inference) peak memory above the inputs (MiB) and time (ms) per instance: "
        f"batch {base['batch']}, {base['heads']} heads × {base['head_dim']}, m = "
        f"{base['num_landmarks']}, {base['dtype']}. `exact-matmul` is the paper's Transformer "
        "(softmax(QKᵀ)·V materialised), `exact` torch SDPA, `nystromer` ours; the last two "
        "columns are the paper's numbers (1080Ti GPU, their whole attention layer), for the "
        "shape of the curves rather than the values."
    )
    return "\n".join([intro, "", *table(header, rows, left=0)])


def format_speed(report: dict) -> str:
    """Markdown of a :func:`run_speed` report: settings, time and memory tables against n,
    fitted exponents, the crossover with exact attention and why a sweep stopped."""
    base, curves = report["base"], report["curves"]
    backward = any(v is not None for c in curves.values() for v in c["backward_ms"])
    lines = [
        f"Batch {base['batch']}, {base['heads']} heads × {base['head_dim']}, m = "
        f"{base['num_landmarks']}, {base['pinv_iterations']} pinv iterations, {base['dtype']}, "
        f"{base['device']}; median of {base['repeats']} calls after {base['warmup']} warm-up; "
        "peak memory above the inputs, fresh process per measurement. "
        + ("Cells: forward / forward+backward." if backward else "Forward only."),
        "",
    ]
    for title, (first, second) in _QUANTITIES.items():
        rows = []
        for i, n in enumerate(report["lengths"]):
            pairs = [(fmt(c[first][i]), fmt(c[second][i])) for c in curves.values()]
            rows.append([f"{n:,}", *(" / ".join(p if backward else p[:1]) for p in pairs)])
        lines += [*table(["n", *(f"{impl} {title}" for impl in curves)], rows, left=0), ""]
    shown = [m for m in METRICS if backward or not m.startswith("backward")]
    fits = report["scaling_exponents"]
    lines += [
        "Fitted scaling exponent (slope of log value against log n over the larger half of "
        "the measured n; ours should be ≈ 1, exact attention's time ≈ 2):",
        "",
        *table(
            ["implementation", *(_METRIC_NAMES[m] for m in shown)],
            [[impl, *(fmt(fits[impl][m], ".2f") for m in shown)] for impl in curves],
        ),
        "",
    ]
    cross = report.get("nystromer_beats_exact_from") or {}
    for metric, label in zip(METRICS[:2], ("forward", "forward+backward"), strict=True):
        if metric in cross and (backward or metric == "forward_ms"):
            n = cross[metric]
            lines.append(
                f"- nystromer is faster than exact attention ({label}) "
                + (f"from n = {n:,} on." if n is not None else "at none of the measured n.")
            )
    for impl, results in report["results"].items():
        stops = [r["note"] for r in results if r["status"] != "ok" and r["note"]]
        lines += [f"- {impl}: {stops[0]}"] if stops else []
    return "\n".join(lines).rstrip()

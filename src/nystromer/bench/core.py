"""The attention-core benchmark: nystromer against the naive formula, exact SDPA and the peers.

One problem size (by default n = 16,384, batch 1, 8 heads of 64, m = 64, float32), every
registered implementation plus nystromer on a padded batch, time and peak memory of forward
and forward+backward, the machine's float32 GEMM rate, and the project's targets:

* forward ≥ 2.5× and forward+backward ≥ 2× faster than the faster peer;
* peak memory ≤ 1/5 (forward) and ≤ 1/2.3 (forward+backward) of the leaner peer's;
* forward within 2× of the FLOP limit 8·B·H·n·m·d / GEMM rate;
* padded (≈10% padding) within 1.3× of unpadded.

``benchmarks/attention_core.py`` is the command-line front end.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
from dataclasses import dataclass

from .._machine import machine_info, machine_label
from .._markdown import replace_section
from .implementations import PEERS
from .measure import CaseResult, CaseSpec, matmul_flop_rate, measure_case

__all__ = [
    "CoreReport",
    "Target",
    "run_core",
    "check_targets",
    "format_report",
    "write_docs_section",
    "OURS",
    "OURS_PADDED",
    "CORE_IMPLEMENTATIONS",
    "median_result",
]

#: What the core benchmark compares by default (the O(n²)-memory exact-matmul is left out).
CORE_IMPLEMENTATIONS = ("nystromer", "naive", "exact", *PEERS)
OURS = "nystromer"
OURS_PADDED = "nystromer (padded)"
_BEGIN = "<!-- attention-core:begin (written by benchmarks/attention_core.py) -->"
_END = "<!-- attention-core:end -->"


@dataclass
class Target:
    """One target: ``value`` compared to ``limit`` (``>=`` or ``<=``); None = not measurable."""

    name: str
    value: float | None
    limit: float
    direction: str
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.direction == ">=" else self.value <= self.limit


@dataclass
class CoreReport:
    """Everything one run measured: rows by label, GEMM rate, FLOP limit, machine, command."""

    base: CaseSpec
    rows: dict[str, CaseResult]
    gemm_flops: float
    gemm_size: int
    flop_limit_ms: float
    machine: dict
    command: str
    date: str
    rounds: int = 1
    #: label → "forward_ms" / "backward_ms" → each round's own median (None where a round
    #: failed), so that ratios can also be read round by round, side by side in time.
    per_round: dict[str, dict[str, list[float | None]]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> CoreReport:
        """Rebuild a report from :meth:`to_dict`'s output (e.g. a saved ``--json`` file)."""

        def result(d: dict) -> CaseResult:
            fields = {k: v for k, v in d.items() if k != "spec"}
            return CaseResult(CaseSpec(**d["spec"]), **fields)

        return cls(
            base=CaseSpec(**data["base"]),
            rows={k: result(v) for k, v in data["rows"].items()},
            gemm_flops=data["gemm_gflops"] * 1e9,
            gemm_size=data["gemm_size"],
            flop_limit_ms=data["flop_limit_ms"],
            machine=data["machine"],
            command=data["command"],
            date=data["date"],
            rounds=data.get("rounds", 1),
            per_round=data.get("per_round", {}),
        )

    def to_dict(self) -> dict:
        return {
            "base": dataclasses.asdict(self.base),
            "rows": {k: v.to_dict() for k, v in self.rows.items()},
            "gemm_gflops": self.gemm_flops / 1e9,
            "gemm_size": self.gemm_size,
            "flop_limit_ms": self.flop_limit_ms,
            "machine": self.machine,
            "machine_label": machine_label(self.machine),
            "command": self.command,
            "date": self.date,
            "rounds": self.rounds,
            "per_round": self.per_round,
            "targets": [dataclasses.asdict(t) | {"passed": t.passed} for t in check_targets(self)],
        }


def run_core(
    base: CaseSpec,
    *,
    implementations: list[str] | None = None,
    padding: float = 0.1,
    rounds: int = 1,
    exact_repeats: int = 2,
    gemm_size: int = 4096,
    gemm_repeats: int = 5,
    command: str = "",
    timeout: float | None = None,
    progress=print,
) -> CoreReport:
    """Measure every implementation (fresh process each) on ``base``'s size.

    Args:
        base: the problem; its ``impl`` is ignored.
        implementations: registry names (default: :data:`CORE_IMPLEMENTATIONS`).
        padding: padding fraction of the extra nystromer row.
        rounds: how many times to measure every implementation, in turn (round-robin), so
            that each one is measured across the same stretch of a shared machine's noise;
            each row is the median over rounds. Exact attention is measured in the first
            round only.
        exact_repeats: timed repeats of exact attention (it is only the O(n²) reference and
            takes seconds per call at n = 16k).
        gemm_size, gemm_repeats: the GEMM that measures the FLOP rate (best of the repeats).
        command: the command line, recorded in the report.
        timeout: seconds allowed to each worker process.
        progress: called with one line per finished measurement (None: silent).
    """
    import torch

    names = list(CORE_IMPLEMENTATIONS) if implementations is None else implementations
    cases: list[tuple[str, CaseSpec]] = []
    for name in names:
        spec = dataclasses.replace(base, impl=name, padding=0.0)
        if name == "exact":
            spec = dataclasses.replace(spec, repeats=min(base.repeats, exact_repeats))
        cases.append((name, spec))
    if OURS in names and padding > 0:
        cases.append((OURS_PADDED, dataclasses.replace(base, impl=OURS, padding=padding)))

    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds!r}")
    measured: dict[str, list[CaseResult]] = {label: [] for label, _ in cases}
    for r in range(rounds):
        for label, spec in cases:
            if r > 0 and (spec.impl == "exact" or measured[label][0].status != "ok"):
                continue
            measured[label].append(result := measure_case(spec, timeout=timeout))
            if progress is not None:
                where = f" (round {r + 1}/{rounds})" if rounds > 1 else ""
                progress(f"  {label:<20} {_row_summary(result)}{where}")
    rows = {label: median_result(results) for label, results in measured.items()}
    per_round = {
        label: {attr: [getattr(r, attr) for r in results] for attr in _TIMES}
        for label, results in measured.items()
    }

    if base.threads is not None:
        torch.set_num_threads(base.threads)
    rate = matmul_flop_rate(gemm_size, gemm_repeats, base.device, base.dtype)
    flops = 8.0 * base.batch * base.heads * base.seq_len * base.num_landmarks * base.head_dim
    return CoreReport(
        base=base,
        rows=rows,
        gemm_flops=rate,
        gemm_size=gemm_size,
        flop_limit_ms=flops / rate * 1e3,
        machine=machine_info(base.device, base.threads),
        command=command,
        date=datetime.date.today().isoformat(),
        rounds=rounds,
        per_round=per_round,
    )


_TIMES = ("forward_ms", "backward_ms")


def median_result(results: list[CaseResult]) -> CaseResult:
    """One row from the rounds of one case: the median of each quantity (every call's time
    kept); a case that was not ``ok`` in its first round keeps that result."""
    if len(results) == 1 or results[0].status != "ok":
        return results[0]

    def median(attr: str) -> float | None:
        values = [getattr(r, attr) for r in results if getattr(r, attr) is not None]
        return statistics.median(values) if values else None

    return dataclasses.replace(
        results[0],
        forward_ms=median("forward_ms"),
        backward_ms=median("backward_ms"),
        forward_peak_mib=median("forward_peak_mib"),
        backward_peak_mib=median("backward_peak_mib"),
        forward_times_ms=[t for r in results for t in r.forward_times_ms],
        backward_times_ms=[t for r in results for t in r.backward_times_ms],
    )


def _row_summary(r: CaseResult) -> str:
    if r.status != "ok":
        return f"{r.status}: {r.note}"
    return (
        f"fwd {r.forward_ms:.1f} ms, fwd+bwd {r.backward_ms:.1f} ms, "
        f"peak {r.forward_peak_mib:.1f} / {r.backward_peak_mib:.1f} MiB"
    )


def _ok(report: CoreReport, label: str) -> CaseResult | None:
    r = report.rows.get(label)
    return r if r is not None and r.status == "ok" else None


def _best_peer(report: CoreReport, attr: str) -> tuple[str, float] | None:
    found = [(name, getattr(r, attr)) for name in PEERS if (r := _ok(report, name)) is not None]
    return min(found, key=lambda x: x[1]) if found else None


def _round_range(report: CoreReport, num: str, den: str | float, attr: str) -> str:
    """``"; rounds LO–HI"``: the ratio ``num / den`` of each round's own medians (``den`` a
    label, or a constant such as the FLOP limit); empty with fewer than two rounds."""
    a = report.per_round.get(num, {}).get(attr, [])
    if isinstance(den, str):
        b = report.per_round.get(den, {}).get(attr, [])
    else:
        b = [den] * len(a)
    ratios = [x / y for x, y in zip(a, b, strict=False) if x is not None and y]
    if len(ratios) < 2:
        return ""
    return f"; rounds {min(ratios):.2f}–{max(ratios):.2f}"


def check_targets(report: CoreReport) -> list[Target]:
    """The six targets of the module docstring (peer targets against the better peer).

    Time targets note the range of the same ratio over the rounds, each round's peer and ours
    measured one after the other: how far the machine's noise moves the median's reading.
    """
    ours, padded = _ok(report, OURS), _ok(report, OURS_PADDED)
    targets = []
    for attr, label, limit in (
        ("forward_ms", "forward time: faster peer / ours", 2.5),
        ("backward_ms", "forward+backward time: faster peer / ours", 2.0),
        ("forward_peak_mib", "forward peak memory: leaner peer / ours", 5.0),
        ("backward_peak_mib", "forward+backward peak memory: leaner peer / ours", 2.3),
    ):
        best = _best_peer(report, attr)
        if ours is None or best is None:
            targets.append(Target(label, None, limit, ">=", "no peer or no nystromer result"))
        else:
            value = best[1] / max(getattr(ours, attr), 1e-9)
            note = f"peer: {best[0]}"
            if attr in _TIMES:
                note += _round_range(report, best[0], OURS, attr)
            targets.append(Target(label, value, limit, ">=", note))
    targets.append(
        Target(
            "forward time / FLOP limit",
            None if ours is None else ours.forward_ms / report.flop_limit_ms,
            2.0,
            "<=",
            f"limit {report.flop_limit_ms:.1f} ms at {report.gemm_flops / 1e9:.1f} GFLOP/s"
            + _round_range(report, OURS, report.flop_limit_ms, "forward_ms"),
        )
    )
    for attr, what in (("forward_ms", "forward"), ("backward_ms", "forward+backward")):
        value = None
        if ours is not None and padded is not None:
            value = getattr(padded, attr) / getattr(ours, attr)
        note = ""
        if padded:
            note = f"{report.rows[OURS_PADDED].spec.padding:.0%} padding"
            note += _round_range(report, OURS_PADDED, OURS, attr)
        targets.append(Target(f"padded / unpadded {what} time", value, 1.3, "<=", note))
    return targets


def _fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def format_report(report: CoreReport) -> str:
    """Markdown: size line, machine, table with ratios (row / nystromer), GEMM, targets."""
    b = report.base
    ours = _ok(report, OURS)
    lines = [
        f"n = {b.seq_len:,}, batch {b.batch}, {b.heads} heads × {b.head_dim}, "
        f"m = {b.num_landmarks}, {b.pinv_iterations} pinv iterations, {b.dtype}, {b.device}.",
        f"Machine: {machine_label(report.machine)}.",
        "",
        "| implementation | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB "
        "| fwd time ×ours | fwd+bwd time ×ours | fwd mem ×ours | fwd+bwd mem ×ours |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label, r in report.rows.items():
        if r.status != "ok":
            lines.append(f"| {label} | {r.status}: {r.note} |" + " |" * 8)
            continue
        ratios = []
        for attr in ("forward_ms", "backward_ms", "forward_peak_mib", "backward_peak_mib"):
            ours_value = None if ours is None else getattr(ours, attr)
            ratios.append(None if not ours_value else getattr(r, attr) / max(ours_value, 1e-9))
        cells = [
            _fmt(r.forward_ms),
            _fmt(r.backward_ms),
            _fmt(r.forward_peak_mib),
            _fmt(r.backward_peak_mib),
        ] + [_fmt(x, 2) for x in ratios]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    method = next((r.memory_method for r in report.rows.values() if r.memory_method), "")
    exact = report.rows.get("exact")
    exact_note = ""
    if exact is not None and exact.spec.repeats != b.repeats:
        exact_note = f" (exact: {exact.spec.repeats} calls"
        exact_note += ", first round only)" if report.rounds > 1 else ")"
    rounds_note = ""
    if report.rounds > 1:
        rounds_note = (
            f", in each of {report.rounds} rounds that run every implementation in turn; "
            "each cell is the median over the rounds"
        )
    itemsize = {"float64": 8, "float32": 4}.get(b.dtype, 2)
    io_mib = b.batch * b.heads * b.seq_len * b.head_dim * itemsize / 2**20
    lines += [
        "",
        f"Times: median of {b.repeats} calls after {b.warmup} warm-up{exact_note}"
        f"{rounds_note}; forward "
        "without autograd, forward+backward back to the inputs. Peak memory: "
        f"fresh process per measurement, method `{method}`, above the inputs' footprint; it "
        f"includes the output ({io_mib:,.1f} MiB) and, for forward+backward, the gradients of "
        f"q, k, v ({3 * io_mib:,.1f} MiB), which every implementation must produce.",
        f"FP32 GEMM {report.gemm_size}²: {report.gemm_flops / 1e9:.1f} GFLOP/s (best of runs); "
        f"FLOP limit of the forward 8·B·H·n·m·d / rate = {report.flop_limit_ms:.1f} ms.",
        "",
        "| target | value | needed | result | note |",
        "|---|--:|--:|---|---|",
    ]
    for t in check_targets(report):
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t.passed]
        lines.append(
            f"| {t.name} | {_fmt(t.value, 2)} | {t.direction} {t.limit} | {verdict} | {t.note} |"
        )
    return "\n".join(lines)


def write_docs_section(path: str | os.PathLike[str], report: CoreReport) -> None:
    """Write or replace the attention-core section (between markers) of a Markdown file."""
    section = "\n".join(
        [
            f"Measured {report.date} with `{report.command}`.",
            "",
            format_report(report),
        ]
    )
    replace_section(path, _BEGIN, _END, section, new_file="# Benchmarks\n\n## Attention core\n")

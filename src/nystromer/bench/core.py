"""The attention-core benchmark (``benchmarks/attention_core.py``; docs/benchmarks.md, "Attention
core"): every registered implementation, and nystromer on a padded batch, at one size, side by
side with each one's ratio to ours.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
from dataclasses import dataclass

from .._machine import machine_info, machine_label
from .._markdown import replace_section, table
from .implementations import PEERS
from .measure import DTYPES, METRICS, CaseResult, CaseSpec, fmt, measure_case

__all__ = [
    "CoreReport",
    "CORE_IMPLEMENTATIONS",
    "OURS",
    "run_core",
    "format_report",
    "median_result",
    "write_docs_section",
]

#: What the core benchmark compares by default (the O(n²)-memory exact-matmul is left out).
CORE_IMPLEMENTATIONS = ("nystromer", "naive", "exact", *PEERS)
OURS = "nystromer"
_BEGIN = "<!-- attention-core:begin (written by benchmarks/attention_core.py) -->"
_END = "<!-- attention-core:end -->"


@dataclass
class CoreReport:
    """Everything one run measured: rows by label, machine, command, date, rounds."""

    base: CaseSpec
    rows: dict[str, CaseResult]
    machine: dict
    command: str
    date: str
    rounds: int = 1

    @classmethod
    def from_dict(cls, data: dict) -> CoreReport:
        """Rebuild a report from :meth:`to_dict`'s output (e.g. a saved ``--json`` file)."""
        rows = {
            label: CaseResult(**row | {"spec": CaseSpec(**row["spec"])})
            for label, row in data["rows"].items()
        }
        recorded = {key: data[key] for key in ("machine", "command", "date")}
        return cls(CaseSpec(**data["base"]), rows, **recorded, rounds=data.get("rounds", 1))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"machine_label": machine_label(self.machine)}


def run_core(
    base: CaseSpec,
    *,
    implementations: list[str] | None = None,
    padding: float = 0.1,
    rounds: int = 1,
    exact_repeats: int = 2,
    command: str = "",
    timeout: float | None = None,
    progress=print,
) -> CoreReport:
    """Measure ``implementations`` (registry names, default :data:`CORE_IMPLEMENTATIONS`) on
    ``base``'s size (its ``impl`` is ignored), each in fresh processes, and nystromer (and
    nystromer-plain) again with a ``padding`` fraction. ``rounds`` measures them all that many
    times in turn, so that each sees the same stretch of a shared machine's noise; each row is
    the median over rounds. Exact attention, the O(n²) reference, runs in the first round only,
    with ``exact_repeats`` calls. ``command`` is recorded; ``timeout`` is per worker process;
    ``progress`` gets one line per measurement (None: silent).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds!r}")
    names = list(CORE_IMPLEMENTATIONS) if implementations is None else implementations
    cases = {name: dataclasses.replace(base, impl=name, padding=0.0) for name in names}
    if "exact" in cases:
        cases["exact"] = dataclasses.replace(
            cases["exact"], repeats=min(base.repeats, exact_repeats)
        )
    for name in ("nystromer", "nystromer-plain"):
        if name in names and padding > 0:
            cases[f"{name} (padded)"] = dataclasses.replace(base, impl=name, padding=padding)

    measured: dict[str, list[CaseResult]] = {label: [] for label in cases}
    for r in range(rounds):
        for label, spec in cases.items():
            if r > 0 and (spec.impl == "exact" or measured[label][0].status != "ok"):
                continue
            measured[label].append(result := measure_case(spec, timeout=timeout))
            if progress is not None:
                where = f" (round {r + 1}/{rounds})" if rounds > 1 else ""
                progress(f"  {label:<20} {result.summary()}{where}")
    return CoreReport(
        base=base,
        rows={label: median_result(results) for label, results in measured.items()},
        machine=machine_info(base.device, base.threads),
        command=command,
        date=datetime.date.today().isoformat(),
        rounds=rounds,
    )


def median_result(results: list[CaseResult]) -> CaseResult:
    """One row from a case's rounds: medians and every call's time, or the first failure of
    any round (medians over the other rounds would leave a failed, e.g. timed-out, round out
    unseen), its note naming the round."""
    for i, result in enumerate(results):
        if result.status != "ok":
            where = f"round {i + 1} of {len(results)}: " if len(results) > 1 else ""
            return dataclasses.replace(result, note=where + result.note)
    if len(results) == 1:
        return results[0]
    found = {}
    for attr in METRICS:
        values = [x for r in results if (x := getattr(r, attr)) is not None]
        found[attr] = statistics.median(values) if values else None
    for attr in ("forward_times_ms", "backward_times_ms"):
        found[attr] = [t for r in results for t in getattr(r, attr)]
    return dataclasses.replace(results[0], **found)


def format_report(report: CoreReport) -> str:
    """Markdown: size line, machine, one row per implementation with its ratios to ours."""
    b, ours = report.base, report.rows.get(OURS)
    bases = [getattr(ours, attr) if ours and ours.status == "ok" else None for attr in METRICS]
    rows = []
    for label, r in report.rows.items():
        values = [getattr(r, attr) for attr in METRICS]
        ratios = [
            x / y if x is not None and y else None for x, y in zip(values, bases, strict=True)
        ]
        cells = [*(fmt(x) for x in values), *(fmt(x, ".2f") for x in ratios)]
        rows.append([label, *(cells if r.status == "ok" else [f"{r.status}: {r.note}"])])
    kinds = ("fwd", "fwd+bwd")
    header = [
        f"{k} {what}" for what in ("ms", "peak MiB", "time ×ours", "mem ×ours") for k in kinds
    ]
    method = next((r.memory_method for r in report.rows.values() if r.memory_method), "")
    exact = report.rows.get("exact")
    exact_note = rounds_note = ""
    if exact is not None and exact.spec.repeats != b.repeats:
        exact_note = f" (exact: {exact.spec.repeats} calls"
        exact_note += ", first round only)" if report.rounds > 1 else ")"
    if report.rounds > 1:
        rounds_note = (
            f", in each of {report.rounds} rounds that run every implementation in turn; "
            "each cell is the median over the rounds"
        )
    io_mib = b.batch * b.heads * b.seq_len * b.head_dim * DTYPES[b.dtype].itemsize / 2**20
    lines = [
        f"n = {b.seq_len:,}, batch {b.batch}, {b.heads} heads × {b.head_dim}, "
        f"m = {b.num_landmarks}, {b.pinv_iterations} pinv iterations, {b.dtype}, {b.device}.",
        f"Machine: {machine_label(report.machine)}.",
        "",
        *table(["implementation", *header], rows),
        "",
        f"Times: median of {b.repeats} calls after {b.warmup} warm-up{exact_note}"
        f"{rounds_note}; forward "
        "without autograd, forward+backward back to the inputs. Peak memory: "
        f"fresh process per measurement, method `{method}`, above the inputs' footprint; it "
        f"includes the output ({io_mib:,.1f} MiB) and, for forward+backward, the gradients of "
        f"q, k, v ({3 * io_mib:,.1f} MiB), which every implementation must produce.",
    ]
    return "\n".join(lines)


def write_docs_section(path: str | os.PathLike[str], report: CoreReport) -> None:
    """Write or replace the attention-core section (between markers) of a Markdown file."""
    section = f"Measured {report.date} with `{report.command}`.\n\n{format_report(report)}"
    replace_section(path, _BEGIN, _END, section, new_file="# Benchmarks\n\n## Attention core\n")

"""Metric sums that add up across batches and processes, and the run's ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_path, atomic_write

__all__ = ["Stats", "MetricsLog", "plot_metrics"]


class Stats:
    """Sums of per-sample quantities plus the sample count; metrics are sums / count.

    An objective reports e.g. ``{"count": 32, "loss": 71.3, "accuracy": 9}`` (loss summed
    over samples, number correct); sums add across batches and processes exactly, so the
    mean over a split does not depend on how it was batched or sharded.
    """

    def __init__(self, sums: Mapping[str, float] | None = None) -> None:
        self.sums: dict[str, float] = dict(sums or {})

    def add(self, sums: Mapping[str, float]) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    @property
    def count(self) -> float:
        return self.sums.get("count", 0.0)

    def means(self) -> dict[str, float]:
        """Every quantity divided by the count (empty when nothing was added)."""
        n = self.count
        if n <= 0:
            return {}
        return {k: v / n for k, v in self.sums.items() if k != "count"}

    def reset(self) -> None:
        self.sums.clear()


def stats_tensor(stats: Mapping[str, torch.Tensor | float], keys: list[str]) -> torch.Tensor:
    """Pack per-batch sums into one float64 vector (one all-reduce for all of them)."""
    return torch.stack(
        [torch.as_tensor(stats[k], dtype=torch.float64).detach().cpu().reshape(()) for k in keys]
    )


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, each with a ``step``.

    The file is rewritten atomically on every append (it holds one line per evaluation, a
    few hundred at most), so it is never half-written. On resume, :meth:`truncate` drops
    lines from after the checkpoint, which the resumed run writes again.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(
                            f"{self.path}, line {number}: not a JSON record ({exc.msg})"
                        ) from exc

    def truncate(self, step: int) -> None:
        """Keep only records with ``record["step"] <= step``."""
        kept = [r for r in self.records if r.get("step", 0) <= step]
        if len(kept) != len(self.records):
            self.records = kept
            self._write()

    def append(self, record: Mapping[str, Any]) -> None:
        self.records.append(_finite_json(dict(record)))
        self._write()

    def _write(self) -> None:
        with atomic_write(self.path) as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")


def _finite_json(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf; write them as strings so the file stays standard JSON.
    return {
        k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in record.items()
    }


def plot_metrics(
    metrics_file: str | os.PathLike[str],
    key: str,
    out_png: str | os.PathLike[str],
    *,
    title: str = "",
    ylabel: str | None = None,
    start: tuple[float, float] | None = None,
) -> Path:
    """Plot one metric of a ``metrics.jsonl`` against the step into a PNG (written atomically).

    Args:
        metrics_file: a run's ``metrics.jsonl``.
        key: the record field to plot, e.g. ``val_accuracy``.
        out_png: the image to write.
        title, ylabel: labels (``ylabel`` defaults to ``key``).
        start: an extra first point ``(step, value)``, e.g. the score before training.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: no record has ``key``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = MetricsLog(metrics_file).records
    points = [(r["step"], float(r[key])) for r in records if key in r]
    if start is not None:
        points = [start, *points]
    if not points:
        raise ValueError(f"{metrics_file} has no {key!r} values to plot")
    steps, values = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(steps, values, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or key)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out

"""Benchmarks and diagnostics: speed, memory and approximation error of attention
implementations. :mod:`.implementations` is the registry the benchmarks loop over,
:mod:`.measure` times one case and measures its peak memory in a fresh process, and each command
(``nystromer bench``, ``demo``, ``viz attention``, benchmarks/*.py) has its module; what each
measures is in docs/benchmarks.md.
"""

from .implementations import (
    IMPLEMENTATIONS,
    AttentionConfig,
    Implementation,
    available_implementations,
    naive_nystrom_attention,
)
from .measure import CaseResult, CaseSpec, measure_case

__all__ = [
    "IMPLEMENTATIONS",
    "AttentionConfig",
    "Implementation",
    "available_implementations",
    "naive_nystrom_attention",
    "CaseResult",
    "CaseSpec",
    "measure_case",
]

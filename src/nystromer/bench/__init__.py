"""Benchmarks and diagnostics: speed, memory and approximation error of attention implementations.

Modules:
    implementations  the registry of attention implementations (ours, naive, exact, peers)
    inputs           random query/key/value tensors and padding masks
    measure          time and peak memory of one case, in a fresh process
    core             the attention-core benchmark (benchmarks/attention_core.py)
    demo             ``nystromer demo``: exact vs Nyström as n grows
    speed            ``nystromer bench speed``: time and memory against n, scaling fits, plots
    approx           ``nystromer bench approx``: approximation error against m, iterations, ...
    lra_inputs       q, k, v of a trained LRA model on real validation inputs (approx, viz)
    viz              ``nystromer viz attention``: exact and approximated attention matrices
    report           ``nystromer bench report`` (``make bench``): regenerates docs/benchmarks.md
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

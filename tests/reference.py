"""The float64 references the tests compare against: :mod:`nystromer.reference`.

That module is written from the paper's formulas and does not use nystromer's fast code (it
ships in the package so that the benchmarks' naive baseline and the visualisations use the same
definition). The names below are the ones the tests import.
"""

from nystromer.reference import (
    exact_attention,
    kmeans_landmarks,
    landmarks,
    newton_pinv,
    nystrom_matrix,
    nystrom_one_head,
    nystrom_reference,
    segment_bounds,
)

__all__ = [
    "exact_attention",
    "kmeans_landmarks",
    "landmarks",
    "newton_pinv",
    "nystrom_matrix",
    "nystrom_one_head",
    "nystrom_reference",
    "segment_bounds",
]

"""Distillation: train a converted (Nyström-attention) encoder to reproduce its exact teacher.

    nystromer distill --teacher DIR --out DIR --text FILE ...      (command line)
    distill(DistillConfig(teacher=..., texts=[...]), out_dir)       (Python)

See :mod:`nystromer.distill.run` and docs/convert.md.
"""

from .data import BUILTIN_TEXTS, TokenWindows, read_texts, split_corpus
from .run import (
    DistillConfig,
    build_student,
    distill,
    distill_objective,
    load_teacher,
    mean_pool,
    set_dropout,
)

__all__ = [
    "BUILTIN_TEXTS",
    "DistillConfig",
    "TokenWindows",
    "build_student",
    "distill",
    "distill_objective",
    "load_teacher",
    "mean_pool",
    "read_texts",
    "set_dropout",
    "split_corpus",
]

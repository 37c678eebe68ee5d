"""Argument checks that several public functions, modules and configs share.

Each rule has one wording, so an impossible value reads the same wherever it is passed: the
message names the argument, what it must be and what was received.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor


class InputTypeError(TypeError):
    """A value read from a file (a recipe, a run's or a model's config.json) has the wrong
    type. Library callers catch it as the TypeError it is; the ``nystromer`` commands report
    it in one line as an input error (``nystromer._args.USAGE_ERRORS``), while any other
    TypeError is a bug and keeps its traceback."""


def is_int(value: object) -> bool:
    """An int that is not a bool (True is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float that is not a bool (True is no weight)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is an int ≥ 1."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def plain_int(value: object) -> object:
    """A NumPy (or other) integer as a Python int, anything else, bools included, unchanged:
    sizes often come from arrays, and a stored int stays JSON-ready."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def positive_int(name: str, value: object) -> int:
    """``value`` as an int if it is an integer ≥ 1, a NumPy integer included (torch's modules
    take them too); else the ValueError of check_positive_int."""
    value = plain_int(value)
    check_positive_int(name, value)
    return value


def check_int_at_least(name: str, value: object, low: int) -> None:
    """Raise ValueError unless ``value`` is an int ≥ ``low``."""
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")


def check_odd_kernel_size(name: str, value: object, *, or_none: bool = False) -> None:
    """Raise ValueError unless ``value`` is an odd int ≥ 1 (a convolution kernel that keeps the
    sequence length), or None where ``or_none``."""
    if or_none and value is None:
        return
    if not is_int(value) or value < 1 or value % 2 == 0:
        alternative = " (or None)" if or_none else ""
        raise ValueError(f"{name} must be an odd integer ≥ 1{alternative}, got {value!r}")


def check_probability(name: str, value: float, *, one: bool = False) -> None:
    """Raise ValueError unless 0 ≤ ``value`` < 1 (a dropout rate), or ≤ 1 with ``one`` (as
    torch's Dropout takes). A bool is no rate."""
    try:
        valid = 0.0 <= value <= 1.0 if one else 0.0 <= value < 1.0
    except TypeError:  # not a number, e.g. None
        valid = False
    if not valid or isinstance(value, bool):
        interval = "[0, 1]" if one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_scale(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is None or a finite real number (a score scale).

    A NaN or infinite scale turns every attention weight into NaN without an error, and a
    bool is no scale. Tensors pass unchecked: reading one would synchronise with its device.
    Under ``torch.compile`` only the type is checked: with ``dynamic=True`` a module's float
    attribute is symbolic there, and ``math.isfinite`` of it breaks the graph.
    """
    if value is None or isinstance(value, Tensor):
        return
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or (not torch.compiler.is_compiling() and not math.isfinite(value))
    ):
        raise ValueError(f"{name} must be a finite real number or None, got {value!r}")


def check_shape(name: str, tensor: Tensor, shape: Sequence[int], axes: str | None = None) -> None:
    """Raise ValueError unless ``tensor`` has exactly ``shape``; ``axes`` names its axes in
    the message, e.g. ``"batch, seq_len"``."""
    shape = tuple(shape)
    if tuple(tensor.shape) != shape:
        named = f" ({axes})" if axes else ""
        raise ValueError(f"{name} must have shape {shape}{named}, got {tuple(tensor.shape)}")


def check_token_mask(name: str, mask: object) -> None:
    """Raise TypeError unless ``mask`` is a bool tensor (True = real token)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor (True = real token), got {got}")

"""The Nyström settings, in one object: what every layer, model and command passes along.

``NystromOptions`` is validated once, when it is made; the function, the modules, ``patch``,
``convert``, the model config and the LRA and distillation commands all take or build one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._checks import InputTypeError, is_int, plain_int

__all__ = ["NystromOptions", "check_nystrom_options", "resolve_options"]


def check_nystrom_options(
    num_landmarks: int,
    pinv_iterations: int,
    conv_kernel_size: int | None = None,
    kmeans_iterations: int = 0,
) -> None:
    """Validate the Nyström settings.

    Raises:
        ValueError: naming the argument, the value received and what is expected.
    """
    # The rules of _checks.check_int_at_least and check_odd_kernel_size, written inline: this
    # runs on every nystrom_attention call, and four calls would double its cost.
    if not is_int(num_landmarks) or num_landmarks < 1:
        raise ValueError(f"num_landmarks must be an integer ≥ 1, got {num_landmarks!r}")
    if not is_int(pinv_iterations) or pinv_iterations < 0:
        raise ValueError(f"pinv_iterations must be an integer ≥ 0, got {pinv_iterations!r}")
    if not is_int(kmeans_iterations) or kmeans_iterations < 0:
        raise ValueError(f"kmeans_iterations must be an integer ≥ 0, got {kmeans_iterations!r}")
    if conv_kernel_size is not None and (
        not is_int(conv_kernel_size) or conv_kernel_size < 1 or conv_kernel_size % 2 == 0
    ):
        raise ValueError(
            f"conv_kernel_size must be an odd integer ≥ 1 (or None), got {conv_kernel_size!r}"
        )


@dataclass(frozen=True)
class NystromOptions:
    """How Nyström attention approximates a layer.

    Args:
        num_landmarks: m, landmarks per head (see :func:`nystromer.nystrom_attention`).
        pinv_iterations: iterations of the pseudo-inverse (6 in the paper).
        kmeans_iterations: Lloyd iterations that refine the landmarks from the segment means;
            0 keeps the paper's landmarks.
        conv_kernel_size: odd k adds the paper's depthwise convolution of the values along the
            sequence as a skip; None adds none.

    Raises:
        ValueError: at construction, naming the first setting with an impossible value.
    """

    num_landmarks: int = 64
    pinv_iterations: int = 6
    kmeans_iterations: int = 0
    conv_kernel_size: int | None = None

    def __post_init__(self) -> None:
        # NumPy integers (a sweep over np.arange, a value read from an array) are stored as
        # ints, so that to_dict stays JSON-ready; bools stay what they are, and are refused.
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, plain_int(getattr(self, field.name)))
        check_nystrom_options(
            self.num_landmarks, self.pinv_iterations, self.conv_kernel_size, self.kmeans_iterations
        )

    def attention_kwargs(self) -> dict[str, int]:
        """The keyword arguments of :func:`nystromer.nystrom_attention` these settings fix."""
        return {
            "num_landmarks": self.num_landmarks,
            "pinv_iterations": self.pinv_iterations,
            "kmeans_iterations": self.kmeans_iterations,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (e.g. for a config file); :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, settings: dict[str, Any] | None) -> NystromOptions:
        """Settings from a dict; missing keys take the defaults, unknown keys are an error."""
        if settings is not None and not isinstance(settings, Mapping):
            raise InputTypeError(
                f"settings must be a dict of Nyström settings or None, got "
                f"{type(settings).__name__}"
            )
        settings = dict(settings or {})
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys of any type (a JSON file's are strings, a caller's may not be) sort by their repr.
        unknown = sorted(set(settings) - known, key=repr)
        if unknown:
            raise ValueError(
                f"unknown Nyström setting(s) {unknown}; expected some of {sorted(known)}"
            )
        return cls(**settings)

    def replace(self, **changes: Any) -> NystromOptions:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def resolve_options(
    options: NystromOptions | None,
    num_landmarks: int = 64,
    pinv_iterations: int = 6,
    kmeans_iterations: int = 0,
    conv_kernel_size: int | None = None,
    /,
) -> NystromOptions:
    """The one :class:`NystromOptions` behind a signature that takes both forms.

    Public constructors and functions take the settings as keyword arguments (as PyTorch
    modules do) or as ``options``; this turns either into the object passed along. The
    settings come in the order of NystromOptions' fields.

    Args:
        options: the settings as one object, or None to build them from the others.
        num_landmarks, pinv_iterations, kmeans_iterations, conv_kernel_size: the settings as
            the caller's keywords received them; with ``options`` given, each must keep its
            default.

    Raises:
        TypeError: ``options`` is neither None nor a NystromOptions.
        ValueError: ``options`` together with a keyword that differs from its default (which
            one should win would be a guess), or an impossible setting.
    """
    settings = NystromOptions.__dataclass_fields__.keys()
    values = (num_landmarks, pinv_iterations, kmeans_iterations, conv_kernel_size)
    keywords = dict(zip(settings, values, strict=True))
    if options is None:
        return NystromOptions(**keywords)
    if not isinstance(options, NystromOptions):
        raise TypeError(f"options must be a NystromOptions or None, got {type(options).__name__}")
    default = NystromOptions()
    changed = [f"{k}={v!r}" for k, v in keywords.items() if v != getattr(default, k)]
    if changed:
        raise ValueError(
            f"pass the Nyström settings either as options or as keywords, not both: got options "
            f"and {', '.join(changed)}"
        )
    return options

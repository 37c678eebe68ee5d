"""nystromer: fast, padding- and batch-correct Nyström attention for PyTorch.

Public API:
    nystrom_attention           the attention function (shapes like scaled_dot_product_attention)
    attention_rows              rows of the matrix it applies (heatmaps), without the n×n matrix
    AttentionMap                that matrix indexed like a tensor, rows computed on demand
                                (``NystromAttention.attention_map``, ``compat``'s return_attn)
    NystromAttention            a batch-first multi-head attention module
    NystromMultiheadAttention   a drop-in for torch.nn.MultiheadAttention
    NystromOptions              the Nyström settings as one object; every entry point below
                                takes it as ``options=`` or the settings as keywords
    patch                       switch an existing model's self-attention to Nyström attention
    attn_implementation="nystrom"   transformers' own switch, registered by importing nystromer
                                (nystromer.hf; settings in config.nystrom)
    convert                     patch a pretrained encoder (BERT, RoBERTa, …) and lengthen its
                                position table; extend_positions does the latter alone
    from_pretrained             load a converted checkpoint with its Nyström attention
    calibrate                   fit a converted model's convolution skips to exact attention;
                                returns a CalibrationResult
    iterative_pinv              the iterative pseudo-inverse the attention uses
    nystromer.models            the Nyströmformer model; reads and writes Hugging Face checkpoints
"""

import sys as _sys
import types as _types
import warnings as _warnings

from . import calibration, conversion
from . import hf as _hf
from ._version import __version__
from .attention import NystromAttention, NystromMultiheadAttention
from .attention_map import AttentionMap
from .calibration import CalibrationResult, calibrate
from .conversion import convert, extend_positions, from_pretrained
from .functional import attention_rows, iterative_pinv, nystrom_attention
from .options import NystromOptions
from .patching import patch


class _MovedModule(_types.ModuleType):
    """What ``from nystromer.<old> import name`` reads for one release after a module was
    renamed so that it no longer shares its name with the function ``nystromer.<old>``."""

    def __init__(self, old: str, new: _types.ModuleType) -> None:
        super().__init__(f"{__name__}.{old}")
        self._new = new

    def __getattr__(self, name: str):
        if name.startswith("__"):  # the import system's own lookups (__path__, ...)
            raise AttributeError(name)
        value = getattr(self._new, name)  # AttributeError, unwarned, for an unknown name
        _warnings.warn(
            f"the module {self.__name__} is now {self._new.__name__}; import {name} from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return value


# Set in sys.modules only: the attributes nystromer.convert and nystromer.calibrate stay the
# functions.
for _old, _new in (("convert", conversion), ("calibrate", calibration)):
    _sys.modules[f"{__name__}.{_old}"] = _MovedModule(_old, _new)
del _old, _new

# attn_implementation="nystrom": registered now if transformers is imported, else right after
# it is (importing transformers here would cost seconds to users who never use it).
_hf.install()


__all__ = [
    "NystromAttention",
    "NystromMultiheadAttention",
    "NystromOptions",
    "CalibrationResult",
    "calibrate",
    "convert",
    "extend_positions",
    "from_pretrained",
    "iterative_pinv",
    "nystrom_attention",
    "attention_rows",
    "AttentionMap",
    "patch",
    "__version__",
]

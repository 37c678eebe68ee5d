"""Nyströmformer models in the Hugging Face checkpoint layout (docs/models.md).

    NystromformerConfig                      config.json fields (transformers' names + ours)
    NystromformerModel                       the encoder
    NystromformerForMaskedLM                 and the task heads of transformers
    NystromformerForSequenceClassification
    NystromformerForTokenClassification
    NystromformerForMultipleChoice
    NystromformerForQuestionAnswering

Every class has ``from_pretrained(directory, *, strict=False, dtype=None, **config_overrides)`` and
``save_pretrained(directory)``; transformers is not required.
"""

from . import modeling
from .config import NystromformerConfig
from .hf_io import CheckpointError
from .modeling import *  # noqa: F403  (the classes listed in modeling.__all__)

__all__ = ["CheckpointError", "NystromformerConfig"]
__all__ += modeling.__all__

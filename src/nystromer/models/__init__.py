"""Nyströmformer models in the Hugging Face checkpoint layout (docs/models.md).

    NystromformerConfig                      config.json fields (transformers' names + ours)
    NystromformerModel                       the encoder
    NystromformerForMaskedLM                 and the task heads of transformers
    NystromformerForSequenceClassification
    NystromformerForTokenClassification
    NystromformerForMultipleChoice
    NystromformerForQuestionAnswering

Every class has ``from_pretrained(directory, **config_overrides)`` and
``save_pretrained(directory)``; transformers is not required.
"""

from .config import NystromformerConfig
from .hf_io import CheckpointError
from .modeling import (
    BaseModelOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    NystromformerForMaskedLM,
    NystromformerForMultipleChoice,
    NystromformerForQuestionAnswering,
    NystromformerForSequenceClassification,
    NystromformerForTokenClassification,
    NystromformerModel,
    NystromformerPreTrainedModel,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

__all__ = [
    "CheckpointError",
    "NystromformerConfig",
    "NystromformerModel",
    "NystromformerPreTrainedModel",
    "NystromformerForMaskedLM",
    "NystromformerForSequenceClassification",
    "NystromformerForTokenClassification",
    "NystromformerForMultipleChoice",
    "NystromformerForQuestionAnswering",
    "BaseModelOutput",
    "MaskedLMOutput",
    "SequenceClassifierOutput",
    "TokenClassifierOutput",
    "MultipleChoiceModelOutput",
    "QuestionAnsweringModelOutput",
]

"""NystromformerConfig: the single source of truth for a model's shape, stored as config.json.

Field names and defaults are those of ``transformers.NystromformerConfig`` (checked against
transformers 5.24), so a config.json written by either library is read by the other. Three
fields are ours: ``numerics``, ``pinv_iterations`` and ``kmeans_iterations``; transformers
ignores them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import InputTypeError, check_positive_int, check_probability
from .._io import atomic_write
from ..options import NystromOptions

__all__ = ["NystromformerConfig", "CONFIG_NAME", "ACTIVATIONS", "NO_CONV_KEY"]

CONFIG_NAME = "config.json"
# Activation names of transformers' ACT2FN that this package implements (see modeling._activation).
ACTIVATIONS = (
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "relu",
    "silu",
    "swish",
    "tanh",
)
NUMERICS = ("nystromer", "hf")
# Earlier name of "nystromer", still read (with a DeprecationWarning) so old config.json load.
_OLD_NUMERICS = {"ours": "nystromer"}
# Written by transformers but describing the file, not the model: kept out of `extra`.
_FILE_KEYS = ("architectures", "model_type", "transformers_version")
# nystromer's conv_kernel_size where the file's own says something else for transformers:
# save_pretrained writes a model without convolution as a zero kernel-1 convolution
# (transformers' config refuses a null conv_kernel_size) and this key as null.
NO_CONV_KEY = "nystromer_conv_kernel_size"


@dataclass
class NystromformerConfig:
    """Shape and behaviour of a Nyströmformer model (post-LN BERT-style encoder).

    Args (transformers' names and defaults):
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size:
            the usual BERT dimensions (defaults 30000, 768, 12, 12, 3072).
        hidden_act: activation of the feed-forward layer and heads ("gelu_new").
        hidden_dropout_prob, attention_probs_dropout_prob: dropout rates (0.1, 0.1).
        max_position_embeddings: longest input (510); the table has 2 more rows because
            position ids start at 2.
        type_vocab_size: number of token types (2).
        segment_means_seq_len: the one input length transformers' Nyström branch accepts (64).
            Used only with ``numerics="hf"``.
        num_landmarks: m, landmarks per head (64).
        conv_kernel_size: depthwise convolution skip on the values, odd, or None for none (65;
            save_pretrained writes None as a zero kernel-1 convolution, which transformers reads).
        inv_coeff_init_option: with ``numerics="hf"``, pseudo-inverse initial scale per matrix
            (True) or one scale for the whole batch (False, transformers' default).
        initializer_range: std of the normal initialisation (0.02).
        layer_norm_eps: 1e-5.
        pad_token_id, bos_token_id, eos_token_id: 1, 0, 2.
        add_cross_attention: must be False (the model is an encoder).
        tie_word_embeddings: masked-LM decoder shares the word embedding matrix (True).
        num_labels, id2label, label2id, problem_type: classification heads (2 labels;
            problem_type None infers regression / single-label / multi-label from the labels).

    Args (nystromer's):
        numerics: "nystromer" (default): :func:`nystromer.nystrom_attention` with
            ``num_landmarks``, masked landmarks, any length up to the position table, linear
            cost. "hf": reproduces transformers' NystromformerModel, quirks included
            (docs/models.md). The former name "ours" is read as "nystromer", with a
            DeprecationWarning.
        pinv_iterations: pseudo-inverse iterations (6, the paper's and transformers' value).
        kmeans_iterations: k-means refinement of the landmarks (0, the paper's segment means;
            ``numerics="nystromer"`` only; see :func:`nystromer.nystrom_attention`).

    The four Nyström settings are also :attr:`nystrom_options`. Unknown keys of a config.json
    are kept in ``extra`` and written back unchanged.
    """

    vocab_size: int = 30000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 510
    type_vocab_size: int = 2
    segment_means_seq_len: int = 64
    num_landmarks: int = 64
    conv_kernel_size: int | None = 65
    inv_coeff_init_option: bool = False
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    numerics: str = "nystromer"
    pinv_iterations: int = 6
    kmeans_iterations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.id2label is not None:
            # JSON object keys are strings; transformers stores label ids as ints.
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field with an impossible value."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "segment_means_seq_len",
            "num_labels",
        ):
            check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size must be a multiple of num_attention_heads, got hidden_size="
                f"{self.hidden_size}, num_attention_heads={self.num_attention_heads}"
            )
        _ = self.nystrom_options  # raises ValueError naming an impossible Nyström setting
        if self.numerics in _OLD_NUMERICS:
            new = _OLD_NUMERICS[self.numerics]
            warnings.warn(
                f"numerics={self.numerics!r} is deprecated; it is now called {new!r}",
                DeprecationWarning,
                stacklevel=3,
            )
            self.numerics = new
        if self.kmeans_iterations and self.numerics != "nystromer":
            raise ValueError(
                f"kmeans_iterations needs numerics='nystromer' (transformers' numerics have "
                f"segment-mean landmarks only), got kmeans_iterations={self.kmeans_iterations} "
                f"with numerics={self.numerics!r}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            check_probability(name, getattr(self, name))
        if self.add_cross_attention:
            raise ValueError("add_cross_attention=True is not supported: the model is an encoder")
        if self.problem_type not in (
            None,
            "regression",
            "single_label_classification",
            "multi_label_classification",
        ):
            raise ValueError(
                "problem_type must be None, 'regression', 'single_label_classification' or "
                f"'multi_label_classification', got {self.problem_type!r}"
            )
        if self.numerics == "hf" and self.num_landmarks != self.segment_means_seq_len:
            if self.segment_means_seq_len % self.num_landmarks:
                raise ValueError(
                    "numerics='hf' with num_landmarks != segment_means_seq_len needs "
                    "segment_means_seq_len to be a multiple of num_landmarks, got "
                    f"{self.segment_means_seq_len} and {self.num_landmarks}"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def nystrom_options(self) -> NystromOptions:
        """The Nyström settings of the attention layers (num_landmarks, pinv_iterations,
        kmeans_iterations, conv_kernel_size) as one object; ``replace(**options.to_dict())``
        sets them."""
        return NystromOptions(
            num_landmarks=self.num_landmarks,
            pinv_iterations=self.pinv_iterations,
            kmeans_iterations=self.kmeans_iterations,
            conv_kernel_size=self.conv_kernel_size,
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names a config.json or a ``from_pretrained`` override may set."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NystromformerConfig:
        """Build from a config.json dictionary; unknown keys go to ``extra``."""
        if not isinstance(data, dict):
            raise InputTypeError(f"config must be a dict, got {type(data).__name__}")
        model_type = data.get("model_type", "nystromformer")
        if model_type != "nystromformer":
            raise ValueError(
                f"config describes a {model_type!r} model, expected model_type 'nystromformer'"
            )
        known = set(cls.field_names())
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {
            k: v
            for k, v in data.items()
            if k not in known and k not in _FILE_KEYS and k != NO_CONV_KEY
        }
        if NO_CONV_KEY in data:
            kwargs["conv_kernel_size"] = data[NO_CONV_KEY]
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """config.json dictionary: every field, nystromer's included, plus ``extra``."""
        out: dict[str, Any] = dict(self.extra)
        for name in self.field_names():
            value = getattr(self, name)
            if name == "id2label":
                value = {str(k): v for k, v in value.items()}
            out[name] = value
        out["model_type"] = "nystromformer"
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> NystromformerConfig:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def to_json_file(
        self, path: str | os.PathLike[str], architectures: list[str] | None = None
    ) -> None:
        data = self.to_dict()
        if architectures:
            data["architectures"] = list(architectures)
        with atomic_write(path) as f:
            json.dump(dict(sorted(data.items())), f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], **overrides: Any
    ) -> NystromformerConfig:
        """Read ``directory/config.json`` and apply ``overrides`` (field names only)."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        config = cls.from_json_file(path)
        return config.replace(**overrides) if overrides else config

    def replace(self, **changes: Any) -> NystromformerConfig:
        """A copy with some fields changed; unknown names raise TypeError."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(
                f"unknown config field(s) {unknown}; valid fields: {', '.join(self.field_names())}"
            )
        if "num_labels" in changes and "id2label" not in changes:
            # A new label count invalidates the stored label names.
            changes = {**changes, "id2label": None, "label2id": None}
        elif "id2label" in changes and "label2id" not in changes:
            # New label names: label2id is derived from them again, not kept from the old ones.
            changes = {**changes, "label2id": None}
        return dataclasses.replace(self, **{"extra": dict(self.extra), **changes})

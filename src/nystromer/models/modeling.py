"""Nyströmformer encoder and task heads, in the Hugging Face checkpoint layout.

Post-LN BERT-style encoder (Xiong et al. 2021, transformers' NystromformerModel): word + position
(ids start at 2) + token-type embeddings, LayerNorm; per layer Nyström self-attention with an
optional depthwise convolution skip on the values, dense + residual + LayerNorm, feed-forward
(gelu_new) + residual + LayerNorm. Parameter names equal transformers' state-dict keys.

Attention goes through :func:`nystromer.nystrom_attention` (``numerics="nystromer"``, the
default), by the same path as :class:`nystromer.NystromAttention`, or, to reproduce
transformers' outputs exactly, through the compatibility function in
:mod:`nystromer.models.hf_numerics` (``numerics="hf"``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .. import _cpu
from .._checks import check_shape, positive_int
from ..attention import ValueConv, multihead_nystrom_attention
from ..attention_map import AttentionMap
from ..functional import attention_rows
from . import hf_io
from .config import NystromformerConfig
from .hf_numerics import hf_additive_mask, hf_attention_rows, hf_self_attention

__all__ = [
    "NystromformerPreTrainedModel",
    "NystromformerModel",
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

# Position ids start at 2 in transformers' Nyströmformer (RoBERTa-style offset): rows 0 and 1 of
# the table exist but the default ids never use them.
POSITION_OFFSET = 2


# --------------------------------------------------------------------------- outputs


class _Output:
    """Named fields, also reachable as ``out[0]`` (first non-None field) or ``out["logits"]``,
    as transformers' ModelOutput."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        )

    def __getitem__(self, item: int | str) -> Any:
        if isinstance(item, str):
            return getattr(self, item)
        return self.to_tuple()[item]


@dataclass
class BaseModelOutput(_Output):
    """last_hidden_state (B, n, hidden); hidden_states: embeddings and every layer's output
    (num_hidden_layers + 1 tensors) when ``output_hidden_states=True``; attentions: one
    :class:`~nystromer.AttentionMap` (B, H, n, n) per layer when ``output_attentions=True``."""

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[AttentionMap, ...] | None = None


@dataclass
class _LogitsOutput(_Output):
    loss: Tensor | None
    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[AttentionMap, ...] | None = None


@dataclass
class MaskedLMOutput(_LogitsOutput):
    """loss (scalar, with labels), logits (B, n, vocab_size), hidden_states, attentions."""


@dataclass
class SequenceClassifierOutput(_LogitsOutput):
    """loss (scalar, with labels), logits (B, num_labels), hidden_states, attentions."""


@dataclass
class TokenClassifierOutput(_LogitsOutput):
    """loss (scalar, with labels), logits (B, n, num_labels), hidden_states, attentions."""


@dataclass
class MultipleChoiceModelOutput(_LogitsOutput):
    """loss (scalar, with labels), logits (B, num_choices), hidden_states, attentions
    (maps of the B·num_choices encoded sequences)."""


@dataclass
class QuestionAnsweringModelOutput(_Output):
    """loss (scalar, with start and end positions), start_logits and end_logits (B, n),
    hidden_states, attentions."""

    loss: Tensor | None
    start_logits: Tensor
    end_logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[AttentionMap, ...] | None = None


def _as_requested(output: _Output, return_dict: bool | None) -> Any:
    """transformers' convention: ``return_dict=False`` gives the fields that are set, as a
    tuple in field order; None (the default) or True the output object."""
    return output.to_tuple() if return_dict is False else output


# --------------------------------------------------------------------------- building blocks


def _activation(name: str):
    # transformers' ACT2FN names; "gelu_new" and "gelu_fast" are the tanh approximation.
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        # A partial, not a lambda: modules holding it must pickle (torch.save(model), spawn).
        return functools.partial(F.gelu, approximate="tanh")
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}[
        name
    ]


class NystromformerEmbeddings(nn.Module):
    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__()
        pad = config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings + POSITION_OFFSET, config.hidden_size
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, inputs_embeds: Tensor, token_type_ids: Tensor, position_ids: Tensor
    ) -> Tensor:
        x = (
            inputs_embeds
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(position_ids)
        )
        return self.dropout(self.LayerNorm(x))


class NystromformerSelfAttention(nn.Module):
    """Q, K, V projections, attention, optional convolution skip. Output (B, n, hidden), before
    the output projection (which lives in ``attention.output.dense`` in this layout).

    The settings are read from the shared config at every call, so changing the config (as
    :func:`nystromer.convert` does) changes the attention of every layer."""

    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.conv: ValueConv | None = None
        if config.conv_kernel_size is not None:
            self.conv = ValueConv(config.num_attention_heads, config.conv_kernel_size)

    def forward(
        self, hidden_states: Tensor, mask: Tensor | None, output_attentions: bool = False
    ) -> Tensor | tuple[Tensor, AttentionMap]:
        """(B, n, hidden) → (B, n, hidden); with ``output_attentions``, also the
        :class:`~nystromer.AttentionMap` (B, H, n, n) of the matrix applied to the values."""
        cfg = self.config
        q, k, v = (
            proj(hidden_states).unflatten(-1, (cfg.num_attention_heads, cfg.head_dim))
            for proj in (self.query, self.key, self.value)
        )
        if cfg.numerics == "hf":
            out = self._hf_attention(q, k, v, mask).transpose(1, 2).flatten(2)
        else:
            out = multihead_nystrom_attention(
                q,
                k,
                v,
                cfg.nystrom_options,
                mask=mask,
                dropout_p=cfg.attention_probs_dropout_prob if self.training else 0.0,
                conv=self.conv,
            ).flatten(2)
        if output_attentions:
            return out, self._attention_map(q, k, mask)
        return out

    def _attention_map(self, q: Tensor, k: Tensor, mask: Tensor | None) -> AttentionMap:
        """The matrix the forward multiplied the values by (before the convolution skip is
        added), as rows on demand, from its (B, n, H, d) projections q and k: what
        :func:`nystromer.attention_rows` gives for the forward's settings, or transformers'
        for ``numerics="hf"``. Attention dropout (training only) is not in it."""
        cfg = self.config
        b, n, h, _ = q.shape
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, n, d), views
        # A copy: the caller may reuse the mask's memory before rows are asked for.
        mask = None if mask is None else mask.clone()
        if cfg.numerics == "hf":
            additive = hf_additive_mask(mask, q)
            settings = {
                "num_landmarks": cfg.num_landmarks,
                "segment_means_seq_len": cfg.segment_means_seq_len,
                "pinv_iterations": cfg.pinv_iterations,
                "per_matrix_init": cfg.inv_coeff_init_option,
            }

            def rows(b_sel: slice, h_sel: slice, index: Tensor) -> Tensor:
                return hf_attention_rows(
                    q, k, additive, index, batch=b_sel, heads=h_sel, **settings
                )

        else:
            settings = cfg.nystrom_options.attention_kwargs()

            def rows(b_sel: slice, h_sel: slice, index: Tensor) -> Tensor:
                # Each sample's rows depend on that sample alone: the batch can be narrowed.
                sample_mask = None if mask is None else mask[b_sel]
                return attention_rows(
                    q[b_sel, h_sel], k[b_sel, h_sel], index, mask=sample_mask, **settings
                )

        return AttentionMap(rows, (b, h, n, n), q.dtype, q.device)

    def _hf_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """transformers' numerics: (B, n, H, d) inputs → (B, H, n, d)."""
        cfg = self.config
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return hf_self_attention(
            q,
            k,
            v,
            hf_additive_mask(mask, q),
            num_landmarks=cfg.num_landmarks,
            segment_means_seq_len=cfg.segment_means_seq_len,
            pinv_iterations=cfg.pinv_iterations,
            per_matrix_init=cfg.inv_coeff_init_option,
            conv=self.conv,
        )


class _DenseResidualNorm(nn.Module):
    """dense → dropout → LayerNorm(· + residual): transformers' *SelfOutput and *Output."""

    def __init__(self, d_in: int, d_out: int, config: NystromformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class NystromformerAttention(nn.Module):
    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__()
        self.self = NystromformerSelfAttention(config)
        self.output = _DenseResidualNorm(config.hidden_size, config.hidden_size, config)

    def forward(
        self, hidden_states: Tensor, mask: Tensor | None, output_attentions: bool = False
    ) -> Tensor | tuple[Tensor, AttentionMap]:
        if output_attentions:
            context, attention = self.self(hidden_states, mask, output_attentions=True)
            return self.output(context, hidden_states), attention
        return self.output(self.self(hidden_states, mask), hidden_states)


class _Intermediate(nn.Module):
    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class NystromformerLayer(nn.Module):
    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__()
        self.attention = NystromformerAttention(config)
        self.intermediate = _Intermediate(config)
        self.output = _DenseResidualNorm(config.intermediate_size, config.hidden_size, config)

    def forward(
        self, hidden_states: Tensor, mask: Tensor | None, output_attentions: bool = False
    ) -> Tensor | tuple[Tensor, AttentionMap]:
        if output_attentions:
            x, attention = self.attention(hidden_states, mask, output_attentions=True)
            return self.output(self.intermediate(x), x), attention
        x = self.attention(hidden_states, mask)
        return self.output(self.intermediate(x), x)


class NystromformerEncoder(nn.Module):
    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            NystromformerLayer(config) for _ in range(config.num_hidden_layers)
        )
        # Set by NystromformerPreTrainedModel.gradient_checkpointing_enable.
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict[str, Any] = {}

    def run_layers(
        self,
        x: Tensor,
        mask: Tensor | None,
        states: list[Tensor] | None,
        attentions: list[AttentionMap] | None = None,
    ) -> Tensor:
        """Every layer in turn (recomputed in the backward pass under gradient checkpointing,
        while training); appends each output to ``states`` and each layer's attention map to
        ``attentions`` when given."""
        # getattr: a whole model pickled by an earlier version has no such attribute.
        checkpointing = getattr(self, "gradient_checkpointing", False)
        checkpointing = checkpointing and self.training and torch.is_grad_enabled()
        # Positional: checkpoint passes its extra arguments on positionally.
        args = (mask, True) if attentions is not None else (mask,)
        for layer in self.layer:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, *args, **self.checkpoint_kwargs)
            else:
                x = layer(x, *args)
            if attentions is not None:
                x, attention = x
                attentions.append(attention)
            if states is not None:
                states.append(x)
        return x


# --------------------------------------------------------------------------- models


class NystromformerPreTrainedModel(nn.Module):
    """Config handling, weight initialisation, and the Hugging Face checkpoint format."""

    base_model_prefix = "nystromformer"
    # State-dict keys that share storage with another key and are not written to checkpoints.
    _tied_keys: tuple[str, ...] = ()

    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__()
        if not isinstance(config, NystromformerConfig):
            raise TypeError(f"config must be a NystromformerConfig, got {type(config).__name__}")
        config.validate()
        self.config = config

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' initialisation: N(0, initializer_range) for linear and embedding
        # weights, zero biases and padding rows, unit LayerNorm.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _post_init(self) -> None:
        self.apply(self._init_weights)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Recompute each layer in the backward pass instead of storing its activations
        (transformers' method; ``Trainer(gradient_checkpointing=True)`` calls it). Applies in
        training mode only; dropout masks are replayed, so gradients do not change.

        Args:
            gradient_checkpointing_kwargs: keywords for ``torch.utils.checkpoint.checkpoint``;
                default ``{"use_reentrant": False}``.
        """
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for m in self.modules():
            if isinstance(m, NystromformerEncoder):
                m.gradient_checkpointing, m.checkpoint_kwargs = True, kwargs

    def gradient_checkpointing_disable(self) -> None:
        """Store activations again (the default)."""
        for m in self.modules():
            if isinstance(m, NystromformerEncoder):
                m.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether :meth:`gradient_checkpointing_enable` is in effect."""
        return any(
            getattr(m, "gradient_checkpointing", False)
            for m in self.modules()
            if isinstance(m, NystromformerEncoder)
        )

    @property
    def is_base_model(self) -> bool:
        return isinstance(self, NystromformerModel)

    def get_output_embeddings(self) -> nn.Linear | None:
        """The masked-LM decoder (transformers' method); None for the other classes."""
        return None

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """Change the vocabulary size, as transformers' ``PreTrainedModel`` does: the word
        embedding table, ``config.vocab_size`` and, in the masked-LM model, the decoder and its
        output bias (tied or not, as the model ties them) get ``new_num_tokens`` rows.

        Rows of the old tokens are kept; growing appends rows, shrinking drops the last ones
        (and the table's padding index, if it is dropped). New rows:

        - ``mean_resizing=True`` (default): drawn from the normal distribution with the old
          rows' mean and 1e-9 times their covariance (transformers' choice: new tokens start
          at the average token, so that predictions barely move), or the mean itself where
          that covariance is singular (fewer tokens than hidden_size); new output-bias
          entries are the old entries' mean.
        - ``mean_resizing=False``: N(0, ``config.initializer_range``) weights, zero bias.

        The table stays the same module (hooks and references to it hold), with new parameters:
        build optimisers after resizing.

        Args:
            new_num_tokens: the new number of rows; None keeps the current number.
            pad_to_multiple_of: round the number of rows up to a multiple of this (e.g. 64
                for tensor-core friendly shapes).
            mean_resizing: how new rows are initialised (above).

        Returns:
            The word embedding ``nn.Embedding``; with both sizes None, the current one,
            unchanged.
        """
        embeddings = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embeddings
        rows = embeddings.num_embeddings
        if new_num_tokens is not None:
            rows = positive_int("new_num_tokens", new_num_tokens)
        if pad_to_multiple_of is not None:
            multiple = positive_int("pad_to_multiple_of", pad_to_multiple_of)
            rows = -(-rows // multiple) * multiple
        if rows != embeddings.num_embeddings:
            std = self.config.initializer_range
            embeddings.weight = _resized_parameter(embeddings.weight, rows, mean_resizing, std)
            embeddings.num_embeddings = rows
            if embeddings.padding_idx is not None and embeddings.padding_idx >= rows:
                embeddings.padding_idx = None
            self._resize_outputs(rows, mean_resizing)
        self.set_input_embeddings(embeddings)  # config.vocab_size; a tied decoder follows
        return embeddings

    def _resize_outputs(self, rows: int, mean_resizing: bool) -> None:
        """Resize the layers that predict tokens (none here) to ``rows`` tokens."""

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        strict: bool = False,
        dtype: torch.dtype | str | None = None,
        **config_overrides: Any,
    ):
        """Load a Hugging Face-format directory (config.json + model.safetensors or
        pytorch_model.bin, possibly sharded), as written by transformers or :meth:`save_pretrained`.
        The model is returned in eval mode, as transformers does; call ``.train()`` to fine-tune.

        Args:
            directory: the checkpoint folder.
            strict: if True, every weight of this class must be in the checkpoint and nothing
                else may be. If False (default), head weights missing from the checkpoint (a
                new task head on a pretrained encoder) are initialised and logged, and weights
                of other heads are ignored and logged; missing or unknown encoder weights are
                always an error.
            dtype: of the model's weights. None (default): torch's default dtype (float32),
                whatever the checkpoint was saved in, as transformers 4 loaded; ``"auto"``: the
                checkpoint's (config.json's ``"dtype"``, else its weights'), as transformers 5
                loads by default; or a floating ``torch.dtype`` or its name.
            **config_overrides: config fields to change, e.g. ``num_landmarks=64``,
                ``numerics="hf"``, ``num_labels=3``.

        Raises:
            FileNotFoundError: no config.json or no weights file.
            ValueError: an impossible ``dtype``.
            hf_io.CheckpointError: key or shape mismatch (the message lists the keys).
        """
        target = hf_io.check_dtype(dtype)
        config = NystromformerConfig.from_pretrained(directory, **config_overrides)
        state = hf_io.read_state_dict(directory)
        if target == "auto":
            target = hf_io.checkpoint_dtype(config.extra, state)
        # Made in the target dtype before the weights are copied in: a float64 checkpoint
        # loaded in float64 is never rounded through float32.
        model = cls(config).to(target)
        hf_io.load_into(model, state, strict=strict, source=str(directory))
        return model.eval()  # as transformers: dropout off until model.train()

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write config.json and model.safetensors that transformers' matching class loads
        without missing weights. Each file is written atomically."""
        hf_io.write_checkpoint(self, directory)


def _resized_parameter(old: Tensor, rows: int, mean_resizing: bool, std: float) -> nn.Parameter:
    """A copy of ``old`` (V, d) or (V,) with ``rows`` rows: the first min(V, rows) kept, new
    ones initialised as :meth:`NystromformerPreTrainedModel.resize_token_embeddings` says
    (``std``: of the normal draw without mean resizing; 0 gives zeros)."""
    with torch.no_grad():
        keep = min(len(old), rows)
        new = old.new_empty(rows, *old.shape[1:])
        new[:keep] = old[:keep]
        added = rows - keep
        if added:
            if mean_resizing:
                new[keep:] = _mean_rows(old, added)
            elif std:
                new[keep:] = torch.randn_like(new[keep:]) * std
            else:
                new[keep:] = 0
    return nn.Parameter(new, requires_grad=old.requires_grad)


def _mean_rows(old: Tensor, count: int) -> Tensor:
    """``count`` rows near the mean of old's rows (V, d): drawn from N(mean, 1e-9·Σ), Σ their
    covariance, as transformers draws them; the mean itself where 1e-9·Σ is not positive
    definite, and for a vector (V,) (a bias)."""
    work = old.to(torch.promote_types(old.dtype, torch.float32))
    mean = work.mean(0)
    rows = mean.expand(count, *mean.shape)
    if old.dim() == 2:
        centred = work - mean
        factor, info = torch.linalg.cholesky_ex(1e-9 * (centred.T @ centred) / len(old))
        if int(info) == 0:
            rows = rows + torch.randn_like(rows) @ factor.T
    return rows.to(old.dtype)


def _check_ids(name: str, ids: Tensor, high: int, shape: tuple[int, ...] | None) -> None:
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if shape is not None:
        check_shape(name, ids, shape)
    # Looked at only where reading is cheap: elsewhere reading the range back would wait for
    # the device at every forward (an id out of range then fails in the embedding lookup).
    if ids.numel() and _cpu.reads_are_cheap(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= high:
            raise ValueError(f"{name} must lie in [0, {high}), got values in [{lo}, {hi}]")


class NystromformerModel(NystromformerPreTrainedModel):
    """The bare encoder: ``forward(...) -> BaseModelOutput`` with last_hidden_state (B, n, hidden).

    Pad on the right: position ids count from the start of the sequence, so a right-padded
    sequence has, at its real positions, the output it has alone (with the default numerics).
    """

    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__(config)
        self.embeddings = NystromformerEmbeddings(config)
        self.encoder = NystromformerEncoder(config)
        self._post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the word embedding table, an ``nn.Embedding(rows, hidden_size)``;
        ``config.vocab_size`` becomes its number of rows (the ids ``forward`` accepts)."""
        if not isinstance(value, nn.Embedding) or value.embedding_dim != self.config.hidden_size:
            raise ValueError(
                f"value must be an nn.Embedding with embedding_dim {self.config.hidden_size} "
                f"(hidden_size), got {value!r}"
            )
        self.embeddings.word_embeddings = value
        self.config.vocab_size = value.num_embeddings

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        output_attentions: bool = False,
    ) -> BaseModelOutput | tuple[Tensor, ...]:
        """Encode a batch.

        Args:
            input_ids: (B, n) token ids in [0, vocab_size).
            attention_mask: (B, n), 1/True for real tokens, 0/False for padding; None = no
                padding.
            token_type_ids: (B, n) or (1, n) in [0, type_vocab_size); default zeros.
            position_ids: (B, n), (1, n) or (n,) rows of the position table; default 2, 3, …,
                n + 1.
            inputs_embeds: (B, n, hidden_size) instead of input_ids.
            output_hidden_states: also return the embeddings and every layer's output.
            return_dict: False returns the output's fields as a tuple, leaving out absent
                ones (transformers' ``return_dict=False``); None or True the dataclass.
            output_attentions: also return each layer's attention matrix, the one its
                attention multiplied the values by (before the convolution skip; without
                attention dropout), as an :class:`~nystromer.AttentionMap` (B, H, n, n)
                whose rows are computed when indexed: ``out.attentions[-1][:, :, 0]`` is the
                first token's row for every head, O((m + 1)·n) per head, never n×n. Exact
                softmax rows for n ≤ num_landmarks; with ``numerics="hf"``, transformers'
                matrix (its own ``output_attentions`` gives F·A⁺, (B, H, n, m), in the
                Nyström branch). Last in the signature, unlike transformers (where it comes
                before ``output_hidden_states``), so that positional calls keep working:
                pass it by keyword.

        Returns:
            BaseModelOutput; n ≤ max_position_embeddings.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(
                    f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}"
                )
            _check_ids("input_ids", input_ids, cfg.vocab_size, None)
            b, n = input_ids.shape
            device = input_ids.device
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, seq_len, {cfg.hidden_size}), got "
                    f"{tuple(inputs_embeds.shape)}"
                )
            b, n = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        if n < 1:
            raise ValueError("the input sequence is empty")
        if position_ids is None:
            if n > cfg.max_position_embeddings:
                raise ValueError(
                    f"sequence length {n} exceeds max_position_embeddings "
                    f"({cfg.max_position_embeddings}), the length of the position table"
                )
            position_ids = torch.arange(POSITION_OFFSET, n + POSITION_OFFSET, device=device)
            position_ids = position_ids.expand(b, n)
        else:
            if position_ids.dim() == 1 or (position_ids.dim() == 2 and len(position_ids) == 1):
                # (n,) or (1, n): one row for the whole batch, broadcast as transformers does.
                position_ids = position_ids.expand(b, -1)
            _check_ids(
                "position_ids",
                position_ids,
                cfg.max_position_embeddings + POSITION_OFFSET,
                (b, n),
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros(b, n, dtype=torch.long, device=device)
        else:
            if token_type_ids.dim() == 2 and len(token_type_ids) == 1:
                token_type_ids = token_type_ids.expand(b, -1)  # (1, n), as position_ids
            _check_ids("token_type_ids", token_type_ids, cfg.type_vocab_size, (b, n))
        mask = None
        if attention_mask is not None:
            check_shape("attention_mask", attention_mask, (b, n), "batch, seq_len")
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
            mask = _cpu.drop_all_real(mask)

        if inputs_embeds is None:
            inputs_embeds = self.embeddings.word_embeddings(input_ids)
        x = self.embeddings(inputs_embeds, token_type_ids, position_ids)
        states = [x] if output_hidden_states else None
        attentions: list[AttentionMap] | None = [] if output_attentions else None
        x = self.encoder.run_layers(x, mask, states, attentions)
        return _as_requested(
            BaseModelOutput(
                x,
                tuple(states) if states is not None else None,
                tuple(attentions) if attentions is not None else None,
            ),
            return_dict,
        )


class _HeadModel(NystromformerPreTrainedModel):
    """The encoder and a task head: ``forward`` encodes, ``_logits`` and ``_loss`` are the
    head's, ``output_class`` the output's."""

    output_class: type[_LogitsOutput]

    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__(config)
        self.nystromformer = NystromformerModel(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.nystromformer.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """As :meth:`NystromformerModel.set_input_embeddings`."""
        self.nystromformer.set_input_embeddings(value)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        output_attentions: bool = False,
    ) -> _LogitsOutput | tuple[Tensor, ...]:
        """Encode and apply the head; inputs and ``output_attentions`` as
        :meth:`NystromformerModel.forward`, ``labels`` as the class docstring says. Returns the
        class's output (loss None without labels), or with ``return_dict=False`` its fields as
        a tuple, absent ones left out."""
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
        }
        out = self.nystromformer(
            **self._encoder_inputs(inputs),
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self._logits(out.last_hidden_state, inputs)
        loss = None if labels is None else self._loss(logits, labels)
        return _as_requested(
            self.output_class(loss, logits, out.hidden_states, out.attentions), return_dict
        )

    def _encoder_inputs(self, inputs: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        return inputs

    def _logits(self, hidden: Tensor, inputs: dict[str, Tensor | None]) -> Tensor:
        raise NotImplementedError

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        # Cross-entropy over the last axis, labels -100 ignored: the masked-LM, token and
        # multiple-choice heads.
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


class _LMPredictions(nn.Module):
    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = _activation(config.hidden_act)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # transformers ties decoder.bias to this parameter; checkpoints store it here.
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        x = self.transform.LayerNorm(self.act(self.transform.dense(x)))
        return self.decoder(x) + self.bias


class NystromformerForMaskedLM(_HeadModel):
    """Masked language model: logits (B, n, vocab_size); loss is cross-entropy over labels
    (B, n), positions labelled -100 ignored."""

    output_class = MaskedLMOutput

    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__(config)
        self.cls = nn.Module()
        self.cls.predictions = _LMPredictions(config)
        self._post_init()
        nn.init.zeros_(self.cls.predictions.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the decoder matrix with the word embeddings (``tie_word_embeddings``)."""
        if self.config.tie_word_embeddings:
            decoder = self.cls.predictions.decoder
            decoder.weight = self.nystromformer.embeddings.word_embeddings.weight
            decoder.out_features = decoder.weight.shape[0]
            self._tied_keys = ("cls.predictions.decoder.weight",)

    def get_output_embeddings(self) -> nn.Linear:
        """The decoder, ``cls.predictions.decoder`` (its output bias is
        ``cls.predictions.bias``)."""
        return self.cls.predictions.decoder

    def _resize_outputs(self, rows: int, mean_resizing: bool) -> None:
        # The output bias always; the decoder matrix when untied (tied, it is the table).
        predictions = self.cls.predictions
        if not self.config.tie_word_embeddings:
            decoder = predictions.decoder
            std = self.config.initializer_range
            decoder.weight = _resized_parameter(decoder.weight, rows, mean_resizing, std)
            decoder.out_features = rows
        predictions.bias = _resized_parameter(predictions.bias, rows, mean_resizing, 0.0)

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the word embedding table (as :meth:`NystromformerModel.set_input_embeddings`);
        the tied decoder follows it, and the output bias keeps its rows (0 for new rows)."""
        predictions = self.cls.predictions
        rows = value.num_embeddings if isinstance(value, nn.Embedding) else len(predictions.bias)
        if not self.config.tie_word_embeddings and rows != predictions.decoder.out_features:
            raise ValueError(
                f"the untied decoder predicts {predictions.decoder.out_features} tokens; a table "
                f"of {rows} rows needs a decoder of that size too (tie_word_embeddings=False)"
            )
        super().set_input_embeddings(value)
        if rows != len(predictions.bias):
            with torch.no_grad():
                bias = predictions.bias.new_zeros(rows)
                keep = min(rows, len(predictions.bias))
                bias[:keep] = predictions.bias[:keep]
            predictions.bias = nn.Parameter(bias)
        self.tie_weights()

    def _logits(self, hidden: Tensor, inputs: dict[str, Tensor | None]) -> Tensor:
        return self.cls.predictions(hidden)


class NystromformerForSequenceClassification(_HeadModel):
    """Sequence classification or regression from the first token: logits (B, num_labels).

    Loss as transformers: ``problem_type`` (or, when None, inferred: num_labels == 1 →
    regression (MSE); integer labels → single-label cross-entropy; else multi-label BCE).
    """

    output_class = SequenceClassifierOutput

    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Module()
        self.classifier.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.act = _activation(config.hidden_act)
        self._post_init()

    def _logits(self, hidden: Tensor, inputs: dict[str, Tensor | None]) -> Tensor:
        x = self.dropout(hidden[:, 0])
        x = self.dropout(self.act(self.classifier.dense(x)))
        return self.classifier.out_proj(x)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        k = self.config.num_labels
        problem = self.config.problem_type
        if problem is None:
            if k == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if k == 1:
                return F.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, k), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class NystromformerForTokenClassification(_HeadModel):
    """Per-token classification: logits (B, n, num_labels); cross-entropy, -100 ignored."""

    output_class = TokenClassifierOutput

    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._post_init()

    def _logits(self, hidden: Tensor, inputs: dict[str, Tensor | None]) -> Tensor:
        return self.classifier(self.dropout(hidden))


class NystromformerForMultipleChoice(_HeadModel):
    """Multiple choice: inputs (B, C, n) (embeddings (B, C, n, hidden)), logits (B, C),
    cross-entropy over choices with labels (B,)."""

    output_class = MultipleChoiceModelOutput

    def __init__(self, config: NystromformerConfig) -> None:
        super().__init__(config)
        self.pre_classifier = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self._post_init()

    @staticmethod
    def _choices(inputs: dict[str, Tensor | None]) -> tuple[int, int]:
        """(B, C) from input_ids (B, C, n) or inputs_embeds (B, C, n, hidden)."""
        input_ids, inputs_embeds = inputs["input_ids"], inputs["inputs_embeds"]
        lead = input_ids if input_ids is not None else inputs_embeds
        if lead is None:
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        want = 3 if input_ids is not None else 4
        if lead.dim() != want:
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(
                f"{name} must have {want} dimensions (batch, num_choices, seq_len"
                f"{', hidden' if want == 4 else ''}), got shape {tuple(lead.shape)}"
            )
        return lead.shape[0], lead.shape[1]

    def _encoder_inputs(self, inputs: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        b, c = self._choices(inputs)

        def flat(t: Tensor | None, name: str) -> Tensor | None:
            if t is None:
                return None
            one_row = (t.dim() == 2 and len(t) == 1) or (name == "position_ids" and t.dim() == 1)
            if name in ("position_ids", "token_type_ids") and one_row:
                return t  # one row for every sequence, as the encoder takes it: broadcast
            if t.shape[:2] != (b, c):
                raise ValueError(
                    f"{name} must have shape ({b}, {c}, ...) (batch, num_choices, ...), got "
                    f"{tuple(t.shape)}"
                )
            return t.reshape(b * c, *t.shape[2:])

        return {name: flat(t, name) for name, t in inputs.items()}

    def _logits(self, hidden: Tensor, inputs: dict[str, Tensor | None]) -> Tensor:
        pooled = F.relu(self.pre_classifier(hidden[:, 0]))
        return self.classifier(pooled).view(self._choices(inputs))


class NystromformerForQuestionAnswering(_HeadModel):
    """Extractive QA: start_logits and end_logits (B, n). With ``start_positions`` and
    ``end_positions`` (B,), loss is the mean of the two cross-entropies; positions outside the
    input are clamped to n and ignored (transformers' convention). ``config.num_labels`` is 2."""

    output_class = _LogitsOutput  # start and end logits stacked (B, n, 2); forward splits them

    def __init__(self, config: NystromformerConfig) -> None:
        if config.num_labels != 2:
            config = config.replace(num_labels=2)
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._post_init()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        output_attentions: bool = False,
    ) -> QuestionAnsweringModelOutput | tuple[Tensor, ...]:
        """Encode and predict the answer span; inputs and ``output_attentions`` as
        :meth:`NystromformerModel.forward`."""
        # The heads' one forward, with the span as labels (B, 2) and logits (B, n, 2).
        labels = None
        if start_positions is not None and end_positions is not None:
            labels = torch.stack((start_positions.reshape(-1), end_positions.reshape(-1)), -1)
        out = super().forward(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            labels,
            output_hidden_states,
            output_attentions=output_attentions,
        )
        start_logits, end_logits = out.logits.unbind(-1)
        return _as_requested(
            QuestionAnsweringModelOutput(
                out.loss, start_logits, end_logits, out.hidden_states, out.attentions
            ),
            return_dict,
        )

    def _logits(self, hidden: Tensor, inputs: dict[str, Tensor | None]) -> Tensor:
        return self.qa_outputs(hidden)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        n = logits.shape[1]
        start_logits, end_logits = logits.unbind(-1)
        start, end = labels.clamp(0, n).unbind(-1)
        return 0.5 * (
            F.cross_entropy(start_logits, start, ignore_index=n)
            + F.cross_entropy(end_logits, end, ignore_index=n)
        )

"""The Nyströmformer authors' Long Range Arena classifiers, with Nyström or exact attention.

A small pre-LN Transformer encoder (token embedding + learned positions, 2 layers of width 64,
FFN 128, 2 heads of 32, dropout 0.1) whose outputs are mean-pooled over real tokens and fed to
``Linear(64→128) → ReLU → Linear(128→classes)``; the retrieval task uses two towers with a
shared encoder and the features ``[x₀, x₁, x₀·x₁, x₀−x₁]``. ``attention="nystrom"`` is our
:class:`~nystromer.NystromAttention` (64 landmarks, depthwise convolution skip of kernel 35),
``"softmax"`` exact attention through ``scaled_dot_product_attention`` with the same padding
mask, so the paper's two columns are compared on identical data and code.

Differences from the authors' code, all because padding must not change a result: pooling
averages real tokens only (theirs averages every position, padding counted as zeros), and
Nyström landmarks ignore padding (theirs do not; see docs/lra.md). Token 0 is padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int, check_probability
from ..attention import NystromAttention
from ..options import NystromOptions, check_nystrom_options

__all__ = [
    "ATTENTIONS",
    "PAD_MULTIPLE",
    "LRAArchitecture",
    "LRAModelConfig",
    "SoftmaxAttention",
    "LRAEncoder",
    "LRAClassifier",
    "LRADualClassifier",
    "build_model",
    "collate",
    "classification_objective",
    "round_up",
    "count_parameters",
]

ATTENTIONS = ("nystrom", "softmax")
PAD_MULTIPLE = 64  # the authors pad every sequence to a multiple of the landmark count


_Config = TypeVar("_Config", bound="LRAArchitecture")


def round_up(n: int, multiple: int = PAD_MULTIPLE) -> int:
    """Smallest multiple of ``multiple`` that is ≥ ``n``."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class LRAArchitecture:
    """What an LRA classifier is, apart from the data it reads: the part a recipe chooses.

    Attributes:
        attention: ``nystrom`` or ``softmax``.
        embed_dim, ffn_dim, num_heads, num_layers: encoder shape (64, 128, 2, 2).
        classifier_dim: hidden width of the head (128).
        dropout: on embeddings, attention output and FFN (0.1).
        attention_dropout: on attention weights; None means the authors' choice: 0.1 for
            softmax, 0 for Nyström (their Nyström attention has none).
        num_landmarks, conv_kernel_size, pinv_iterations: Nyström settings (64, 35, 6);
            ``conv_kernel_size=None`` drops the convolution skip. :attr:`nystrom` holds them
            as one :class:`~nystromer.NystromOptions`.

    Raises:
        ValueError: at construction, naming the first field with an impossible value.
    """

    attention: str = "nystrom"
    embed_dim: int = 64
    ffn_dim: int = 128
    num_heads: int = 2
    num_layers: int = 2
    classifier_dim: int = 128
    dropout: float = 0.1
    attention_dropout: float | None = None
    num_landmarks: int = 64
    conv_kernel_size: int | None = 35
    pinv_iterations: int = 6

    def __post_init__(self) -> None:
        for name in ("embed_dim", "ffn_dim", "classifier_dim", "num_heads", "num_layers"):
            check_positive_int(name, getattr(self, name))
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads={self.num_heads}, got {self.embed_dim}"
            )
        for name in ("dropout", "attention_dropout"):
            if getattr(self, name) is not None:
                check_probability(name, getattr(self, name))
        check_nystrom_options(self.num_landmarks, self.pinv_iterations, self.conv_kernel_size)

    @property
    def nystrom(self) -> NystromOptions:
        """The Nyström settings as one validated object."""
        return NystromOptions(
            num_landmarks=self.num_landmarks,
            pinv_iterations=self.pinv_iterations,
            conv_kernel_size=self.conv_kernel_size,
        )

    @property
    def effective_attention_dropout(self) -> float:
        if self.attention_dropout is not None:
            return self.attention_dropout
        return 0.1 if self.attention == "softmax" else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_Config], d: Mapping[str, Any]) -> _Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}; expected some of {sorted(known)}"
            )
        return cls(**dict(d))


@dataclass(frozen=True, kw_only=True)
class LRAModelConfig(LRAArchitecture):
    """Shape of an LRA classifier: an :class:`LRAArchitecture` plus what the data fixes.

    Attributes (besides the architecture's; all keyword-only):
        vocab_size: number of token ids (0 is padding).
        num_classes: number of labels.
        max_length: rows of the position table: the longest (padded) input.
        two_tower: the retrieval model (two inputs, shared encoder).
    """

    vocab_size: int
    num_classes: int
    max_length: int
    two_tower: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_classes", "max_length"):
            check_positive_int(name, getattr(self, name))
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be ≥ 2, got {self.num_classes}")
        super().__post_init__()

    @property
    def architecture(self) -> LRAArchitecture:
        """The data-independent part of this config."""
        return LRAArchitecture(**{f.name: getattr(self, f.name) for f in fields(LRAArchitecture)})


class SoftmaxAttention(nn.Module):
    """Exact multi-head self-attention (``scaled_dot_product_attention``) with a key mask.

    The baseline column of the paper's LRA table, with the same projections as
    :class:`~nystromer.NystromAttention` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).

    Shapes: x (B, n, E), mask (B, n) bool True for real tokens → (B, n, E).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        attn_mask = None
        if mask is not None:
            # A sample without real tokens attends everywhere (finite; its output is unused).
            attn_mask = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]
        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)),
            heads(self.k_proj(x)),
            heads(self.v_proj(x)),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))


class _EncoderLayer(nn.Module):
    """Pre-LN block: x + Dropout(Attn(LN(x))), then x + FFN(LN(x)) with GELU (the authors')."""

    def __init__(self, cfg: LRAModelConfig) -> None:
        super().__init__()
        p_attn = cfg.effective_attention_dropout
        self.norm1 = nn.LayerNorm(cfg.embed_dim)
        self.attn: nn.Module
        if cfg.attention == "nystrom":
            nystrom = cfg.nystrom
            self.attn = NystromAttention(
                cfg.embed_dim,
                cfg.num_heads,
                num_landmarks=nystrom.num_landmarks,
                pinv_iterations=nystrom.pinv_iterations,
                conv_kernel_size=nystrom.conv_kernel_size,
                dropout=p_attn,
            )
        else:
            self.attn = SoftmaxAttention(cfg.embed_dim, cfg.num_heads, dropout=p_attn)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.embed_dim)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.ffn_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_dim, cfg.embed_dim),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), mask=mask))
        return x + self.ffn(self.norm2(x))


class LRAEncoder(nn.Module):
    """Embeddings, pre-LN layers, final LayerNorm, and mean pooling over real tokens.

    Shapes: input_ids (B, n) int64 with 0 for padding, n ≤ ``max_length`` → (B, E).
    """

    def __init__(self, cfg: LRAModelConfig) -> None:
        super().__init__()
        self.max_length = cfg.max_length
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.positions = nn.Embedding(cfg.max_length, cfg.embed_dim)
        # The authors' initialisation of both tables.
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(_EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor of shape (batch, seq_len), got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
            )
        n = input_ids.shape[1]
        if n > self.max_length:
            raise ValueError(
                f"input_ids has {n} positions but the model has {self.max_length} "
                "(max_length); truncate the data or build the model longer"
            )
        mask = input_ids != 0
        pos = torch.arange(n, device=input_ids.device)
        x = self.dropout(self.tokens(input_ids) + self.positions(pos))
        for layer in self.layers:
            x = layer(x, mask)
        x = self.norm(x)
        keep = mask.unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def _head(in_dim: int, cfg: LRAModelConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, cfg.classifier_dim),
        nn.ReLU(),
        nn.Linear(cfg.classifier_dim, cfg.num_classes),
    )


class LRAClassifier(nn.Module):
    """Sequence classifier (ListOps, Text, Image, Pathfinder).

    Shapes: input_ids (B, n) → logits (B, num_classes).
    """

    def __init__(self, cfg: LRAModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = LRAEncoder(cfg)
        self.head = _head(cfg.embed_dim, cfg)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.encoder(input_ids))


class LRADualClassifier(nn.Module):
    """Two-tower pair classifier (Retrieval): one shared encoder, features [x₀, x₁, x₀x₁, x₀−x₁].

    Shapes: input_ids_1 (B, n₁), input_ids_2 (B, n₂) → logits (B, num_classes).
    """

    def __init__(self, cfg: LRAModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = LRAEncoder(cfg)
        self.head = _head(4 * cfg.embed_dim, cfg)

    def forward(self, input_ids_1: Tensor, input_ids_2: Tensor) -> Tensor:
        x0, x1 = self.encoder(input_ids_1), self.encoder(input_ids_2)
        return self.head(torch.cat([x0, x1, x0 * x1, x0 - x1], dim=-1))


def build_model(cfg: LRAModelConfig) -> LRAClassifier | LRADualClassifier:
    """The classifier that ``cfg`` describes (two-tower when ``cfg.two_tower``)."""
    return LRADualClassifier(cfg) if cfg.two_tower else LRAClassifier(cfg)


def _pad(seqs: Sequence[Tensor], multiple: int) -> Tensor:
    lengths = []
    for s in seqs:
        nz = torch.nonzero(s)
        lengths.append(int(nz[-1]) + 1 if len(nz) else 0)
    n = round_up(max(max(lengths), 1), multiple)
    out = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, (s, length) in enumerate(zip(seqs, lengths, strict=True)):
        out[i, :length] = s[:length]
    return out


def collate(items: Sequence[tuple], pad_multiple: int = PAD_MULTIPLE) -> dict[str, Tensor]:
    """Batch LRA items, right-padded with 0 to a multiple of ``pad_multiple``.

    Trailing padding beyond the batch's longest sequence is dropped: the models give the same
    result for any amount of padding, so a batch of short sequences costs less.

    Args:
        items: ``(input_ids, label)`` or, for retrieval, ``(input_ids_1, input_ids_2, label)``
            with 1-D integer tensors.

    Returns:
        ``{"input_ids": (B, n), "labels": (B,)}`` or ``{"input_ids_1", "input_ids_2",
        "labels"}``.
    """
    if not items:
        raise ValueError("collate got an empty batch")
    width = len(items[0])
    if width not in (2, 3) or any(len(it) != width for it in items):
        raise ValueError(
            "items must all be (input_ids, label) or (input_ids_1, input_ids_2, label), got "
            f"lengths {sorted({len(it) for it in items})}"
        )
    labels = torch.tensor([int(it[-1]) for it in items], dtype=torch.long)
    if width == 2:
        return {"input_ids": _pad([it[0] for it in items], pad_multiple), "labels": labels}
    return {
        "input_ids_1": _pad([it[0] for it in items], pad_multiple),
        "input_ids_2": _pad([it[1] for it in items], pad_multiple),
        "labels": labels,
    }


def classification_objective(
    model: nn.Module, batch: Mapping[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy objective for :func:`nystromer.train.train`.

    Returns:
        ``(mean loss, {"count", "loss" (summed), "accuracy" (number correct)})``.
    """
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"})
    # The loss in at least float32 under bf16 autocast.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(logits, labels, reduction="none")
    correct = (logits.argmax(-1) == labels).sum()
    sums = {
        "count": torch.tensor(labels.numel()),
        "loss": losses.sum().detach(),
        "accuracy": correct,
    }
    return losses.mean(), sums


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (the authors' ListOps model: about 0.1 M besides positions)."""
    return sum(p.numel() for p in model.parameters())

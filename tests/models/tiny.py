"""Tiny configurations shared by the model tests (hidden 32, 2 layers, 4 heads)."""

from __future__ import annotations

import torch

from nystromer.models import NystromformerConfig

HEADS = (
    "NystromformerModel",
    "NystromformerForMaskedLM",
    "NystromformerForSequenceClassification",
    "NystromformerForTokenClassification",
    "NystromformerForMultipleChoice",
    "NystromformerForQuestionAnswering",
)

TINY = dict(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=96,
    conv_kernel_size=5,
    num_labels=3,
)


def tiny_config(**overrides) -> NystromformerConfig:
    return NystromformerConfig(**{**TINY, **overrides})


def tiny_hf_config(**overrides):
    from transformers import NystromformerConfig as HFConfig

    return HFConfig(**{**TINY, **overrides})


def hf_branch(branch: str):
    """``(transformers config, n, pad)`` that put transformers' Nyströmformer in its ``"exact"``
    branch (published checkpoints: num_landmarks == segment_means_seq_len; any length and
    padding) or its ``"nystrom"`` branch (exactly segment_means_seq_len tokens, no padding:
    transformers broadcasts an (n, n) mask onto (m, n) scores there)."""
    if branch == "exact":
        return tiny_hf_config(num_landmarks=16, segment_means_seq_len=16), 37, True
    return tiny_hf_config(num_landmarks=8, segment_means_seq_len=32), 32, False


def peaked(model):
    """``model`` with peaked attention and a strong convolution, in place: the N(0, 0.02)
    initialisation gives near-uniform attention, under which wrong masks or kernels and the
    numerical differences between implementations (pseudo-inverse scale, masking of the
    convolution) vanish."""
    base = getattr(model, "nystromformer", model)
    with torch.no_grad():
        for layer in base.encoder.layer:
            attn = layer.attention.self
            attn.query.weight.normal_(std=0.5)
            attn.key.weight.normal_(std=0.5)
            if getattr(attn, "conv", None) is not None:
                attn.conv.weight.normal_(std=0.3)
    return model


def main_output(name: str, out):
    """The tensor a head is judged by."""
    if name == "NystromformerModel":
        return out.last_hidden_state
    if name == "NystromformerForQuestionAnswering":
        return torch.stack([out.start_logits, out.end_logits])
    return out.logits


def batch(name: str, n: int, *, pad: bool, seed: int = 0, vocab: int = 50):
    """Inputs (and labels) for head `name`: batch 2 (multiple choice: 2 × 3 choices); with
    `pad`, the second sequence has its last 5 tokens padded."""
    g = torch.Generator().manual_seed(seed)
    lead = (2, 3) if name == "NystromformerForMultipleChoice" else (2,)
    ids = torch.randint(3, vocab, (*lead, n), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, ..., n - 5 :] = 0
    kwargs = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.randint(0, 2, ids.shape, generator=g),
    }
    labels = {
        "NystromformerModel": {},
        "NystromformerForMaskedLM": {"labels": torch.where(mask.bool(), ids, -100)},
        "NystromformerForSequenceClassification": {"labels": torch.tensor([0, 2])},
        "NystromformerForTokenClassification": {
            "labels": torch.randint(0, 3, ids.shape, generator=g)
        },
        "NystromformerForMultipleChoice": {"labels": torch.tensor([1, 2])},
        "NystromformerForQuestionAnswering": {
            "start_positions": torch.tensor([1, 3]),
            "end_positions": torch.tensor([4, n + 7]),  # out of range: ignored by convention
        },
    }[name]
    return kwargs, labels


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: relative to the output's scale, robust to entries near zero."""
    return float((a - b).detach().abs().max() / b.detach().abs().max())

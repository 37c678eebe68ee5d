"""Tiny local BERT checkpoints with a tokenizer, and a small text corpus (shared with the
benchmark tests)."""

from __future__ import annotations

import random

import torch

WORDS = [f"w{i}" for i in range(40)]


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def make_bert(
    directory,
    *,
    max_position_embeddings: int = 64,
    seed: int = 0,
    qk_scale: float = 30.0,
    value_scale: float = 10.0,
):
    """A 2-layer, 32-wide BERT with a WordPiece tokenizer over ``WORDS``, saved to
    ``directory``. Query and key weights are scaled by ``qk_scale``: at the usual random
    initialisation attention is almost uniform, which Nyström attention reproduces exactly;
    peaked attention, like a trained model's, gives the approximation a gap to close. Value
    weights are scaled by ``value_scale``: at the initial scale (std 0.02) attention adds
    little to the residual stream, and so does the approximation's error (the mean-pooled
    cosine of the Nyström model would be 0.9999 at m = 8 and 64 tokens; 0.988 with 10)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    # The vocabulary as a dict: transformers 5 ignores a vocab_file argument and would leave
    # only the special tokens, turning every word into [UNK].
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    assert len(tokenizer) == len(VOCAB)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertModel(config)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(qk_scale)
            layer.attention.self.key.weight.mul_(qk_scale)
            layer.attention.self.value.weight.mul_(value_scale)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_text(path, words: int = 3000, seed: int = 0):
    """Random sentences over ``WORDS``, a sentence per line."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(5, 15))) for _ in range(words // 10)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

"""Tiny in-memory datasets with the contract of ``nystromer.lra.data.load_split``."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class TokenDataset(Dataset):
    """Variable-length sequences whose label is the most frequent of a few marker tokens.

    Items are ``(input_ids (L,), label)``, 0 is padding, and ``vocab_size``/``max_length``
    are attributes, as the real LRA loaders provide. Learnable by a tiny model in a few
    dozen steps, and lengths vary so that padding and masking are exercised.
    """

    def __init__(
        self,
        n: int,
        *,
        num_classes: int = 3,
        vocab_size: int = 16,
        min_len: int = 20,
        max_length: int = 90,
        seed: int = 0,
        pairs: bool = False,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.num_classes = num_classes
        self.pairs = pairs
        self.items = []
        for _ in range(n):
            label = int(torch.randint(num_classes, (), generator=g))
            seqs = []
            for _ in range(2 if pairs else 1):
                length = int(torch.randint(min_len, max_length + 1, (), generator=g))
                ids = torch.randint(num_classes + 1, vocab_size, (length,), generator=g)
                marks = torch.randint(length, (length // 3,), generator=g)
                ids[marks] = label + 1  # marker tokens 1..num_classes carry the label
                seqs.append(ids)
            self.items.append((*seqs, label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def tiny_model_config(**overrides):
    """A small LRA classifier that trains in milliseconds per step."""
    from nystromer.lra.model import LRAModelConfig

    kw = dict(
        vocab_size=16,
        num_classes=3,
        max_length=128,
        embed_dim=16,
        ffn_dim=32,
        num_heads=2,
        num_layers=2,
        classifier_dim=16,
        num_landmarks=8,
        conv_kernel_size=5,
    )
    kw.update(overrides)
    return LRAModelConfig(**kw)


def recording_objective(
    losses, *, fail_at=None, nan_at=None, signal_at=None, nan_grad_at=None, fail_eval_at=None
):
    """The classification objective, recording each training loss; it can inject a
    KeyboardInterrupt, a NaN loss, a SIGINT or a NaN gradient under a finite loss at a given
    (1-based) training step, or a KeyboardInterrupt in the validation after that step."""
    import signal

    from nystromer.lra.model import classification_objective

    calls = {"n": 0}

    def objective(model, batch):
        loss, sums = classification_objective(model, batch)
        if not model.training:
            if calls["n"] == fail_eval_at:
                raise KeyboardInterrupt
            return loss, sums
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt
        if calls["n"] == signal_at:
            signal.raise_signal(signal.SIGINT)
        if calls["n"] == nan_at:
            loss = loss * float("nan")
        if calls["n"] == nan_grad_at:
            # sqrt at 0: the value adds 0, its derivative is inf · 0 = NaN for every weight.
            loss = loss + torch.sqrt(sum(p.sum() for p in model.parameters()) * 0.0)
        losses.append(loss.item())
        return loss, sums

    return objective

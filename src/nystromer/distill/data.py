"""Unlabeled text → fixed-length token windows for distillation.

The corpus is the concatenation of the given texts, tokenized once without special tokens.
Its last ``eval_fraction`` is held out (a contiguous tail, so held-out windows share no text
with training windows); the held-out tail is cut in two, validation (picks the best
checkpoint) and test (the reported before/after numbers). Training windows overlap
(``stride`` < window), held-out windows do not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["BUILTIN_TEXTS", "TokenWindows", "collate", "read_texts", "split_corpus"]

# Texts that ship with CPython, usable offline: name → loader.
BUILTIN_TEXTS = {
    # The reference manual's topics as shown by help(): ~465k characters of English prose
    # with code examples (~110k BERT tokens).
    "builtin:pydoc": lambda: _pydoc_topics(),
    # The docstrings of the standard library's modules, classes and functions (tests and
    # tools excluded, longer than 80 characters, each once): ~1.5M characters of English
    # prose (~350k BERT tokens) for CPython 3.11; the exact text depends on the version.
    "builtin:stdlib-docs": lambda: _stdlib_docstrings(),
}


def _pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _stdlib_docstrings() -> str:
    docs = (doc for _, module in stdlib_docstrings() for doc in module if len(doc) > 80)
    return "\n\n".join(dict.fromkeys(docs))  # each once


def stdlib_docstrings() -> Iterator[tuple[str, list[str]]]:
    """Per standard-library module (tests and tools excluded): its path below the library folder
    and its docstrings (module, classes, functions), each once, in order."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately invalid or not UTF-8
        docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
        yield rel.as_posix(), list(dict.fromkeys(doc for doc in docs if doc))


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; a file in another encoding is a ValueError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text file {path} is not UTF-8 ({e.reason} at byte {e.start}); convert it, "
            "e.g. with iconv -t UTF-8"
        ) from None


def read_texts(sources: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The texts of ``sources``: UTF-8 files, or a name from :data:`BUILTIN_TEXTS`.

    Raises:
        ValueError: no sources, an empty text, or a file that is not UTF-8 (the message
            names it).
        FileNotFoundError: a file that does not exist (the message names it).
    """
    if not sources:
        raise ValueError(f"text must name at least one file or one of {sorted(BUILTIN_TEXTS)}")
    texts = []
    for src in sources:
        if str(src) in BUILTIN_TEXTS:
            text = BUILTIN_TEXTS[str(src)]()
        else:
            path = Path(src)
            if not path.is_file():
                raise FileNotFoundError(
                    f"text file {path} does not exist (or name a built-in text: "
                    f"{', '.join(sorted(BUILTIN_TEXTS))})"
                )
            text = read_text_file(path)
        if not text.strip():
            raise ValueError(f"text {src} is empty")
        texts.append(text)
    return texts


def split_corpus(
    ids: Sequence[int], eval_fraction: float, window: int
) -> tuple[list[int], list[int], list[int]]:
    """Cut a token stream into train, validation and test parts (in that order).

    Args:
        ids: the tokenized corpus.
        eval_fraction: share of the tokens held out, in (0, 1).
        window: tokens per window (without special tokens); validation and test must each
            hold at least one.

    Raises:
        ValueError: a fraction outside (0, 1), or too little text for one window per part.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    n = len(ids)
    held = int(n * eval_fraction)
    train_end = n - held
    val_end = train_end + held // 2
    parts = (list(ids[:train_end]), list(ids[train_end:val_end]), list(ids[val_end:]))
    if min(len(p) for p in parts) < window:
        raise ValueError(
            f"the text has {n} tokens: too few for one {window}-token window in each of "
            f"train / validation / test with eval_fraction={eval_fraction} "
            f"(parts of {', '.join(str(len(p)) for p in parts)} tokens); give more text or a "
            "smaller max_length"
        )
    return parts


class TokenWindows(Dataset):
    """Windows of a token stream, each wrapped in the model's special tokens.

    Item ``i`` is ``{"input_ids": (L,), "attention_mask": (L,)}`` with L ≤ ``max_length``:
    ``prefix + ids[i·stride : i·stride + max_length − len(prefix) − len(suffix)] + suffix``.
    A final partial window is kept when ``keep_partial`` (it is padded by :func:`collate`).
    """

    def __init__(
        self,
        ids: Sequence[int],
        max_length: int,
        *,
        prefix: Sequence[int],
        suffix: Sequence[int],
        pad_id: int,
        stride: int | None = None,
        keep_partial: bool = False,
    ) -> None:
        self.ids = torch.as_tensor(list(ids), dtype=torch.long)
        self.prefix = torch.as_tensor(list(prefix), dtype=torch.long)
        self.suffix = torch.as_tensor(list(suffix), dtype=torch.long)
        self.pad_id = int(pad_id)
        self.body = max_length - len(self.prefix) - len(self.suffix)
        if self.body < 1:
            raise ValueError(f"max_length must exceed the {max_length - self.body} special tokens")
        self.stride = self.body if stride is None else stride
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be ≥ 1, got {stride!r}")
        n = len(self.ids)
        self.starts = list(range(0, n - self.body + 1, self.stride))
        covered = self.starts[-1] + self.body if self.starts else 0
        if keep_partial and covered < n:
            self.starts.append(covered)
        if not self.starts:
            raise ValueError(f"{n} tokens make no window of {self.body}")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        s = self.starts[i]
        ids = torch.cat([self.prefix, self.ids[s : s + self.body], self.suffix])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


def collate(items: list[dict[str, Tensor]], pad_id: int = 0) -> dict[str, Any]:
    """Right-pad a list of windows into a batch ``{"input_ids": (B, L), "attention_mask":
    (B, L)}`` (1 = real token)."""
    length = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        ids[row, :n] = x["input_ids"]
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}

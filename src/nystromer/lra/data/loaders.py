"""Readers for the official Long Range Arena files of the five tasks, as torch Datasets.

Every dataset yields ``(input_ids, label)`` (retrieval: ``(input_ids_1, input_ids_2, label)``)
with ``input_ids`` a 1-D int64 tensor whose real tokens are >= 1 (0 is padding), truncated to
``max_length``; it has the attributes ``vocab_size`` (largest id + 1), ``max_length`` and
``num_classes``. Padding and batching are left to the collate function.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from . import listops as _listops

__all__ = [
    "TASKS",
    "SPLITS",
    "DEFAULT_MAX_LENGTH",
    "NUM_CLASSES",
    "load_split",
    "restricted_unpickle",
    "TokenDataset",
    "PixelDataset",
    "PairDataset",
]

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
SPLITS = ("train", "val", "test")
# The Nyströmformer paper's lengths (docs/lra.md); text reviews: 1000 bytes (LRA itself uses 4000).
DEFAULT_MAX_LENGTH = {
    "listops": 2000,
    "text": 1000,
    "retrieval": 4000,
    "image": 1024,
    "pathfinder": 1024,
}
NUM_CLASSES = {"listops": 10, "text": 2, "retrieval": 2, "image": 10, "pathfinder": 2}
BYTE_VOCAB_SIZE = 257  # bytes 0–255 as ids 1–256
PATHFINDER_SPLIT_SEED = 0
GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale, used by LRA


def _index(i: int, n: int) -> int:
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} items")
    return int(i) % n


class TokenDataset(Dataset):
    """Variable-length sequences stored flat: item ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.

    Args:
        ids: (total,) token ids before ``shift`` (uint8 or wider).
        offsets: (N + 1,) start of each sequence in ``ids``.
        labels: (N,) class labels.
        vocab_size, max_length, num_classes: the dataset's attributes.
        shift: added to every id when an item is read (1 for byte-level data).
    """

    def __init__(
        self,
        ids: np.ndarray,
        offsets: np.ndarray,
        labels: np.ndarray,
        *,
        vocab_size: int,
        max_length: int,
        num_classes: int,
        shift: int = 0,
    ) -> None:
        self.ids, self.offsets, self.labels = ids, offsets, labels
        self.vocab_size, self.max_length, self.num_classes = vocab_size, max_length, num_classes
        self.shift = shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = _index(i, len(self))
        seq = self.ids[self.offsets[i] : self.offsets[i + 1]].astype(np.int64) + self.shift
        return torch.from_numpy(seq), int(self.labels[i])


class PixelDataset(Dataset):
    """Images as rows of grey levels: item ``i`` is ``pixels[i] + 1`` (ids 1–256), label.

    Args:
        pixels: (N, L) uint8 grey levels, rows already truncated to ``max_length``.
        labels: (N,) class labels.
    """

    def __init__(
        self, pixels: np.ndarray, labels: np.ndarray, *, max_length: int, num_classes: int
    ) -> None:
        self.pixels, self.labels = pixels, labels
        self.vocab_size = BYTE_VOCAB_SIZE
        self.max_length, self.num_classes = max_length, num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = _index(i, len(self))
        row = torch.from_numpy(self.pixels[i].astype(np.int64) + 1)
        return row, int(self.labels[i])


class PairDataset(Dataset):
    """LRA retrieval pairs read lazily from the TSV file (one seek per item).

    Only line offsets and labels stay in memory; each item reads its line, splits the five
    fields and returns both texts byte-level (ids = byte + 1), each truncated to ``max_length``.
    The file handle is reopened in each process, so DataLoader workers can share the dataset.
    """

    def __init__(
        self, path: Path, offsets: np.ndarray, labels: np.ndarray, *, max_length: int
    ) -> None:
        self.path, self.offsets, self.labels = path, offsets, labels
        self.vocab_size, self.max_length, self.num_classes = BYTE_VOCAB_SIZE, max_length, 2
        self._file: Any = None
        self._pid = -1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        i = _index(i, len(self))
        if self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(int(self.offsets[i]))
        line = self._file.readline().rstrip(b"\r\n")  # to its own end: blank lines may follow
        fields = line.split(b"\t")
        texts = [
            torch.from_numpy(np.frombuffer(t[: self.max_length], np.uint8).astype(np.int64) + 1)
            for t in fields[3:5]
        ]
        return texts[0], texts[1], int(self.labels[i])

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()


def load_split(
    task: str,
    data_dir: str | os.PathLike[str],
    split: str,
    *,
    max_length: int | None = None,
) -> Dataset:
    """One split of an LRA task, read from the official release files.

    Args:
        task: one of :data:`TASKS`: ``listops``, ``text``, ``retrieval``, ``image``,
            ``pathfinder``.
        data_dir: the task's folder: ListOps ``basic_*.tsv``; text the ``aclImdb`` folder or its
            parent; retrieval ``new_aan_pairs.*.tsv``; image ``cifar-10-batches-py`` or its
            parent; pathfinder ``curv_contour_length_14`` (with ``metadata/`` and ``imgs/``) or
            its parent.
        split: ``train``, ``val`` or ``test``. Text has no validation set in LRA: ``val`` is the
            test set, as in LRA. Image: ``val`` is the last 10% of CIFAR-10's training batches.
            Retrieval: ``val`` is the ``eval`` file. Pathfinder: 80/10/10 of all images after a
            fixed shuffle.
        max_length: longest sequence (each document for retrieval); longer ones are truncated.
            Default :data:`DEFAULT_MAX_LENGTH` of the task.

    Returns:
        A Dataset of ``(input_ids (L,) int64, label)``, or ``(input_ids_1, input_ids_2, label)``
        for retrieval, with ``L <= max_length`` and ids >= 1, and the attributes ``vocab_size``,
        ``max_length`` and ``num_classes``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if max_length is None:
        max_length = DEFAULT_MAX_LENGTH[task]
    if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool):
        raise TypeError(f"max_length must be an int or None, got {type(max_length).__name__}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{task} data folder {root} does not exist")
    reader = {
        "listops": _load_listops,
        "text": _load_text,
        "retrieval": _load_retrieval,
        "image": _load_image,
        "pathfinder": _load_pathfinder,
    }[task]
    return reader(root, split, int(max_length))


def _find(root: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"{what}: none of {list(names)} in {root}")


# ---------------------------------------------------------------------------------------------
# ListOps


_SPACE = 32
_BLANKS = (9, 11, 12, 13, _SPACE)  # the whitespace bytes besides the newline
_BLOCK_BYTES = 1 << 23  # parse the TSV in blocks of whole lines: bounded memory on 600 MB files
_LISTOPS_EXPECTED = "digits 0-9, [MIN, [MAX, [MED, [SM, ], ( and )"


def _load_listops(root: Path, split: str, max_length: int) -> TokenDataset:
    path = _find(root, [f"basic_{split}.tsv"], f"ListOps {split} split")
    ids, offsets, labels = read_listops_tsv(path, max_length)
    return TokenDataset(
        ids,
        offsets,
        labels,
        vocab_size=_listops.VOCAB_SIZE,
        max_length=max_length,
        num_classes=10,
    )


def read_listops_tsv(path: Path, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenise a ListOps TSV like the LRA pipeline: ids (total,), offsets (N + 1,), labels.

    Parentheses are dropped, ``]`` is the closing token; ids follow
    :data:`nystromer.lra.data.listops.VOCAB`. Each expression keeps its first ``max_length``
    tokens. Vectorised over blocks of lines.
    """
    ids_parts, count_parts, label_parts = [], [], []
    with open(path, "rb") as f:
        header = f.readline()
        if header.rstrip(b"\r\n") != _listops.HEADER:
            raise ValueError(
                f"{path}, line 1: expected the header 'Source<TAB>Target', got "
                f"{header[:60].decode('utf-8', 'replace')!r}"
            )
        line_no = 2
        rest = b""
        while True:
            block = f.read(_BLOCK_BYTES)
            data = rest + block
            if not block:
                if data.strip():
                    parts = _parse_listops_block(data, path, line_no, max_length)
                    for acc, part in zip((ids_parts, count_parts, label_parts), parts, strict=True):
                        acc.append(part)
                break
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            parts = _parse_listops_block(data[:cut], path, line_no, max_length)
            for acc, part in zip((ids_parts, count_parts, label_parts), parts, strict=True):
                acc.append(part)
            line_no += data.count(b"\n", 0, cut)
            rest = data[cut:]
    if not any(part.size for part in label_parts):  # none, or only blank lines
        raise ValueError(f"{path}: no examples after the header")
    counts = np.concatenate(count_parts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return np.concatenate(ids_parts), offsets, np.concatenate(label_parts)


def _parse_listops_block(data: bytes, path: Path, first_line: int, max_length: int):
    """Parse whole lines ``data`` (numbered from ``first_line``): ids, per-line counts, labels.

    Blank lines (nothing but whitespace: an editor's last newline, a gap) are skipped."""
    # bytes.replace drops the parenthesis tokens at memory speed and leaves a third of the bytes
    # for numpy. A parenthesis glued to anything else survives and is reported below.
    text = data.replace(b"( ", b"").replace(b" )", b"")
    size = len(text)
    arr = np.frombuffer(text + b"    ", dtype=np.uint8).copy()  # spaces: safe look-ahead
    newlines = np.flatnonzero(arr[:size] == 10)
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [size]])
    if starts[-1] >= size:  # the block ends with a newline: no line after it
        starts, ends = starts[:-1], ends[:-1]
    crlf = (ends > starts) & (arr[np.maximum(ends - 1, 0)] == 13)
    arr[ends[crlf] - 1] = _SPACE
    ends = ends - crlf
    # A line ends in its Target digit: only one that ends in whitespace (or is empty) can be
    # blank, and those few are checked one by one, then blanked and dropped.
    maybe = np.flatnonzero((ends == starts) | np.isin(arr[np.maximum(ends - 1, 0)], _BLANKS))
    blank = [i for i in maybe.tolist() if not text[starts[i] : ends[i]].strip()]
    numbers = np.arange(starts.size)  # each line's index in data, for the messages
    if blank:
        for i in blank:
            arr[starts[i] : ends[i]] = _SPACE
        keep = np.ones(starts.size, dtype=bool)
        keep[blank] = False
        starts, ends, numbers = starts[keep], ends[keep], numbers[keep]
        if not starts.size:
            empty = np.zeros(0, dtype=np.int64)
            return np.zeros(0, dtype=np.uint8), empty, empty
    n = starts.size

    def fail(line: int, message: str):
        line = int(numbers[line])
        original = data.split(b"\n")[line].rstrip(b"\r")[:80].decode("utf-8", "replace")
        raise ValueError(f"{path}, line {first_line + line}: {message}; the line: {original!r}")

    tabs = np.flatnonzero(arr[:size] == 9)
    tab_line = np.searchsorted(starts, tabs, side="right") - 1
    per_line = np.bincount(tab_line, minlength=n)
    if (per_line != 1).any():
        bad = int(np.flatnonzero(per_line != 1)[0])
        fail(bad, f"expected 2 tab-separated fields (Source, Target), got {per_line[bad] + 1}")
    tab = tabs  # one per line, in line order
    target_ok = (ends - tab == 2) & (arr[tab + 1] >= 48) & (arr[tab + 1] <= 57)
    if not target_ok.all():
        fail(int(np.flatnonzero(~target_ok)[0]), "expected a Target digit 0-9")
    labels = (arr[tab + 1] - 48).astype(np.int64)

    # Blank the separators and targets: what is left are the Source tokens between spaces.
    arr[newlines] = _SPACE
    arr[tab] = _SPACE
    arr[tab + 1] = _SPACE
    char = (arr[:size] != _SPACE).view(np.int8)
    edge = np.diff(char, prepend=np.int8(0), append=np.int8(0))
    tok_start = np.flatnonzero(edge == 1)
    tok_len = np.flatnonzero(edge == -1) - tok_start
    c0, c1, c2, c3 = (arr[tok_start + j] for j in range(4))
    one = tok_len == 1
    is_digit = one & (c0 >= 48) & (c0 <= 57)
    is_close = one & (c0 == 93)
    op3 = (tok_len == 4) & (c0 == 91) & (c1 == ord("M"))
    is_min = op3 & (c2 == ord("I")) & (c3 == ord("N"))
    is_max = op3 & (c2 == ord("A")) & (c3 == ord("X"))
    is_med = op3 & (c2 == ord("E")) & (c3 == ord("D"))
    is_sm = (tok_len == 3) & (c0 == 91) & (c1 == ord("S")) & (c2 == ord("M"))
    is_paren = one & ((c0 == 40) | (c0 == 41))  # the few bytes.replace cannot reach
    ids = np.zeros(tok_start.size, dtype=np.uint8)
    ids[is_digit] = c0[is_digit] - 48 + 1
    for mask, value in ((is_min, 11), (is_max, 12), (is_med, 13), (is_sm, 14), (is_close, 15)):
        ids[mask] = value
    unknown = (ids == 0) & ~is_paren
    if unknown.any():
        k = int(np.flatnonzero(unknown)[0])
        token = text[tok_start[k] : tok_start[k] + tok_len[k]][:20].decode("utf-8", "replace")
        line = int(np.searchsorted(starts, tok_start[k], side="right") - 1)
        fail(line, f"unknown token {token!r}, expected {_LISTOPS_EXPECTED}")
    ids, tok_start = ids[~is_paren], tok_start[~is_paren]
    tok_line = np.searchsorted(starts, tok_start, side="right") - 1
    counts = np.bincount(tok_line, minlength=n)
    if (counts == 0).any():
        fail(int(np.flatnonzero(counts == 0)[0]), "empty Source expression")
    if counts.max() > max_length:  # keep each expression's first max_length tokens
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ids = ids[np.arange(ids.size) - first[tok_line] < max_length]
    return ids, np.minimum(counts, max_length), labels


# ---------------------------------------------------------------------------------------------
# Text (IMDB)


def _load_text(root: Path, split: str, max_length: int) -> TokenDataset:
    if not (root / "train").is_dir() and (root / "aclImdb").is_dir():
        root = root / "aclImdb"
    folder = root / ("train" if split == "train" else "test")  # LRA evaluates on test
    chunks, lengths, labels = [], [], []
    for label, name in ((0, "neg"), (1, "pos")):
        sub = folder / name
        if not sub.is_dir():
            raise FileNotFoundError(f"IMDB {split} split: {sub} is missing (expected aclImdb)")
        files = sorted(sub.glob("*.txt"), key=_review_order)
        if not files:
            raise FileNotFoundError(f"IMDB {split} split: no *.txt reviews in {sub}")
        for path in files:
            with open(path, "rb") as f:
                text = f.read(max_length)
            chunks.append(text)
            lengths.append(len(text))
            labels.append(label)
    ids = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenDataset(
        ids,
        offsets,
        np.asarray(labels, dtype=np.int64),
        vocab_size=BYTE_VOCAB_SIZE,
        max_length=max_length,
        num_classes=2,
        shift=1,
    )


def _review_order(path: Path) -> tuple[int, str]:
    """aclImdb names reviews ``<id>_<rating>.txt``: order by id, then name."""
    head = path.name.split("_", 1)[0]
    return (int(head), path.name) if head.isdigit() else (-1, path.name)


# ---------------------------------------------------------------------------------------------
# Retrieval (AAN)


def _load_retrieval(root: Path, split: str, max_length: int) -> PairDataset:
    name = {"train": "train", "val": "eval", "test": "test"}[split]
    path = _find(root, [f"new_aan_pairs.{name}.tsv"], f"retrieval {split} split")
    offsets, labels = [], []
    position = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            body = line.rstrip(b"\r\n")
            if not body.strip():  # a blank line (an editor's last newline, a gap): skipped
                position += len(line)
                continue
            n_fields = body.count(b"\t") + 1
            if n_fields != 5:
                raise ValueError(
                    f"{path}, line {line_no}: expected 5 tab-separated fields (label, id1, id2, "
                    f"text1, text2), got {n_fields}"
                )
            field = body[: body.index(b"\t")]
            try:
                value = float(field)
            except ValueError:
                value = -1.0
            if value not in (0.0, 1.0):
                raise ValueError(
                    f"{path}, line {line_no}: expected a label 0 or 1 in field 1, got "
                    f"{field[:20].decode('utf-8', 'replace')!r}"
                )
            offsets.append(position)
            labels.append(int(value))
            position += len(line)
    if not labels:
        raise ValueError(f"{path}: no examples")
    offsets.append(position)
    return PairDataset(
        path,
        np.asarray(offsets, dtype=np.int64),
        np.asarray(labels, dtype=np.int64),
        max_length=max_length,
    )


# ---------------------------------------------------------------------------------------------
# Image (CIFAR-10)


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Python 3 writes bytes in protocol-2 pickles as ``_codecs.encode(text, "latin1")``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {encoding!r}")
    return text.encode("latin-1")


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array and dtype constructors (and latin-1 bytes).

    Everything else a pickle may name (``os.system``, ``builtins.eval``, any class) is refused
    before it is imported, so loading runs no code from the file.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        factory = _PICKLE_ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"{self.source}: refusing to load the global {module}.{name}: only numpy "
                "arrays, dtypes and built-in values are allowed"
            )
        return factory()


def restricted_unpickle(path: str | os.PathLike[str]) -> Any:
    """Load a pickle that may only contain built-in values and numpy arrays (CIFAR-10 batches).

    Raises ``pickle.UnpicklingError`` naming the file and the refused global otherwise.
    """
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, str(path)).load()
        except pickle.UnpicklingError as exc:
            if str(path) in str(exc):
                raise
            raise pickle.UnpicklingError(f"{path}: {exc}") from exc
        except Exception as exc:  # truncated or foreign data
            raise pickle.UnpicklingError(f"{path}: not a readable pickle ({exc})") from exc


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3072) uint8 pixels (1024 red, green, blue, each row-major) and (N,) labels."""
    obj = restricted_unpickle(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of CIFAR-10 fields, got {type(obj).__name__}")
    fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in fields or "labels" not in fields:
        raise ValueError(f"{path}: expected the keys 'data' and 'labels', got {sorted(fields)}")
    data, labels = fields["data"], np.asarray(fields["labels"])
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        shape = getattr(data, "shape", None)
        raise ValueError(f"{path}: expected 'data' as uint8 (N, 3072), got {shape}")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: expected {data.shape[0]} integer labels, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be 0-9, got {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def rgb_to_grey(data: np.ndarray) -> np.ndarray:
    """CIFAR rows (N, 3072) → grey levels (N, 1024) uint8, as ``tf.image.rgb_to_grayscale``.

    Luma ``0.2989 R + 0.5870 G + 0.1140 B`` in [0, 1], converted back to uint8 the way
    TensorFlow's ``convert_image_dtype`` does (``floor(x · 255.5)``), so the ids match LRA's.
    """
    rgb = data.reshape(-1, 3, 1024).astype(np.float32) / 255.0
    w = np.asarray(GREY_WEIGHTS, dtype=np.float32)
    luma = np.einsum("c,ncp->np", w, rgb)
    return np.clip(np.floor(luma * 255.5), 0, 255).astype(np.uint8)


def _load_image(root: Path, split: str, max_length: int) -> PixelDataset:
    if not (root / "test_batch").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    parts = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 {split} split: {path} is missing")
        data, labels = _cifar_batch(path)
        parts.append((rgb_to_grey(data), labels))
    pixels = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if split != "test":  # LRA: train[:90%], validation train[90%:]
        cut = len(labels) * 9 // 10
        sl = slice(0, cut) if split == "train" else slice(cut, None)
        pixels, labels = pixels[sl], labels[sl]
    _warn_if_truncated("image", pixels.shape[1], max_length)
    return PixelDataset(
        np.ascontiguousarray(pixels[:, :max_length]), labels, max_length=max_length, num_classes=10
    )


def _warn_if_truncated(task: str, pixels: int, max_length: int) -> None:
    if pixels > max_length:
        warnings.warn(
            f"{task}: images have {pixels} pixels but max_length is {max_length}; each image "
            "is cut to its first rows",
            stacklevel=4,
        )


# ---------------------------------------------------------------------------------------------
# Pathfinder


def _pathfinder_root(root: Path) -> Path:
    if (root / "metadata").is_dir():
        return root
    preferred = root / "curv_contour_length_14"
    if (preferred / "metadata").is_dir():
        return preferred
    found = sorted(p for p in root.glob("curv_*") if (p / "metadata").is_dir())
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(
        f"Pathfinder: {root} has no metadata/ folder and no single curv_* folder with one "
        f"(found {[p.name for p in found]})"
    )


def _natural(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def read_pathfinder_metadata(root: Path) -> tuple[list[tuple[Path, int, int]], np.ndarray, list]:
    """All images listed in ``root/metadata/*.npy``: their paths and labels.

    Returns ``(sources, labels, paths)`` where ``sources[i]`` is ``(metadata file, line)`` of
    image ``i``. Files are read in natural order of their names, lines in order.
    """
    meta_files = sorted((root / "metadata").glob("*.npy"), key=_natural)
    if not meta_files:
        raise FileNotFoundError(f"Pathfinder: no metadata/*.npy files in {root}")
    sources, labels, paths = [], [], []
    for meta in meta_files:
        try:
            text = meta.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{meta}: expected text lines (folder, file name, index, label, ...), found "
                "binary data"
            ) from exc
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) < 4 or fields[3] not in ("0", "1"):
                raise ValueError(
                    f"{meta}, line {line_no}: expected space-separated fields folder, file name, "
                    f"index, label (0 or 1), ...; got {line[:80]!r}"
                )
            sources.append((meta, line_no))
            labels.append(int(fields[3]))
            paths.append(root / fields[0] / fields[1])
    return sources, np.asarray(labels, dtype=np.int64), paths


def pathfinder_split_indices(n: int, split: str) -> np.ndarray:
    """Indices of ``split`` among ``n`` images: 80/10/10 after a shuffle with seed 0."""
    order = np.random.default_rng(PATHFINDER_SPLIT_SEED).permutation(n)
    n_train, n_val = n * 8 // 10, n // 10
    bounds = {
        "train": (0, n_train),
        "val": (n_train, n_train + n_val),
        "test": (n_train + n_val, n),
    }
    lo, hi = bounds[split]
    return np.sort(order[lo:hi])


def _load_pathfinder(root: Path, split: str, max_length: int) -> PixelDataset:
    from PIL import Image, UnidentifiedImageError

    root = _pathfinder_root(root)
    sources, labels, paths = read_pathfinder_metadata(root)
    chosen = pathfinder_split_indices(len(paths), split)
    rows: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[Path] = []
    shape = None
    for i in chosen:
        path = paths[i]
        try:
            if path.stat().st_size == 0:
                raise OSError("empty file")
            with Image.open(path) as im:
                im = im.convert("L") if im.mode != "L" else im
                pixels = np.asarray(im, dtype=np.uint8)
        except FileNotFoundError as exc:
            meta, line = sources[i]
            raise FileNotFoundError(f"{meta}, line {line}: the image {path} is missing") from exc
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            skipped.append(path)
            continue
        if shape is None:
            shape = pixels.shape
        elif pixels.shape != shape:
            raise ValueError(f"{path}: expected a {shape[1]}x{shape[0]} image, got {pixels.shape}")
        rows.append(pixels.reshape(-1))
        kept.append(int(i))
    if skipped:
        warnings.warn(
            f"Pathfinder {split}: skipped {len(skipped)} of {len(chosen)} images that are empty "
            f"or unreadable (first: {skipped[0]})",
            stacklevel=3,
        )
    if not rows:
        raise ValueError(f"Pathfinder {split}: no readable image in {root}")
    pixels = np.stack(rows)
    _warn_if_truncated("pathfinder", pixels.shape[1], max_length)
    return PixelDataset(
        np.ascontiguousarray(pixels[:, :max_length]),
        labels[np.asarray(kept)],
        max_length=max_length,
        num_classes=2,
    )

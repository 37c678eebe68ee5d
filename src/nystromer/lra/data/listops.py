"""ListOps (Nangia & Bowman 2018, as in Long Range Arena): generator and tokeniser.

The LRA generator draws a random expression tree: every node is an operator with probability
0.25 and otherwise a digit 0–9 (always a digit at depth ``max_depth``, the root being depth 1);
an operator takes 2–``max_args`` arguments and is one of MIN, MAX, MED (median, rounded down)
and SM (sum modulo 10). Trees are kept when ``min_length < tokens < max_length``, where tokens
are what the LRA pipeline sees (operators, digits and closing brackets; no parentheses), and
duplicates are removed.

This generator draws the same distribution but is vectorised: thousands of trees grow level by
level with numpy, a tree is dropped as soon as its length must exceed ``max_length``, and the
value and the text of the accepted trees are computed per level as well. The text follows the
release byte for byte in form: the LRA script nests every argument in a pair of parentheses,
``( ( ( [MAX 2 ) 9 ) ] )`` for MAX(2, 9).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ..._io import atomic_write, load_json

__all__ = [
    "OPERATORS",
    "CLOSE",
    "VOCAB",
    "VOCAB_SIZE",
    "SPLITS",
    "SPLIT_SIZES",
    "generate",
    "write_splits",
    "max_tree_length",
]

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
# Token ids after the LRA pipeline's tokenisation; 0 is padding.
VOCAB: dict[str, int] = {
    **{str(d): d + 1 for d in range(10)},
    **{op: 11 + i for i, op in enumerate(OPERATORS)},
    CLOSE: 15,
}
VOCAB_SIZE = 16
SPLITS = ("train", "val", "test")
# Examples per split in the LRA release.
SPLIT_SIZES = {"train": 96000, "val": 2000, "test": 2000}
HEADER = b"Source\tTarget"
# Python's csv writer, which wrote the release, ends rows with CRLF.
NEWLINE = b"\r\n"
SETTINGS_FILE = "nystromer_listops.json"  # the arguments a generated set was made with

_OPERATOR_P = 0.25  # the LRA generator's VALUE_P: a node is an operator with this probability
# Codes of the text pieces, each with its trailing separator.
_OPEN, _CLOSE_PAREN, _CLOSE_OP, _OP0, _DIGIT0, _END0 = 0, 1, 2, 3, 7, 17
_PIECES = (
    [b"( ", b") ", b"] "]
    + [op.encode() + b" " for op in OPERATORS]
    + [str(d).encode() + b" " for d in range(10)]
    # The root's final parenthesis also ends the row: ")\t<target>\r\n".
    + [b")\t" + str(d).encode() + NEWLINE for d in range(10)]
)
_PIECE_WIDTH = max(len(p) for p in _PIECES)
# One padded row per piece: text = rows of the codes, minus the padding (a fast 2-D gather).
_PIECE_TABLE = np.zeros((len(_PIECES), _PIECE_WIDTH), dtype=np.uint8)
for _i, _p in enumerate(_PIECES):
    _PIECE_TABLE[_i, : len(_p)] = np.frombuffer(_p, dtype=np.uint8)
_PIECE_MASK = np.arange(_PIECE_WIDTH) < np.array([len(p) for p in _PIECES])[:, None]
_PIECE_LEN = _PIECE_MASK.sum(axis=1)

_TREES_PER_ROUND = 4096
_HOPELESS_ROUNDS = 64  # rounds without a new accepted tree before giving up on the settings


def max_tree_length(max_depth: int, max_args: int) -> int:
    """The most tokens a tree can have: full ``max_args``-ary down to depth ``max_depth``."""
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


def _check_settings(min_length: int, max_length: int, max_depth: int, max_args: int) -> None:
    for name, value in (
        ("min_length", min_length),
        ("max_length", max_length),
        ("max_depth", max_depth),
        ("max_args", max_args),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if min_length < 1:
        raise ValueError(f"min_length must be >= 1 (a lone digit is no example), got {min_length}")
    if max_depth < 2:
        raise ValueError(f"max_depth must be >= 2 (depth 1 is the root operator), got {max_depth}")
    if max_args < 2:
        raise ValueError(f"max_args must be >= 2, got {max_args}")
    longest = max_tree_length(max_depth, max_args)
    # Lengths from 4 (an operator over two digits) to `longest` are all reachable.
    low, high = max(min_length + 1, 4), min(max_length - 1, longest)
    if low > high:
        raise ValueError(
            f"no tree satisfies min_length={min_length} < tokens < max_length={max_length}: "
            f"with max_depth={max_depth} (root at depth 1) and max_args={max_args} trees have "
            f"4 to {longest} tokens"
        )


def _grow(rng: np.random.Generator, n_trees: int, max_length: int, max_depth: int, max_args: int):
    """Grow ``n_trees`` trees breadth-first; return the levels, token counts and alive flags.

    Each level is ``(tree, symbol, nargs)``: the tree each node belongs to, its symbol (0–9 a
    digit, 10–13 an operator) and its number of arguments (0 for digits). Nodes of a level are
    ordered by parent, so the arguments of the operators of one level are the next level's nodes,
    in order. The root is always an operator: a lone digit is never accepted, so forcing it
    leaves the distribution of accepted trees unchanged and saves three quarters of the draws.
    """
    tree = np.arange(n_trees)
    tokens = np.zeros(n_trees, dtype=np.int64)
    alive = np.ones(n_trees, dtype=bool)
    levels = []
    for depth in range(1, max_depth + 1):
        n = tree.size
        if depth == 1:
            is_op = np.ones(n, dtype=bool)
        elif depth < max_depth:
            is_op = rng.random(n) < _OPERATOR_P
        else:
            is_op = np.zeros(n, dtype=bool)
        nargs = np.where(is_op, rng.integers(2, max_args + 1, n), 0)
        symbol = np.where(is_op, 10 + rng.integers(0, 4, n), rng.integers(0, 10, n))
        tokens += np.bincount(tree, weights=1 + is_op, minlength=n_trees).astype(np.int64)
        pending = np.bincount(tree, weights=nargs, minlength=n_trees).astype(np.int64)
        # Each pending argument adds at least one token: stop growing hopeless trees now.
        alive &= tokens + pending < max_length
        levels.append((tree, symbol, nargs))
        expand = is_op & alive[tree]
        if not expand.any():
            break
        tree = np.repeat(tree[expand], nargs[expand])
    return levels, tokens, alive


def _segment_median(values: np.ndarray, parent: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median, rounded down, of each parent's values (digits 0–9), as ``int(np.median(...))``.

    Digits allow a histogram per parent instead of a sort: the median's two middle order
    statistics are the first digits whose cumulative count passes their rank.
    """
    hist = np.bincount(parent * 10 + values, minlength=counts.size * 10).reshape(-1, 10)
    cum = np.cumsum(hist, axis=1)
    low = np.argmax(cum > ((counts - 1) // 2)[:, None], axis=1)
    high = np.argmax(cum > (counts // 2)[:, None], axis=1)
    return (low + high) // 2


def _render(levels, accepted: np.ndarray):
    """Values, text bytes and per-tree byte ranges of the accepted trees, in tree order.

    Returns ``(values (T,), text (bytes as uint8), bounds (T + 1,))``: tree ``t``'s row is
    ``text[bounds[t]:bounds[t + 1]]``, the TSV line including the target and the newline.
    """
    # Keep the accepted trees' nodes; order within each level (by parent) survives filtering.
    kept = []
    for tree, symbol, nargs in levels:
        keep = accepted[tree]
        if not keep.any():
            break
        kept.append((tree[keep], symbol[keep], nargs[keep]))
    n_levels = len(kept)
    # Bottom-up: value and text size (tokens with parentheses) of every node.
    value = [None] * n_levels
    size = [None] * n_levels
    seg = [None] * n_levels  # for operators of a level: start of their arguments in the next
    for d in range(n_levels - 1, -1, -1):
        _, symbol, nargs = kept[d]
        is_op = nargs > 0
        val = np.where(is_op, 0, symbol)
        sz = np.where(is_op, 2 * nargs + 4, 1)
        if is_op.any():
            counts = nargs[is_op]
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            child_val, child_size = value[d + 1], size[d + 1]
            if child_val.size != counts.sum():  # pragma: no cover - an internal invariant
                raise AssertionError("ListOps levels are inconsistent")
            parent = np.repeat(np.arange(counts.size), counts)
            op = symbol[is_op] - 10
            results = np.stack(
                [
                    np.minimum.reduceat(child_val, starts),
                    np.maximum.reduceat(child_val, starts),
                    _segment_median(child_val, parent, counts),
                    np.add.reduceat(child_val, starts) % 10,
                ]
            )
            val[is_op] = results[op, np.arange(op.size)]
            sz[is_op] += np.add.reduceat(child_size, starts)
            seg[d] = (starts, counts)
        value[d], size[d] = val, sz

    # Top-down: offset of every node in the concatenated token-code array.
    root_size = size[0]
    n_codes = int(root_size.sum())
    codes = np.full(n_codes, _OPEN, dtype=np.uint8)
    offset = np.concatenate([[0], np.cumsum(root_size)[:-1]])
    for d in range(n_levels):
        _, symbol, nargs = kept[d]
        is_op = nargs > 0
        sz = size[d]
        digit = ~is_op
        codes[offset[digit]] = _DIGIT0 + symbol[digit]
        o, k, s = offset[is_op], nargs[is_op], sz[is_op]
        codes[o + k + 1] = _OP0 + symbol[is_op] - 10
        codes[o + s - 2] = _CLOSE_OP
        if d == 0:
            codes[o + s - 1] = _END0 + value[0]  # the root's ")" ends the row with the target
        else:
            codes[o + s - 1] = _CLOSE_PAREN
            # every argument is followed by the ")" of the pair that holds it
            codes[offset + sz] = _CLOSE_PAREN
        if d + 1 < n_levels and is_op.any():
            starts, counts = seg[d]
            child_size = size[d + 1]
            step = child_size + 1
            before = np.cumsum(step) - step
            within = before - np.repeat(before[starts], counts)
            offset = np.repeat(o + k + 2, counts) + within
    # Token codes -> bytes: gather padded rows, drop the padding.
    text = _PIECE_TABLE[codes][_PIECE_MASK[codes]]
    ends = np.cumsum(_PIECE_LEN[codes])
    bounds = np.concatenate([[0], ends[np.cumsum(root_size) - 1]])
    return value[0], text, bounds


def generate(
    n: int,
    *,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    seen: set[bytes] | None = None,
) -> Iterator[tuple[bytes, int, int]]:
    """Yield ``n`` distinct ListOps examples as ``(row, target, tokens)``.

    ``row`` is the TSV line (``Source``, tab, ``Target``, CRLF) as bytes and ``tokens`` the
    length the LRA pipeline sees. Deterministic for a seed and the settings.

    Args:
        n: number of examples.
        seed: seeds numpy's PCG64 generator.
        min_length, max_length: keep trees with ``min_length < tokens < max_length`` (the LRA
            generator's strict bounds; LRA: 500 and 2000).
        max_depth: the root is depth 1; nodes at this depth are digits (LRA: 10).
        max_args: most arguments of one operator (LRA: 10).
        seen: digests of rows to exclude, updated in place (to keep several calls disjoint).
    """
    _check_settings(min_length, max_length, max_depth, max_args)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.Generator(np.random.PCG64(seed))
    seen = set() if seen is None else seen
    produced = idle = 0
    while produced < n:
        if idle >= _HOPELESS_ROUNDS:
            raise ValueError(
                f"no new tree of {min_length} < tokens < {max_length} in "
                f"{idle * _TREES_PER_ROUND} draws with max_depth={max_depth}, "
                f"max_args={max_args} after {produced} of {n}: such trees are too rare or "
                "too few distinct ones exist; widen the length bounds or ask for fewer"
            )
        levels, tokens, alive = _grow(rng, _TREES_PER_ROUND, max_length, max_depth, max_args)
        accepted = alive & (tokens > min_length)
        idle += 1
        if not accepted.any():
            continue
        values, text, bounds = _render(levels, accepted)
        lengths = tokens[accepted]
        for t in range(values.size):
            row = text[bounds[t] : bounds[t + 1]].tobytes()
            digest = hashlib.blake2b(row, digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            idle = 0
            yield row, int(values[t]), int(lengths[t])
            produced += 1
            if produced == n:
                return


def write_splits(
    data_dir: str | os.PathLike[str],
    sizes: Mapping[str, int] | None = None,
    *,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    progress: bool = False,
) -> dict[str, Path]:
    """Write ``basic_{train,val,test}.tsv`` in the LRA release's format; return their paths.

    Args:
        data_dir: output folder (created).
        sizes: examples per split, keys ``train``, ``val``, ``test`` (default :data:`SPLIT_SIZES`,
            LRA's 96000, 2000, 2000). No example occurs twice, within or across splits.
        seed, min_length, max_length, max_depth, max_args: as in :func:`generate`.
        progress: show a tqdm progress bar.

    Each file is written to a temporary name and renamed when complete, so a file with its final
    name is always whole. The arguments are recorded in ``nystromer_listops.json``; a folder
    that already holds ListOps files made otherwise (other arguments, or not by this function,
    such as the LRA release) is refused, so that a set is never overwritten nor, after an
    interruption, left mixing two generations. The same arguments again rewrite the same bytes.
    """
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"sizes has unknown splits {sorted(unknown)}; expected {SPLITS}")
    for split, count in sizes.items():
        if not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"sizes[{split!r}] must be an int >= 0, got {count!r}")
    _check_settings(min_length, max_length, max_depth, max_args)
    out = Path(data_dir)
    record = {
        "generator": "nystromer",
        "sizes": {split: int(sizes[split]) for split in SPLITS if split in sizes},
        "seed": seed,
        "min_length": min_length,
        "max_length": max_length,
        "max_depth": max_depth,
        "max_args": max_args,
    }
    settings_path = out / SETTINGS_FILE
    existing = [f"basic_{split}.tsv" for split in SPLITS if (out / f"basic_{split}.tsv").exists()]
    if settings_path.exists():
        if load_json(settings_path) != record:
            raise ValueError(
                f"{out} holds a ListOps set made with other arguments ({settings_path}); "
                "choose another --out or delete it"
            )
    elif existing:
        raise ValueError(
            f"{out} already holds ListOps data not written by nystromer ({', '.join(existing)}); "
            "choose another --out or delete it"
        )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(settings_path) as f:
        json.dump(record, f, indent=1)
    total = sum(sizes.values())
    examples = generate(
        total,
        seed=seed,
        min_length=min_length,
        max_length=max_length,
        max_depth=max_depth,
        max_args=max_args,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="expr", desc="ListOps")
    paths = {}
    try:
        for split in SPLITS:
            if split not in sizes:
                continue
            path = out / f"basic_{split}.tsv"
            with atomic_write(path, "wb") as f:
                f.write(HEADER + NEWLINE)
                for _ in range(sizes[split]):
                    row, _, _ = next(examples)
                    f.write(row)
                    if bar is not None:
                        bar.update()
            paths[split] = path
    finally:
        if bar is not None:
            bar.close()
    return paths

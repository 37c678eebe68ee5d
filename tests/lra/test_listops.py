"""ListOps generator: exact targets, the release's text format, determinism, atomic files."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from nystromer.lra.data import listops, load_split

SMALL = dict(min_length=20, max_length=200, max_depth=6, max_args=6)


def tokens_of(source: str) -> list[str]:
    return [t for t in source.split(" ") if t not in ("(", ")")]


def evaluate(tokens: list[str]) -> int:
    """Independent evaluator: a stack of open operators over the parenthesis-free tokens."""
    ops = {
        "[MIN": min,
        "[MAX": max,
        "[MED": lambda a: int(np.median(a)),  # the LRA generator's definition
        "[SM": lambda a: sum(a) % 10,
    }
    stack: list[list] = []
    for tok in tokens:
        if tok in ops:
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            value = ops[op](args)
            if not stack:
                return value
            stack[-1].append(value)
        else:
            stack[-1].append(int(tok))
    raise AssertionError("unbalanced expression")


def lra_to_string(tokens: list[str]) -> str:
    """The LRA script's text: (op, a0), then ((.., a0), a1), ..., then (.., ']'), each pair in
    parentheses. Rebuilt from the tokens to check the generator's parenthesisation."""
    pos = 0

    def node() -> str:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if not tok.startswith("["):
            return tok
        text = f"( {tok} {node()} )"
        while tokens[pos] != "]":
            text = f"( {text} {node()} )"
        pos += 1
        return f"( {text} ] )"

    out = node()
    assert pos == len(tokens)
    return out


def parse_rows(rows):
    for row, target, length in rows:
        assert row.endswith(b"\r\n")
        source, field = row[:-2].decode().split("\t")
        yield source, int(field), target, length


def test_targets_lengths_and_text_match_independent_reference():
    rows = list(listops.generate(300, seed=3, **SMALL))
    for source, field, target, length in parse_rows(rows):
        toks = tokens_of(source)
        assert field == target == evaluate(toks)
        assert len(toks) == length and 20 < length < 200
        assert source == lra_to_string(toks)


def test_lra_default_settings():
    rows = list(listops.generate(40, seed=0))
    lengths = []
    for source, field, target, length in parse_rows(rows):
        toks = tokens_of(source)
        assert field == target == evaluate(toks)
        assert 500 < len(toks) == length < 2000
        lengths.append(length)
    assert statistics.mean(lengths) > 600  # not all at the lower bound


def test_operator_and_digit_mix():
    ops, digits = {}, {}
    for source, *_ in parse_rows(listops.generate(300, seed=1, **SMALL)):
        for t in tokens_of(source):
            if t.startswith("["):
                ops[t] = ops.get(t, 0) + 1
            elif t != "]":
                digits[t] = digits.get(t, 0) + 1
    assert set(ops) == set(listops.OPERATORS) and set(digits) == {str(d) for d in range(10)}
    # Uniform choices: each share within 30% of the mean (thousands of draws each).
    for counts in (ops, digits):
        mean = statistics.mean(counts.values())
        assert all(abs(c - mean) < 0.3 * mean for c in counts.values()), counts


def test_median_rounds_down_and_sum_mod():
    assert evaluate(tokens_of("( ( ( [MED 3 ) 4 ) ] )")) == 3
    values = np.array([[3, 4, 9, 9], [0, 9, 9, 9]])
    parent = np.repeat(np.arange(2), 4)
    got = listops._segment_median(values.ravel(), parent, np.array([4, 4]))
    assert got.tolist() == [int(np.median(v)) for v in values] == [6, 9]


def test_deterministic_for_a_seed():
    a = [r[0] for r in listops.generate(50, seed=7, **SMALL)]
    b = [r[0] for r in listops.generate(50, seed=7, **SMALL)]
    c = [r[0] for r in listops.generate(50, seed=8, **SMALL)]
    assert a == b and a != c


def test_write_splits_layout_and_no_duplicates(tmp_path: Path):
    # Few distinct trees exist at these settings, so duplicates would appear without removal.
    settings = dict(min_length=3, max_length=7, max_depth=3, max_args=2)
    paths = listops.write_splits(tmp_path, {"train": 150, "val": 30, "test": 30}, **settings)
    rows = []
    for split, n in (("train", 150), ("val", 30), ("test", 30)):
        raw = paths[split].read_bytes()
        assert paths[split] == tmp_path / f"basic_{split}.tsv"
        lines = raw.split(b"\r\n")
        assert lines[0] == b"Source\tTarget" and lines[-1] == b""
        assert len(lines) == n + 2
        rows += lines[1:-1]
    assert len(set(rows)) == len(rows) == 210


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="max_depth=2"):
        listops.write_splits("/nonexistent", {"train": 1}, min_length=64, max_depth=2)
    with pytest.raises(ValueError, match="too few distinct"):
        # only 4 operators x 100 digit pairs exist at depth 2 with two arguments
        list(listops.generate(401, min_length=3, max_length=5, max_depth=2, max_args=2))
    with pytest.raises(ValueError, match="sizes"):
        listops.write_splits("/nonexistent", {"dev": 1})


def test_crash_leaves_no_complete_looking_file(tmp_path: Path, monkeypatch):
    real = listops.generate

    def failing(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 25:
                raise RuntimeError("disk full")
            yield item

    monkeypatch.setattr(listops, "generate", failing)
    sizes = {"train": 20, "val": 10, "test": 10}
    with pytest.raises(RuntimeError, match="disk full"):
        listops.write_splits(tmp_path, sizes, **SMALL)
    assert (tmp_path / "basic_train.tsv").exists()  # complete before the failure
    assert not (tmp_path / "basic_val.tsv").exists()  # no partial file under its name
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["basic_train.tsv", "nystromer_listops.json"]
    # The same command again completes the set, with the bytes of an uninterrupted run.
    monkeypatch.setattr(listops, "generate", real)
    listops.write_splits(tmp_path, sizes, **SMALL)
    listops.write_splits(tmp_path / "clean", sizes, **SMALL)
    for split in sizes:
        name = f"basic_{split}.tsv"
        assert (tmp_path / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_a_folder_holding_another_set_is_refused_untouched(tmp_path: Path):
    # Overwriting it file by file would lose it, and an interruption would leave a new
    # train file beside the old test file: examples could then be in both.
    release = tmp_path / "release"
    release.mkdir()
    (release / "basic_val.tsv").write_bytes(b"Source\tTarget\r\nold\t1\r\n")
    with pytest.raises(ValueError, match=r"not written by nystromer \(basic_val\.tsv\)"):
        listops.write_splits(release, {"train": 5, "val": 2}, **SMALL)
    assert sorted(p.name for p in release.iterdir()) == ["basic_val.tsv"]
    listops.write_splits(tmp_path / "made", {"train": 5, "val": 2}, seed=1, **SMALL)
    before = (tmp_path / "made" / "basic_train.tsv").read_bytes()
    with pytest.raises(ValueError, match="other arguments"):
        listops.write_splits(tmp_path / "made", {"train": 5, "val": 2}, seed=2, **SMALL)
    assert (tmp_path / "made" / "basic_train.tsv").read_bytes() == before


def test_loader_reads_generated_files(tmp_path: Path):
    listops.write_splits(tmp_path, {"train": 40, "val": 5, "test": 5}, seed=2, **SMALL)
    ds = load_split("listops", tmp_path, "train")
    assert len(ds) == 40 and ds.vocab_size == 16 and ds.max_length == 2000
    inverse = {v: k for k, v in listops.VOCAB.items()}
    lines = (tmp_path / "basic_train.tsv").read_text().splitlines()[1:]
    for i, line in enumerate(lines):
        source, target = line.split("\t")
        ids, label = ds[i]
        assert ids.dtype == torch.int64 and int(ids.min()) >= 1
        assert [inverse[int(t)] for t in ids] == tokens_of(source)
        assert label == int(target)
    short = load_split("listops", tmp_path, "train", max_length=10)
    assert all(len(short[i][0]) == min(10, len(ds[i][0])) for i in range(len(ds)))
    assert short.max_length == 10


@pytest.mark.slow
def test_full_lra_size(tmp_path: Path):
    paths = listops.write_splits(tmp_path)
    ds = load_split("listops", tmp_path, "train")
    assert len(ds) == 96000 and paths["test"].exists()

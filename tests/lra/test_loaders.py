"""Readers of the official LRA files: contract, formats, errors, the restricted unpickler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nystromer.lra.data import DEFAULT_MAX_LENGTH, TASKS, load_split
from nystromer.lra.data.loaders import restricted_unpickle, rgb_to_grey


def check_contract(ds, pair: bool = False) -> None:
    assert ds.max_length >= 1 and ds.vocab_size >= 2
    assert [t.tolist() for t in ds[-1][:-1]] == [t.tolist() for t in ds[len(ds) - 1][:-1]]
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    for i in range(len(ds)):
        item = ds[i]
        assert len(item) == (3 if pair else 2) and isinstance(item[-1], int)
        for ids in item[:-1]:
            assert ids.dtype == torch.int64 and ids.ndim == 1 and len(ids) <= ds.max_length
            if len(ids):
                assert int(ids.min()) >= 1 and int(ids.max()) < ds.vocab_size


def test_api_surface():
    assert TASKS == ("listops", "text", "retrieval", "image", "pathfinder")
    assert DEFAULT_MAX_LENGTH == {
        "listops": 2000,
        "text": 1000,
        "retrieval": 4000,
        "image": 1024,
        "pathfinder": 1024,
    }


def test_argument_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="task must be one of"):
        load_split("lisptops", tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_split("text", tmp_path, "dev")
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        load_split("text", tmp_path, "train", max_length=0)
    with pytest.raises(TypeError, match="max_length must be an int"):
        load_split("text", tmp_path, "train", max_length=1.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split("text", tmp_path / "nope", "train")


# --- ListOps ----------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def test_listops_tokenisation_and_crlf(tmp_path: Path):
    write(
        tmp_path / "basic_train.tsv",
        "Source\tTarget\r\n( ( ( [MAX 2 ) 9 ) ] )\t9\r\n"
        "( ( ( ( [SM ( ( ( [MIN 4 ) 7 ) ] ) ) 0 )  5 ) ] )\t9\r\n",
    )
    ds = load_split("listops", tmp_path, "train")
    assert len(ds) == 2 and ds.vocab_size == 16 and ds.num_classes == 10
    # ids: digits d -> d + 1, MIN 11, MAX 12, MED 13, SM 14, ] 15
    assert ds[0][0].tolist() == [12, 3, 10, 15] and ds[0][1] == 9
    assert ds[1][0].tolist() == [14, 11, 5, 8, 15, 1, 6, 15] and ds[1][1] == 9
    check_contract(ds)


@pytest.mark.parametrize(
    "body, message",
    [
        ("Src\tTarget\n", r"line 1: expected the header"),
        ("Source\tTarget\n[MAX 2 ]\t2\n[MAX 2 ]\t2\t3\n", r"line 3: expected 2 tab-separated"),
        ("Source\tTarget\n[MAX 2 ]\t12\n", r"line 2: expected a Target digit"),
        (
            "Source\tTarget\n[MAX 2 ]\t1\n[MAX 2 [FIRST 3 ] ]\t3\n",
            r"line 3: unknown token '\[FIRST'",
        ),
        ("Source\tTarget\n[MAX 2 ]\t1\n( )\t3\n", r"line 3: empty Source"),
    ],
)
def test_listops_malformed(tmp_path: Path, body: str, message: str):
    write(tmp_path / "basic_val.tsv", body)
    with pytest.raises(ValueError, match=message) as info:
        load_split("listops", tmp_path, "val")
    assert "basic_val.tsv" in str(info.value)


def test_listops_line_numbers_across_blocks(tmp_path: Path, monkeypatch):
    import nystromer.lra.data.loaders as loaders

    monkeypatch.setattr(loaders, "_BLOCK_BYTES", 64)  # many blocks
    rows = ["( ( ( [MIN 1 ) 2 ) ] )\t1"] * 30 + ["( ( ( [MIN 1 ) 2 ) ] )\tx"]
    write(tmp_path / "basic_test.tsv", "Source\tTarget\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="line 32: expected a Target digit"):
        load_split("listops", tmp_path, "test")
    write(tmp_path / "basic_test.tsv", "Source\tTarget\n" + "\n".join(rows[:-1]))  # no final \n
    ds = load_split("listops", tmp_path, "test", max_length=3)
    assert len(ds) == 30 and all(ds[i][0].tolist() == [11, 2, 3] for i in range(30))


@pytest.mark.parametrize("block_bytes", [64, 1 << 23])  # blank lines across blocks, or in one
def test_listops_skips_blank_lines(tmp_path: Path, monkeypatch, block_bytes: int):
    # As the Pathfinder metadata reader does: an editor's last newline, a gap, a line of spaces
    # (CRLF too) is no example, and a line after them keeps its number in the messages.
    import nystromer.lra.data.loaders as loaders

    monkeypatch.setattr(loaders, "_BLOCK_BYTES", block_bytes)
    row = "( ( ( [MIN 1 ) 2 ) ] )\t1"
    body = f"Source\tTarget\n{row}\n\n{row}\r\n \t \r\n\n\n\n{row}\n\n  \n"
    write(tmp_path / "basic_train.tsv", body)
    ds = load_split("listops", tmp_path, "train")
    assert len(ds) == 3 and all(ds[i][0].tolist() == [11, 2, 3, 15] for i in range(3))
    assert all(ds[i][1] == 1 for i in range(3))
    write(tmp_path / "basic_train.tsv", body + "\n\n" + row.replace("\t1", "\tx") + "\n")
    with pytest.raises(ValueError, match=r"line 14: expected a Target digit"):
        load_split("listops", tmp_path, "train")
    write(tmp_path / "basic_train.tsv", "Source\tTarget\n\n \n")
    with pytest.raises(ValueError, match="no examples after the header"):
        load_split("listops", tmp_path, "train")


# --- Text -------------------------------------------------------------------------------------


def make_imdb(root: Path) -> None:
    reviews = {
        ("train", "pos"): ["Great film.", "Loved it \u00e9"],
        ("train", "neg"): ["Bad.", "x" * 50],
        ("test", "pos"): ["Fine"],
        ("test", "neg"): ["Meh", "No"],
    }
    for (split, label), texts in reviews.items():
        folder = root / "aclImdb" / split / label
        folder.mkdir(parents=True)
        for i, text in enumerate(texts):
            (folder / f"{10 - i}_{7}.txt").write_bytes(text.encode())
    (root / "aclImdb" / "train" / "unsup").mkdir()
    (root / "aclImdb" / "train" / "unsup" / "0_0.txt").write_text("unlabelled")


def test_text(tmp_path: Path):
    make_imdb(tmp_path)
    train = load_split("text", tmp_path, "train", max_length=20)
    assert len(train) == 4 and train.vocab_size == 257 and train.max_length == 20
    items = [(bytes((train[i][0] - 1).tolist()), train[i][1]) for i in range(4)]
    # neg then pos, by review id; byte-level (UTF-8 bytes + 1), truncated to 20 bytes
    assert items == [
        (b"x" * 20, 0),
        (b"Bad.", 0),
        ("Loved it \u00e9".encode(), 1),
        (b"Great film.", 1),
    ]
    check_contract(train)
    val, test = (
        load_split("text", tmp_path / "aclImdb", "val"),
        load_split("text", tmp_path, "test"),
    )
    assert len(val) == len(test) == 3 and val.max_length == 1000  # LRA: test doubles as val
    assert [val[i][0].tolist() for i in range(3)] == [test[i][0].tolist() for i in range(3)]


def test_text_missing_folder(tmp_path: Path):
    (tmp_path / "train" / "pos").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="neg is missing"):
        load_split("text", tmp_path, "train")


# --- Retrieval --------------------------------------------------------------------------------


def test_retrieval(tmp_path: Path):
    rows = [
        "1\tP1\tP2\tb'First paper text'\tb'Second'",
        "0.0\tP3\tP4\t" + "a" * 30 + "\tshort",
        "1.0\tP5\tP6\t\tnon-empty",
    ]
    write(tmp_path / "new_aan_pairs.eval.tsv", "\n".join(rows) + "\n")
    ds = load_split("retrieval", tmp_path, "val", max_length=10)
    assert len(ds) == 3 and ds.vocab_size == 257 and ds.max_length == 10
    a, b, label = ds[0]
    assert bytes((a - 1).tolist()) == b"b'First pa" and bytes((b - 1).tolist()) == b"b'Second'"
    assert label == 1 and ds[1][2] == 0 and ds[2][2] == 1
    assert bytes((ds[1][0] - 1).tolist()) == b"a" * 10
    assert len(ds[2][0]) == 0  # an empty document is an empty sequence
    check_contract(ds, pair=True)
    # items survive pickling (DataLoader workers) and reopen the file
    again = pickle.loads(pickle.dumps(ds))
    assert again[1][0].tolist() == ds[1][0].tolist()


def test_retrieval_skips_blank_lines(tmp_path: Path):
    # As ListOps and the Pathfinder metadata do; an item still reads its own line only.
    rows = ["1\tP1\tP2\tfirst\tsecond", "", " \t ", "0\tP3\tP4\tthird\tfourth\r", "", ""]
    write(tmp_path / "new_aan_pairs.test.tsv", "\n".join(rows))
    ds = load_split("retrieval", tmp_path, "test")
    assert len(ds) == 2 and [ds[i][2] for i in range(2)] == [1, 0]
    texts = [bytes((t - 1).tolist()) for i in range(2) for t in ds[i][:2]]
    assert texts == [b"first", b"second", b"third", b"fourth"]
    write(tmp_path / "new_aan_pairs.test.tsv", "\n".join([*rows, "2\ta\tb\tc\td"]))
    with pytest.raises(ValueError, match="line 7: expected a label 0 or 1"):
        load_split("retrieval", tmp_path, "test")


@pytest.mark.parametrize(
    "row, message",
    [
        ("1\tP1\tP2\tonly four", "line 2: expected 5 tab-separated fields"),
        ("2\tP1\tP2\ta\tb", "line 2: expected a label 0 or 1 in field 1, got '2'"),
        ("yes\tP1\tP2\ta\tb", "line 2: expected a label 0 or 1"),
    ],
)
def test_retrieval_malformed(tmp_path: Path, row: str, message: str):
    write(tmp_path / "new_aan_pairs.train.tsv", "0\ta\tb\tc\td\n" + row + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_split("retrieval", tmp_path, "train")
    assert "new_aan_pairs.train.tsv" in str(info.value)


# --- Image ------------------------------------------------------------------------------------


def make_cifar(root: Path, per_batch: int = 10) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    made = {}
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        obj = {
            b"batch_label": f"batch {b}".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
        made[name] = (data, labels)
    return made


def test_grey_levels_match_tensorflow_formula():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (50, 3072), dtype=np.uint8)
    data[0] = 255
    data[1] = 0
    data[2, :1024], data[2, 1024:] = 255, 0  # pure red
    rgb = data.reshape(50, 3, 1024).astype(np.float64) / 255
    luma = 0.2989 * rgb[:, 0] + 0.5870 * rgb[:, 1] + 0.1140 * rgb[:, 2]
    want = np.floor(luma * 255.5)  # tf.image.convert_image_dtype(float -> uint8)
    got = rgb_to_grey(data).astype(np.float64)
    # float32 vs float64 can only differ where luma * 255.5 sits within rounding of an integer
    near_integer = np.abs(luma * 255.5 - np.rint(luma * 255.5)) < 1e-4
    assert (got[~near_integer] == want[~near_integer]).all()
    assert (np.abs(got - want) <= 1).all()
    assert got[0].tolist() == [255] * 1024 and got[1].tolist() == [0] * 1024
    assert got[2, 0] == 76  # floor(0.2989 * 255.5)


def test_image_splits(tmp_path: Path):
    made = make_cifar(tmp_path)
    train = load_split("image", tmp_path, "train")
    val = load_split("image", tmp_path / "cifar-10-batches-py", "val")
    test = load_split("image", tmp_path, "test")
    assert (len(train), len(val), len(test)) == (45, 5, 10)
    assert train.vocab_size == 257 and train.max_length == 1024 and train.num_classes == 10
    all_train = np.concatenate([made[f"data_batch_{i}"][0] for i in range(1, 6)])
    all_labels = sum((made[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    grey = rgb_to_grey(all_train).astype(np.int64) + 1
    # train: first 90% of the training batches in file order; val: the last 10%
    assert (train[44][0].numpy() == grey[44]).all() and train[44][1] == all_labels[44]
    assert (val[0][0].numpy() == grey[45]).all() and val[4][1] == all_labels[49]
    assert (test[3][0].numpy() == rgb_to_grey(made["test_batch"][0])[3] + 1).all()
    check_contract(val)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path: Path):
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps({b"data": evil, b"labels": []}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3: refusing .*system"):
        load_split("image", tmp_path, "train")
    assert not marker.exists()
    path.write_bytes(pickle.dumps(eval, protocol=4))  # builtins.eval itself
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        restricted_unpickle(path)
    path.write_bytes(b"\x80\x02}q\x00")  # truncated
    with pytest.raises(pickle.UnpicklingError, match="not a readable pickle"):
        restricted_unpickle(path)


def test_image_wrong_content(tmp_path: Path):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}))
    with pytest.raises(ValueError, match=r"test_batch: expected 'data' as uint8 \(N, 3072\)"):
        load_split("image", tmp_path, "test")


def test_restricted_unpickler_reads_python2_style_names(tmp_path: Path):
    data = np.arange(6, dtype=np.uint8).reshape(2, 3)
    raw = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=2)
    assert b"cnumpy._core.multiarray\n" in raw
    # CIFAR-10's own files were written by Python 2's numpy: numpy.core.multiarray
    path = tmp_path / "batch"
    path.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    obj = restricted_unpickle(path)
    assert (obj[b"data"] == data).all() and obj[b"labels"] == [3, 4]


def test_restricted_unpickler_limits_codecs(tmp_path: Path):
    path = tmp_path / "batch"
    # bytes in a protocol-2 pickle are _codecs.encode(text, "latin1"); other codecs are refused
    raw = pickle.dumps({b"x": b"\x00"}, protocol=2).replace(b"latin1", b"zlib  ")
    path.write_bytes(raw)
    with pytest.raises(
        pickle.UnpicklingError, match="batch: refusing _codecs.encode with 'zlib  '"
    ):
        restricted_unpickle(path)

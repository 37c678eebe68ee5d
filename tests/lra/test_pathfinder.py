"""Pathfinder generator: labels, geometry, the release's layout, resuming, atomic batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nystromer.lra.data import load_split, pathfinder
from nystromer.lra.data.loaders import pathfinder_split_indices
from nystromer.lra.data.pathfinder import PathfinderSettings


def segment_distances(points: np.ndarray, segs: np.ndarray) -> np.ndarray:
    """Float64 distances from each point (A, 2) to each segment (S, 2, 2): (A, S)."""
    p = points.astype(np.float64)[:, None]
    a, b = segs[None, :, 0].astype(np.float64), segs[None, :, 1].astype(np.float64)
    t = np.clip(((p - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0, 1)
    return np.linalg.norm(p - a - t[..., None] * (b - a), axis=-1)


@pytest.fixture(scope="module")
def batch():
    return pathfinder.generate_batch(101, np.random.default_rng(5))


def test_labels_balanced_and_images(batch):
    images, labels, _ = batch
    assert images.shape == (101, 32, 32) and images.dtype == np.uint8
    assert abs(int(labels.sum()) - 50) <= 1
    ink = (images > 0).mean(axis=(1, 2))
    assert (ink > 0.15).all() and (ink < 0.8).all()  # paths drawn, not filled


def test_markers_sit_on_the_same_path_iff_label_1(batch):
    images, labels, geo = batch
    t, markers, origin = geo["targets"], geo["markers"], geo["origin"]
    for i in range(len(labels)):
        first, second = markers[i]
        assert np.allclose(first, t[i, origin[i], 0, 0])  # start of a target path
        ends = [t[i, p, -1, 1] for p in range(2)]
        same = np.allclose(second, ends[origin[i]])
        other = np.allclose(second, ends[1 - origin[i]])
        assert (same, other) == ((True, False) if labels[i] == 1 else (False, True))
        # the marker pixels are bright
        for x, y in markers[i]:
            assert images[i, int(y), int(x)] > 200


def test_geometry_separation(batch):
    _, _, geo = batch
    s = PathfinderSettings()
    line_reach = s.line_width / 2 + 0.5
    marker_reach = s.marker_radius + 0.5
    for i in range(len(geo["targets"])):
        paths = geo["targets"][i]  # (2, 14, 2, 2)
        pts = paths.reshape(-1, 2)
        assert (pts >= s.padding - 1e-4).all() and (pts <= 32 - s.padding + 1e-4).all()
        # paddles are paddle_length long, turns below 90 degrees
        d = paths[:, :, 1] - paths[:, :, 0]
        assert np.allclose(np.linalg.norm(d, axis=-1), s.paddle_length, atol=1e-4)
        angle = np.arctan2(d[..., 1], d[..., 0])
        turn = np.angle(np.exp(1j * np.diff(angle, axis=1)))
        assert (np.abs(turn) < np.pi / 2 + 1e-5).all()
        # Paddles are tested at points 0.5 px apart, each > 1 px (an empty pixel) from other
        # paths, so the segments stay > 1 - 0.25 px apart.
        gap = segment_distances(paths[0].reshape(-1, 2), paths[1]).min()
        assert gap > 0.75
        for p in range(2):  # nor does a path come back to itself (neighbours are 2 px apart)
            for j in range(2, s.contour_length):
                assert segment_distances(paths[p, j], paths[p, : j - 1]).min() > 0.75
        for p in range(2):
            ends = np.stack([paths[p, 0, 0], paths[p, -1, 1]])
            assert segment_distances(ends, paths[1 - p]).min() >= marker_reach + line_reach - 1e-4
        # distractors keep off the target paths and the four path ends
        dist = geo["distractors"][i][geo["distractor_mask"][i]]
        if len(dist):
            assert segment_distances(dist.reshape(-1, 2), paths.reshape(-1, 2, 2)).min() > 0.75
            # sampled points stay > marker_reach from the ends, the segments > that - 0.25
            ends = np.concatenate([paths[:, 0, 0], paths[:, -1, 1]])
            assert segment_distances(ends, dist).min() > marker_reach - 0.25


def test_within_matches_brute_force():
    g = pathfinder._Geometry(PathfinderSettings(), np.random.default_rng(0))
    rng = np.random.default_rng(1)
    ys, xs = rng.integers(0, g.side, (2, 50, 3, 4))
    idx = ys * g.side + xs
    centre = rng.integers(5, g.side - 5, (2, 50))
    cy, cx = centre
    brute = ((np.abs(ys - cy[:, None, None]) <= 2) & (np.abs(xs - cx[:, None, None]) <= 2)).any(-1)
    got = g.within(idx, (cy * g.side + cx)[:, None, None], 2)
    assert (got == brute).all() and brute.any() and not brute.all()


def test_deterministic_for_a_seed():
    a = pathfinder.generate_batch(12, np.random.default_rng(9))[0]
    b = pathfinder.generate_batch(12, np.random.default_rng(9))[0]
    c = pathfinder.generate_batch(12, np.random.default_rng(10))[0]
    assert (a == b).all() and (a != c).any()


def test_other_resolution_and_length():
    images, labels, geo = pathfinder.generate_batch(
        6, np.random.default_rng(0), PathfinderSettings(resolution=48, contour_length=9)
    )
    assert images.shape == (6, 48, 48) and geo["targets"].shape[2] == 9
    with pytest.raises(ValueError, match="resolution"):
        PathfinderSettings(resolution=8)


def read_metadata(folder: Path) -> list[list[str]]:
    lines = []
    for meta in sorted((folder / "metadata").glob("*.npy"), key=lambda p: int(p.stem)):
        lines += [line.split(" ") for line in meta.read_text().splitlines()]
    return lines


def test_write_dataset_layout_and_metadata(tmp_path: Path):
    folder = pathfinder.write_dataset(tmp_path, images=30, images_per_batch=8, seed=1)
    assert folder == tmp_path / "curv_contour_length_14"
    assert sorted(p.name for p in (folder / "metadata").iterdir()) == [
        "0.npy",
        "1.npy",
        "2.npy",
        "3.npy",
    ]
    lines = read_metadata(folder)
    assert len(lines) == 30
    for b in range(4):
        batch = [f for f in lines if f[0] == f"imgs/{b}"]
        assert len(batch) == (8 if b < 3 else 6)
        assert sum(int(f[3]) for f in batch) == len(batch) // 2  # balanced per batch
        for k, fields in enumerate(batch):
            assert fields[1:3] == [f"sample_{k}.png", str(k)]
            assert fields[4:] == ["1.0", "14", "4", "2", "0.5", "1", "1"]
            with Image.open(folder / fields[0] / fields[1]) as im:
                assert im.mode == "L" and im.size == (32, 32)


def test_resume_and_refusal(tmp_path: Path):
    folder = pathfinder.write_dataset(tmp_path, images=12, images_per_batch=6, seed=2)
    png = folder / "imgs" / "1" / "sample_3.png"
    original = png.read_bytes()
    kept = (folder / "metadata" / "0.npy").stat().st_mtime_ns
    # an interrupted batch: no metadata, a half-written image
    (folder / "metadata" / "1.npy").unlink()
    png.write_bytes(original[:20])
    pathfinder.write_dataset(tmp_path, images=12, images_per_batch=6, seed=2)
    assert png.read_bytes() == original  # redone identically
    assert (folder / "metadata" / "0.npy").stat().st_mtime_ns == kept  # complete batch kept
    with pytest.raises(ValueError, match="other arguments"):
        pathfinder.write_dataset(tmp_path, images=12, images_per_batch=6, seed=3)


def test_crash_mid_batch_leaves_it_incomplete(tmp_path: Path, monkeypatch):
    real = pathfinder._write_png
    calls = []

    def failing(path, image):
        calls.append(path)
        if len(calls) == 9:
            raise OSError("disk full")
        real(path, image)

    monkeypatch.setattr(pathfinder, "_write_png", failing)
    with pytest.raises(OSError, match="disk full"):
        pathfinder.write_dataset(tmp_path, images=12, images_per_batch=6)
    meta = tmp_path / "curv_contour_length_14" / "metadata"
    assert sorted(p.name for p in meta.iterdir()) == ["0.npy"]  # no temporary file either


def test_loader_splits_and_broken_images(tmp_path: Path):
    folder = pathfinder.write_dataset(tmp_path, images=40, images_per_batch=20, seed=4)
    labels = [int(f[3]) for f in read_metadata(folder)]
    parts = [pathfinder_split_indices(40, s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [32, 4, 4]
    assert sorted(np.concatenate(parts).tolist()) == list(range(40))
    assert (pathfinder_split_indices(40, "val") == parts[1]).all()  # fixed shuffle
    test = load_split("pathfinder", tmp_path, "test")
    assert len(test) == 4 and test.vocab_size == 257 and test.max_length == 1024
    lines = read_metadata(folder)
    for j, i in enumerate(parts[2]):
        ids, label = test[j]
        with Image.open(folder / lines[i][0] / lines[i][1]) as im:
            pixels = np.asarray(im).ravel().astype(np.int64)
        assert (ids.numpy() == pixels + 1).all() and label == labels[i]
    # one empty and one corrupt image in train: skipped with one warning counting both
    train_ids = parts[0]
    (folder / lines[train_ids[0]][0] / lines[train_ids[0]][1]).write_bytes(b"")
    (folder / lines[train_ids[1]][0] / lines[train_ids[1]][1]).write_bytes(b"\x89PNG garbage")
    with pytest.warns(UserWarning, match="skipped 2 of 32") as record:
        train = load_split("pathfinder", folder, "train")
    assert len(record) == 1 and len(train) == 30
    with pytest.warns(UserWarning, match="1024 pixels but max_length is 100"):
        short = load_split("pathfinder", folder, "val", max_length=100)
    assert short.max_length == 100 and all(len(short[i][0]) == 100 for i in range(len(short)))


def test_loader_reports_malformed_metadata(tmp_path: Path):
    folder = tmp_path / "curv_contour_length_14"
    (folder / "metadata").mkdir(parents=True)
    (folder / "metadata" / "0.npy").write_text("imgs/0 sample_0.png 0 1\nimgs/0 sample_1.png 1\n")
    with pytest.raises(ValueError, match=r"0\.npy, line 2: expected space-separated"):
        load_split("pathfinder", tmp_path, "train")
    (folder / "metadata" / "0.npy").write_text("imgs/0 sample_0.png 0 1\n" * 10)
    with pytest.raises(FileNotFoundError, match=r"line \d+: the image .*sample_0.png is missing"):
        load_split("pathfinder", tmp_path, "train")
    # Blank lines are skipped (as in the ListOps and Retrieval TSV files), keeping the numbers.
    (folder / "metadata" / "0.npy").write_text("\n \n" + "imgs/0 sample_0.png 0 1\n\n" * 10)
    with pytest.raises(FileNotFoundError, match=r"0\.npy, line \d*[13579]: the image .*sample_0"):
        load_split("pathfinder", tmp_path, "train")

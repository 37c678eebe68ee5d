"""Pathfinder (Linsley et al. 2018; LRA's Pathfinder-32): a vectorised image generator.

An image shows dashed curved paths made of short line segments ("paddles") and two circular
markers. Two long paths start a few pixels apart near the centre; one marker sits at the start
of one of them, the other at the far end of the same path (label 1) or of the other path
(label 0). Shorter distractor paths fill the rest. Paths never touch one another: every paddle
keeps at least one empty pixel to any other path (and to its own earlier paddles).

The geometry follows the settings LRA used for Pathfinder-32 with the original generator
(drewlinsley/pathfinder): 32×32 pixels, paddles 2 px long, paddle margin 1 px (consecutive
paddles 2 px apart), markers of radius 1.5 px, path starts 7 px apart, continuity 1.0 (each
turn Δ between paddles has density ∝ cos²(continuity·Δ), so turns stay under 90°), distractor
paths of ``contour_length // 3`` paddles, ``20 // that`` of them. Other resolutions scale all
lengths by ``resolution / 32``. The drawing is our own: anti-aliased lines 1 px wide.

Everything is computed for a whole batch of images at once with numpy: each paddle of each
path is chosen among a few sampled candidates by an occupancy-grid test over all images
together. Images whose paths get stuck are redrawn.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..._checks import check_int_at_least
from ..._io import atomic_write, load_json

__all__ = [
    "PathfinderSettings",
    "generate_batch",
    "write_dataset",
    "dataset_folder",
    "SETTINGS_FILE",
]

SETTINGS_FILE = "nystromer_pathfinder.json"
# Turns tried per paddle: the original tries the pixels of a circle of radius paddle length +
# margin (3 px at 32 px), about 9 of which lie within ±90°.
_CANDIDATES = 12
_SEED_CANDIDATES = 4  # random first paddles tried per target path
_DISTRACTOR_SEED_CANDIDATES = 16  # the canvas is crowded by then
_DISTRACTOR_TRIES = 2  # attempts per distractor path before it is left out


@dataclass(frozen=True)
class PathfinderSettings:
    """Geometry of the images, in pixels at ``resolution`` 32 (scaled for other resolutions).

    Attributes:
        resolution: image side in pixels.
        contour_length: paddles per target path (LRA: 14, the hardest level).
        paddle_length: length of one paddle.
        paddle_margin: half the gap between consecutive paddles.
        paddle_thickness: the original generator's thickness parameter (metadata only).
        line_width: width of the drawn lines.
        marker_radius: radius of the two markers.
        seed_distance: distance between the starts of the two target paths.
        continuity: turns have density ∝ cos²(continuity·Δ) for |Δ| < π / (2·continuity).
        padding: margin kept free at the image border.
    """

    resolution: int = 32
    contour_length: int = 14
    paddle_length: float = 2.0
    paddle_margin: float = 1.0
    paddle_thickness: float = 0.5
    line_width: float = 1.0
    marker_radius: float = 1.5
    seed_distance: float = 7.0
    continuity: float = 1.0
    padding: float = 1.0

    def __post_init__(self) -> None:
        check_int_at_least("resolution", self.resolution, 16)
        check_int_at_least("contour_length", self.contour_length, 3)
        if self.continuity <= 0:
            raise ValueError(f"continuity must be > 0, got {self.continuity}")

    @property
    def scale(self) -> float:
        return self.resolution / 32

    @property
    def distractor_length(self) -> int:
        """Paddles per distractor path, as LRA: ``contour_length // 3``."""
        return self.contour_length // 3

    @property
    def num_distractors(self) -> int:
        """Distractor paths per image, as LRA: ``20 // distractor_length``."""
        return 20 // self.distractor_length

    def metadata_fields(self) -> str:
        """Fields 4 onwards of a metadata line, in the original generator's order."""
        # The original writes Python values with str(): continuity is a float ("1.0").
        values = (
            self.contour_length,
            self.distractor_length,
            self.paddle_length * self.scale,
            self.paddle_thickness * self.scale,
            self.paddle_margin * self.scale,
            1,  # number of paddle contrasts
        )
        return " ".join([repr(float(self.continuity))] + [f"{v:g}" for v in values])


def dataset_folder(out: str | os.PathLike[str], contour_length: int) -> Path:
    """``out/curv_contour_length_<L>``, the release's folder name."""
    return Path(out) / f"curv_contour_length_{contour_length}"


class _Geometry:
    """Constants of the drawing and the vectorised pixel tests; images are the leading axis.

    Occupancy grids are flat boolean arrays (m, side²) over the canvas plus a ``border`` of
    pixels that are taken from the start (as is the padding), so that the test for a candidate
    paddle is a single gather, with no bounds check: no candidate reaches beyond the border.
    """

    def __init__(self, settings: PathfinderSettings, rng: np.random.Generator):
        s = settings
        self.s, self.rng = s, rng
        self.res = s.resolution
        self.length = s.paddle_length * s.scale
        self.margin = s.paddle_margin * s.scale
        self.pad = s.padding * s.scale
        self.halo = max(1, round(s.scale))  # empty pixels kept around every paddle
        # How far ink reaches from a line's axis and from a marker's centre (anti-aliasing).
        self.line_reach = s.line_width * s.scale / 2 + 0.5
        self.marker_reach = s.marker_radius * s.scale + 0.5
        self.points = int(np.ceil(self.length / 0.5)) + 1  # samples per paddle, <= 0.5 px apart
        self.border = int(np.ceil(2 * self.margin + self.length)) + self.halo + 1
        self.side = self.res + 2 * self.border
        h = np.arange(-self.halo, self.halo + 1)
        self.halo_offsets = (h[:, None] * self.side + h[None, :]).ravel()
        self._t = np.linspace(0.0, 1.0, self.points, dtype=np.float32)

    def new_grids(self, m: int) -> np.ndarray:
        lo, hi = int(np.floor(self.pad)), self.res - int(np.ceil(self.pad))
        grid = np.ones((m, self.side, self.side), dtype=bool)
        b = self.border
        grid[:, b + lo : b + hi, b + lo : b + hi] = False
        return grid.reshape(m, -1)

    def footprint(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Flat grid indices (..., P) of the pixels under the paddles ``start``–``end`` (..., 2).

        Points are clipped to the grid less ``halo``, so stamping a halo never leaves the grid.
        """
        lo, hi = self.halo - self.border, self.res + self.border - self.halo - 1
        a, b = np.clip(start, lo, hi), np.clip(end, lo, hi)
        # Shifted by the border the coordinates are >= 0, so truncation is floor.
        x = (a[..., 0, None] + self._t * (b[..., 0] - a[..., 0])[..., None] + self.border).astype(
            np.int32
        )
        y = (a[..., 1, None] + self._t * (b[..., 1] - a[..., 1])[..., None] + self.border).astype(
            np.int32
        )
        return y * self.side + x

    def free(self, grid: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Whether candidates ``idx`` (m, K, P) lie on free pixels only."""
        rows = np.arange(grid.shape[0])[:, None, None]
        return ~grid[rows, idx].any(axis=-1)

    def stamp(self, grid: np.ndarray, idx: np.ndarray) -> None:
        """Mark the pixels within ``halo`` of the paddles ``idx`` (m, P) as taken."""
        cells = idx[:, :, None] + self.halo_offsets
        grid[np.arange(grid.shape[0])[:, None, None], cells] = True

    def within(self, idx: np.ndarray, centre: np.ndarray, radius: int) -> np.ndarray:
        """Whether any pixel of ``idx`` (m, K, P) is within ``radius`` (Chebyshev) of ``centre``."""
        # Shifted by radius in both axes, a pixel is near iff both offsets lie in [0, 2·radius]
        # (divmod keeps dx in [0, side), so only dy can be negative).
        dy, dx = np.divmod(idx - centre + radius * (self.side + 1), self.side)
        return ((dy >= 0) & (dy <= 2 * radius) & (dx <= 2 * radius)).any(axis=-1)

    def mark_around(self, grid: np.ndarray, points: np.ndarray) -> None:
        """Mark the pixels around ``points`` (m, ..., 2) that a marker's ink could touch."""
        reach = int(np.ceil(self.marker_reach))
        r = np.arange(-reach, reach + 1)
        block = (r[:, None] * self.side + r[None, :]).ravel()
        centre = self.footprint(points, points)[..., 0]  # the pixel of each point
        cells = np.clip(centre.reshape(len(grid), -1, 1) + block, 0, grid.shape[1] - 1)
        grid[np.arange(len(grid))[:, None, None], cells] = True

    def seed(self, grid: np.ndarray, start: np.ndarray, also_taken=None):
        """First paddles from candidate starts (m, K, 2) in random directions.

        Returns ``(found (m,), paddle)`` with paddle ``[start, end, angle, pixels]`` of the first
        free candidate of each image.
        """
        angle = self.rng.uniform(-np.pi, np.pi, start.shape[:2]).astype(np.float32)
        start = start.astype(np.float32)
        stop = start + self.length * _unit(angle)
        idx = self.footprint(start, stop)
        valid = self.free(grid, idx)
        if also_taken is not None:
            valid &= ~also_taken(idx)
        first = np.argmax(valid, axis=1)
        rows = np.arange(start.shape[0])
        return valid.any(axis=1), [a[rows, first] for a in (start, stop, angle, idx)]

    def extend(self, grid: np.ndarray, paddle: list[np.ndarray], avoid: np.ndarray | None = None):
        """The next paddle after ``paddle`` (its end (m, 2) and heading (m,) are used).

        The path turns at a pivot ``margin`` beyond the last paddle and the new paddle starts
        ``margin`` beyond the pivot, as in the original generator. As there, the turn is drawn
        from the continuity density restricted to the free positions: candidate turns cover
        the allowed range (one per bin, jittered), and one free candidate is drawn with
        probability proportional to its density. Candidates with a pixel within a marker's
        reach of the pixel ``avoid`` (m,) (flat grid index) are not free either.
        Returns ``(found (m,), new paddle)``.
        """
        _, end, angle, _ = paddle
        m, k, c = end.shape[0], _CANDIDATES, self.s.continuity
        limit = np.pi / (2 * c)
        edges = np.linspace(-limit, limit, k + 1, dtype=np.float32)
        turn = edges[:-1] + (edges[1] - edges[0]) * self.rng.random((m, k), dtype=np.float32)
        new_angle = angle[:, None] + turn
        direction = _unit(new_angle)
        pivot = end + self.margin * _unit(angle)
        start = pivot[:, None, :] + self.margin * direction
        stop = start + self.length * direction
        idx = self.footprint(start, stop)
        free = self.free(grid, idx)
        if avoid is not None:
            free &= ~self.within(idx, avoid[:, None, None], int(np.ceil(self.marker_reach)))
        # float64: u·total < total for every float32 u < 1, so a free candidate is always hit
        weight = np.cos(c * turn, dtype=np.float64) ** 2 * free
        cum = np.cumsum(weight, axis=1)
        total = cum[:, -1]
        threshold = self.rng.random(m, dtype=np.float32) * total
        choice = np.argmax(cum > threshold[:, None], axis=1)
        rows = np.arange(m)
        return total > 0, [a[rows, choice] for a in (start, stop, new_angle, idx)]


def _unit(angle: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def _near(g: _Geometry, idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
    """Whether a pixel of ``idx_a`` (m, K, P) is within the halo of ``idx_b`` (m, P)."""
    ya, xa = np.divmod(idx_a, g.side)
    yb, xb = np.divmod(idx_b, g.side)
    dy = np.abs(ya[:, :, :, None] - yb[:, None, None, :])
    dx = np.abs(xa[:, :, :, None] - xb[:, None, None, :])
    return (np.maximum(dx, dy) <= g.halo).any(axis=(-1, -2))


def _draw_targets(g: _Geometry, n: int):
    """Try ``n`` pairs of target paths; return the successful ones.

    Returns ``(targets (m, 2, L, 2, 2), occupancy (m, side²))``: paddles as (start, end)
    points in (x, y) pixel coordinates, and the grid of the pixels they take with their halo.
    Images whose paths get stuck are dropped as soon as that happens, so later steps only work
    on live ones.
    """
    s, k, rng = g.s, _SEED_CANDIDATES, g.rng
    sd, cl = s.seed_distance * s.scale, s.contour_length
    occ = g.new_grids(n)
    # The first start lies at least 2·seed_distance from the border (as the original), the
    # second seed_distance away from it in a random direction.
    lo, hi = min(2 * sd, g.res / 2 - 1), max(g.res - 2 * sd, g.res / 2 + 1)
    found, a = g.seed(occ, rng.uniform(lo, hi, (n, k, 2)))
    starts_b = a[0][:, None, :] + sd * _unit(rng.uniform(-np.pi, np.pi, (n, k)))
    found_b, b = g.seed(occ, starts_b, lambda idx: _near(g, idx, a[3]))
    live = np.flatnonzero(found & found_b)  # images still being drawn
    heads = [[x[live] for x in a], [x[live] for x in b]]
    occ = occ[live]
    targets = np.zeros((n, 2, cl, 2, 2), dtype=np.float32)
    for p in range(2):
        targets[live, p, 0] = np.stack(heads[p][:2], axis=1)
    # A marker touching the other path would join the two to the eye, so each path keeps away
    # from the other's start (a possible marker place); the far ends are checked at the end.
    origin = [g.footprint(h[0], h[0])[:, 0] for h in heads]
    # Grow both alternately. A path's newest paddle joins the grid only once the next one is
    # placed (the two are meant to be close), so the other path checks it separately.
    for step in range(1, cl):
        for p in range(2):
            grid = occ.copy()
            g.stamp(grid, heads[1 - p][3])
            found, new = g.extend(grid, heads[p], avoid=origin[1 - p])
            g.stamp(occ, heads[p][3])
            heads[p] = new
            if not found.all():
                live, occ = live[found], occ[found]
                origin = [x[found] for x in origin]
                heads = [[x[found] for x in h] for h in heads]
            targets[live, p, step] = np.stack(heads[p][:2], axis=1)
    for p in range(2):
        g.stamp(occ, heads[p][3])
    targets = targets[live]
    clear = _ends_clear(g, targets)
    targets, occ = targets[clear], occ[clear]
    # Distractors keep away from all four ends alike (the label must not show in them).
    ends = np.concatenate([targets[:, :, 0, 0], targets[:, :, -1, 1]], axis=1)  # (m, 4, 2)
    g.mark_around(occ, ends)
    return targets, occ


def _segment_distance(points: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Distances (m, A, S) from points (m, A, 2) to segments (m, S, 2, 2)."""
    a, b = seg[:, None, :, 0], seg[:, None, :, 1]
    ab, ap = b - a, points[:, :, None, :] - a
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(ap - t[..., None] * ab, axis=-1)


def _ends_clear(g: _Geometry, targets: np.ndarray) -> np.ndarray:
    """Whether both ends of each target path keep a marker's gap to the other path (m,)."""
    ok = np.ones(targets.shape[0], dtype=bool)
    for p in range(2):
        ends = np.stack([targets[:, p, 0, 0], targets[:, p, -1, 1]], axis=1)
        distance = _segment_distance(ends, targets[:, 1 - p]).min(axis=(1, 2))
        ok &= distance >= g.marker_reach + g.line_reach  # the two inks do not overlap
    return ok


def _draw_distractors(g: _Geometry, occ: np.ndarray):
    """Add up to ``num_distractors`` short paths to each image of ``occ`` (m, side²), in place.

    A path that gets stuck is dropped and tried again elsewhere, ``_DISTRACTOR_TRIES`` times
    per path at most. Returns ``(distractors (m, D, 2, 2), mask (m, D))``.
    """
    s, k, rng = g.s, _DISTRACTOR_SEED_CANDIDATES, g.rng
    dl, nd = s.distractor_length, s.num_distractors
    m = occ.shape[0]
    distractors = np.zeros((m, nd * dl, 2, 2), dtype=np.float32)
    placed = np.zeros(m, dtype=np.int64)
    for _ in range(nd * _DISTRACTOR_TRIES):
        act = np.flatnonzero(placed < nd)
        if act.size == 0:
            break
        grid = occ[act]
        starts = rng.uniform(g.pad, g.res - g.pad, (act.size, k, 2))
        good, paddle = g.seed(grid, starts)
        paddles = [np.stack(paddle[:2], axis=1)]
        for _ in range(dl - 1):
            found, new = g.extend(grid, paddle)
            good &= found
            g.stamp(grid, paddle[3])
            paddle = new
            paddles.append(np.stack(new[:2], axis=1))
        g.stamp(grid, paddle[3])
        rows = act[good]
        occ[rows] = grid[good]
        slots = placed[rows, None] * dl + np.arange(dl)
        distractors[rows[:, None], slots] = np.stack(paddles, axis=1)[good]
        placed[rows] += 1
    mask = np.arange(nd * dl)[None, :] < (placed * dl)[:, None]
    return distractors, mask


def _ink(out: np.ndarray, res: int, corner: np.ndarray, dist, reach: float, window: int):
    """Add anti-aliased ink ``clip(reach - dist, 0, 1)`` to ``out`` (n, R²) by maximum.

    Each shape touches only a ``window``² block of pixels from its ``corner`` (n, S, 2); ``dist``
    maps the pixel centres (n, S, W, W, 2) to distances.
    """
    n, n_shapes = corner.shape[:2]
    offsets = np.arange(window)
    px = corner[..., 0, None, None] + offsets[None, :]  # (n, S, 1, W) columns
    py = corner[..., 1, None, None] + offsets[:, None]  # (n, S, W, 1) rows
    px, py = np.broadcast_arrays(px, py)
    centres = np.stack([px, py], axis=-1).astype(np.float32) + 0.5
    ink = np.clip(reach - dist(centres), 0.0, 1.0)
    inside = (px >= 0) & (px < res) & (py >= 0) & (py < res)
    ink = np.where(inside, ink, 0.0)
    cells = np.clip(py, 0, res - 1) * res + np.clip(px, 0, res - 1)
    rows = np.broadcast_to(np.arange(n)[:, None, None, None], cells.shape)
    np.maximum.at(out, (rows.ravel(), cells.ravel()), ink.ravel())


def _render(
    settings: PathfinderSettings,
    segments: np.ndarray,
    seg_mask: np.ndarray,
    markers: np.ndarray,
) -> np.ndarray:
    """Anti-aliased greyscale images (n, R, R) uint8 of segments (n, S, 2, 2) and markers.

    Lines have width ``line_width`` (pixel value ``clip(width/2 + 0.5 - distance, 0, 1)``), the
    markers radius ``marker_radius``; where shapes overlap the brighter one wins.
    """
    s = settings
    res, n = s.resolution, segments.shape[0]
    out = np.zeros((n, res * res), dtype=np.float32)
    reach = s.line_width * s.scale / 2 + 0.5
    seg = segments.astype(np.float32)
    a, b = seg[:, :, 0], seg[:, :, 1]  # (n, S, 2)
    ab = b - a
    denom = np.maximum((ab * ab).sum(-1), 1e-12)
    window = int(np.ceil(s.paddle_length * s.scale + 2 * reach)) + 2
    corner = np.floor(np.minimum(a, b) - reach).astype(np.int64)
    corner[~seg_mask] = -10 * window  # outside the image: no ink

    def segment_distance(c: np.ndarray) -> np.ndarray:
        ap = c - a[:, :, None, None, :]
        t = (ap * ab[:, :, None, None, :]).sum(-1) / denom[:, :, None, None]
        t = np.clip(t, 0.0, 1.0)
        return np.linalg.norm(ap - t[..., None] * ab[:, :, None, None, :], axis=-1)

    _ink(out, res, corner, segment_distance, reach, window)
    radius = s.marker_radius * s.scale + 0.5
    m = markers.astype(np.float32)
    m_window = 2 * int(np.ceil(radius)) + 2
    m_corner = np.floor(m - radius).astype(np.int64)
    _ink(
        out,
        res,
        m_corner,
        lambda c: np.linalg.norm(c - m[:, :, None, None, :], axis=-1),
        radius,
        m_window,
    )
    return np.rint(out * 255).astype(np.uint8).reshape(n, res, res)


def generate_batch(
    n: int,
    rng: np.random.Generator,
    settings: PathfinderSettings | None = None,
    *,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Draw ``n`` Pathfinder images.

    Args:
        n: number of images.
        rng: numpy random generator (the images are a function of its state).
        settings: geometry (default: LRA's Pathfinder-32 with contour length 14).
        labels: (n,) of 0/1; default exactly balanced (half of each, the odd one random),
            shuffled.

    Returns:
        ``(images (n, R, R) uint8, labels (n,) int64, geometry)`` where geometry holds
        ``targets`` (n, 2, L, 2, 2): the two target paths' paddles as (start, end) (x, y)
        points, ``markers`` (n, 2, 2), ``origin`` (n,): the target path whose start carries the
        first marker, and ``distractors`` (n, D, 2, 2) with ``distractor_mask`` (n, D).
    """
    s = settings or PathfinderSettings()
    if labels is None:
        labels = np.arange(n) % 2
        if n % 2:
            labels[-1] = rng.integers(0, 2)
        labels = rng.permutation(labels)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be (n,) = ({n},) of 0/1, got shape {labels.shape}")
    g = _Geometry(s, rng)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    have = 0
    rate = 0.1  # success rate of target pairs, refined as we go
    while have < n:
        want = n - have
        tries = max(64, int(want / rate * 1.2))
        targets, occ = _draw_targets(g, tries)
        rate = max(targets.shape[0], 1) / tries
        parts.append((targets[:want], occ[:want]))
        have += min(want, targets.shape[0])
    targets = np.concatenate([p[0] for p in parts])
    occ = np.concatenate([p[1] for p in parts])
    distractors, dmask = _draw_distractors(g, occ)
    origin = rng.integers(0, 2, n)
    terminal = np.where(labels == 1, origin, 1 - origin)
    rows = np.arange(n)
    markers = np.stack([targets[rows, origin, 0, 0], targets[rows, terminal, -1, 1]], axis=1)
    segments = np.concatenate([targets.reshape(n, -1, 2, 2), distractors], axis=1)
    seg_mask = np.concatenate([np.ones((n, 2 * s.contour_length), dtype=bool), dmask], axis=1)
    images = _render(s, segments, seg_mask, markers)
    geometry = {
        "targets": targets,
        "markers": markers,
        "origin": origin,
        "distractors": distractors,
        "distractor_mask": dmask,
    }
    return images, labels, geometry


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def write_dataset(
    out: str | os.PathLike[str],
    *,
    images: int = 200_000,
    resolution: int = 32,
    contour_length: int = 14,
    seed: int = 0,
    images_per_batch: int = 1000,
    progress: bool = False,
) -> Path:
    """Write a Pathfinder set in the release's layout; return its folder.

    Layout, under ``out/curv_contour_length_<contour_length>/``: ``imgs/<b>/sample_<k>.png``
    (greyscale) and ``metadata/<b>.npy``, a text file (despite the name) with one line per image:
    ``imgs/<b> sample_<k>.png <k> <label> <continuity> <contour length> <distractor length>
    <paddle length> <paddle thickness> <paddle margin> <number of contrasts>``.

    A batch's metadata file is written last and atomically, so a batch is complete iff its
    metadata exists. Running again with the same arguments keeps the complete batches and redoes
    the rest (each batch has its own random stream, so the result is the same); running with
    other arguments into the same folder is refused. ``nystromer_pathfinder.json`` records them.

    Args:
        out: parent folder.
        images: total number of images; labels are balanced within every batch.
        resolution: image side in pixels (32 as LRA; others scale the geometry).
        contour_length: paddles per target path (LRA: 14).
        seed: the random seed; batch ``b`` draws from ``numpy.random.default_rng([seed, b])``.
        images_per_batch: images per ``imgs/<b>`` folder and metadata file.
        progress: show a tqdm progress bar with the rate.
    """
    check_int_at_least("images", images, 1)
    check_int_at_least("images_per_batch", images_per_batch, 1)
    check_int_at_least("seed", seed, 0)
    settings = PathfinderSettings(resolution=resolution, contour_length=contour_length)
    folder = dataset_folder(out, contour_length)
    record = {
        "generator": "nystromer",
        "images": images,
        "images_per_batch": images_per_batch,
        "seed": seed,
        "settings": asdict(settings),
    }
    settings_path = folder / SETTINGS_FILE
    meta_dir = folder / "metadata"
    if settings_path.exists():
        if load_json(settings_path) != record:
            raise ValueError(
                f"{folder} holds a Pathfinder set made with other arguments ({settings_path}); "
                "choose another --out or delete it"
            )
    elif meta_dir.exists() and any(meta_dir.iterdir()):
        raise ValueError(f"{folder} already holds Pathfinder data not written by nystromer")
    meta_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(settings_path) as f:
        json.dump(record, f, indent=1)

    n_batches = -(-images // images_per_batch)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=images, unit="img", desc="Pathfinder", smoothing=0.1)
    fields = settings.metadata_fields()
    try:
        for b in range(n_batches):
            count = min(images_per_batch, images - b * images_per_batch)
            meta_path = meta_dir / f"{b}.npy"
            if meta_path.exists():
                if bar is not None:
                    bar.update(count)
                continue
            rng = np.random.default_rng([seed, b])
            img_dir = folder / "imgs" / str(b)
            img_dir.mkdir(parents=True, exist_ok=True)
            lines = []
            done = 0
            # Draw in slices to keep memory flat for any images_per_batch.
            while done < count:
                part = min(500, count - done)
                batch, labels, _ = generate_batch(part, rng, settings, labels=None)
                for j in range(part):
                    k = done + j
                    name = f"sample_{k}.png"
                    _write_png(img_dir / name, batch[j])
                    lines.append(f"imgs/{b} {name} {k} {int(labels[j])} {fields}\n")
                done += part
                if bar is not None:
                    bar.update(part)
            with atomic_write(meta_path) as f:
                f.writelines(lines)
    finally:
        if bar is not None:
            bar.close()
    return folder

"""``nystromer.bench.approx``: the landmark sweep's three landmark choices and their table/plot.

The end-to-end run of ``bench approx`` is in test_report.py; these are the fast unit checks.
"""

from __future__ import annotations

import json
import math

import torch

from nystromer.bench.approx import format_sweep_tables, landmark_sweep, write_approx_outputs
from nystromer.bench.inputs import random_qkv

PNG = b"\x89PNG\r\n\x1a\n"


def _clustered_qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k around 6 centres per head (n = 256, d = 6, 2 heads).

    Segment means of such tokens are averages over several clusters and sit near none of
    them, while k-means landmarks find the clusters: the case the refinement is for.
    """
    gen = torch.Generator().manual_seed(seed)
    heads, n, d, clusters = 2, 256, 6, 6
    centres = 1.5 * torch.randn(1, heads, clusters, d, generator=gen)

    def draw() -> torch.Tensor:
        which = torch.randint(clusters, (1, heads, n, 1), generator=gen).expand(1, heads, n, d)
        noise = 0.15 * torch.randn(1, heads, n, d, generator=gen)
        return centres.gather(2, which) + noise

    q, k = draw(), draw()
    return q, k, torch.randn(1, heads, n, d, generator=gen)


def _report(sweep: dict) -> dict:
    iterations = {"iterations": [6], "error": [0.5], "exact_pinv_error": 0.4, "num_landmarks": 8}
    return {
        "num_landmarks": 8,
        "sources": {
            "clustered": {
                "description": "q, k around 6 centres",
                "landmarks": sweep,
                "iterations": iterations,
                "implementations": {},
            }
        },
    }


def test_landmark_sweep_measures_kmeans_landmarks_where_they_must_help():
    q, k, v = _clustered_qkv()
    sweep = landmark_sweep(q, k, v, [8, 16, 256])
    assert sweep["landmarks"] == [8, 16]  # m = n is exact attention, not measured
    assert sweep["kmeans_iterations"] == 3
    for key in ("segment_means", "kmeans", "random_subsample"):
        assert len(sweep[key]) == 2 and all(math.isfinite(e) and e >= 0 for e in sweep[key])
    # Measured: segment means ≈ 0.83, 3 k-means iterations ≈ 0.31 at m = 8.
    assert sweep["segment_means"][0] > 0.6
    assert sweep["kmeans"][0] < 0.5 * sweep["segment_means"][0]
    unrefined = landmark_sweep(q, k, v, [8], kmeans_iterations=0)
    assert unrefined["kmeans"] == unrefined["segment_means"] and unrefined["kmeans_iterations"] == 0


def test_sweep_table_has_three_choices():
    sweep = {
        "landmarks": [8, 16],
        "segment_means": [0.83, 0.66],
        "kmeans": [0.31, 0.043],
        "random_subsample": [0.57, 0.27],
        "kmeans_iterations": 3,
    }
    table = format_sweep_tables(_report(sweep))
    assert "segment means / k-means / random positions" in table
    assert "k-means: 3 Lloyd iterations from the segment means" in table
    assert "| 8 | 0.83 / 0.31 / 0.57 |" in table and "| 16 | 0.66 / 0.043 / 0.27 |" in table


def test_outputs_table_and_plots(tmp_path):
    q, k, v = _clustered_qkv()
    sweep = landmark_sweep(q, k, v, [8])
    report = _report(sweep)
    paths = write_approx_outputs(report, tmp_path)
    assert [p.name for p in paths] == [
        "approx.json",
        "approx.md",
        "approx_landmarks.png",
        "approx_iterations.png",
    ]
    assert json.loads(paths[0].read_text())["sources"]["clustered"]["landmarks"] == sweep
    md = paths[1].read_text()
    assert f"{sweep['kmeans'][0]:.3g}" in md and "- `clustered`: q, k around 6 centres" in md
    assert paths[2].read_bytes()[:8] == PNG


def test_language_model_sweeps_use_every_layer(monkeypatch):
    # The lm inputs are (layers, H, n, d) and the report says "every layer": the sweeps must
    # not measure the first layer alone, as they do for the other kinds' sample 0.
    import nystromer.bench.approx as approx

    layers = [random_qkv(1, 2, 64, 8, style="structured", seed=s) for s in range(3)]
    # Layer 0 with near-uniform attention (tiny logits) is far easier than the others.
    layers[0] = (0.01 * layers[0][0], 0.01 * layers[0][1], layers[0][2])
    q, k, v = (torch.cat(t) for t in zip(*layers, strict=True))
    monkeypatch.setattr(approx, "model_qkv", lambda *a, **kw: (q, k, v, "three layers"))
    report = approx.run_approx(
        sources=["lm"], landmarks=[8], iterations=[2], num_landmarks=8, progress=None
    )
    entry = report["sources"]["lm"]
    assert "every layer" in entry["description"]
    every = landmark_sweep(q, k, v, [8])
    first = landmark_sweep(q[:1], k[:1], v[:1], [8])
    assert every["segment_means"][0] > 2 * first["segment_means"][0]  # the layers differ
    assert entry["landmarks"]["segment_means"] == every["segment_means"]
    iterations = approx.iteration_sweep(q, k, v, [2], num_landmarks=8)
    assert entry["iterations"]["error"] == iterations["error"]
    assert entry["iterations"]["exact_pinv_error"] == iterations["exact_pinv_error"]

"""q, k, v of a trained LRA model: example choice, capture, read-only checkpoint reading."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from nystromer.bench import lra_inputs
from nystromer.bench.approx import implementation_errors
from nystromer.bench.lra_inputs import (
    has_checkpoint,
    load_lra_model,
    lra_qkv,
    pick_examples,
    resolve_lra_run,
)
from nystromer.lra.data import load_split


def test_pick_examples_prefers_an_exact_multiple_and_three_quarters_padding():
    lengths = [100, 128, 256, 200, 190, 250, 64]
    pick = pick_examples(lengths, 64)
    # 256 is the longest multiple of 64; 190 is the closest to 0.75·256 = 192.
    assert pick == {
        "index0": 2,
        "n": 256,
        "truncated0": False,
        "index1": 4,
        "length1": 190,
        "truncated1": False,
    }
    # No multiple of 64 above 64: the longest is cut down to one.
    pick = pick_examples([150, 199, 70], 64)
    assert (pick["index0"], pick["n"], pick["truncated0"]) == (1, 192, True)
    assert (pick["index1"], pick["length1"]) == (0, 150)
    # Nothing shorter than n: the other example is cut to 3/4 of n.
    pick = pick_examples([128, 128], 64)
    assert (pick["index0"], pick["index1"], pick["length1"], pick["truncated1"]) == (0, 1, 96, True)
    with pytest.raises(ValueError, match="longer than 2·64"):
        pick_examples([100, 120], 64)
    with pytest.raises(ValueError, match="at least two"):
        pick_examples([128], 64)


def _digest(folder):
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_lra_qkv_captures_the_layer_and_leaves_the_run_untouched(lra_run):
    before = _digest(lra_run)
    found = lra_qkv(lra_run, layer=0, num_landmarks=16)
    assert _digest(lra_run) == before  # read-only: nothing written, touched or replaced

    n, length1 = found.lengths
    assert found.query.shape == found.key.shape == found.value.shape == (2, 2, n, 32)
    assert n % 16 == 0 and 0 < length1 < n
    assert found.mask[0].all() and found.mask[1].sum() == length1
    assert not found.mask[1, length1:].any()
    assert found.info["checkpoint"] == "best" and found.info["layer"] == 0
    assert "listops model" in found.description and f"{n - length1} padding" in found.description

    # Layer 0's queries are q_proj(LayerNorm(token + position embeddings)): recompute them from
    # the checkpoint's weights for sample 0 and compare (float32 on both sides, same ops).
    model, _ = load_lra_model(lra_run)
    split = load_split("listops", found.info["data_dir"], "val", max_length=160)  # the demo's
    ids = split[found.info["examples"][0]][0][:n]
    enc = model.encoder
    with torch.no_grad():
        x = enc.tokens(ids) + enc.positions(torch.arange(n))
        q = enc.layers[0].attn.q_proj(enc.layers[0].norm1(x))
    expected = q.view(n, 2, 32).transpose(0, 1)
    torch.testing.assert_close(found.query[0], expected, rtol=0, atol=1e-6)

    last = lra_qkv(lra_run, num_landmarks=16, checkpoint="last")
    assert last.info["layer"] == 1 and last.info["checkpoint"] == "last"
    assert not torch.equal(last.query[0], found.query[0])


def test_lra_inputs_feed_the_implementation_table(lra_run):
    found = lra_qkv(lra_run, num_landmarks=16)
    rows = implementation_errors(
        found.query, found.key, found.value, num_landmarks=16, mask=found.mask
    )
    ours = rows["nystromer"]
    assert ours["batch_coupling"] == 0.0
    for name in ("unpadded", "unpadded_uneven", "padded_sample", "full_sample_in_padded_batch"):
        assert math.isfinite(ours[name]) and 0 < ours[name] < 1
    bad = found.mask.clone()
    bad[0, -1] = False
    with pytest.raises(ValueError, match="row 0 all True"):
        implementation_errors(found.query, found.key, found.value, num_landmarks=16, mask=bad)


def test_checkpoint_read_retries_until_meta_and_weights_agree(lra_run, monkeypatch):
    # A trainer replacing the checkpoint between the two meta reads: the first pair differs.
    steps = iter([1, 2, 2, 2])
    monkeypatch.setattr(lra_inputs.ckpt, "read_meta", lambda _where: {"step": next(steps)})
    where, meta, tensors = lra_inputs._read_checkpoint(lra_run, "last")
    assert meta == {"step": 2} and where.name == "last"
    assert any(name.endswith("q_proj.weight") for name in tensors)


def test_resolve_lra_run_reads_a_run_and_never_trains_one(tmp_path, lra_run, monkeypatch):
    assert has_checkpoint(lra_run) and not has_checkpoint(tmp_path)
    assert resolve_lra_run(lra_run) == lra_run
    with pytest.raises(ValueError, match=r"--lra-run: .* holds no trained LRA model.*nystromer"):
        resolve_lra_run(tmp_path)
    monkeypatch.setattr(lra_inputs, "DEFAULT_LRA_RUN", tmp_path / "absent")
    # The demo's run is a default too.
    monkeypatch.setattr(lra_inputs, "FALLBACK_LRA_DIR", lra_run.parent)
    assert resolve_lra_run(None) == lra_run
    monkeypatch.setattr(lra_inputs, "FALLBACK_LRA_DIR", tmp_path / "demo")
    with pytest.raises(ValueError, match="no trained LRA model in .*nystromer train listops"):
        resolve_lra_run(None)
    assert not (tmp_path / "demo").exists()

"""attention_rows: rows of the matrix nystrom_attention applies, without forming the rest."""

from __future__ import annotations

import pytest
import torch

from nystromer import attention_rows, nystrom_attention
from tests import reference

B, H, D, M = 2, 3, 8, 8


def _qkv(n_q, n_k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, n_k, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, n_k, D + 2, generator=g, dtype=dtype)
    return q, k, v


def _right_padded(n, real):
    return torch.arange(n)[None, :] < torch.tensor(real)[:, None]


@pytest.mark.parametrize(
    "n_q, n_k, real, kmeans",
    [
        (50, 50, None, 0),  # n not a multiple of m, no padding
        (48, 48, None, 0),  # equal segments
        (50, 50, [50, 37], 0),  # padded batch
        (50, 50, [50, 5], 0),  # one sample with at most m real keys: exact rows
        (50, 50, [41, 30], 2),  # k-means landmarks
        (30, 44, [44, 20], 0),  # cross-attention
        (6, 40, None, 0),  # n_q ≤ m: exact attention
    ],
)
def test_rows_times_values_equal_the_attention_output(n_q, n_k, real, kmeans):
    q, k, v = _qkv(n_q, n_k)
    mask = None if real is None else _right_padded(n_k, real)
    settings = dict(num_landmarks=M, mask=mask, kmeans_iterations=kmeans)
    rows = [0, 3, n_q - 1, -2]
    weights = attention_rows(q, k, rows, **settings)
    assert weights.shape == (B, H, len(rows), n_k)
    out = nystrom_attention(q, k, v, **settings)
    torch.testing.assert_close(weights @ v, out[:, :, [r % n_q for r in rows]], rtol=0, atol=1e-10)
    if mask is not None:  # padding keys get no weight
        assert (weights.masked_select(~mask[:, None, None, :]) == 0).all()


def test_rows_of_padded_queries_equal_those_of_the_real_queries_alone():
    # Sample 0 has 4 ≤ m real queries (exact rows alone), sample 1 has 30 (Nyström).
    q, k, v = _qkv(40, 44, seed=3)
    query_mask = _right_padded(40, [4, 30])
    rows = attention_rows(q, k, [0, 3], num_landmarks=M, query_mask=query_mask)
    out = nystrom_attention(q, k, v, num_landmarks=M, query_mask=query_mask)
    torch.testing.assert_close(rows @ v, out[:, :, [0, 3]], rtol=0, atol=1e-10)
    for i, n in enumerate([4, 30]):
        alone = attention_rows(q[i : i + 1, :, :n], k[i : i + 1], [0, 3], num_landmarks=M)
        torch.testing.assert_close(rows[i : i + 1], alone, rtol=0, atol=1e-10)


def test_rows_equal_the_dense_reference_matrix():
    q, k, _ = _qkv(50, 50, seed=1)
    dense = reference.nystrom_matrix(q, k, M)  # (B, H, n, n), the paper's F·A⁺·B
    rows = torch.tensor([0, 17, 49])
    torch.testing.assert_close(
        attention_rows(q, k, rows, num_landmarks=M), dense[:, :, rows], rtol=0, atol=1e-12
    )
    # A padded sample's rows are those of its real tokens alone.
    mask = _right_padded(50, [50, 33])
    alone = reference.nystrom_matrix(q[1:, :, :33], k[1:, :, :33], M)
    padded = attention_rows(q, k, [0, 32], num_landmarks=M, mask=mask)
    torch.testing.assert_close(padded[1:, :, :, :33], alone[:, :, [0, 32]], rtol=0, atol=1e-12)


def test_padded_queries_and_empty_samples_give_zero_rows():
    q, k, _ = _qkv(40, 40, seed=2)
    mask = _right_padded(40, [30, 0])
    weights = attention_rows(q, k, [0, 35], num_landmarks=M, mask=mask)
    assert torch.isfinite(weights).all()
    assert (weights[:, :, 1] == 0).all()  # position 35 is padding in both samples
    assert (weights[1] == 0).all()  # sample 1 has no real key
    assert weights[0, :, 0].abs().sum() > 0


def test_low_precision_rows_match_float64():
    q, k, _ = _qkv(64, 64, seed=3)
    rows = [0, 63]
    exact = attention_rows(q, k, rows, num_landmarks=M)
    low = attention_rows(q.bfloat16(), k.bfloat16(), rows, num_landmarks=M)
    assert low.dtype == torch.bfloat16
    # bf16 inputs carry ~3 significant digits; the rows are computed in float32 from them.
    assert (low.double() - exact).abs().max() < 0.05 * exact.abs().max()


def test_rows_are_computed_in_float32_under_autocast():
    # Autocast (mixed-precision training, e.g. a heatmap taken inside the training loop)
    # would lower every product to bf16; the rows are documented as computed in float32.
    q, k, _ = _qkv(64, 64, seed=3)
    q, k = q.bfloat16(), k.bfloat16()
    plain = attention_rows(q, k, [0, 63], num_landmarks=M)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = attention_rows(q, k, [0, 63], num_landmarks=M)
    assert torch.equal(auto, plain)


def test_bad_rows_are_refused_by_name():
    q, k, _ = _qkv(20, 20)
    with pytest.raises(ValueError, match=r"rows must be query positions in \[-20, 20\)"):
        attention_rows(q, k, [0, 20], num_landmarks=M)
    with pytest.raises(TypeError, match="rows must hold integers"):
        attention_rows(q, k, torch.tensor([0.5]), num_landmarks=M)
    with pytest.raises(TypeError, match="rows must be an int or a sequence of ints"):
        attention_rows(q, k, [0, "1"], num_landmarks=M)
    with pytest.raises(ValueError, match="at least one"):
        attention_rows(q, k, [], num_landmarks=M)
    with pytest.raises(TypeError, match="rows must be an int or a sequence of ints, got 0.5"):
        attention_rows(q, k, 0.5, num_landmarks=M)
    with pytest.raises(ValueError, match="mask must have shape"):
        attention_rows(q, k, 0, num_landmarks=M, mask=torch.ones(2, 19, dtype=torch.bool))


def test_integer_like_rows_and_an_empty_batch():
    np = pytest.importorskip("numpy")
    q, k, _ = _qkv(20, 20)
    want = attention_rows(q, k, [3, 5], num_landmarks=M)
    for rows in (np.array([3, 5]), [np.int64(3), 5], range(3, 6, 2)):
        torch.testing.assert_close(attention_rows(q, k, rows, num_landmarks=M), want)
    torch.testing.assert_close(attention_rows(q, k, np.int64(3), num_landmarks=M), want[:, :, :1])
    empty = attention_rows(q[:0], k[:0], [0, 1], num_landmarks=M)
    assert empty.shape == (0, H, 2, 20)


@pytest.mark.parametrize("real", [None, [50, 37]])
def test_rows_are_the_same_when_the_keys_come_in_blocks(monkeypatch, real):
    # The kernel B is formed a block of keys at a time (log-normaliser first, then the
    # product); blocks of 7 keys, which divide neither n nor the padding boundary, must give
    # the rows of the one-block computation and of the dense float64 reference.
    from nystromer import functional

    q, k, v = _qkv(50, 50, seed=2)
    mask = None if real is None else _right_padded(50, real)
    whole = attention_rows(q, k, [0, 21], num_landmarks=M, mask=mask)
    monkeypatch.setattr(functional, "_ROWS_BLOCK", B * H * M * 7)
    blocked = attention_rows(q, k, [0, 21], num_landmarks=M, mask=mask)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-12)
    out = nystrom_attention(q, k, v, num_landmarks=M, mask=mask)
    torch.testing.assert_close(blocked @ v, out[:, :, [0, 21]], rtol=0, atol=1e-10)


@pytest.mark.parametrize("rows", [[0, 3], torch.tensor([0, -1])], ids=["list", "cpu-tensor"])
def test_rows_are_checked_before_they_reach_the_device(rows):
    # Rows given as ints or a CPU tensor are bounds-checked on the host; on a GPU a check after
    # the move would wait for the device. On the meta device any read of a value fails.
    q, k = (torch.empty(2, 2, 40, 8, device="meta") for _ in range(2))
    mask = torch.ones(2, 40, dtype=torch.bool, device="meta")
    out = attention_rows(q, k, rows, num_landmarks=8, mask=mask)
    assert out.shape == (2, 2, 2, 40) and out.device.type == "meta"
    with pytest.raises(ValueError, match="rows must be query positions in"):
        attention_rows(q, k, [40], num_landmarks=8)

"""``nystromer viz attention``'s colour scale on matrices of any size."""

from __future__ import annotations

import torch

from nystromer.bench.viz import colour_limit


def test_colour_limit_is_the_quantile_and_takes_more_than_4096_squared_entries():
    x = torch.rand(50, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # The same interpolation as torch.quantile where that works (float64: exact to rounding).
    expected = float(torch.quantile(x.flatten(), 0.995))
    assert abs(colour_limit(x) - expected) < 1e-15
    # An n×n attention matrix for n = 4,097 (torch.quantile: "input tensor is too large").
    big = torch.arange(4097 * 4097, dtype=torch.float32).view(4097, 4097)
    n = big.numel()
    # Linear interpolation between the sorted entries around 0.995·(n − 1).
    assert abs(colour_limit(big) - 0.995 * (n - 1)) <= 8.0  # float32 spacing near 1.7e7: 2

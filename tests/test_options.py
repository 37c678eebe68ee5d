"""NystromOptions: validation, the dict round trip, and resolve_options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nystromer import NystromAttention, NystromOptions


def test_numpy_integers_are_stored_as_ints():
    # They are integers ≥ 1: refusing them said "must be an integer ≥ 1, got np.int64(8)".
    opts = NystromOptions(
        num_landmarks=np.int64(8),
        pinv_iterations=np.int32(4),
        kmeans_iterations=np.uint8(1),
        conv_kernel_size=np.int16(5),
    )
    assert opts == NystromOptions(8, 4, 1, 5)
    assert all(type(v) is int for v in opts.to_dict().values())
    assert NystromOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    assert opts.replace(num_landmarks=np.int64(16)).num_landmarks == 16
    with pytest.raises(ValueError, match=r"num_landmarks must be an integer ≥ 1"):
        NystromOptions(num_landmarks=np.int64(0))
    with pytest.raises(ValueError, match="num_landmarks.*True"):
        NystromOptions(num_landmarks=True)


def test_module_sizes_and_settings_may_be_numpy_integers():
    torch.manual_seed(0)
    attn = NystromAttention(np.int64(16), np.int64(2), num_landmarks=np.int64(4), kdim=np.int32(6))
    assert (type(attn.embed_dim), type(attn.head_dim), type(attn.kdim)) == (int, int, int)
    assert attn.options == NystromOptions(num_landmarks=4)
    out = attn(torch.randn(1, 9, 16), torch.randn(1, 11, 6), torch.randn(1, 11, 16))
    assert out.shape == (1, 9, 16)


@pytest.mark.parametrize("settings", [[("num_landmarks", 8)], "num_landmarks", NystromOptions()])
def test_from_dict_refuses_what_is_not_a_dict(settings):
    # A list of pairs was read as a dict, a string failed in dict() naming nothing.
    with pytest.raises(TypeError, match="settings must be a dict of Nyström settings or None"):
        NystromOptions.from_dict(settings)


def test_from_dict_names_unknown_keys_of_any_type():
    # sorted() of an int and a str key raised "'<' not supported" instead.
    with pytest.raises(ValueError, match=r"unknown Nyström setting\(s\) \['landmarks', 1\]"):
        NystromOptions.from_dict({"landmarks": 8, 1: 2, "num_landmarks": 8})

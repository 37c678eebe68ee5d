"""NystromformerConfig: transformers' fields and defaults, config.json round trips, validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nystromer.models import NystromformerConfig


def test_fields_and_defaults_match_transformers():
    transformers = pytest.importorskip("transformers")
    hf_cls = transformers.NystromformerConfig
    hf = hf_cls()
    ours = NystromformerConfig()
    own = set(NystromformerConfig.field_names())
    for name in hf_cls.__annotations__:
        assert name in own, name
        assert getattr(ours, name) == getattr(hf, name), name
    for name in ("num_labels", "problem_type"):
        assert getattr(ours, name) == getattr(hf, name), name


def test_json_round_trip_keeps_unknown_keys_and_label_maps(tmp_path):
    cfg = NystromformerConfig(
        hidden_size=32,
        num_attention_heads=4,
        id2label={0: "neg", 1: "neu", 2: "pos"},
        numerics="hf",
        extra={"classifier_dropout": None, "my_note": [1, 2]},
    )
    assert cfg.num_labels == 3 and cfg.label2id == {"neg": 0, "neu": 1, "pos": 2}
    cfg.to_json_file(tmp_path / "config.json", architectures=["NystromformerModel"])
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "nystromformer" and data["id2label"]["2"] == "pos"
    back = NystromformerConfig.from_pretrained(tmp_path)
    assert back == cfg  # architectures / model_type describe the file, not the config


def test_replace_and_overrides():
    cfg = NystromformerConfig(hidden_size=32, num_attention_heads=4)
    three = cfg.replace(num_labels=3)
    assert three.num_labels == 3 and list(three.id2label) == [0, 1, 2]
    assert cfg.num_labels == 2  # the original is unchanged
    with pytest.raises(TypeError, match="unknown config field.*num_landmark"):
        cfg.replace(num_landmark=8)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 30}, "multiple of num_attention_heads"),
        ({"conv_kernel_size": 4}, "conv_kernel_size must be an odd"),
        ({"numerics": "fast"}, "numerics must be one of"),
        ({"hidden_act": "mish"}, "hidden_act must be one of"),
        ({"num_landmarks": 0}, "num_landmarks must be an integer ≥ 1"),
        ({"pinv_iterations": -1}, "pinv_iterations"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"numerics": "hf", "num_landmarks": 5}, "multiple of num_landmarks"),
        ({"problem_type": "ranking"}, "problem_type"),
    ],
)
def test_validation_names_the_field(changes, message):
    base = dataclasses.asdict(NystromformerConfig(hidden_size=32, num_attention_heads=4))
    base.pop("extra")
    with pytest.raises(ValueError, match=message):
        NystromformerConfig(**{**base, **changes})


def test_a_config_of_another_model_type_is_refused():
    with pytest.raises(ValueError, match="'bert' model"):
        NystromformerConfig.from_dict({"model_type": "bert", "hidden_size": 32})


def test_old_numerics_name_is_read_with_a_warning(tmp_path):
    with pytest.warns(DeprecationWarning, match="numerics='ours' is deprecated.*'nystromer'"):
        old = NystromformerConfig(hidden_size=32, num_attention_heads=4, numerics="ours")
    assert old == NystromformerConfig(hidden_size=32, num_attention_heads=4)
    assert old.numerics == "nystromer"
    # A config.json written before the rename loads, and is written back with the new name.
    data = {**old.to_dict(), "numerics": "ours"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.warns(DeprecationWarning):
        back = NystromformerConfig.from_pretrained(tmp_path)
    assert back == old and back.to_dict()["numerics"] == "nystromer"
    with pytest.raises(ValueError, match="numerics must be one of.*'nystromer', 'hf'"):
        NystromformerConfig(numerics="mine")


def test_nystrom_options_are_the_four_attention_fields():
    from nystromer import NystromOptions

    cfg = NystromformerConfig(num_landmarks=32, kmeans_iterations=2, conv_kernel_size=None)
    assert cfg.nystrom_options == NystromOptions(
        num_landmarks=32, pinv_iterations=6, kmeans_iterations=2, conv_kernel_size=None
    )
    opts = NystromOptions(num_landmarks=16, conv_kernel_size=3)
    assert cfg.replace(**opts.to_dict()).nystrom_options == opts


def test_replace_label_names_keeps_the_two_maps_consistent():
    cfg = NystromformerConfig(hidden_size=32, num_attention_heads=4)
    named = cfg.replace(id2label={0: "neg", 1: "neu", 2: "pos"})
    assert named.num_labels == 3
    assert named.label2id == {"neg": 0, "neu": 1, "pos": 2}
    # Both given: taken as they are.
    both = cfg.replace(id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    assert both.label2id == {"a": 0, "b": 1}

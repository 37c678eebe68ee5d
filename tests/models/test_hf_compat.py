"""Checkpoints in both directions with transformers, and numerics="hf" against its outputs."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import nystromer.models as ours
from nystromer.models import CheckpointError

from .tiny import HEADS, batch, hf_branch, main_output, peaked, rel_err, tiny_config, tiny_hf_config

transformers = pytest.importorskip("transformers")

# float32 throughout. numerics="hf" runs transformers' operations in their order; what remains
# is rounding (F.gelu vs transformers' formula, fused kernels): measured ≤ 1.1e-7 (exact
# branch) and ≤ 2.4e-7 (Nyström branch). 1e-5 is the requirement; a per-matrix instead of
# global pseudo-inverse scale, or a masked convolution input, fails it (checked).
TOL = 1e-5


def _hf_model(name, config, seed=0):
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config).eval()
    return peaked(model)


def _loss(out):
    return out.loss


@pytest.mark.parametrize("branch", ["exact", "nystrom"])
@pytest.mark.parametrize("name", HEADS)
def test_hf_numerics_reproduce_transformers(tmp_path, name, branch):
    hf_cfg, n, pad = hf_branch(branch)
    hf = _hf_model(name, hf_cfg)
    hf.save_pretrained(tmp_path)
    model = getattr(ours, name).from_pretrained(tmp_path, numerics="hf", strict=True).eval()
    kwargs, labels = batch(name, n, pad=pad)
    with torch.no_grad():
        expected = hf(**kwargs, **labels)
        got = model(**kwargs, **labels)
    mask = kwargs["attention_mask"].bool()
    a, b = main_output(name, got), main_output(name, expected)
    if name in ("NystromformerModel", "NystromformerForMaskedLM"):
        a, b = a[mask], b[mask]  # padded positions carry no meaning
    assert rel_err(a, b) <= TOL
    if name != "NystromformerModel":
        assert torch.allclose(got.loss, expected.loss, rtol=TOL, atol=0)


def test_hf_numerics_nystrom_branch_quirks(tmp_path):
    # transformers 5.24 raises on padding in this branch; transformers 4.x and the authors' code
    # masked only the landmark-to-key kernel, so padded tokens still shape the landmarks. We
    # keep that in numerics="hf" and show it; the default numerics are padding-invariant.
    torch.manual_seed(0)
    model = ours.NystromformerModel(
        tiny_config(numerics="hf", num_landmarks=8, segment_means_seq_len=32)
    ).eval()
    kwargs, _ = batch("NystromformerModel", 32, pad=True)
    other = dict(kwargs, input_ids=kwargs["input_ids"].clone())
    other["input_ids"][1, -5:] = 7  # change padded tokens only
    real = kwargs["attention_mask"].bool()
    with torch.no_grad():
        a, b = model(**kwargs)[0], model(**other)[0]
        assert torch.isfinite(a).all()
        assert rel_err(a[real], b[real]) > 1e-4  # padding leaks into real positions
        model.config.numerics = "nystromer"
        a, b = model(**kwargs)[0], model(**other)[0]
        assert rel_err(a[real], b[real]) < 1e-6
        model.config.numerics = "hf"
        with pytest.raises(ValueError, match="exactly 32 tokens"):
            model(input_ids=kwargs["input_ids"][:, :27])


def test_our_checkpoints_load_into_transformers_without_missing_weights(tmp_path):
    cfg = tiny_config(numerics="hf", num_landmarks=16, segment_means_seq_len=16)
    for i, name in enumerate(HEADS):
        torch.manual_seed(i)
        model = getattr(ours, name)(cfg).eval()
        directory = tmp_path / name
        model.save_pretrained(directory)
        hf, info = getattr(transformers, name).from_pretrained(directory, output_loading_info=True)
        hf.eval()
        assert not any(info.values()), (name, info)
        kwargs, labels = batch(name, 21, pad=True, seed=i)
        with torch.no_grad():
            a = main_output(name, model(**kwargs))
            b = main_output(name, hf(**kwargs))
        mask = kwargs["attention_mask"].bool()
        if name in ("NystromformerModel", "NystromformerForMaskedLM"):
            a, b = a[mask], b[mask]
        assert rel_err(a, b) <= TOL, name


def test_untied_masked_lm_decoder_both_ways(tmp_path):
    hf = _hf_model("NystromformerForMaskedLM", tiny_hf_config(tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    model = ours.NystromformerForMaskedLM.from_pretrained(tmp_path / "hf", strict=True)
    assert model.cls.predictions.decoder.weight is not model.get_input_embeddings().weight
    model.save_pretrained(tmp_path / "ours")
    back, info = transformers.NystromformerForMaskedLM.from_pretrained(
        tmp_path / "ours", output_loading_info=True
    )
    assert not any(info.values()), info
    kwargs, _ = batch("NystromformerForMaskedLM", 20, pad=False)
    with torch.no_grad():
        assert rel_err(back.eval()(**kwargs).logits, hf(**kwargs).logits) == 0


def test_config_json_is_read_by_transformers(tmp_path):
    cfg = tiny_config(problem_type="single_label_classification", num_landmarks=8)
    ours.NystromformerForSequenceClassification(cfg).save_pretrained(tmp_path)
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf_cfg).__name__ == "NystromformerConfig"
    assert hf_cfg.num_labels == 3 and hf_cfg.num_landmarks == 8
    assert hf_cfg.problem_type == "single_label_classification"
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["architectures"] == ["NystromformerForSequenceClassification"]
    assert data["numerics"] == "nystromer"


def test_pytorch_model_bin_and_sharded_safetensors(tmp_path):
    hf = _hf_model("NystromformerForMaskedLM", tiny_hf_config())
    # transformers 5 writes no .bin; published checkpoints are transformers-4 pickles holding
    # every key, tied decoder weights and the position_ids buffer included. Write one so.
    hf.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    state = dict(hf.state_dict())
    state["nystromformer.embeddings.position_ids"] = torch.arange(2, 98)[None]
    assert "cls.predictions.decoder.weight" in state and "cls.predictions.decoder.bias" in state
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    hf.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    kwargs, _ = batch("NystromformerForMaskedLM", 20, pad=True)
    with torch.no_grad():
        expected = hf(**kwargs).logits
        for sub in ("bin", "shards"):
            model = ours.NystromformerForMaskedLM.from_pretrained(tmp_path / sub, numerics="hf")
            assert rel_err(model.eval()(**kwargs).logits, expected) <= TOL


def test_prefix_mapping_between_encoder_and_head_checkpoints(tmp_path, caplog):
    hf = _hf_model("NystromformerForMaskedLM", tiny_hf_config())
    hf.save_pretrained(tmp_path / "mlm")
    # Encoder from a masked-LM checkpoint: the "nystromformer." prefix is stripped and the
    # head weights are ignored (logged).
    with caplog.at_level(logging.WARNING, logger="nystromer.models.hf_io"):
        base = ours.NystromformerModel.from_pretrained(tmp_path / "mlm", numerics="hf").eval()
    assert "cls.predictions" in caplog.text
    kwargs, _ = batch("NystromformerModel", 20, pad=False)
    with torch.no_grad():
        assert rel_err(base(**kwargs)[0], hf.nystromformer(**kwargs)[0]) <= TOL
    # A new classification head on that encoder: head weights initialised and logged.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nystromer.models.hf_io"):
        clf = ours.NystromformerForSequenceClassification.from_pretrained(tmp_path / "mlm")
    assert "classifier.out_proj.weight" in caplog.text
    torch.testing.assert_close(
        clf.nystromformer.embeddings.word_embeddings.weight,
        hf.nystromformer.embeddings.word_embeddings.weight,
    )
    with pytest.raises(CheckpointError, match="missing head weights"):
        ours.NystromformerForSequenceClassification.from_pretrained(tmp_path / "mlm", strict=True)
    # The other way: a bare encoder checkpoint into a task model gets the prefix added.
    base.save_pretrained(tmp_path / "base")
    mlm = ours.NystromformerForMaskedLM.from_pretrained(tmp_path / "base")
    torch.testing.assert_close(
        mlm.nystromformer.encoder.layer[1].attention.self.conv.weight,
        hf.nystromformer.encoder.layer[1].attention.self.conv.weight,
    )


def test_mismatched_checkpoints_give_errors_listing_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _hf_model("NystromformerForSequenceClassification", tiny_hf_config())
    hf.save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"classifier\.out_proj\.weight: checkpoint \(3, 32\)"
    ):
        ours.NystromformerForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    with pytest.raises(
        CheckpointError, match=r"unexpected encoder weights \[nystromformer\.encoder\.layer\.1"
    ):
        ours.NystromformerForSequenceClassification.from_pretrained(tmp_path, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"conv\.weight"):
        ours.NystromformerForSequenceClassification.from_pretrained(tmp_path, conv_kernel_size=3)
    state = load_file(tmp_path / "model.safetensors")
    del state["nystromformer.encoder.layer.0.attention.self.key.bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"missing encoder weights \[nystromformer\.encoder\.layer\.0\.attention\."
        r"self\.key\.bias\]",
    ):
        ours.NystromformerForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="unknown config field"):
        ours.NystromformerModel.from_pretrained(tmp_path, num_landmark=8)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ours.NystromformerModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        ours.NystromformerModel.from_pretrained(tmp_path)


def test_published_layout_runs_linear_attention_with_default_numerics(tmp_path, monkeypatch):
    # Published configs set num_landmarks == segment_means_seq_len (64): transformers then runs
    # exact O(n²) attention at every length. Ours runs nystrom_attention with num_landmarks.
    hf_cfg = tiny_hf_config(num_landmarks=64, segment_means_seq_len=64, max_position_embeddings=510)
    hf = _hf_model("NystromformerForMaskedLM", hf_cfg)
    hf.save_pretrained(tmp_path)
    model = ours.NystromformerForMaskedLM.from_pretrained(tmp_path, num_landmarks=16).eval()
    n, m = 300, 16
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    kwargs, _ = batch("NystromformerForMaskedLM", n, pad=True)
    with torch.no_grad():
        model(**kwargs)
    assert calls and max(a * b for a, b in calls) <= n * m  # never n × n
    # Short inputs (n ≤ m, no padding) are exact and equal transformers' published behaviour.
    calls.clear()
    kwargs, _ = batch("NystromformerForMaskedLM", 12, pad=False)
    with torch.no_grad():
        assert rel_err(model(**kwargs).logits, hf(**kwargs).logits) <= TOL


def test_untied_masked_lm_uses_the_decoder_bias_transformers_trained(tmp_path):
    # Untied (tie_word_embeddings=False), transformers 5 keeps cls.predictions.decoder.bias as
    # a parameter of its own and adds it in forward; cls.predictions.bias is then unused and
    # stays zero. After fine-tuning the two differ: the decoder's bias is the one to load.
    hf = _hf_model("NystromformerForMaskedLM", tiny_hf_config(tie_word_embeddings=False))
    decoder_bias = hf.cls.predictions.decoder.bias
    assert decoder_bias is not hf.cls.predictions.bias
    with torch.no_grad():
        decoder_bias.normal_()  # what training does to it
    hf.save_pretrained(tmp_path)
    model = ours.NystromformerForMaskedLM.from_pretrained(tmp_path, numerics="hf", strict=True)
    kwargs, _ = batch("NystromformerForMaskedLM", 20, pad=False)
    with torch.no_grad():
        # The same float32 weights, run in float64 on both sides: only rounding remains
        # (measured 1e-15); loading predictions.bias instead gives O(1).
        assert rel_err(model.double()(**kwargs).logits, hf.double()(**kwargs).logits) <= 1e-12


def test_saved_config_states_the_dtype_of_the_saved_weights(tmp_path):
    # transformers loads a checkpoint in the dtype its config.json names ("dtype"; transformers
    # 4: "torch_dtype"). A bfloat16 checkpoint loaded here (float32) and saved again must not
    # keep "bfloat16", or transformers rounds the saved float32 weights to bfloat16.
    torch.manual_seed(0)
    hf = transformers.NystromformerForSequenceClassification(tiny_hf_config()).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    data = json.loads((tmp_path / "bf16" / "config.json").read_text())
    data["torch_dtype"] = "bfloat16"  # as transformers 4 wrote it
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(data))
    model = ours.NystromformerForSequenceClassification.from_pretrained(tmp_path / "bf16")
    with torch.no_grad():  # weights no bfloat16 holds, as after fine-tuning in float32
        model.classifier.dense.weight.add_(1e-4)
    model.save_pretrained(tmp_path / "ours")
    data = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert data["dtype"] == "float32" and "torch_dtype" not in data
    back = transformers.NystromformerForSequenceClassification.from_pretrained(tmp_path / "ours")
    assert back.classifier.dense.weight.dtype == torch.float32
    kwargs, _ = batch("NystromformerForSequenceClassification", 20, pad=False)
    with torch.no_grad():
        assert rel_err(back.eval()(**kwargs).logits, model(**kwargs).logits) <= TOL
    model.to(torch.bfloat16).save_pretrained(tmp_path / "half")
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", HEADS)
def test_return_dict_false_gives_transformers_tuple(tmp_path, name):
    # Code written for transformers passes return_dict=False and unpacks a tuple: (loss,)
    # logits (QA: start, end), hidden states; absent entries are left out.
    hf = _hf_model(name, tiny_hf_config(num_landmarks=16, segment_means_seq_len=16))
    hf.save_pretrained(tmp_path)
    model = getattr(ours, name).from_pretrained(tmp_path, numerics="hf", strict=True)
    kwargs, labels = batch(name, 20, pad=False)
    for extra in ({}, {**labels, "output_hidden_states": True}):
        with torch.no_grad():
            expected = hf(**kwargs, **extra, return_dict=False)
            got = model(**kwargs, **extra, return_dict=False)
            assert type(model(**kwargs, **extra, return_dict=True)) is not tuple
        assert type(got) is tuple and len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            a, b = (a, b) if isinstance(a, torch.Tensor) else (torch.stack(a), torch.stack(b))
            assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("name", ["NystromformerModel", "NystromformerForMaskedLM"])
def test_models_without_convolution_load_into_transformers(tmp_path, name):
    # float64: transformers' model and ours (numerics="hf") run the same operations, and the
    # zero kernel-1 convolution written for transformers adds exactly 0, so what remains is
    # float64 rounding of differently fused kernels (1e-12 is far above it, far below any
    # real difference).
    cfg = tiny_config(numerics="hf", num_landmarks=16, segment_means_seq_len=16)
    cfg = cfg.replace(conv_kernel_size=None)
    torch.manual_seed(0)
    model = peaked(getattr(ours, name)(cfg)).double().eval()
    model.save_pretrained(tmp_path)
    hf, info = getattr(transformers, name).from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert not any(info.values()), info
    assert hf.dtype == torch.float64
    kwargs, _ = batch(name, 21, pad=True)
    mask = kwargs["attention_mask"].bool()
    with torch.no_grad():
        a, b = main_output(name, model(**kwargs))[mask], main_output(name, hf(**kwargs))[mask]
    assert rel_err(a, b) <= 1e-12
    back = getattr(ours, name).from_pretrained(tmp_path, strict=True).double()
    assert back.config.conv_kernel_size is None
    assert not any("conv" in k for k in back.state_dict())
    written = back.config.to_dict()
    assert written.pop("dtype") == "float64" and written == model.config.to_dict()
    with torch.no_grad():
        assert torch.equal(main_output(name, back(**kwargs)), main_output(name, model(**kwargs)))
    # Trained in transformers, the stand-in is a real convolution: refused without the kernel
    # size, loaded with it.
    with torch.no_grad():
        hf.base_model.encoder.layer[0].attention.self.conv.weight.fill_(0.5)
    hf.save_pretrained(tmp_path / "trained")
    with pytest.raises(CheckpointError, match="conv_kernel_size=1"):
        getattr(ours, name).from_pretrained(tmp_path / "trained")
    kept = getattr(ours, name).from_pretrained(tmp_path / "trained", conv_kernel_size=1)
    assert kept.config.conv_kernel_size == 1

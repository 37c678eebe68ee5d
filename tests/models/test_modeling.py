"""The models with the default numerics: padding, training, compile, autocast, bad input."""

from __future__ import annotations

import pytest
import torch

import nystromer.models as ours
from nystromer.models import NystromformerForMaskedLM, NystromformerModel

from .tiny import HEADS, batch, main_output, rel_err, tiny_config


def _model(cls=NystromformerModel, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(num_landmarks=8, **overrides)).eval()


@pytest.mark.parametrize("name", HEADS)
def test_padded_batch_equals_each_sequence_alone(name):
    # float64 so that only the method, not rounding, could make a difference: 1e-10.
    model = _model(getattr(ours, name)).double()
    lengths = [70, 41, 9]  # > m, > m, ≤ m (exact fallback) in one batch
    n = max(lengths)
    g = torch.Generator().manual_seed(1)
    lead = (3, 2) if name == "NystromformerForMultipleChoice" else (3,)
    ids = torch.randint(3, 50, (*lead, n), generator=g)
    types = torch.randint(0, 2, ids.shape, generator=g)
    mask = torch.arange(n) < torch.tensor(lengths).view(3, *[1] * (len(lead) - 1), 1)
    mask = mask.expand_as(ids).long()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        for i, length in enumerate(lengths):
            alone = model(
                input_ids=ids[i : i + 1, ..., :length],
                token_type_ids=types[i : i + 1, ..., :length],
            )
            a, b = main_output(name, alone), main_output(name, full)
            if name == "NystromformerForQuestionAnswering":
                a, b = a[:, 0], b[:, i, ..., :length]
            elif name in (
                "NystromformerForSequenceClassification",
                "NystromformerForMultipleChoice",
            ):
                a, b = a[0], b[i]
            else:
                a, b = a[0], b[i, ..., :length, :]
            assert torch.allclose(a, b, atol=1e-10, rtol=0), (name, length)


def test_short_inputs_are_exact_attention():
    # n ≤ num_landmarks: default numerics must equal the exact branch (numerics="hf" with
    # num_landmarks == segment_means_seq_len), without padding where the two conv skips agree.
    model = _model()
    ids = torch.randint(3, 50, (2, 8))
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        model.config.numerics = "hf"
        model.config.segment_means_seq_len = model.config.num_landmarks
        b = model(input_ids=ids).last_hidden_state
    assert rel_err(a, b) <= 1e-6


def test_save_pretrained_removes_the_temporary_files_a_hard_kill_left(tmp_path):
    # Each file is written under a temporary name and renamed; SIGKILL leaves that name.
    model = _model(NystromformerModel)
    stale = [".model.safetensors.k1ll_ed0.tmp", ".config.json.abcd1234.tmp"]
    others = [".model.safetensors.tmp", ".model.safetensors.notes.tmp", "model.safetensors.bak"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"\0" * 10)
    model.save_pretrained(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["config.json", "model.safetensors", *others])
    back = NystromformerModel.from_pretrained(tmp_path, strict=True)
    saved, loaded = model.state_dict(), back.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_save_load_round_trip_and_tied_decoder(tmp_path):
    model = _model(NystromformerForMaskedLM)
    emb = model.nystromformer.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is emb
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "cls.predictions.decoder.weight" not in keys and "cls.predictions.bias" in keys
    back = NystromformerForMaskedLM.from_pretrained(tmp_path, strict=True).eval()
    assert (
        back.cls.predictions.decoder.weight is back.nystromformer.embeddings.word_embeddings.weight
    )
    kwargs, _ = batch("NystromformerForMaskedLM", 30, pad=True)
    with torch.no_grad():
        assert torch.equal(back(**kwargs).logits, model(**kwargs).logits)


def test_training_step_reduces_the_loss():
    torch.manual_seed(0)
    model = NystromformerForMaskedLM(
        tiny_config(num_landmarks=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    )
    kwargs, labels = batch("NystromformerForMaskedLM", 40, pad=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model(**kwargs, **labels).loss
        opt.zero_grad()
        loss.backward()
        conv = model.nystromformer.encoder.layer[0].attention.self.conv.weight
        assert conv.grad is not None and torch.isfinite(conv.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_hidden_states_and_tuple_access():
    model = _model()
    kwargs, _ = batch("NystromformerModel", 12, pad=False)
    out = model(**kwargs, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1] is out.last_hidden_state
    assert out[0] is out.last_hidden_state and out["last_hidden_state"] is out[0]


def test_off_the_cpu_a_forward_reads_no_input_value_on_the_host():
    # Off the CPU a host read (is there padding? are the ids in range?) waits for all queued
    # work, at every forward. Meta tensors have no values, so any read raises: a forward on
    # the meta device makes none, as a CUDA forward must not.
    model = _model(ours.NystromformerForSequenceClassification).to("meta")
    b, n = 2, 30
    ids = torch.zeros(b, n, dtype=torch.long, device="meta")
    mask = torch.ones(b, n, dtype=torch.long, device="meta")
    types = torch.zeros(b, n, dtype=torch.long, device="meta")
    positions = torch.zeros(b, n, dtype=torch.long, device="meta")
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions)
    assert out.logits.device.type == "meta" and out.logits.shape[0] == b


def test_bf16_autocast_stays_close_to_float32():
    model = _model(ours.NystromformerForSequenceClassification)
    kwargs, _ = batch("NystromformerForSequenceClassification", 40, pad=True)
    with torch.no_grad():
        ref = model(**kwargs).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**kwargs).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 ≈ 4e-3) through 2 layers; the landmark
    # solve runs in float32. Measured 7e-3.
    assert rel_err(low.float(), ref) < 5e-2


def test_torch_compile_full_graph_forward_and_backward():
    # aot_eager traces the whole model with dynamo + AOTAutograd (what inductor compiles)
    # in a few seconds; the slow test below runs inductor itself (~30 s on 2 cores).
    model = _model(ours.NystromformerForSequenceClassification, num_hidden_layers=1)
    kwargs, labels = batch("NystromformerForSequenceClassification", 40, pad=True)
    eager = model(**kwargs, **labels)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(**kwargs, **labels)
    assert rel_err(out.logits, eager.logits) <= 1e-6
    out.loss.backward()
    assert model.classifier.out_proj.weight.grad is not None


@pytest.mark.slow
def test_torch_compile_inductor_padded_batch():
    model = _model(ours.NystromformerForSequenceClassification)
    kwargs, _ = batch("NystromformerForSequenceClassification", 40, pad=True)
    with torch.no_grad():
        eager = model(**kwargs).logits
        compiled = torch.compile(model)(**kwargs).logits
    # Inductor fuses and reorders float32 reductions: agreement to rounding, not bits.
    assert rel_err(compiled, eager) <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_ids": torch.tensor([[3, 50, 4]])}, ValueError, r"input_ids must lie in \[0, 50\)"),
        ({"input_ids": torch.tensor([[3, -1, 4]])}, ValueError, "input_ids must lie in"),
        (
            {"input_ids": torch.ones(1, 97, dtype=torch.long)},
            ValueError,
            "exceeds max_position_embeddings",
        ),
        (
            {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 6)},
            ValueError,
            r"attention_mask must have shape \(2, 5\)",
        ),
        (
            {
                "input_ids": torch.ones(2, 5, dtype=torch.long),
                "token_type_ids": torch.full((2, 5), 2),
            },
            ValueError,
            "token_type_ids must lie in",
        ),
        (
            {
                "input_ids": torch.ones(1, 5, dtype=torch.long),
                "position_ids": torch.arange(95, 100),
            },
            ValueError,
            "position_ids must lie in",
        ),
        ({"input_ids": torch.ones(1, 5)}, TypeError, "input_ids must be an integer tensor"),
        (
            {"input_ids": torch.ones(5, dtype=torch.long)},
            ValueError,
            r"input_ids must have shape \(batch, seq_len\)",
        ),
        ({}, ValueError, "exactly one of input_ids and inputs_embeds"),
        (
            {"inputs_embeds": torch.ones(1, 5, 31)},
            ValueError,
            r"inputs_embeds must have shape \(batch, seq_len, 32\)",
        ),
    ],
)
def test_bad_input_gives_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        _model()(**kwargs)


def test_longest_input_and_inputs_embeds():
    model = _model()
    ids = torch.randint(3, 50, (1, 96))
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = model(inputs_embeds=model.get_input_embeddings()(ids)).last_hidden_state
    assert torch.equal(a, b)


def test_old_numerics_name_gives_the_same_model_outputs(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    with pytest.warns(DeprecationWarning, match="numerics='ours'"):
        old = NystromformerModel.from_pretrained(tmp_path, numerics="ours")
    assert old.config.numerics == "nystromer"
    kwargs, _ = batch("NystromformerModel", 40, pad=True)
    with torch.no_grad():
        assert torch.equal(old(**kwargs).last_hidden_state, model(**kwargs).last_hidden_state)


@pytest.mark.parametrize("numerics", ["nystromer", "hf"])
def test_forward_hooks_on_the_conv_skip_fire(numerics):
    # The convolution skip is a submodule called as one, with either numerics.
    overrides = {"numerics": numerics, "segment_means_seq_len": 8} if numerics == "hf" else {}
    model = _model(**overrides)
    conv = model.encoder.layer[1].attention.self.conv
    seen = []
    handle = conv.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    kwargs, _ = batch("NystromformerModel", 40, pad=False)
    with torch.no_grad():
        model(**kwargs)
    handle.remove()
    assert seen == [(2, 4, 40, 8)]


def test_position_and_type_ids_of_one_row_apply_to_the_whole_batch():
    # transformers broadcasts (1, n) ids (the shape of its own position_ids buffer, and of
    # `torch.arange(n)[None]`) over the batch; they must give what the (B, n) ids give.
    model = _model()
    kwargs, _ = batch("NystromformerModel", 20, pad=True)
    positions = torch.arange(5, 25)[None]
    types = torch.randint(0, 2, (1, 20))
    with torch.no_grad():
        expected = model(**kwargs | {"position_ids": positions.expand(2, -1)})[0]
        assert torch.equal(model(**kwargs | {"position_ids": positions})[0], expected)
        kwargs["token_type_ids"] = types
        expected = model(**kwargs | {"token_type_ids": types.expand(2, -1)})[0]
        assert torch.equal(model(**kwargs)[0], expected)


def test_set_input_embeddings_replaces_the_table_and_keeps_the_decoder_tied(tmp_path):
    # transformers' API: a new word embedding table (a vocabulary of another size); the tied
    # masked-LM decoder must follow it, or it silently keeps predicting over the old table.
    for cls in (NystromformerModel, NystromformerForMaskedLM):
        model = _model(cls)
        table = torch.nn.Embedding(60, 32)
        model.set_input_embeddings(table)
        assert model.get_input_embeddings() is table
    assert model.cls.predictions.decoder.weight is table.weight
    ids = torch.randint(0, 60, (2, 12))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model.cls.predictions.transform.LayerNorm(
            torch.nn.functional.gelu(
                model.cls.predictions.transform.dense(model.nystromformer(input_ids=ids)[0]),
                approximate="tanh",
            )
        )
    assert torch.allclose(logits, hidden @ table.weight.T + model.cls.predictions.bias, atol=1e-6)
    model.save_pretrained(tmp_path)
    back = NystromformerForMaskedLM.from_pretrained(tmp_path, strict=True)
    assert back.config.vocab_size == 60
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, logits)
    with pytest.raises(ValueError, match="embedding_dim 32"):
        model.set_input_embeddings(torch.nn.Embedding(60, 16))
    untied = _model(NystromformerForMaskedLM, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="untied decoder predicts 50 tokens"):
        untied.set_input_embeddings(table)


@pytest.mark.parametrize("act", ["gelu_new", "gelu_fast", "gelu"])
def test_models_pickle_whole(act):
    # torch.save(model), multiprocessing with spawn and Ray pickle the module itself; the
    # default activation (gelu_new) must not be a local lambda.
    import pickle

    model = _model(ours.NystromformerForSequenceClassification, hidden_act=act)
    back = pickle.loads(pickle.dumps(model))
    kwargs, _ = batch("NystromformerForSequenceClassification", 12, pad=True)
    with torch.no_grad():
        assert torch.equal(back(**kwargs).logits, model(**kwargs).logits)


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout():
    # transformers' switch (Trainer(gradient_checkpointing=True) calls it): the layers are
    # recomputed in the backward pass, with the same dropout masks, so gradients are equal.
    model = _model(NystromformerForMaskedLM, hidden_dropout_prob=0.1).double().train()
    kwargs, labels = batch("NystromformerForMaskedLM", 30, pad=True)

    def gradients():
        model.zero_grad()
        torch.manual_seed(5)
        model(**kwargs, **labels).loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = gradients()
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    recomputed = []
    hook = model.nystromformer.encoder.layer[0].register_forward_pre_hook(
        lambda *args: recomputed.append(1)
    )
    checkpointed = gradients()
    hook.remove()
    assert len(recomputed) == 2  # forward, and again in the backward pass
    for k in plain:
        assert torch.allclose(checkpointed[k], plain[k], rtol=1e-12, atol=1e-14), k
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_multiple_choice_takes_one_row_of_position_and_type_ids():
    # As the other heads (and transformers' multiple-choice head): (n,) or (1, n) ids apply
    # to every sequence of every choice.
    model = _model(ours.NystromformerForMultipleChoice)
    kwargs, _ = batch("NystromformerForMultipleChoice", 20, pad=True)
    positions = torch.arange(5, 25)
    types = torch.randint(0, 2, (1, 20))
    full = {"position_ids": positions.expand(2, 3, -1), "token_type_ids": types.expand(2, 3, -1)}
    with torch.no_grad():
        expected = model(**kwargs | full).logits
        for rows in (positions, positions[None]):
            got = model(**kwargs | {"position_ids": rows, "token_type_ids": types}).logits
            assert torch.equal(got, expected)

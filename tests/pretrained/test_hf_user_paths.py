"""What a transformers user does with ``attn_implementation="nystrom"``: pipelines on padded
batches, left padding, switching implementations, training on padded batches, ``Trainer``.

A tiny local BERT (``.tiny.make_bert``, peaked attention) with ``num_landmarks = 8``, so that
texts of more tokens take the Nyström path and shorter ones the exact one. Tolerances: 1e-5 in
float32 where a padded batch and its rows alone run the same computation up to summation order
(outputs of order 1); 1e-10 in float64.
"""

from __future__ import annotations

import pytest
import torch

import nystromer  # noqa: F401  (registers "nystrom")

from .tiny import WORDS, make_bert

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, AutoTokenizer  # noqa: E402

M = 8
TEXTS = [
    "w1 w2",  # 4 tokens with [CLS] and [SEP]: exact
    " ".join(WORDS[:30]),  # 32 tokens: Nyström
    " ".join(WORDS[5:12]),  # 9 tokens: Nyström, just above m
]


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("bert"))


def load(path, cls=AutoModel, implementation="nystrom"):
    torch.manual_seed(0)  # the same new head every time
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # new task heads are reported as missing
    try:
        model = cls.from_pretrained(path, attn_implementation=implementation).eval()
    finally:
        # Other tests read transformers' warnings: the verbosity is theirs again.
        transformers.logging.set_verbosity(verbosity)
    model.config.nystrom = {"num_landmarks": M}
    return model


@pytest.mark.parametrize("side", ["right", "left"])
def test_feature_extraction_pipeline_batched_equals_each_text_alone(bert_path, side):
    tokenizer = AutoTokenizer.from_pretrained(bert_path, padding_side=side)
    pipe = transformers.pipeline("feature-extraction", model=load(bert_path), tokenizer=tokenizer)
    alone = [torch.tensor(pipe(t)[0]) for t in TEXTS]
    batched = pipe(TEXTS, batch_size=len(TEXTS))
    for one, padded in zip(alone, batched, strict=True):
        padded = torch.tensor(padded[0])  # the pipeline returns the padding rows too
        n = one.shape[0]
        if side == "left" and n < padded.shape[0]:
            # BERT counts positions from the first column, padding included, whatever the
            # attention (test_left_padding_with_position_ids_... passes them).
            continue
        torch.testing.assert_close(padded[:n], one, rtol=0, atol=1e-5)
    exact = transformers.pipeline(
        "feature-extraction", model=load(bert_path, implementation="sdpa"), tokenizer=tokenizer
    )
    # ... and the long text did go through Nyström attention.
    assert (torch.tensor(exact(TEXTS[1])[0]) - alone[1]).abs().max() > 1e-3


def test_fill_mask_and_text_classification_pipelines_batched_equal_each_text_alone(bert_path):
    masked = [t.replace("w3", "[MASK]", 1) if "w3" in t else t + " [MASK]" for t in TEXTS]
    cases = [
        ("fill-mask", transformers.AutoModelForMaskedLM, masked, {"top_k": 3}),
        ("text-classification", transformers.AutoModelForSequenceClassification, TEXTS,
         {"top_k": None}),
    ]  # fmt: skip
    for task, cls, texts, kwargs in cases:
        tokenizer = AutoTokenizer.from_pretrained(bert_path)
        pipe = transformers.pipeline(task, model=load(bert_path, cls), tokenizer=tokenizer)
        alone = [pipe(t, **kwargs) for t in texts]
        batched = pipe(texts, batch_size=len(texts), **kwargs)
        for a, b in zip(alone, batched, strict=True):
            assert [x.get("token", x.get("label")) for x in a] == [
                x.get("token", x.get("label")) for x in b
            ]
            got = torch.tensor([x["score"] for x in b])
            torch.testing.assert_close(
                got, torch.tensor([x["score"] for x in a]), rtol=0, atol=1e-5
            )


def test_left_padding_with_position_ids_equals_each_sequence_alone():
    # Nyström landmarks are means over real tokens by rank, wherever the padding is; RoBERTa
    # derives position ids from the padding itself, BERT needs them passed.
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    for config in (transformers.RobertaConfig(vocab_size=90, **small),
                   transformers.BertConfig(vocab_size=90, **small)):  # fmt: skip
        config.nystrom = {"num_landmarks": M}
        torch.manual_seed(0)
        model = AutoModel.from_config(config, attn_implementation="nystrom").double().eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randint(3, 90, (2, 30), generator=g)
        mask = torch.ones_like(x)
        mask[0, :12] = 0  # 18 real tokens > m, padded on the left
        x[0, :12] = config.pad_token_id
        kwargs = {}
        if config.model_type == "bert":
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            batch = model(input_ids=x, attention_mask=mask, **kwargs).last_hidden_state
            first = model(input_ids=x[:1, 12:]).last_hidden_state
            second = model(input_ids=x[1:]).last_hidden_state
        torch.testing.assert_close(batch[0, 12:], first[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(batch[1], second[0], rtol=0, atol=1e-10)


def test_switching_implementations_back_and_forth(bert_path):
    model = load(bert_path, implementation="sdpa")
    x = torch.randint(5, len(WORDS), (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = {i: load(bert_path, implementation=i)(input_ids=x).last_hidden_state for i in
                ("sdpa", "eager", "nystrom")}  # fmt: skip
    for implementation in ("nystrom", "eager", "nystrom", "sdpa", "nystrom"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            got = model(input_ids=x).last_hidden_state
        torch.testing.assert_close(got, want[implementation], rtol=0, atol=1e-5)
    assert (want["nystrom"] - want["sdpa"]).abs().max() > 1e-3


def test_padded_training_batch_gives_the_gradients_of_its_sequences_alone(bert_path):
    # Padding-correct in the backward pass too: a padded batch's loss gradient equals the
    # mean of each sequence's own (float64; dropout is 0 in the tiny model).
    model = load(bert_path, transformers.AutoModelForSequenceClassification).double().train()
    lengths = [30, 12, 5]  # Nyström, Nyström, exact
    x = torch.randint(5, len(WORDS), (3, 30), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(30) < torch.tensor(lengths)[:, None]).long()
    labels = torch.tensor([0, 1, 1])
    model(input_ids=x * mask, attention_mask=mask, labels=labels).loss.backward()
    batched = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i, n in enumerate(lengths):
        loss = model(input_ids=x[i : i + 1, :n], labels=labels[i : i + 1]).loss
        (loss / len(lengths)).backward()
    for name, p in model.named_parameters():
        if name in batched:
            torch.testing.assert_close(batched[name], p.grad, rtol=0, atol=1e-10, msg=name)


def test_settings_survive_save_pretrained_but_the_implementation_is_asked_again(
    bert_path, tmp_path
):
    model = load(bert_path)
    model.config.nystrom = {"num_landmarks": M, "kmeans_iterations": 1}
    model.save_pretrained(tmp_path)
    x = torch.randint(5, len(WORDS), (2, 30), generator=torch.Generator().manual_seed(0))
    again = AutoModel.from_pretrained(tmp_path, attn_implementation="nystrom").eval()
    assert again.config.nystrom == {"num_landmarks": M, "kmeans_iterations": 1}
    plain = AutoModel.from_pretrained(tmp_path).eval()  # transformers saves no implementation
    assert plain.config._attn_implementation != "nystrom"
    with torch.no_grad():
        want = model(input_ids=x).last_hidden_state
        torch.testing.assert_close(again(input_ids=x).last_hidden_state, want, rtol=0, atol=0)
        assert (plain(input_ids=x).last_hidden_state - want).abs().max() > 1e-3


def test_trainer_with_accumulation_and_eval_saves_a_checkpoint_that_reloads(bert_path, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    cls = transformers.AutoModelForSequenceClassification
    tokenizer = AutoTokenizer.from_pretrained(bert_path)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(16):
        words = [
            WORDS[i]
            for i in torch.randint(
                0, len(WORDS), (int(torch.randint(3, 30, (), generator=g)),), generator=g
            )
        ]
        data.append({**tokenizer(" ".join(words)), "labels": int("w1" in words)})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_steps=2, eval_strategy="steps", eval_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=load(bert_path, cls).train(), args=args, train_dataset=data, eval_dataset=data[:8],
        data_collator=transformers.DataCollatorWithPadding(tokenizer),
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    trained = trainer.model.eval()
    batch = transformers.DataCollatorWithPadding(tokenizer)(data[:8])
    batch.pop("labels")
    reloaded = cls.from_pretrained(tmp_path / "final", attn_implementation="nystrom").eval()
    assert reloaded.config.nystrom == {"num_landmarks": M}  # the settings travel in config.json
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained(**batch).logits)
    # transformers saves no attention implementation: without the argument it loads exact.
    assert cls.from_pretrained(tmp_path / "final").config._attn_implementation != "nystrom"

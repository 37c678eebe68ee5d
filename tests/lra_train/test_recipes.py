"""Recipes hold the paper's hyper-parameters; overrides are validated; the schedule's shape."""

from __future__ import annotations

import json

import pytest
import torch

from nystromer.lra.recipes import FIELDS, TASKS, Recipe, load_recipe, recipe_path
from nystromer.train.schedule import OneCycle

# (batch size, steps, warm-up, max length, classes): Xiong et al. 2021, as in docs/lra.md.
PAPER = {
    "listops": (32, 5000, 1000, 2000, 10),
    "text": (32, 20000, 8000, 1000, 2),
    "retrieval": (32, 30000, 800, 4000, 2),
    "image": (256, 35000, 175, 1024, 10),
    "pathfinder": (256, 62400, 312, 1024, 2),
}


@pytest.mark.parametrize("task", TASKS)
def test_shipped_recipes_hold_the_papers_numbers(task):
    r = load_recipe(task)
    assert (r.batch_size, r.steps, r.warmup_steps, r.max_length, r.num_classes) == PAPER[task]
    assert (r.lr, r.adam_eps, r.weight_decay) == (1e-4, 1e-6, 0.0)
    assert (r.embed_dim, r.ffn_dim, r.num_heads, r.num_layers, r.classifier_dim) == (
        64, 128, 2, 2, 128,
    )  # fmt: skip
    assert (r.dropout, r.num_landmarks, r.conv_kernel_size, r.attention) == (
        0.1, 64, 35, "nystrom",
    )  # fmt: skip
    assert r.padded_length % 64 == 0 and r.padded_length >= r.max_length
    assert r.model_config(vocab_size=300).two_tower == (task == "retrieval")
    # The file has every field: nothing silently falls back to a code default.
    assert set(json.loads(recipe_path(task).read_text())) == set(FIELDS)


def test_overrides_are_typed_and_named():
    r = load_recipe("listops", steps=100, attention="softmax", conv_kernel_size="none")
    assert (r.steps, r.attention, r.conv_kernel_size) == (100, "softmax", None)
    assert r.warmup_steps == 20  # the recipe's warm-up fraction (1000/5000) is kept
    assert load_recipe("listops", steps=100, warmup_steps=7).warmup_steps == 7
    with pytest.raises(TypeError, match="'batch_size' must be int"):
        load_recipe("listops", batch_size=3.5)
    with pytest.raises(ValueError, match="unknown recipe keys"):
        load_recipe("listops", batchsize=3)
    with pytest.raises(ValueError, match="attention must be one of"):
        load_recipe("listops", attention="linear")
    with pytest.raises(ValueError, match="warmup_steps"):
        load_recipe("listops", steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="must be one of .* or a recipe JSON file"):
        load_recipe("cifar")


def test_recipe_file_round_trip(tmp_path):
    r = load_recipe("text", max_length=4000, seed=3)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(r.to_dict()))
    assert load_recipe(path) == r
    assert Recipe.from_dict(r.to_dict()).train_config(device="cpu").steps == 20000


def lrs_and_betas(total, warmup):
    p = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW(p, lr=1.0)
    sched = OneCycle(opt, 1e-3, total, warmup)
    out = []
    for _ in range(total):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        sched.step()
    return out


def test_one_cycle_shape():
    curve = lrs_and_betas(10, 4)
    lrs = [lr for lr, _ in curve]
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert lrs[4] == pytest.approx(1e-3) and max(lrs) == lrs[4]
    assert lrs[-1] == pytest.approx(1e-3 / 25e4)
    assert lrs[2] == pytest.approx((lrs[0] + lrs[4]) / 2)  # linear warm-up
    assert curve[0][1] == pytest.approx(0.95) and curve[4][1] == pytest.approx(0.85)
    assert curve[-1][1] == pytest.approx(0.95)
    # Defined for the short warm-ups where torch's OneCycleLR divides by zero.
    for warmup in (0, 1):
        lrs = [lr for lr, _ in lrs_and_betas(5, warmup)]
        assert lrs[warmup] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3 / 25e4)


def test_one_cycle_matches_torch_one_cycle_on_the_listops_recipe():
    ours = [lr for lr, _ in lrs_and_betas(5000, 1000)]
    p = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW(p, lr=1.0)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-3, total_steps=5000, pct_start=0.2, anneal_strategy="linear"
    )
    ref = []
    for _ in range(5000):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        ref_sched.step()
    # OneCycleLR peaks one step earlier (at W − 1): the curves differ by one step's slope.
    assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) < 1e-3 / 999


def test_every_architecture_setting_is_a_recipe_key_that_reaches_the_model():
    from dataclasses import fields

    from nystromer.lra.model import LRAArchitecture, LRAModelConfig

    recipe = load_recipe("retrieval", embed_dim=32, num_landmarks=16, conv_kernel_size="none")
    assert recipe.model == LRAArchitecture(embed_dim=32, num_landmarks=16, conv_kernel_size=None)
    for f in fields(LRAArchitecture):
        assert f.name in FIELDS, f"{f.name} has no recipe key (and so no flag)"
    model = recipe.model_config(vocab_size=7)
    assert isinstance(model, LRAModelConfig) and model.architecture == recipe.model
    assert (model.vocab_size, model.max_length, model.two_tower) == (7, 4032, True)
    assert model.nystrom.num_landmarks == 16 and model.nystrom.conv_kernel_size is None


def test_flat_keys_read_through_to_the_sections():
    r = load_recipe("listops")
    assert (r.num_landmarks, r.attention) == (r.model.num_landmarks, r.model.attention)
    assert (r.batch_size, r.lr) == (r.training.batch_size, r.training.lr)
    assert r.to_dict()["embed_dim"] == r.model.embed_dim
    with pytest.raises(AttributeError, match="no attribute 'device'"):
        getattr(r, "device")  # noqa: B009 - a runtime setting, not part of a recipe
    with pytest.raises(ValueError, match=r"\['steps'\] are recipe keys"):
        r.train_config(steps=3)


def test_a_recipe_file_without_source_or_with_a_missing_key(tmp_path):
    flat = load_recipe("text").to_dict()
    del flat["source"]  # optional
    path = tmp_path / "r.json"
    path.write_text(json.dumps(flat))
    assert load_recipe(path).source == ""
    del flat["eval_every"]
    with pytest.raises(ValueError, match=r"recipe keys \['eval_every'\] are required"):
        Recipe.from_dict(flat)


def test_the_reproduction_table_in_the_docs_states_the_papers_numbers():
    """docs/lra.md's per-task table of expected accuracies is the one the reports print."""
    from pathlib import Path

    from nystromer.lra.report import PAPER_ACCURACY

    text = (Path(__file__).resolve().parents[2] / "docs" / "lra.md").read_text()
    table = text[text.index("## Reproducing the paper's table") :]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in TASKS:
            rows[cells[0]] = {"softmax": float(cells[2]), "nystrom": float(cells[3])}
    assert rows == PAPER_ACCURACY


# What earlier versions wrote into a run's config.json ("recipe" and "model"), literally: a run
# directory from before the recipe held its model and training configs must still load.
_OLD_RUN_RECIPE = {
    "task": "listops", "max_length": 2000, "num_classes": 10, "batch_size": 32, "steps": 12,
    "warmup_steps": 2, "eval_every": 4, "source": "", "attention": "softmax", "embed_dim": 16,
    "ffn_dim": 128, "num_heads": 2, "num_layers": 2, "classifier_dim": 128, "dropout": 0.1,
    "attention_dropout": None, "num_landmarks": 64, "conv_kernel_size": 35,
    "pinv_iterations": 6, "lr": 0.0001, "adam_eps": 1e-06, "weight_decay": 0.0,
    "grad_clip": None, "eval_batches": None, "seed": 0, "precision": "fp32",
}  # fmt: skip
_OLD_RUN_MODEL = {
    "vocab_size": 16, "num_classes": 10, "max_length": 2048, "attention": "softmax",
    "embed_dim": 16, "ffn_dim": 128, "num_heads": 2, "num_layers": 2, "classifier_dim": 128,
    "dropout": 0.1, "attention_dropout": None, "num_landmarks": 64, "conv_kernel_size": 35,
    "pinv_iterations": 6, "two_tower": False,
}  # fmt: skip


def test_a_run_config_written_by_earlier_versions_still_loads():
    from nystromer.lra.model import LRAModelConfig

    recipe = Recipe.from_dict(_OLD_RUN_RECIPE)
    assert (recipe.model.attention, recipe.model.embed_dim, recipe.training.steps) == (
        "softmax", 16, 12,
    )  # fmt: skip
    assert recipe.to_dict() == _OLD_RUN_RECIPE  # written back in the same layout
    model = LRAModelConfig.from_dict(_OLD_RUN_MODEL)
    # Resuming compares the saved model with the recipe's: they must agree key for key.
    assert recipe.model_config(vocab_size=16).to_dict() == _OLD_RUN_MODEL == model.to_dict()


@pytest.mark.parametrize(
    "field, value",
    [
        ("classifier_dim", 0),  # built a head with no hidden unit
        ("classifier_dim", -2),  # failed in nn.Linear, not naming the field
        ("seed", -1),  # failed in numpy's SeedSequence once training had started
        ("lr", float("inf")),
        ("weight_decay", float("inf")),
    ],
)
def test_impossible_recipe_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        load_recipe("listops", **{field: value})


def test_a_recipe_with_fewer_classes_than_the_data_is_refused_before_any_file(tmp_path):
    from nystromer.lra.run import train_task

    from .synthetic import TokenDataset

    # The synthetic data has labels 0-2; two logits used to fail inside the loss at step 1,
    # after config.json had been written (on CUDA as a device-side assert).
    splits = {s: TokenDataset(8, num_classes=3, seed=i) for i, s in enumerate(("train", "val"))}
    recipe = load_recipe("listops", num_classes=2, max_length=90, steps=2, batch_size=4)
    with pytest.raises(ValueError, match=r"num_classes is 2 .* has 3 classes"):
        train_task(recipe, None, tmp_path / "run", splits=splits, progress=False)
    assert not (tmp_path / "run").exists()


def test_given_splits_longer_than_the_recipe_are_refused_before_any_file(tmp_path):
    from nystromer.lra.run import train_task

    from .synthetic import TokenDataset

    # Sequences up to 200 tokens do not fit a position table of 128 (max_length 90 rounded up):
    # the run used to stop at the first batch holding one.
    splits = {"train": TokenDataset(8, max_length=200), "val": TokenDataset(4, seed=1)}
    recipe = load_recipe("listops", num_classes=3, max_length=90, steps=2, batch_size=4)
    with pytest.raises(ValueError, match=r"max_length is 90 .* up to 200 tokens"):
        train_task(recipe, None, tmp_path / "run", splits=splits, progress=False)
    assert not (tmp_path / "run").exists()

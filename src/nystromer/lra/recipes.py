"""The paper's LRA hyper-parameters, one JSON recipe per task, with validated overrides.

The recipes (``nystromer/lra/recipes/<task>.json``) hold what Xiong et al. (2021) used:
model shape, batch size, steps, warm-up, AdamW (lr 1e-4, ε 1e-6, no weight decay), sequence
length, classes and how often to validate. :func:`load_recipe` reads one; every field can be
overridden (the ``nystromer train`` flags are generated from :data:`FIELDS`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..train import TrainConfig
from .model import ATTENTIONS, LRAModelConfig, round_up

__all__ = ["Recipe", "FIELDS", "TASKS", "load_recipe", "recipe_path"]

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")


@dataclass(frozen=True)
class Recipe:
    """Everything that defines an LRA run besides the data and where it runs.

    Model fields are those of :class:`~nystromer.lra.model.LRAModelConfig`; training fields
    those of :class:`~nystromer.train.TrainConfig`. ``max_length`` is the longest input in
    tokens (per document for retrieval) before padding to a multiple of 64.
    """

    task: str
    max_length: int
    num_classes: int
    batch_size: int
    steps: int
    warmup_steps: int
    eval_every: int
    source: str = ""
    attention: str = "nystrom"
    embed_dim: int = 64
    ffn_dim: int = 128
    num_heads: int = 2
    num_layers: int = 2
    classifier_dim: int = 128
    dropout: float = 0.1
    attention_dropout: float | None = None
    num_landmarks: int = 64
    conv_kernel_size: int | None = 35
    pinv_iterations: int = 6
    lr: float = 1e-4
    adam_eps: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float | None = None
    eval_batches: int | None = None
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be ≥ 1, got {self.max_length}")
        # Build both configs once: their own checks reject bad values here, early.
        self.model_config(vocab_size=2)
        self.train_config()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """A recipe from a mapping with exactly the known keys (missing ones take defaults)."""
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; known keys: {sorted(FIELDS)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides: Any) -> Recipe:
        """A copy with some fields replaced.

        ``None`` values are ignored (a nullable field is cleared with the string ``"none"``).
        Changing ``steps`` without ``warmup_steps`` keeps the recipe's warm-up *fraction*,
        so a short run still has the shape of the full schedule.
        """
        unknown = sorted(set(overrides) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; known keys: {sorted(FIELDS)}")
        changes = {}
        for k, v in overrides.items():
            if v is None:
                continue
            if isinstance(v, str) and v.lower() == "none" and FIELDS[k][1]:
                v = None
            changes[k] = v
        if "steps" in changes and "warmup_steps" not in changes:
            changes["warmup_steps"] = self.warmup_steps * changes["steps"] // self.steps
        return replace(self, **changes)

    @property
    def padded_length(self) -> int:
        """Position-table size: ``max_length`` rounded up to a multiple of 64."""
        return round_up(self.max_length)

    def model_config(self, vocab_size: int) -> LRAModelConfig:
        """The model this recipe trains, for a vocabulary of ``vocab_size`` ids."""
        # Every model field is a recipe field of the same name, except these three (the
        # recipe's max_length is unpadded); tests/lra_train/test_recipes.py checks it.
        derived = {
            "vocab_size": vocab_size,
            "max_length": self.padded_length,
            "two_tower": self.task == "retrieval",
        }
        shared = {
            f.name: getattr(self, f.name) for f in fields(LRAModelConfig) if f.name not in derived
        }
        return LRAModelConfig(**derived, **shared)

    def train_config(self, **runtime: Any) -> TrainConfig:
        """The :class:`~nystromer.train.TrainConfig`; ``runtime`` adds settings that are not
        part of a recipe (device, num_workers, stop_at, progress, checkpoint_every, ...)."""
        shared = {k: getattr(self, k) for k in TrainConfig.field_names() if k in FIELDS}
        return TrainConfig(**shared, **runtime)


# name → (python type, nullable), from the dataclass annotations.
_TYPES = {"int": int, "float": float, "str": str}
FIELDS: dict[str, tuple[type, bool]] = {}
for _f in fields(Recipe):
    _ann = str(_f.type).replace(" ", "")
    FIELDS[_f.name] = (_TYPES[_ann.split("|")[0]], _ann.endswith("|None"))


def _check_type(name: str, value: Any) -> None:
    typ, nullable = FIELDS[name]
    if value is None and nullable:
        return
    ok = isinstance(value, typ) and not isinstance(value, bool)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        expected = typ.__name__ + (" or null" if nullable else "")
        raise TypeError(f"recipe field {name!r} must be {expected}, got {value!r}")


def recipe_path(task: str) -> Path:
    """Where the shipped recipe of ``task`` lives."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return Path(str(resources.files("nystromer.lra") / "recipes" / f"{task}.json"))


def load_recipe(task_or_path: str | Path, **overrides: Any) -> Recipe:
    """The shipped recipe of a task (or a recipe JSON file), with ``overrides`` applied.

    Args:
        task_or_path: one of :data:`TASKS`, or the path of a JSON file with recipe keys.
        overrides: recipe fields to replace, e.g. ``steps=100, attention="softmax"``.

    Raises:
        ValueError / TypeError: unknown keys, values of the wrong type or out of range.
    """
    if str(task_or_path) in TASKS:
        path = recipe_path(str(task_or_path))
    else:
        path = Path(task_or_path)
        if not path.is_file():
            raise ValueError(
                f"task_or_path must be one of {TASKS} or a recipe JSON file, got {task_or_path!r}"
            )
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for k, v in data.items():
        if k in FIELDS and FIELDS[k][0] is float and isinstance(v, int):
            data[k] = float(v)
    return Recipe.from_dict(data).with_overrides(**overrides)

"""The paper's LRA hyper-parameters, one JSON recipe per task, with validated overrides.

The recipes (``nystromer/lra/recipes/<task>.json``) hold what Xiong et al. (2021) used:
model shape, batch size, steps, warm-up, AdamW (lr 1e-4, ε 1e-6, no weight decay), sequence
length, classes and how often to validate. :func:`load_recipe` reads one; every field can be
overridden (the ``nystromer train`` flags are generated from :data:`FIELDS`).

In memory a :class:`Recipe` holds the model's :class:`~nystromer.lra.model.LRAArchitecture`
and a :class:`~nystromer.train.TrainConfig`; on disk (recipe files, a run's ``config.json``)
and on the command line it is one flat set of keys, the fields of both, so that a key, its
flag and its place in the file share one name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .._checks import InputTypeError
from .._io import load_json
from ..train import TrainConfig
from .model import LRAArchitecture, LRAModelConfig, round_up

__all__ = ["Recipe", "FIELDS", "TASKS", "load_recipe", "recipe_path"]

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")

# The TrainConfig fields a recipe fixes; the others say how a run executes (device, workers,
# progress, ...) and are given when it starts (Recipe.train_config's ``runtime``).
_TRAINING_FIELDS = (
    "batch_size",
    "steps",
    "warmup_steps",
    "lr",
    "adam_eps",
    "weight_decay",
    "grad_clip",
    "eval_batches",
    "seed",
    "precision",
    "eval_every",
)

# Keys a recipe file must give: the task's own numbers have no sensible default.
_REQUIRED = ("task", "max_length", "num_classes", "batch_size", "steps", "warmup_steps")
_REQUIRED += ("eval_every",)


@dataclass(frozen=True)
class Recipe:
    """Everything that defines an LRA run besides the data and where it runs.

    Attributes:
        task: one of :data:`TASKS`.
        max_length: the longest input in tokens (per document for retrieval) before padding
            to a multiple of 64.
        num_classes: number of labels.
        model: the classifier's architecture (:class:`~nystromer.lra.model.LRAArchitecture`).
        training: the optimisation (:class:`~nystromer.train.TrainConfig`; only the fields in
            :data:`FIELDS` belong to the recipe, the rest keep their defaults here).
        source: where the numbers come from.

    Every key of :data:`FIELDS` also reads as an attribute (``recipe.num_landmarks`` is
    ``recipe.model.num_landmarks``, ``recipe.batch_size`` is ``recipe.training.batch_size``).
    """

    task: str
    max_length: int
    num_classes: int
    model: LRAArchitecture
    training: TrainConfig
    source: str = ""

    def __post_init__(self) -> None:
        for name, value in self.to_dict().items():
            _check_type(name, value)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be ≥ 1, got {self.max_length}")
        if not isinstance(self.model, LRAArchitecture):
            raise TypeError(f"model must be an LRAArchitecture, got {type(self.model).__name__}")
        # The full model config checks the classes and the length against the architecture.
        self.model_config(vocab_size=2)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not attributes: the flat keys of the sections.
        section = _SECTION.get(name)
        if section is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(getattr(self, section), name)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """A recipe from a flat mapping of :data:`FIELDS` keys (missing ones take defaults)."""
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; known keys: {sorted(FIELDS)}")
        for name, value in d.items():
            _check_type(name, value)
        sections: dict[str, dict[str, Any]] = {"model": {}, "training": {}}
        top = {}
        for name, value in d.items():
            if name in _SECTION:
                sections[_SECTION[name]][name] = value
            else:
                top[name] = value
        missing = sorted(set(_REQUIRED) - set(d))
        if missing:
            raise ValueError(f"recipe keys {missing} are required")
        return cls(
            **top,
            model=LRAArchitecture(**sections["model"]),
            training=TrainConfig(**sections["training"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """The flat keys of :data:`FIELDS`, in the order of the shipped recipe files."""
        return {name: getattr(self, name) for name in FIELDS}

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
        return Recipe.from_dict({**self.to_dict(), **changes})

    @property
    def padded_length(self) -> int:
        """Position-table size: ``max_length`` rounded up to a multiple of 64."""
        return round_up(self.max_length)

    def model_config(self, vocab_size: int) -> LRAModelConfig:
        """The model this recipe trains, for a vocabulary of ``vocab_size`` ids."""
        return LRAModelConfig(
            **self.model.to_dict(),
            vocab_size=vocab_size,
            num_classes=self.num_classes,
            max_length=self.padded_length,
            two_tower=self.task == "retrieval",
        )

    def train_config(self, **runtime: Any) -> TrainConfig:
        """The :class:`~nystromer.train.TrainConfig`; ``runtime`` adds settings that are not
        part of a recipe (device, num_workers, stop_at, progress, checkpoint_every, ...)."""
        fixed = sorted(set(runtime) & set(FIELDS))
        if fixed:
            raise ValueError(
                f"{fixed} are recipe keys, not runtime settings: override them in the recipe"
            )
        return replace(self.training, **runtime)


def _annotation(f: Any) -> tuple[type, bool]:
    # "int", "float | None", ... (the modules use postponed annotations).
    types = {"int": int, "float": float, "str": str}
    text = str(f.type).replace(" ", "")
    return types[text.split("|")[0]], text.endswith("|None")


_TOP_LEVEL = ("task", "source", "max_length", "num_classes")
_RECIPE_FIELDS = {f.name: f for f in fields(Recipe)}
_TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}
# flat key → the section that holds it
_SECTION: dict[str, str] = {
    **{f.name: "model" for f in fields(LRAArchitecture)},
    **{name: "training" for name in _TRAINING_FIELDS},
}
# name → (python type, nullable), from the dataclass annotations, in the files' order.
FIELDS: dict[str, tuple[type, bool]] = {
    **{name: _annotation(_RECIPE_FIELDS[name]) for name in _TOP_LEVEL},
    **{f.name: _annotation(f) for f in fields(LRAArchitecture)},
    **{name: _annotation(_TRAIN_FIELDS[name]) for name in _TRAINING_FIELDS},
}


def _check_type(name: str, value: Any) -> None:
    typ, nullable = FIELDS[name]
    if value is None and nullable:
        return
    ok = isinstance(value, typ) and not isinstance(value, bool)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        expected = typ.__name__ + (" or null" if nullable else "")
        raise InputTypeError(f"recipe field {name!r} must be {expected}, got {value!r}")


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
    data = load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a recipe: expected a JSON object of recipe keys")
    for k, v in data.items():
        if k in FIELDS and FIELDS[k][0] is float and isinstance(v, int):
            data[k] = float(v)
    try:
        recipe = Recipe.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{path}: {exc}") from exc  # which file: the shipped or the given one
    return recipe.with_overrides(**overrides)

"""Train and evaluate the LRA classifiers: recipe + data → run directory.

A run directory holds ``config.json`` (task, data directory, recipe, model shape), the
``last``/``best`` checkpoints, ``metrics.jsonl`` and, when finished, ``summary.json``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .._checks import check_positive_int
from .._version import __version__
from ..train import TrainConfig, TrainResult, evaluate, train
from ..train import checkpoint as ckpt
from ..train.distributed import DistInfo, resolve_device
from ..train.loop import check_no_earlier_run
from .model import LRAModelConfig, build_model, classification_objective, collate
from .recipes import Recipe

__all__ = [
    "load_splits",
    "train_task",
    "evaluate_run",
    "read_run_config",
    "saved_recipe",
    "CONFIG_FILE",
]

CONFIG_FILE = "config.json"


def load_splits(
    task: str, data_dir: str | os.PathLike[str], max_length: int, splits=("train", "val", "test")
) -> dict[str, Dataset]:
    """The task's splits through :func:`nystromer.lra.data.load_split`."""
    try:
        from .data import load_split
    except ImportError as exc:  # pragma: no cover - the data package ships with nystromer
        raise ImportError(f"the LRA data loaders are unavailable: {exc}") from exc
    try:
        return {s: load_split(task, data_dir, s, max_length=max_length) for s in splits}
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"data_dir: {exc}") from exc  # the argument (--data) it is about


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a run directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} is not an LRA run directory: {CONFIG_FILE} is missing")
    config = ckpt.load_json(path)
    # Another command's run (a distillation's) has a config.json too, without these.
    missing = [
        k for k in ("task", "recipe", "model") if not isinstance(config, dict) or k not in config
    ]
    if missing:
        raise ValueError(
            f"{run_dir} is not an LRA run directory: its {CONFIG_FILE} has no {missing} "
            "(`nystromer train` writes them)"
        )
    return config


def saved_recipe(run_dir: str | os.PathLike[str], config: Mapping[str, Any]) -> Recipe:
    """The recipe in ``config``, the ``config.json`` of ``run_dir`` (:func:`read_run_config`);
    a bad value is reported with the file's path, as :func:`~nystromer.lra.recipes.load_recipe`
    does (it was written there, not given now)."""
    try:
        return Recipe.from_dict(config["recipe"])
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{Path(run_dir) / CONFIG_FILE}: {exc}") from exc


def train_task(
    recipe: Recipe,
    data_dir: str | os.PathLike[str] | None,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    splits: Mapping[str, Dataset] | None = None,
    **runtime: Any,
) -> TrainResult:
    """Train ``recipe``'s model on its task, validating on ``val`` and testing ``best``.

    Args:
        recipe: the hyper-parameters (see :func:`~nystromer.lra.recipes.load_recipe`).
        data_dir: the task's data (read with ``nystromer.lra.data.load_split``).
        run_dir: output directory; with ``resume`` an existing run to continue.
        splits: ``{"train", "val", "test"}`` datasets to use instead of reading ``data_dir``.
        runtime: extra :class:`~nystromer.train.TrainConfig` settings (device, num_workers,
            stop_at, progress, checkpoint_every, eval_batch_size, micro_batches).

    Returns:
        The :class:`~nystromer.train.TrainResult`; ``summary.json`` holds ``test_accuracy``.
    """
    run_dir = Path(run_dir)
    info = DistInfo.current()
    config: TrainConfig = recipe.train_config(**runtime)  # validates before any file is written
    if not resume and ckpt.find(run_dir, "last") is not None:
        raise ValueError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    if splits is None:
        if data_dir is None:
            raise ValueError("data_dir is required unless splits are given")
        splits = load_splits(recipe.task, data_dir, recipe.max_length)
    missing = {"train", "val"} - set(splits)
    if missing:
        raise ValueError(f"splits must include train and val, missing {sorted(missing)}")
    vocab_size = int(splits["train"].vocab_size)  # type: ignore[attr-defined]
    for name in ("train", "val", "test"):
        data_length = getattr(splits.get(name), "max_length", None)
        if data_length is not None and int(data_length) > recipe.padded_length:
            # A sequence longer than the position table would stop the run at the first batch
            # that holds one, possibly hours in.
            raise ValueError(
                f"max_length is {recipe.max_length} (positions for {recipe.padded_length}) but "
                f"the {name} split holds sequences of up to {int(data_length)} tokens"
            )
    data_classes = getattr(splits["train"], "num_classes", None)
    if data_classes is not None and int(data_classes) > recipe.num_classes:
        # Labels past the model's logits would fail inside the loss at the first step (a
        # device-side assert on CUDA), after config.json was written.
        raise ValueError(
            f"num_classes is {recipe.num_classes} but the {recipe.task} data has "
            f"{int(data_classes)} classes; set --num-classes {int(data_classes)}"
        )
    model_cfg = recipe.model_config(vocab_size)
    run_config = {
        "task": recipe.task,
        "data_dir": None if data_dir is None else str(Path(data_dir).resolve()),
        "recipe": recipe.to_dict(),
        "model": model_cfg.to_dict(),
        "nystromer_version": __version__,
    }
    if resume:
        saved = read_run_config(run_dir)
        if saved["model"] != run_config["model"]:
            was, now = saved["model"], run_config["model"]
            changed = "; ".join(
                f"{k}: {was.get(k)!r} → {now.get(k)!r}"
                for k in sorted(set(was) | set(now))
                if was.get(k) != now.get(k)
            )
            raise ValueError(
                f"cannot resume {run_dir}: the model differs from the checkpoint's ({changed})"
            )
    else:
        if (run_dir / CONFIG_FILE).is_file() and read_run_config(run_dir) != run_config:
            raise ValueError(
                f"{run_dir} holds another run ({CONFIG_FILE} differs); resume it (--resume) "
                "or choose another --out"
            )
        # The trainer refuses this folder: refuse before adding a config.json to it.
        check_no_earlier_run(run_dir, instead="another --out")
        if info.is_main:
            ckpt.write_json(run_dir / CONFIG_FILE, run_config)
    # The same initial weights on every process and for every attention type.
    torch.manual_seed(recipe.training.seed)
    model = build_model(model_cfg)
    return train(
        model,
        classification_objective,
        splits["train"],
        config,
        run_dir,
        val_data=splits["val"],
        test_data=splits.get("test"),
        collate_fn=collate,
        resume=resume,
        run_config=run_config,
        weights_metadata={"task": recipe.task, "attention": recipe.model.attention},
        description=f"{recipe.task} {recipe.model.attention}",
    )


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    split: str = "test",
    checkpoint: str = "best",
    data_dir: str | os.PathLike[str] | None = None,
    dataset: Dataset | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    num_workers: int = 0,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Re-evaluate a run's checkpoint on one split.

    Args:
        run_dir: a directory written by :func:`train_task`.
        split: ``train``, ``val`` or ``test``.
        checkpoint: ``best`` or ``last``.
        data_dir: defaults to the directory the run was trained on.
        dataset: evaluate this dataset instead of reading the split.
        batch_size, precision: default to the recipe's.
        max_batches: only the first this many batches.

    Returns:
        ``{"split", "checkpoint", "step", "accuracy", "loss", ...}``.
    """
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    for name, value in (("batch_size", batch_size), ("max_batches", max_batches)):
        if value is not None:
            check_positive_int(name, value)
    cfg = read_run_config(run_dir)
    recipe = saved_recipe(run_dir, cfg)
    where = ckpt.find(run_dir, checkpoint)
    if where is None:
        raise ValueError(f"{run_dir} has no `{checkpoint}` checkpoint")
    if dataset is None:
        data_dir = data_dir if data_dir is not None else cfg.get("data_dir")
        if data_dir is None:
            raise ValueError("the run records no data directory: pass data_dir (--data)")
        dataset = load_splits(recipe.task, data_dir, recipe.max_length, (split,))[split]
    model = build_model(LRAModelConfig.from_dict(cfg["model"]))
    ckpt.load_weights(model, where / ckpt.WEIGHTS)
    tc = TrainConfig(
        steps=1,
        batch_size=recipe.training.batch_size if batch_size is None else batch_size,
        device=device,
        precision=precision or recipe.training.precision,
        num_workers=num_workers,
        eval_batches=max_batches,
    )
    dev = resolve_device(tc.device)
    model = model.to(dev)
    if tc.precision == "fp64":
        model = model.double()
    metrics = evaluate(model, classification_objective, dataset, tc, collate_fn=collate, device=dev)
    return {
        "run_dir": str(run_dir),
        "split": split,
        "checkpoint": checkpoint,
        "step": ckpt.read_meta(where)["step"],
        **metrics,
    }

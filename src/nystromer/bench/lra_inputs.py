"""Query, key and value of a trained Long Range Arena model on real validation inputs: the
``lra`` inputs of ``nystromer bench approx`` and ``nystromer viz attention``. A run directory as
``nystromer train`` writes it is only read (a job still training there is not disturbed);
nothing is trained here: :func:`resolve_lra_run` says which command makes a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..train import checkpoint as ckpt
from .inputs import captured_heads

__all__ = [
    "DEFAULT_LRA_RUN",
    "FALLBACK_LRA_DIR",
    "LRAInputs",
    "has_checkpoint",
    "resolve_lra_run",
    "load_lra_model",
    "pick_examples",
    "lra_qkv",
]

#: Where the full ListOps run of ``nystromer train listops`` is kept in this repository.
DEFAULT_LRA_RUN = Path("runs/listops")
#: Where ``nystromer demo`` keeps its small ListOps run (``data/`` and ``run/`` inside).
FALLBACK_LRA_DIR = Path("runs/demo")


@dataclass
class LRAInputs:
    """Captured (2, H, n, d) float32 q, k, v of one attention layer for two validation
    examples: sample 0 fills all n positions, sample 1 has ``lengths[1]`` real tokens followed
    by padding; ``mask`` (2, n) is True at real tokens. ``description`` names the run,
    checkpoint, layer and examples in one line, ``info`` as JSON-ready values."""

    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor
    lengths: tuple[int, int]
    description: str
    info: dict[str, Any]


def has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    """True when ``run_dir`` has a ``config.json`` and a ``best`` or ``last`` checkpoint."""
    has_config = (Path(run_dir) / "config.json").is_file()
    return has_config and any(ckpt.find(run_dir, name) for name in ("best", "last"))


def resolve_lra_run(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """The LRA run directory a benchmark reads: ``run_dir``, or by default
    :data:`DEFAULT_LRA_RUN`, else the demo's ``FALLBACK_LRA_DIR/run``, whichever holds
    ``config.json`` and a checkpoint. ValueError naming ``--lra-run`` and the commands that
    make a run when there is none."""
    candidates = (DEFAULT_LRA_RUN, FALLBACK_LRA_DIR / "run") if run_dir is None else (run_dir,)
    found = next((Path(c) for c in candidates if has_checkpoint(c)), None)
    if found is not None:
        return found
    where = f"no trained LRA model in {' or '.join(map(str, candidates))}"
    if run_dir is not None:
        where = (
            f"{run_dir} holds no trained LRA model (config.json and a best/ or last/ checkpoint)"
        )
    raise ValueError(
        f"--lra-run: {where}; make one with `nystromer train listops --data DATA --out DIR` "
        f"(the paper's recipe) or `nystromer demo` (a small ListOps model in "
        f"{FALLBACK_LRA_DIR / 'run'}, in minutes on a CPU), then pass its run directory as "
        "--lra-run DIR"
    )


def _read_checkpoint(run_dir: Path, name: str) -> tuple[Path, dict, dict[str, Tensor]]:
    """Weights and meta of one checkpoint, consistent even while a trainer replaces it."""
    # The trainer swaps a checkpoint directory by two renames: between them the name is missing
    # and a reader could pair one version's meta with the next one's weights. So the weights
    # are read whole, and the meta read before and after must agree.
    from safetensors.torch import load as load_safetensors

    for _ in range(20):
        where = ckpt.find(run_dir, name)
        if where is None:
            raise ValueError(f"{run_dir} has no `{name}` checkpoint")
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):  # mid-swap: retry
            meta, data = ckpt.read_meta(where), (where / ckpt.WEIGHTS).read_bytes()
            if ckpt.read_meta(where) == meta:
                return where, meta, load_safetensors(data)
        time.sleep(0.1)
    raise RuntimeError(f"{run_dir}/{name} kept changing while it was read; try again")


def load_lra_model(
    run_dir: str | os.PathLike[str], checkpoint: str = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, info)``: the model of an LRA run in eval mode on the CPU, from its ``best``,
    ``last`` or (``auto``) best-else-last checkpoint; info holds run_dir, task, checkpoint,
    step, the checkpoint's validation metrics when recorded, and the run's config."""
    from ..lra.model import LRAModelConfig, build_model
    from ..lra.run import read_run_config

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if checkpoint == "auto":
        checkpoint = "best" if ckpt.find(run_dir, "best") else "last"
    _, meta, tensors = _read_checkpoint(run_dir, checkpoint)  # ValueError for an unknown name
    model = build_model(LRAModelConfig.from_dict(config["model"]))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    info = {
        "run_dir": str(run_dir),
        "task": config.get("task"),
        "checkpoint": checkpoint,
        "step": meta.get("step"),
        "val": meta.get("val"),
        "config": config,
    }
    return model, info


def pick_examples(lengths: np.ndarray | list[int], multiple: int) -> dict[str, int | bool]:
    """Choose the two examples from the examples' lengths: ``{"index0", "n", "truncated0",
    "index1", "length1", "truncated1"}``. Sample 0 is the longest example whose length is a
    multiple of ``multiple`` (no padding, so every implementation accepts it): example ``index0``
    of ``n`` tokens (``truncated0``: cut to a multiple, when no example longer than ``multiple``
    has such a length). Sample 1, to be right-padded to n, is the one closest to ¾ n: example
    ``index1`` of ``length1`` < n tokens (``truncated1``: cut, when no other is shorter than n)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or len(lengths) < 2:
        raise ValueError(f"lengths: need at least two examples, got shape {lengths.shape}")
    if multiple < 1:
        raise ValueError(f"multiple must be ≥ 1, got {multiple}")
    usable = lengths // multiple * multiple
    fits = [i for i in range(len(lengths)) if usable[i] > multiple]
    if not fits:
        raise ValueError(
            f"lengths: need an example longer than 2·{multiple} tokens to measure an "
            f"approximation with {multiple} landmarks, the longest has {lengths.max()}"
        )
    # Uncut examples first, then the longest; the first of equals.
    index0 = max(fits, key=lambda i: (usable[i] == lengths[i], usable[i], lengths[i], -i))
    n = int(usable[index0])
    shorter = [i for i in range(len(lengths)) if i != index0 and 0 < lengths[i] < n]
    index1 = min(shorter, key=lambda i: (abs(lengths[i] - 0.75 * n), i), default=int(index0 == 0))
    length1 = int(lengths[index1]) if shorter else max(1, round(0.75 * n))
    return {
        "index0": index0,
        "n": n,
        "truncated0": n != int(lengths[index0]),
        "index1": index1,
        "length1": length1,
        "truncated1": not shorter,
    }


def lra_qkv(
    run_dir: str | os.PathLike[str] | None = None,
    *,
    layer: int = -1,
    checkpoint: str = "auto",
    num_landmarks: int = 64,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "val",
) -> LRAInputs:
    """Capture q, k, v of one attention ``layer`` (Python indexing: -1 is the last) of the
    model of ``run_dir`` (None: :func:`resolve_lra_run`'s default; a one-input task: ListOps,
    Text, Image, Pathfinder; its ``best``, ``last`` or ``auto`` checkpoint) on two examples of
    ``split`` of its data (``data_dir``, default: what the run was trained on), chosen by
    :func:`pick_examples` for ``num_landmarks``, as one right-padded batch, as training batches
    them. Returns :class:`LRAInputs` with (2, H, n, d) tensors and the (2, n) mask."""
    from ..lra.data import load_split

    run_dir = resolve_lra_run(run_dir)
    model, info = load_lra_model(run_dir, checkpoint)
    config = info.pop("config")
    if config["model"].get("two_tower"):
        raise ValueError(f"run_dir: {run_dir} is a two-input (retrieval) model; use another task")
    layers = model.encoder.layers
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer: the model has {len(layers)} layers, got {layer}")
    layer_index = layer % len(layers)
    data_dir = data_dir or config.get("data_dir")
    if data_dir is None:
        raise ValueError(f"data_dir: the run {run_dir} records no data directory; pass one")
    task = config["task"]
    dataset = load_split(task, data_dir, split, max_length=config["recipe"]["max_length"])
    offsets = getattr(dataset, "offsets", None)  # token datasets know every length
    if offsets is None:
        offsets = np.cumsum([0] + [len(dataset[i][0]) for i in range(len(dataset))])
    pick = pick_examples(np.diff(offsets), num_landmarks)
    n, length1, examples = int(pick["n"]), int(pick["length1"]), [pick["index0"], pick["index1"]]
    ids = torch.zeros(2, n, dtype=torch.long)  # 0 is the padding token of the LRA models
    ids[0] = dataset[examples[0]][0][:n]
    ids[1, :length1] = dataset[examples[1]][0][:length1]

    attn = layers[layer_index].attn
    heads = config["model"]["num_heads"]
    projections = {name: [getattr(attn, f"{name}_proj")] for name in ("q", "k", "v")}
    q, k, v = captured_heads(lambda: model.encoder(ids), projections, heads)
    mask = ids != 0  # real tokens are ids ≥ 1, so row 0 is all True
    val = info.get("val") or {}
    accuracy = f", val accuracy {val['accuracy']:.3f}" if "accuracy" in val else ""
    cut0, cut1 = (" (truncated)" if pick[f"truncated{i}"] else "" for i in (0, 1))
    description = (
        f"{task} model of {run_dir} ({info['checkpoint']} checkpoint, step {info['step']}"
        f"{accuracy}), layer {layer_index}, {heads} heads × {q.shape[-1]}; {split} example "
        f"{examples[0]} ({n} tokens{cut0}) and example {examples[1]} ({length1} "
        f"tokens{cut1} + {n - length1} padding)"
    )
    info |= {"layer": layer_index, "split": split, "data_dir": str(data_dir), "heads": heads}
    info |= {"head_dim": int(q.shape[-1]), "seq_len": n, "examples": examples}
    info |= {"lengths": [n, length1], "truncated": [pick["truncated0"], pick["truncated1"]]}
    return LRAInputs(q, k, v, mask, (n, length1), description, info)

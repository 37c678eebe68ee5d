"""Checkpoints: weights in safetensors, the rest of the training state beside them.

A checkpoint is a directory ``RUN_DIR/<name>/`` (``last`` or ``best``) holding

- ``model.safetensors``: the model's state dict (plus string metadata);
- ``meta.json``: step and metrics, readable without torch;
- ``trainer_state.pt`` (``last`` only): optimiser, schedule, gradient scaler, the random
  number generator states of every process (python, numpy, torch, CUDA), the data position
  and the loop's bookkeeping. It is loaded with ``torch.load(weights_only=True)``, so a
  checkpoint cannot run code.

A directory is written whole under a temporary name and then swapped in by renames, so a
crash leaves either the previous checkpoint or the new one, never a mixture; if it happens
between the two renames the previous one survives as ``.old-<name>-*`` and :func:`find`
falls back to it. A hard kill (SIGKILL) while writing leaves its ``.new-<name>-*`` staging
folder behind: the next write of ``<name>`` removes it, and once the new checkpoint is in
place, every ``.old-<name>-*``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import RANDOM_PART, atomic_path, atomic_write, load_json, remove_stale

__all__ = [
    "capture_rng",
    "restore_rng",
    "save_weights",
    "write_weights",
    "load_weights",
    "read_state",
    "write_checkpoint",
    "find",
    "read_meta",
    "load_json",
    "write_json",
    "read_json",
]

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
META = "meta.json"


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """The states of python's, numpy's and torch's global generators (and CUDA's on a GPU),
    as plain values and tensors that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(name), keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "checkpoints need the safetensors package: pip install 'nystromer[lra]'"
        ) from exc
    return safetensors.torch


def save_weights(
    model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``model.state_dict()`` to a safetensors file, atomically."""
    with atomic_path(path) as tmp:
        write_weights(model, tmp, metadata)


def write_weights(
    model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """:func:`save_weights` without the atomic rename (for a path that is already staged)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    _safetensors().save_file(tensors, str(path), metadata=meta)


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, str]:
    """Load a safetensors file written by :func:`save_weights` into ``model`` (strictly).

    Returns:
        The file's string metadata.
    """
    st = _safetensors()
    from safetensors import safe_open

    try:
        tensors = st.load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors' own error type, or an OSError on a short read
        raise _damaged(path, exc) from exc
    model.load_state_dict(tensors, strict=True)
    return metadata


def read_state(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``trainer_state.pt`` of a ``last`` checkpoint (``weights_only``: it runs no code).

    Raises:
        ValueError: the file is damaged (cut short by a copy or a failing disk), naming it.
    """
    path = Path(checkpoint_dir) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a cut zip archive is an OSError or a RuntimeError
        raise _damaged(path, exc) from exc


def _damaged(path: str | os.PathLike[str], exc: BaseException) -> ValueError:
    return ValueError(f"{path} is damaged or not a checkpoint file ({exc})")


def write_checkpoint(
    run_dir: str | os.PathLike[str],
    name: str,
    writers: Mapping[str, Callable[[Path], None]],
) -> Path:
    """Create ``run_dir/name/`` with one file per entry of ``writers``, replacing it whole.

    Args:
        writers: file name → function that writes that file at the given path.

    Returns:
        The checkpoint directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / name
    remove_stale(run_dir, rf"\.new-{re.escape(name)}-{RANDOM_PART}", folders=True)
    staging = Path(tempfile.mkdtemp(prefix=f".new-{name}-", dir=run_dir))
    try:
        for file_name, write in writers.items():
            with atomic_path(staging / file_name) as tmp:
                write(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=run_dir))
            old.rmdir()
            os.replace(target, old)
        os.replace(staging, target)
        # The previous copy, and any an earlier crash between the renames left: superseded.
        remove_stale(run_dir, rf"\.old-{re.escape(name)}-{RANDOM_PART}", folders=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def find(run_dir: str | os.PathLike[str], name: str) -> Path | None:
    """The directory of checkpoint ``name`` in ``run_dir``, or None when there is none."""
    run_dir = Path(run_dir)
    target = run_dir / name
    if (target / WEIGHTS).is_file():
        return target
    # A crash between the two renames of write_checkpoint leaves only the previous copy.
    survivors = sorted(
        (p for p in run_dir.glob(f".old-{name}-*") if (p / WEIGHTS).is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    return survivors[-1] if survivors else None


def read_meta(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory."""
    return load_json(Path(checkpoint_dir) / META)


def read_json(path: str | os.PathLike[str], missing: str) -> Any:
    """Read a JSON file a run wrote; a missing file is a ValueError with the ``missing`` text
    (which says what the caller expected the folder to be)."""
    if not Path(path).is_file():
        raise ValueError(missing)
    return load_json(path)


def write_json(path: str | os.PathLike[str], obj: Any, *, atomic: bool = True) -> None:
    """Write ``obj`` as indented JSON (atomically unless the path is already staged)."""
    if atomic:
        with atomic_write(path) as f:
            f.write(json.dumps(obj, indent=2) + "\n")
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2) + "\n")

"""The Hugging Face checkpoint format, read and written with json + safetensors (+ torch.load).

transformers is not needed. A directory holds config.json and the weights as model.safetensors,
pytorch_model.bin, or shards listed in model.safetensors.index.json /
pytorch_model.bin.index.json. State-dict keys of a task model put the encoder under
``nystromformer.``; a bare encoder's have no prefix. Both directions are mapped.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._io import atomic_path
from .config import CONFIG_NAME, NO_CONV_KEY

if TYPE_CHECKING:
    from .modeling import NystromformerPreTrainedModel

__all__ = [
    "CheckpointError",
    "WEIGHTS_NAMES",
    "check_dtype",
    "checkpoint_dtype",
    "load_into",
    "read_state_dict",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHTS_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX, BIN_NAME, BIN_INDEX)
# Non-trainable buffers some transformers versions saved; they are recomputed, never loaded.
_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
_MAX_LISTED = 12
# The convolution skip's weight within an attention module, transformers' name.
_CONV = "attention.self.conv.weight"


class CheckpointError(ValueError):
    """A checkpoint's file cannot be read, or its keys or shapes do not fit the model (the
    message names the file, or lists the keys)."""


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot read the weights file {path} (truncated or corrupt? save or download it "
        f"again): {error}"
    )


def _safetensors_load(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - safetensors is in the hf extra
        raise ImportError(
            f"reading {path} needs the safetensors package: pip install safetensors"
        ) from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors' errors do not name the file
        raise _unreadable(path, e) from e


def _bin_load(path: Path) -> dict[str, Tensor]:
    # weights_only: a .bin is a pickle, and a pickle from the internet may run code.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unreadable(path, e) from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def read_state_dict(directory: str | os.PathLike[str]) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory, on the CPU.

    Looks for model.safetensors, then model.safetensors.index.json, pytorch_model.bin and
    pytorch_model.bin.index.json (the order transformers prefers).
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    for name, loader in (
        (SAFETENSORS_NAME, _safetensors_load),
        (SAFETENSORS_INDEX, _safetensors_load),
        (BIN_NAME, _bin_load),
        (BIN_INDEX, _bin_load),
    ):
        path = d / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return loader(path)
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path} has no 'weight_map' object")
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(loader(d / shard))
        return state
    raise FileNotFoundError(f"no weights in {d}: expected one of {', '.join(WEIGHTS_NAMES)}")


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """The ``dtype`` argument of the ``from_pretrained`` functions, checked: None gives torch's
    default dtype (float32 unless changed), ``"auto"`` stays (the checkpoint's dtype, as
    transformers 5 loads by default), a floating ``torch.dtype`` or its name gives that dtype.

    Raises:
        ValueError: anything else, naming ``dtype``.
    """
    if dtype is None:
        return torch.get_default_dtype()
    if dtype == "auto":
        return "auto"
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            "dtype must be None (torch's default, float32), 'auto' (the checkpoint's) or a "
            f"floating torch.dtype or its name, got {dtype!r}"
        )
    return resolved


def checkpoint_dtype(recorded: dict, state: dict[str, Tensor]) -> torch.dtype:
    """The dtype a checkpoint was saved in, as transformers 5 reads it: config.json's
    ``"dtype"`` (transformers 4: ``"torch_dtype"``), else its first floating weight's, else
    torch's default."""
    for key in ("dtype", "torch_dtype"):
        named = getattr(torch, str(recorded.get(key)), None)
        if isinstance(named, torch.dtype) and named.is_floating_point:
            return named
    floating = (v.dtype for v in state.values() if v.is_floating_point())
    return next(floating, torch.get_default_dtype())


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f"[{shown}{f', … {more} more' if more > 0 else ''}]"


def load_into(
    model: NystromformerPreTrainedModel,
    state: dict[str, Tensor],
    *,
    strict: bool = False,
    source: str = "checkpoint",
) -> None:
    """Copy a transformers-layout state dict into ``model``, mapping the base-model prefix.

    Encoder weights must match exactly (missing, unknown or misshapen → CheckpointError). Head
    weights absent from the checkpoint keep their initialisation and weights of other heads are
    ignored, both logged as warnings, unless ``strict``.
    """
    base = model.base_model_prefix + "."
    state = {k: v for k, v in state.items() if not k.endswith(_BUFFER_SUFFIXES)}
    checkpoint_has_heads = any(k.startswith(base) for k in state)
    ignored: list[str] = []
    if model.is_base_model and checkpoint_has_heads:
        stripped = {}
        for k, v in state.items():
            if k.startswith(base):
                stripped[k[len(base) :]] = v
            else:
                ignored.append(k)
        state = stripped
    elif not model.is_base_model and not checkpoint_has_heads:
        state = {base + k: v for k, v in state.items()}
    if "cls.predictions.decoder.bias" in state:
        # Tied, transformers makes decoder.bias predictions.bias (older checkpoints store both,
        # equal). Untied, transformers 5 keeps decoder.bias as a parameter of its own, the
        # one its forward adds (predictions.bias is then unused), so it wins.
        decoder_bias = state.pop("cls.predictions.decoder.bias")
        if model.config.tie_word_embeddings:
            state.setdefault("cls.predictions.bias", decoder_bias)
        else:
            state["cls.predictions.bias"] = decoder_bias
    for k in model._tied_keys:
        state.pop(k, None)

    expected = {k: v for k, v in model.state_dict().items() if k not in model._tied_keys}
    # A model without convolution is saved with zero convolutions for transformers (see
    # write_checkpoint): a zero convolution adds nothing, so it is no convolution.
    state = {
        k: v for k, v in state.items() if k in expected or not k.endswith(_CONV) or bool(v.any())
    }

    def in_encoder(k: str) -> bool:
        return model.is_base_model or k.startswith(base)

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    encoder_missing = [k for k in missing if in_encoder(k)]
    head_missing = [k for k in missing if not in_encoder(k)]
    encoder_unexpected = [k for k in unexpected if in_encoder(k)]
    head_unexpected = sorted([k for k in unexpected if not in_encoder(k)] + ignored)
    problems = []
    if encoder_missing:
        problems.append(f"missing encoder weights {_listed(encoder_missing)}")
    if encoder_unexpected:
        problems.append(f"unexpected encoder weights {_listed(encoder_unexpected)}")
        if any(k.endswith(_CONV) for k in encoder_unexpected):
            problems.append(
                f"the checkpoint has trained convolution skips: load it with conv_kernel_size="
                f"{next(v for k, v in state.items() if k.endswith(_CONV)).shape[2]}"
            )
    if strict and head_missing:
        problems.append(f"missing head weights {_listed(head_missing)}")
    if strict and head_unexpected:
        problems.append(f"unexpected weights {_listed(head_unexpected)}")
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        problems.append(
            f"shape mismatches {_listed(mismatched)} (is a config field such as num_labels or "
            "conv_kernel_size overridden?)"
        )
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    if head_missing:
        logger.warning(
            "%s: %d weights of %s are not in the checkpoint and keep their random "
            "initialisation (train them): %s",
            source,
            len(head_missing),
            type(model).__name__,
            _listed(head_missing),
        )
    if head_unexpected:
        logger.warning(
            "%s: ignored %d weights that %s does not use (another task head): %s",
            source,
            len(head_unexpected),
            type(model).__name__,
            _listed(head_unexpected),
        )
    with torch.no_grad():
        for k, v in state.items():
            if k in expected:
                expected[k].copy_(v)


def write_checkpoint(
    model: NystromformerPreTrainedModel, directory: str | os.PathLike[str]
) -> None:
    """Write ``directory/model.safetensors`` and ``directory/config.json`` atomically.

    Tied weights (the masked-LM decoder matrix) are left out, as transformers does; its loader
    re-ties them.
    """
    try:
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover - safetensors is in the hf extra
        raise ImportError("writing checkpoints needs safetensors: pip install safetensors") from e
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if k not in model._tied_keys
    }
    if "cls.predictions.bias" in tensors and not model.config.tie_word_embeddings:
        # Untied, transformers keeps decoder.bias as a weight of its own and expects it.
        tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].clone()
    no_conv = model.config.conv_kernel_size is None
    if no_conv:
        # transformers' config refuses a null conv_kernel_size (typed int) although its model
        # has a no-convolution path; a zero convolution of width 1 is what it can read that
        # adds nothing. Read back as None (NO_CONV_KEY in the config; zero weights dropped).
        for key in [k for k in tensors if k.endswith("attention.self.query.weight")]:
            heads = model.config.num_attention_heads
            conv_key = key.removesuffix("query.weight") + "conv.weight"
            tensors[conv_key] = tensors[key].new_zeros(heads, 1, 1, 1)
    with atomic_path(d / SAFETENSORS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    # transformers loads the weights in the dtype config.json names, so a "dtype" (or
    # transformers 4's "torch_dtype") kept from the checkpoint this model was loaded from
    # would round float32 weights saved here to bfloat16: state the dtype actually written.
    config = copy.copy(model.config)
    config.extra = {k: v for k, v in config.extra.items() if k != "torch_dtype"}
    floating = [v.dtype for v in tensors.values() if v.is_floating_point()]
    if floating:
        config.extra["dtype"] = str(floating[0]).removeprefix("torch.")
    if no_conv:
        config.conv_kernel_size = 1
        config.extra[NO_CONV_KEY] = None
    config.to_json_file(d / CONFIG_NAME, architectures=[type(model).__name__])

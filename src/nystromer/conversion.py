"""Give a pretrained encoder Nyström attention and a longer position table (docs/convert.md).

:func:`convert` = :func:`nystromer.patch` (linear-cost attention, trained weights kept) plus,
when asked for more positions than the model was trained with, :func:`extend_positions`: the
learned absolute position table is lengthened by repeating the trained rows block-wise, the
initialisation Longformer used to take RoBERTa from 512 to 4,096 positions. Both change the
model in place and its config, so ``save_pretrained`` writes a checkpoint that

- :func:`from_pretrained` loads back as the converted model (the Nyström settings are kept
  in the config, ``config.nystrom``, and the convolution skips, if any, are restored),
- ``transformers.AutoModel.from_pretrained(path, attn_implementation="nystrom")`` loads with
  the same settings (a convolution skip needs :func:`from_pretrained`), and
- plain ``transformers`` loads as an exact-attention model with the longer table.

The converted model is close to the original but not equal on inputs longer than
``num_landmarks``; ``nystromer distill`` (:mod:`nystromer.distill`) trains it back towards the
exact model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hf
from .options import NystromOptions, resolve_options
from .patching import SUPPORTED_TRANSFORMERS_MODEL_TYPES, is_transformers_model, patch

__all__ = [
    "CONVERTIBLE_MODEL_TYPES",
    "CONFIG_KEY",
    "convert",
    "extend_positions",
    "from_pretrained",
    "reserved_positions",
]

# Encoders with a learned absolute position table that the tests convert and lengthen
# (transformers families through "nystrom", Nyströmformer through nystromer.models). Any encoder
# nystromer.patch accepts converts; lengthening needs such a table, which vision models (a patch
# grid) and ModernBERT and EuroBERT (rotary positions) do not have.
_NO_POSITION_TABLE = ("vit", "deit", "modernbert", "eurobert")
CONVERTIBLE_MODEL_TYPES = (
    *(t for t in SUPPORTED_TRANSFORMERS_MODEL_TYPES if t not in _NO_POSITION_TABLE),
    "nystromformer",
)
# config.json key under which a converted transformers model keeps its Nyström settings.
CONFIG_KEY = hf.CONFIG_KEY

logger = logging.getLogger(__name__)


def convert(
    model: nn.Module,
    *,
    num_landmarks: int = 64,
    pinv_iterations: int = 6,
    conv_kernel_size: int | None = None,
    max_position_embeddings: int | None = None,
    kmeans_iterations: int = 0,
    options: NystromOptions | None = None,
) -> nn.Module:
    """Switch a pretrained encoder (a transformers BERT, RoBERTa, ELECTRA, ViT, … or a
    Nyströmformer) to Nyström attention and, optionally, a longer position table; in place,
    returns ``model``.

    Inputs of at most ``num_landmarks`` tokens keep exact attention, so on them the converted
    model computes what the original computed. The config is updated (its
    ``max_position_embeddings``, and the Nyström settings), so ``save_pretrained`` writes a
    checkpoint :func:`from_pretrained` restores.

    Args:
        model: a transformers encoder that :func:`nystromer.patch` accepts (any head;
            docs/models.md lists the families), or a :mod:`nystromer.models` Nyströmformer.
        num_landmarks: m, landmarks per head.
        pinv_iterations: pseudo-inverse iterations.
        conv_kernel_size: odd k adds a depthwise convolution skip on the values of each
            attention layer, initialised to zero (transformers models; a Nyströmformer keeps the
            convolution it was trained with, so only None or its own kernel size is accepted).
        max_position_embeddings: the new value of ``config.max_position_embeddings`` (the
            config field's meaning is kept: for RoBERTa it counts the ``pad_token_id + 1``
            reserved rows, e.g. 4098 for 4,096 tokens as in Longformer; for BERT and
            Nyströmformer it is the longest input). None keeps the table. Needs a learned
            absolute position table (ModernBERT's rotary positions need none). See
            :func:`extend_positions`.
        kmeans_iterations: k-means refinement of the landmarks from the segment means (see
            :func:`nystromer.nystrom_attention`); 0 keeps the paper's landmarks. 3 brings a
            converted model closer to the original (docs/results.md).
        options: the four Nyström settings (``num_landmarks``, ``pinv_iterations``,
            ``conv_kernel_size``, ``kmeans_iterations``) as one
            :class:`~nystromer.NystromOptions`, instead of the keywords (which must then keep
            their defaults).

    Returns:
        ``model``, converted.

    Raises:
        ValueError: an unsupported model, a shorter position table, or a bad option.
    """
    options = resolve_options(
        options, num_landmarks, pinv_iterations, kmeans_iterations, conv_kernel_size
    )
    model_type = _model_type(model)
    if max_position_embeddings is not None:
        # Checked before anything changes: a refused table must not leave the model converted.
        _extension_target(model, max_position_embeddings)
    if model_type == "nystromformer":
        _convert_nystromformer(model, options)
    else:
        patch(model, options=options)
    if max_position_embeddings is not None:
        extend_positions(model, max_position_embeddings)
    return model


def extend_positions(model: nn.Module, max_position_embeddings: int) -> nn.Module:
    """Lengthen a learned absolute position table by repeating its trained rows; in place.

    The new table starts with the old one unchanged; after it, the trained rows are copied
    again and again (the last copy cut short), so position ``r + k·L`` starts as position
    ``r`` (L = trained positions). Reserved rows that are never a position (RoBERTa's rows
    up to ``pad_token_id``, Nyströmformer's first 2) are not repeated. The attention is left
    as it is: call it on an exact model to get an exact teacher with the same table.

    Args:
        model: a transformers encoder with a learned absolute position table (BERT, RoBERTa,
            ELECTRA, DistilBERT, …), or a :mod:`nystromer.models` Nyströmformer.
        max_position_embeddings: the new ``config.max_position_embeddings`` (see
            :func:`convert`); equal to the current value leaves the model unchanged.

    Returns:
        ``model``.

    Raises:
        ValueError: an unsupported model, or a value smaller than the current one.
    """
    embeddings = _extension_target(model, max_position_embeddings)
    config = model.config
    if max_position_embeddings == config.max_position_embeddings:
        return model
    old = embeddings.position_embeddings
    reserved = reserved_positions(model)
    rows = max_position_embeddings
    if _model_type(model) == "nystromformer":
        rows += reserved  # its config counts positions, its table also the reserved rows
    new = nn.Embedding(
        rows,
        old.embedding_dim,
        padding_idx=old.padding_idx,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    new.weight.requires_grad_(old.weight.requires_grad)
    with torch.no_grad():
        trained = old.weight[reserved:]
        new.weight[:reserved] = old.weight[:reserved]
        for start in range(reserved, rows, trained.shape[0]):
            take = min(trained.shape[0], rows - start)
            new.weight[start : start + take] = trained[:take]
    embeddings.position_embeddings = new
    # transformers' embeddings keep (1, max_positions) index buffers for inputs without
    # position or token type ids; they must cover the new length.
    for name in ("position_ids", "token_type_ids"):
        buffer = getattr(embeddings, name, None)
        if isinstance(buffer, torch.Tensor) and buffer.dim() == 2:
            if name == "position_ids":
                value = torch.arange(rows, device=buffer.device, dtype=buffer.dtype)[None]
            else:
                value = buffer.new_zeros(1, rows)
            setattr(embeddings, name, value)
    config.max_position_embeddings = max_position_embeddings
    logger.info(
        "extend_positions: %s position table %d -> %d rows (trained rows repeated)",
        type(model).__name__,
        old.num_embeddings,
        rows,
    )
    return model


def from_pretrained(
    directory: str | os.PathLike[str],
    *,
    model_class: Any = None,
    options: NystromOptions | None = None,
    dtype: torch.dtype | str | None = None,
    **convert_options: Any,
) -> nn.Module:
    """Load a checkpoint as a Nyström-attention model, e.g. one saved after :func:`convert` or
    :func:`nystromer.patch`.

    A transformers checkpoint is loaded with ``model_class`` (default
    ``transformers.AutoModel``) and ``attn_implementation="nystrom"``, with the settings its
    config records (``config.nystrom``; :func:`convert`'s defaults if none are recorded, e.g.
    an original checkpoint), overridden by ``options`` and ``convert_options``; trained
    convolution skips are restored. A Nyströmformer checkpoint is loaded with
    :mod:`nystromer.models` (the class named in its config, or ``model_class``), with
    ``convert_options`` as config overrides.

    Args:
        directory: a Hugging Face-format checkpoint folder.
        model_class: the class whose ``from_pretrained`` to use (e.g.
            ``transformers.AutoModelForMaskedLM``).
        options: a :class:`~nystromer.NystromOptions` to use instead of the recorded settings
            (for a Nyströmformer, ``conv_kernel_size=None`` keeps the trained convolution).
        dtype: of the model's weights. None (default): torch's default dtype (float32), also
            for a checkpoint saved in bfloat16, for both kinds of checkpoint (transformers 5
            would keep bfloat16: its default is ``"auto"``); ``"auto"``: the checkpoint's
            (config.json's ``"dtype"``, else its weights'); or a floating ``torch.dtype`` or
            its name.
        **convert_options: ``num_landmarks``, ``pinv_iterations``, ``conv_kernel_size``,
            ``kmeans_iterations``: single settings to override (after ``options``).

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: no config.json in ``directory``.
        ValueError: a model Nyström attention cannot serve (causal, or attention outside
            transformers' interface), or an impossible ``dtype``.
        nystromer.models.CheckpointError: a weights file that cannot be read (named), or
            convolution weights missing or of the wrong shape.
    """
    path = Path(directory)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"directory must be a checkpoint folder with a config.json: {path}")
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    allowed = ("num_landmarks", "pinv_iterations", "conv_kernel_size", "kmeans_iterations")
    unknown = set(convert_options) - set(allowed)
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {sorted(unknown)}; expected {', '.join(allowed)}"
        )
    if options is not None and not isinstance(options, NystromOptions):
        raise TypeError(f"options must be a NystromOptions or None, got {type(options).__name__}")
    from .models.hf_io import check_dtype

    target = check_dtype(dtype)
    if raw.get("model_type") == "nystromformer":
        from . import models

        if model_class is None:
            names = raw.get("architectures") or ["NystromformerModel"]
            model_class = getattr(models, names[0], models.NystromformerModel)
        overrides = {}
        if options is not None:
            overrides = options.to_dict()
            if options.conv_kernel_size is None:
                del overrides["conv_kernel_size"]  # the trained convolution stays
        overrides.update(convert_options)
        return model_class.from_pretrained(path, numerics="nystromer", dtype=target, **overrides)
    if model_class is None:
        from transformers import AutoModel as model_class
    recorded = raw.get(CONFIG_KEY, raw.get(hf.LEGACY_CONFIG_KEY))
    if options is None:
        options = NystromOptions.from_dict(recorded)
    options = options.replace(**convert_options)
    try:
        with hf.conv_weights_expected():
            model = model_class.from_pretrained(
                path, attn_implementation=hf.IMPLEMENTATION, dtype=target
            )
    except Exception as e:
        _name_unreadable_file(path, e)
        raise
    if options.conv_kernel_size is not None:
        hf.add_conv_skips(model, options.conv_kernel_size)
        _load_conv_weights(model, path)
    convert(model, options=options)
    return model.eval()


def reserved_positions(model: nn.Module) -> int:
    """Rows at the start of ``model``'s position table that are never a position: RoBERTa-like
    models count positions from ``padding_idx + 1``, a Nyströmformer from 2; others 0."""
    if _model_type(model) == "nystromformer":
        from .models.modeling import POSITION_OFFSET

        return POSITION_OFFSET
    tables = _position_tables(model)
    if len(tables) != 1:
        return 0  # no learned table (rotary positions, a patch grid): nothing is reserved
    embeddings = tables[0]
    padding_idx = getattr(embeddings, "padding_idx", None)
    # RoBERTa-style embeddings create position ids from the input ids, after padding_idx.
    if padding_idx is not None and hasattr(embeddings, "create_position_ids_from_input_ids"):
        return padding_idx + 1
    return 0


# --------------------------------------------------------------------------- internals


def _model_type(model: nn.Module) -> str:
    if type(model).__module__.startswith("nystromer.models") and hasattr(model, "config"):
        return "nystromformer"
    if isinstance(model, nn.Module) and is_transformers_model(model):
        model_type = getattr(model.config, "model_type", None)
        if model_type == "nystromformer":
            raise ValueError(
                "this is transformers' NystromformerModel; load the checkpoint with "
                "nystromer.models (e.g. nystromer.models.NystromformerModel.from_pretrained"
                "(directory)) and convert that"
            )
        hf.check_supported(model)
        return model_type
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        # The position table may change shape, which a wrapper built before would not follow.
        raise ValueError(
            f"convert the model before wrapping it in {type(model).__name__}: "
            "nystromer.convert(model.module, ...), then wrap it again"
        )
    what = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    raise ValueError(
        f"convert supports transformers encoders and nystromer.models Nyströmformers, got "
        f"{what!r}; for other models with torch.nn.MultiheadAttention use nystromer.patch "
        "(no position table to extend)"
    )


def _extension_target(model: nn.Module, max_position_embeddings: int) -> nn.Module:
    """The embeddings module whose table :func:`extend_positions` lengthens to
    ``max_position_embeddings``, or the error that it cannot; changes nothing."""
    _model_type(model)
    embeddings = _embeddings_module(model)
    current = model.config.max_position_embeddings
    if (
        isinstance(max_position_embeddings, bool)
        or not isinstance(max_position_embeddings, int)
        or max_position_embeddings < current
    ):
        raise ValueError(
            f"max_position_embeddings must be an integer ≥ the model's current {current} "
            f"(convert only lengthens the position table), got {max_position_embeddings!r}"
        )
    reserved = reserved_positions(model)
    rows = embeddings.position_embeddings.num_embeddings
    if max_position_embeddings > current and rows <= reserved:
        raise ValueError(f"the position table has no trained rows beyond the {reserved} reserved")
    return embeddings


def _position_tables(model: nn.Module) -> list[nn.Module]:
    """The modules holding a learned position table (``position_embeddings``, an Embedding)."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "position_embeddings", None), nn.Embedding)
    ]


def _embeddings_module(model: nn.Module) -> nn.Module:
    found = _position_tables(model)
    if len(found) == 1:
        return found[0]
    name = type(model).__name__
    if not found and any(hasattr(m, "rotary_emb") for m in model.modules()):
        raise ValueError(
            f"{name} has rotary position embeddings, which take any length: it needs no "
            "longer table; leave max_position_embeddings out"
        )
    if not found and any(
        isinstance(getattr(m, "position_embeddings", None), nn.Parameter) for m in model.modules()
    ):
        raise ValueError(
            f"{name}'s position embeddings are a patch grid (a vision model), not a table of "
            "token positions; leave max_position_embeddings out"
        )
    raise ValueError(
        f"expected one embeddings module with a learned position_embeddings table in {name}, "
        f"found {len(found)}"
    )


def _name_unreadable_file(path: Path, error: Exception) -> None:
    """Re-raise a weights file that cannot be read as an error naming it (transformers
    passes on safetensors' message, which does not)."""
    from .models.hf_io import CheckpointError, read_state_dict

    try:
        read_state_dict(path)
    except CheckpointError as e:
        raise e from error
    except Exception:
        pass


def _convert_nystromformer(model: nn.Module, options: NystromOptions) -> None:
    config = model.config
    k = options.conv_kernel_size
    if k is not None and k != config.conv_kernel_size:
        raise ValueError(
            f"conv_kernel_size must be None or the model's own {config.conv_kernel_size!r} "
            f"(its convolution is trained), got {k!r}"
        )
    # The modules read the shared config at every call, so changing it converts the model.
    config.num_landmarks = options.num_landmarks
    config.pinv_iterations = options.pinv_iterations
    config.kmeans_iterations = options.kmeans_iterations
    config.numerics = "nystromer"  # transformers' numerics accept one input length only
    config.validate()


def _load_conv_weights(model: nn.Module, directory: Path) -> None:
    """Load the saved ``nystrom_conv`` weights into ``model``'s (new) skips.

    Keys are matched as saved, with or without the base model's prefix, or else by their layer
    numbers (a model saved from another class of the family names its layers differently).
    """
    from .models.hf_io import CheckpointError, read_state_dict

    saved = {k: v for k, v in read_state_dict(directory).items() if "nystrom_conv" in k}
    by_layer = {_layer_numbers(k): k for k in saved}
    prefix = getattr(model, "base_model_prefix", "") + "."
    state = {}
    for key, param in model.state_dict().items():
        if "nystrom_conv" not in key:
            continue
        for candidate in (key, prefix + key, key.removeprefix(prefix)):
            if candidate in saved:
                break
        else:
            candidate = by_layer.get(_layer_numbers(key))
        if candidate is None:
            raise CheckpointError(
                f"{directory} records conv_kernel_size but has no weight for {key}; "
                "pass conv_kernel_size=None to load without the convolution"
            )
        if saved[candidate].shape != param.shape:
            raise CheckpointError(
                f"{directory}: {candidate} has shape {tuple(saved[candidate].shape)}, the model's "
                f"{key} {tuple(param.shape)} (conv_kernel_size or the number of heads differs)"
            )
        state[key] = saved[candidate].to(param.dtype)
    model.load_state_dict(state, strict=False)


def _layer_numbers(key: str) -> tuple[int, ...]:
    return tuple(int(part) for part in key.split(".") if part.isdigit())

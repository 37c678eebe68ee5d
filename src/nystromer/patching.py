"""Give an existing model Nyström attention in place, keeping its trained weights.

Two kinds of model are handled (docs/models.md, "Patching existing models"):

- every ``torch.nn.MultiheadAttention`` (nn.TransformerEncoder, hand-written models) is replaced
  by :class:`~nystromer.attention.NystromMultiheadAttention`, which shares its parameters;
- a transformers encoder is switched to ``attn_implementation="nystrom"`` (:mod:`nystromer.hf`):
  the settings are written into its config (``config.nystrom``), convolution skips are added
  when asked, and ``model.set_attn_implementation("nystrom")`` selects the attention function.
  No module is replaced, so the checkpoint layout and ``save_pretrained`` stay as they were.

Only bidirectional attention can be approximated this way: causal (decoder) attention is
refused with ValueError.
"""

from __future__ import annotations

import logging
import sys

from torch import nn

from . import hf
from .attention import NystromMultiheadAttention
from .hf import AttentionCall, attention_probe
from .options import NystromOptions, resolve_options

__all__ = [
    "AttentionCall",
    "SUPPORTED_TRANSFORMERS_MODEL_TYPES",
    "attention_probe",
    "is_transformers_model",
    "patch",
]

logger = logging.getLogger(__name__)

# The transformers families the tests run (tests/test_transformers_families.py, EuroBERT in
# tests/test_hf_edge.py). Support is decided by capability (nystromer.hf.check_supported), not
# by this list.
SUPPORTED_TRANSFORMERS_MODEL_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "data2vec-text",
    "electra",
    "albert",
    "distilbert",
    "ernie",
    "vit",
    "deit",
    "modernbert",
    "eurobert",
)


def patch(
    model: nn.Module,
    *,
    num_landmarks: int = 64,
    pinv_iterations: int = 6,
    conv_kernel_size: int | None = None,
    kmeans_iterations: int = 0,
    options: NystromOptions | None = None,
) -> nn.Module:
    """Switch ``model``'s self-attention to Nyström attention, in place; returns ``model``.

    Inputs of at most ``num_landmarks`` tokens keep exact softmax attention, so on them the
    patched model computes what it computed before; longer inputs cost O(n·m) instead of O(n²).

    Args:
        model: a module containing ``torch.nn.MultiheadAttention`` layers, or a transformers
            encoder whose attention goes through transformers' attention interface (BERT,
            RoBERTa, ELECTRA, DistilBERT, ViT, ModernBERT, …: docs/models.md), any head.
        num_landmarks: m, landmarks per head.
        pinv_iterations: pseudo-inverse iterations.
        conv_kernel_size: odd k adds the paper's depthwise convolution skip on the values to each
            attention layer, initialised to zero (new parameters ``conv.weight`` /
            ``nystrom_conv.weight``: fine-tune them). None adds nothing. A transformers model
            that has skips already keeps them (and their kernel size).
        kmeans_iterations: k-means refinement of the landmarks (see
            :func:`nystromer.nystrom_attention`); 0 keeps the paper's segment means.
        options: the four settings above as one :class:`~nystromer.NystromOptions`, instead
            of the keywords (which must then keep their defaults).

    Returns:
        ``model``, patched. What was replaced is logged (logger ``nystromer.patching``, INFO).

    Raises:
        ValueError: decoder / causal attention, a transformers model whose attention bypasses
            the attention interface, or nothing to patch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = resolve_options(
        options, num_landmarks, pinv_iterations, kmeans_iterations, conv_kernel_size
    )
    _check_wrapper(model, options)
    inner = getattr(model, "module", None) if _is_wrapper(model) else None
    for candidate in (model, inner):
        if candidate is not None and is_transformers_model(candidate):
            _patch_transformers(candidate, options)
            return model
    _check_patched(model, options)
    replaced = _patch_multihead_attention(model, options)
    patched = _update_patched(model, options)
    if not replaced:
        if patched:
            logger.info(
                "patch: %s is already patched; settings of %d modules now %s",
                type(model).__name__,
                patched,
                options,
            )
            return model
        raise ValueError(
            f"found nothing to patch in {type(model).__name__}: no torch.nn.MultiheadAttention, "
            "and not a transformers model"
        )
    logger.info(
        "patch: replaced %d nn.MultiheadAttention by NystromMultiheadAttention (%s): %s",
        len(replaced),
        options,
        ", ".join(replaced),
    )
    return model


# --------------------------------------------------------------------------- wrappers


def _is_wrapper(model: nn.Module) -> bool:
    """nn.DataParallel or DistributedDataParallel: the model they wrap is ``model.module``."""
    return isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))


def _check_wrapper(model: nn.Module, options: NystromOptions) -> None:
    # DDP lists the parameters it synchronises when it is built: a convolution skip added
    # afterwards would be trained apart on every process.
    if isinstance(model, nn.parallel.DistributedDataParallel) and options.conv_kernel_size:
        raise ValueError(
            "conv_kernel_size adds parameters, which a DistributedDataParallel built before "
            "would not synchronise: patch the model before wrapping it"
        )


# --------------------------------------------------------------------------- torch.nn


def _patched_modules(model: nn.Module) -> list[NystromMultiheadAttention]:
    return list(
        {id(m): m for m in model.modules() if isinstance(m, NystromMultiheadAttention)}.values()
    )


def _check_patched(model: nn.Module, options: NystromOptions) -> None:
    """Before anything changes: a convolution skip cannot be added to a module made without."""
    k = options.conv_kernel_size
    if k is not None and any(m.conv_kernel_size is None for m in _patched_modules(model)):
        raise ValueError(
            f"conv_kernel_size={k}: {type(model).__name__} was patched without convolution "
            "skips, and one cannot be added to a NystromMultiheadAttention afterwards; patch "
            "the original model, or pass conv_kernel_size=None to change the other settings"
        )


def _update_patched(model: nn.Module, options: NystromOptions) -> int:
    """Give every NystromMultiheadAttention of ``model`` (made earlier too) the settings of this
    call; their convolution skips, possibly trained, stay. Returns how many."""
    patched = _patched_modules(model)
    for m in patched:
        m.options = options.replace(conv_kernel_size=m.conv_kernel_size)
    return len(patched)


def _patch_multihead_attention(model: nn.Module, options: NystromOptions) -> list[str]:
    targets = []
    for parent_name, parent in model.named_modules():
        # _modules, not named_children(): that lists a module held twice by one parent once.
        for child_name, child in parent._modules.items():
            if type(child) is not nn.MultiheadAttention:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(parent, nn.TransformerDecoderLayer) and child_name == "self_attn":
                raise ValueError(
                    f"{full} is the self-attention of an nn.TransformerDecoderLayer, which is "
                    "causal: Nyström landmarks would leak future tokens. Patch the encoder only, "
                    "e.g. nystromer.patch(model.encoder)."
                )
            targets.append((full, parent, child_name, child))
    # A module shared by several places (tied weights) gets one replacement, shared the same way.
    replacements: dict[int, NystromMultiheadAttention] = {}
    for _, parent, child_name, child in targets:
        if id(child) not in replacements:
            replacements[id(child)] = NystromMultiheadAttention.from_multihead_attention(
                child, options=options
            )
        # _modules, not setattr: works for ModuleList / Sequential children named "0", "1", ….
        parent._modules[child_name] = replacements[id(child)]
    if targets:
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
                # Its inference path would pack the batch into a nested tensor only for the
                # attention to unpack it again; NystromMultiheadAttention takes the mask directly.
                m.use_nested_tensor = False
    return [full for full, *_ in targets]


# --------------------------------------------------------------------------- transformers


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers
    for a plain torch model)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _patch_transformers(model: nn.Module, options: NystromOptions) -> None:
    modules = hf.check_supported(model)
    existing = hf.conv_kernel_size(model)
    if existing is not None and options.conv_kernel_size != existing:
        # Patched before: its (possibly trained) skips stay, and the config says so.
        logger.info("patch: keeping the existing convolution skips (kernel size %d)", existing)
        options = options.replace(conv_kernel_size=existing)
    elif options.conv_kernel_size is not None:
        hf.add_conv_skips(model, options.conv_kernel_size)
    # Each attention module reads its own config: in a composite model (SigLIP's text and
    # vision encoders) that is a sub-config, which must carry the settings too.
    configs = {id(model.config): model.config}
    configs.update((id(m.config), m.config) for _, m in modules)
    for config in configs.values():
        hf.set_options(config, options)
    hf.register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(hf.IMPLEMENTATION)
    logger.info(
        "patch: %s attention %r -> %r (%s) in %d modules: %s",
        type(model).__name__,
        previous,
        hf.IMPLEMENTATION,
        options,
        len(modules),
        ", ".join(n for n, _ in modules),
    )

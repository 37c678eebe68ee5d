"""Give an existing model Nyström attention in place, keeping its trained weights.

Two kinds of model are handled (docs/models.md, "Patching existing models"):

- every ``torch.nn.MultiheadAttention`` (nn.TransformerEncoder, hand-written models) is replaced
  by :class:`~nystromer.attention.NystromMultiheadAttention`, which shares its parameters;
- transformers' BERT, RoBERTa and ViT are switched through transformers' own attention
  interface: an attention function and a key-padding mask builder are registered under a name
  and ``model.set_attn_implementation(name)`` selects them. No module is replaced, so the
  checkpoint layout, ``save_pretrained`` and everything else of the model stay as they were.
  (Replacing transformers' attention modules would tie us to their private class layouts, which
  change between releases; the attention interface is their public extension point.)

Only bidirectional key-padding attention can be approximated this way: causal (decoder)
attention and masks other than key padding are refused with ValueError.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import check_shape
from .attention import NystromMultiheadAttention, ValueConv, multihead_nystrom_attention
from .options import NystromOptions, resolve_options

__all__ = [
    "AttentionCall",
    "SUPPORTED_TRANSFORMERS_MODEL_TYPES",
    "attention_probe",
    "is_transformers_model",
    "patch",
]

logger = logging.getLogger(__name__)

# model_type values whose attention goes through transformers' AttentionInterface and that the
# tests check (with transformers 5.24).
SUPPORTED_TRANSFORMERS_MODEL_TYPES = ("bert", "roberta", "vit")


@dataclass(frozen=True)
class AttentionCall:
    """What one call of a patched transformers attention layer computed, for
    :func:`attention_probe`.

    Attributes:
        module: the transformers attention module (its ``nystrom_conv``, if any, is the skip).
        query, key, value: (B, H, n, d), as transformers passed them.
        mask: (B, n_k) bool, True for real keys, or None.
        scale: the score scale transformers passed (None: 1/sqrt(d)).
        output: (B, H, n_q, d), the Nyström attention output *before* the convolution skip.
        options: the Nyström settings of the attention function (``conv_kernel_size`` None:
            the skip belongs to the module).
    """

    module: nn.Module
    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    scale: float | None
    output: Tensor
    options: NystromOptions


_PROBE: contextvars.ContextVar[Callable[[AttentionCall], None] | None] = contextvars.ContextVar(
    "nystromer_attention_probe", default=None
)


@contextlib.contextmanager
def attention_probe(probe: Callable[[AttentionCall], None]) -> Iterator[None]:
    """Within the block, call ``probe(call)`` from every patched transformers attention layer.

    ``call`` is an :class:`AttentionCall`: the layer's inputs and its Nyström output before the
    convolution skip, e.g. to compare it with exact attention (:func:`nystromer.calibrate`
    fits the skips this way). The probe runs inside the forward pass, before the skip is added
    (possibly in place: copy ``call.output`` to keep it); an exception it raises ends the pass.
    Probes do not nest: the innermost one is called. Layers patched from
    ``torch.nn.MultiheadAttention`` are modules: use forward hooks there.
    """
    token = _PROBE.set(probe)
    try:
        yield
    finally:
        _PROBE.reset(token)


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
            BERT, RoBERTa or ViT model (any head).
        num_landmarks: m, landmarks per head.
        pinv_iterations: pseudo-inverse iterations.
        conv_kernel_size: odd k adds the paper's depthwise convolution skip on the values to each
            attention layer, initialised to zero (new parameters ``conv.weight`` /
            ``nystrom_conv.weight``: fine-tune them). None adds nothing.
        kmeans_iterations: k-means refinement of the landmarks (see
            :func:`nystromer.nystrom_attention`); 0 keeps the paper's segment means.
        options: the four settings above as one :class:`~nystromer.NystromOptions`, instead
            of the keywords (which must then keep their defaults).

    Returns:
        ``model``, patched. What was replaced is logged (logger ``nystromer.patching``, INFO).

    Raises:
        ValueError: decoder / causal attention, an unsupported transformers model, or nothing
            to patch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = resolve_options(
        options, num_landmarks, pinv_iterations, kmeans_iterations, conv_kernel_size
    )
    if is_transformers_model(model):
        _patch_transformers(model, options)
        return model
    replaced = _patch_multihead_attention(model, options)
    if not replaced:
        if any(isinstance(m, NystromMultiheadAttention) for m in model.modules()):
            logger.info("patch: %s is already patched; nothing replaced", type(model).__name__)
            return model
        raise ValueError(
            f"found nothing to patch in {type(model).__name__}: no torch.nn.MultiheadAttention, "
            f"and not a transformers model of type {SUPPORTED_TRANSFORMERS_MODEL_TYPES}"
        )
    logger.info(
        "patch: replaced %d nn.MultiheadAttention by NystromMultiheadAttention (%s): %s",
        len(replaced),
        options,
        ", ".join(replaced),
    )
    return model


# --------------------------------------------------------------------------- torch.nn


def _patch_multihead_attention(model: nn.Module, options: NystromOptions) -> list[str]:
    targets = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
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
    for _, parent, child_name, child in targets:
        # _modules, not setattr: works for ModuleList / Sequential children named "0", "1", ….
        parent._modules[child_name] = NystromMultiheadAttention.from_multihead_attention(
            child, options=options
        )
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
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TRANSFORMERS_MODEL_TYPES:
        raise ValueError(
            f"patching transformers models of type {model_type!r} is not supported; supported: "
            f"{SUPPORTED_TRANSFORMERS_MODEL_TYPES} (for Nyströmformer checkpoints use "
            "nystromer.models)"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(
            f"{type(model).__name__} is configured as a decoder (is_decoder / "
            "add_cross_attention): its self-attention is causal, which Nyström attention "
            "cannot approximate without leaking future tokens"
        )
    attention_modules = [(name, m) for name, m in model.named_modules() if hasattr(m, "is_causal")]
    causal = [name for name, m in attention_modules if m.is_causal]
    if causal:
        raise ValueError(f"causal attention modules cannot be patched: {causal}")
    if not attention_modules:
        raise ValueError(f"found no attention modules in {type(model).__name__}")

    name = f"nystrom_m{options.num_landmarks}_i{options.pinv_iterations}"
    if options.kmeans_iterations:
        name += f"_k{options.kmeans_iterations}"
    # The registered function depends on its name only (the skip is each module's own
    # nystrom_conv), so models patched with other kernel sizes can share it.
    AttentionInterface.register(
        name,
        functools.partial(_transformers_attention, options=options.replace(conv_kernel_size=None)),
    )
    AttentionMaskInterface.register(name, _key_padding_mask)
    if options.conv_kernel_size is not None:
        heads = config.num_attention_heads
        for _, m in attention_modules:
            if hasattr(m, "nystrom_conv"):
                continue  # patched before: keep its (possibly trained) convolution
            ref = next(m.parameters())
            conv = ValueConv(heads, options.conv_kernel_size, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(conv.weight)  # the patched model starts as the original
            m.nystrom_conv = conv
    previous = config._attn_implementation
    model.set_attn_implementation(name)
    logger.info(
        "patch: %s attention %r -> %r (%s) in %d modules: %s",
        type(model).__name__,
        previous,
        name,
        options,
        len(attention_modules),
        ", ".join(n for n, _ in attention_modules),
    )


def _key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """transformers mask builder: (B, 1, 1, kv_length) bool key padding (True = attend), or
    None without padding. O(n) memory, unlike the (B, 1, n, n) masks of the built-in builders."""
    from transformers.masking_utils import bidirectional_mask_function

    if mask_function is not bidirectional_mask_function or q_offset or kv_offset:
        raise ValueError(
            "Nyström attention supports plain bidirectional attention with key padding only; "
            f"this model asked for a {getattr(mask_function, '__name__', mask_function)!s} mask"
        )
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    check_shape("attention_mask", mask, (batch_size, kv_length))
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask[:, None, None, :]


def _key_mask_from_4d(mask: Tensor, n_q: int, n_k: int) -> Tensor:
    """A (B, 1, n_q or 1, n_k) mask → (B, n_k) bool, True = real; refuse anything else."""
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        # transformers' additive masks: 0 = attend, dtype minimum (or -inf) = masked.
        masked = mask <= torch.finfo(mask.dtype).min
        if not torch.compiler.is_compiling() and not bool(((mask == 0) | masked).all()):
            raise ValueError("additive attention biases are not supported by Nyström attention")
        allowed = ~masked
    if allowed.dim() != 4 or allowed.shape[1] != 1 or allowed.shape[-1] != n_k:
        raise ValueError(
            f"attention_mask must have shape (batch, 1, {n_q} or 1, {n_k}), got "
            f"{tuple(allowed.shape)}"
        )
    if allowed.shape[2] != 1 and not torch.compiler.is_compiling():
        if not bool((allowed == allowed[:, :, :1]).all()):
            raise ValueError(
                "attention_mask masks different keys for different queries (causal or "
                "structured); Nyström attention supports key padding only"
            )
    return allowed[:, 0, 0]


def _transformers_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    options: NystromOptions,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers AttentionInterface function: (B, H, n, d) inputs → ((B, n, H, d), None)."""
    if getattr(module, "is_causal", False):
        raise ValueError("causal attention cannot use Nyström attention")
    n_q, n_k = query.shape[2], key.shape[2]
    mask = None if attention_mask is None else _key_mask_from_4d(attention_mask, n_q, n_k)
    probe = _PROBE.get()
    observe = None
    if probe is not None:

        def observe(out: Tensor) -> None:
            probe(AttentionCall(module, query, key, value, mask, scaling, out, options))

    # The skip is for self-attention; these models have no other kind once patch accepted them.
    conv = getattr(module, "nystrom_conv", None) if n_q == n_k else None
    out = multihead_nystrom_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        options,
        mask=mask,
        dropout_p=dropout,
        scale=scaling,
        conv=conv,
        observe=observe,
    )
    return out, None

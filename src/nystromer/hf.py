"""transformers integration: the attention implementation ``"nystrom"``.

``import nystromer`` registers, with transformers' ``AttentionInterface`` and
``AttentionMaskInterface``, one attention function and one mask builder under the name
``"nystrom"`` (as soon as transformers is imported; ``import nystromer`` itself does not import
it). Then, as with ``"sdpa"``::

    model = AutoModel.from_pretrained(path, attn_implementation="nystrom")
    model.set_attn_implementation("nystrom")

give every encoder whose attention goes through the interface Nyström attention. The settings
are read from the config at each call, ``config.nystrom = {"num_landmarks": 64,
"pinv_iterations": 6, "kmeans_iterations": 0, "conv_kernel_size": None}`` (missing keys take
these defaults), so ``save_pretrained`` writes them into config.json and a checkpoint carries
them. The convolution skip is a parameter of each attention module (``nystrom_conv``), which
:func:`nystromer.patch` adds and :func:`nystromer.from_pretrained` restores.

What is refused, with an error that says why (docs/models.md, "Families"): causal attention and
decoders (Nyström landmarks average over future tokens), models whose attention bypasses the
interface (refused when built with ``"nystrom"``: they would keep their own attention), masks
other than key padding or a bidirectional local window (ModernBERT's local layers, which keep
exact attention; packed sequences are refused), and attention calls given a position bias
(T5's relative attention) or other terms softmax attention does not have.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.abc
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import _cpu
from ._checks import InputTypeError, check_shape
from .attention import ValueConv, multihead_nystrom_attention
from .functional import attention_rows
from .options import NystromOptions

__all__ = [
    "CONFIG_KEY",
    "IMPLEMENTATION",
    "AttentionCall",
    "add_conv_skips",
    "attention_modules",
    "attention_probe",
    "check_supported",
    "get_options",
    "register",
    "set_options",
]

logger = logging.getLogger(__name__)

IMPLEMENTATION = "nystrom"
"""The ``attn_implementation`` name."""
CONFIG_KEY = "nystrom"
"""The config attribute (and config.json key) holding the Nyström settings as a dict."""
# Checkpoints written before the settings had their own name keep them under this key; read only.
LEGACY_CONFIG_KEY = "nystromer"
# Materialised attention weights (output_attentions=True) above this size come with a warning.
_WARN_BYTES = 1 << 30


# --------------------------------------------------------------------------- settings


def get_options(config: Any) -> NystromOptions:
    """The Nyström settings a transformers config records (defaults where it records none).

    Raises:
        TypeError: ``config.nystrom`` is not a dict (a :class:`NystromOptions` included:
            ``save_pretrained`` could not write it; store ``options.to_dict()``).
        ValueError: an unknown key or an impossible value in ``config.nystrom`` (the message
            starts with ``config.nystrom:``).
    """
    settings = getattr(config, CONFIG_KEY, None)
    if settings is None:
        settings = getattr(config, LEGACY_CONFIG_KEY, None)
    if settings is not None and not isinstance(settings, dict):
        # A NystromOptions too: it would run, but save_pretrained could not write it to JSON.
        hint = ": write options.to_dict()" if isinstance(settings, NystromOptions) else ""
        raise InputTypeError(
            f"config.{CONFIG_KEY} must be a dict of Nyström settings (config.json holds it), "
            f"got {type(settings).__name__}{hint}"
        )
    items = tuple(sorted((settings or {}).items()))
    if torch.compiler.is_compiling():
        # Traced: built directly (dynamo cannot follow the cache or from_dict's field list).
        return NystromOptions(**dict(items))
    try:
        try:
            return _options(items)
        except TypeError:  # an unhashable value (a list): validated uncached, naming the setting
            return NystromOptions.from_dict(settings)
    except ValueError as e:
        # Raised inside a forward pass: say where the setting was read.
        raise ValueError(f"config.{CONFIG_KEY}: {e}") from None


@functools.lru_cache(maxsize=64)
def _options(items: tuple[tuple[str, Any], ...]) -> NystromOptions:
    # Every attention call reads the settings: parse and validate each distinct dict once.
    return NystromOptions.from_dict(dict(items))


def set_options(config: Any, options: NystromOptions) -> None:
    """Record ``options`` in ``config`` (``config.nystrom``, saved by ``save_pretrained``)."""
    setattr(config, CONFIG_KEY, options.to_dict())
    if LEGACY_CONFIG_KEY in vars(config):
        delattr(config, LEGACY_CONFIG_KEY)


# --------------------------------------------------------------------------- capability


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of a transformers model that call the attention function:
    those with a config and an ``is_causal`` flag."""
    from transformers import PreTrainedModel

    return [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "is_causal") and hasattr(m, "config") and not isinstance(m, PreTrainedModel)
    ]


def check_supported(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Check that Nyström attention can serve ``model``; returns its attention modules.

    Raises:
        TypeError: not a transformers model.
        ValueError: its attention bypasses transformers' attention interface, it is a decoder,
            it has causal attention modules or none at all, or a relative position bias.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    if not type(model)._can_set_attn_implementation():
        raise ValueError(
            f"{name}'s attention does not go through transformers' attention interface "
            "(transformers itself keeps eager attention for it), so attn_implementation="
            f'"{IMPLEMENTATION}" cannot reach it; docs/models.md lists the families that work'
        )
    config = model.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(
            f"{name} is configured as a decoder (is_decoder / add_cross_attention): its "
            "self-attention is causal, and Nyström landmarks would leak future tokens; "
            "Nyström attention serves encoders only"
        )
    modules = attention_modules(model)
    causal = [n for n, m in modules if m.is_causal]
    if causal:
        raise ValueError(
            f"{name} has causal attention ({', '.join(causal[:3])}…): Nyström landmarks "
            "average over all keys, so future tokens would leak; use it on encoders only"
        )
    if not modules:
        raise ValueError(f"found no attention modules in {name}")
    # T5, LayoutLMv3, Data2VecVision, …: the flag transformers' own modules set (the attention
    # function's position_bias check catches the others at the first forward).
    biased = [
        n
        for n, m in model.named_modules()
        if getattr(m, "has_relative_attention_bias", False) is True
        or getattr(m, "has_relative_position_bias", False) is True
    ]
    if biased:
        raise ValueError(
            f"{name} adds a relative position bias to its attention scores ({biased[0]}): "
            "Nyström attention never forms the n×n scores, so it cannot add one"
        )
    return modules


def _check_model_type(config: Any) -> None:
    """Refuse a config whose model ignores the interface (set through from_pretrained, which
    does not ask the model class): it would apply our key-padding mask in its own attention."""
    lookup = _class_outside_interface
    if torch.compiler.is_compiling():
        # Run, not traced: transformers reads the model's source file to answer, which dynamo
        # cannot follow (fullgraph=True failed unless an eager forward had run first).
        lookup = _class_outside_interface_untraced
    class_name = lookup(getattr(config, "model_type", None))
    if class_name is not None:
        raise ValueError(
            f"{class_name}'s attention does not go through transformers' attention interface, "
            f'so attn_implementation="{IMPLEMENTATION}" cannot serve it (its own attention would '
            "misread the mask); docs/models.md lists the families that work"
        )


@functools.cache
def _class_outside_interface(model_type: str | None) -> str | None:
    """The name of ``model_type``'s model class if its attention bypasses the interface (the
    mask builder asks at every forward: the answer is looked up once per type)."""
    if model_type is None:
        return None
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    class_name = MODEL_MAPPING_NAMES.get(model_type)
    if not isinstance(class_name, str):
        return None
    import transformers

    cls = getattr(transformers, class_name, None)
    return class_name if cls is not None and not cls._can_set_attn_implementation() else None


# The answer is a constant of the model type: computed when traced, kept in the graph.
_class_outside_interface_untraced = torch.compiler.assume_constant_result(
    _class_outside_interface.__wrapped__
)


# --------------------------------------------------------------------------- convolution skips


def add_conv_skips(model: nn.Module, kernel_size: int) -> int:
    """Give each global attention module of ``model`` a convolution skip ``nystrom_conv``,
    initialised to zero (the model computes what it computed before); returns how many.

    Modules that already have one keep it (it may be trained); local sliding-window layers
    (ModernBERT's), which keep exact attention, get none.
    """
    added = 0
    for _, m in attention_modules(model):
        if hasattr(m, "nystrom_conv") or getattr(m, "sliding_window", None) is not None:
            continue
        heads = m.config.num_attention_heads  # its own config: a composite model has several
        ref = next(m.parameters())
        conv = ValueConv(heads, kernel_size, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(conv.weight)
        m.nystrom_conv = conv
        added += 1
    return added


def conv_kernel_size(model: nn.Module) -> int | None:
    """The kernel size of the convolution skips ``model`` already has, or None."""
    for _, m in attention_modules(model):
        conv = getattr(m, "nystrom_conv", None)
        if conv is not None:
            return conv.kernel_size[0]
    return None


@contextlib.contextmanager
def conv_weights_expected() -> Iterator[None]:
    """Within the block, transformers' load report does not list ``nystrom_conv`` weights as
    unexpected: :func:`nystromer.from_pretrained` loads them itself once the model exists."""
    from transformers import PreTrainedModel

    original = PreTrainedModel._adjust_missing_and_unexpected_keys

    def adjust(self, loading_info):
        original(self, loading_info)
        loading_info.unexpected_keys = {
            k for k in loading_info.unexpected_keys if "nystrom_conv" not in k
        }

    PreTrainedModel._adjust_missing_and_unexpected_keys = adjust
    try:
        yield
    finally:
        PreTrainedModel._adjust_missing_and_unexpected_keys = original


# --------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class AttentionCall:
    """What one call of Nyström attention in a transformers model computed, for
    :func:`attention_probe`.

    Attributes:
        module: the transformers attention module (its ``nystrom_conv``, if any, is the skip).
        query, key, value: (B, H, n, d), as transformers passed them (key and value heads
            repeated to H under grouped-query attention).
        mask: (B, n_k) bool, True for real keys, or None.
        scale: the score scale transformers passed (None: 1/sqrt(d)).
        output: (B, H, n_q, d), the Nyström attention output *before* the convolution skip.
        options: the Nyström settings of the call.
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
    """Within the block, call ``probe(call)`` from every Nyström attention call of a
    transformers model.

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


# --------------------------------------------------------------------------- mask builder


def _mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    config: Any = None,
    **kwargs: Any,
) -> Tensor | None:
    """transformers mask builder: (B, 1, 1, kv_length) bool key padding (True = attend), or
    None without padding, for plain bidirectional attention (O(n) memory, unlike the built-in
    (B, 1, n, n) masks); transformers' dense mask for a bidirectional local window, whose
    layers keep exact attention; an error for anything else."""
    _check_model_type(config)
    from transformers.masking_utils import bidirectional_mask_function

    if mask_function is bidirectional_mask_function and torch.compiler.is_compiling():
        # Plain encoders: every query sees every key. Under torch.compile the evaluation below
        # would read tensors back and break the graph (fullgraph=True fails); any other
        # function (windows, packed sequences) is still evaluated.
        kind = "full"
    else:
        kind = _mask_kind(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset)
    if kind == "window":
        from transformers.masking_utils import sdpa_mask

        # Never None: a window layer given no mask would attend to every key.
        kwargs["allow_is_causal_skip"] = kwargs["allow_is_bidirectional_skip"] = False
        return sdpa_mask(
            batch_size,
            q_length,
            kv_length,
            q_offset,
            kv_offset,
            mask_function,
            attention_mask,
            **kwargs,
        )
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    check_shape("attention_mask", mask, (batch_size, kv_length))
    mask = _cpu.drop_all_real(mask)
    return None if mask is None else mask[:, None, None, :]


# Mask functions are evaluated on all query rows up to this many (query, key) pairs, beyond it
# on a spread of rows, to tell their kind.
_PROBE_PAIRS = 1 << 22


# Cached per (mask function, lengths, offsets): the mask builder runs at every forward, and
# plain encoders pass the same module-level mask function each time.
@functools.lru_cache(maxsize=32)
def _mask_kind(
    mask_function: Callable | None,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
) -> str:
    """``"full"`` (every query sees every key), ``"window"`` (bidirectional, local) or an
    error: causal and other one-sided masks would need future keys kept out of the landmarks.

    Every batch row is asked: a mask function may depend on it (transformers folds packed
    sequences, marked by restarting position ids, into it per row)."""
    if mask_function is None:
        raise ValueError("Nyström attention's mask builder needs transformers' mask_function")
    if batch_size * q_length * kv_length <= _PROBE_PAIRS:
        rows = torch.arange(q_length)
    else:
        steps = max(1, _PROBE_PAIRS // (kv_length * batch_size))
        rows = torch.linspace(0, q_length - 1, steps=steps).long()
    # transformers' layout for evaluating mask functions: (batch, head, query, key).
    batch = torch.arange(batch_size)[:, None, None, None]
    q = (rows + q_offset)[:, None]
    kv = (torch.arange(kv_length) + kv_offset)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    try:
        allowed = torch.as_tensor(mask_function(batch, zero, q[None, None], kv[None, None]))
        # On the CPU, with the positions: a function may close over a tensor on the model's
        # device (transformers' packed-sequence mask does) and answer there.
        allowed = allowed.cpu()
        # A function of the positions alone gives one row for the whole batch: kept as one.
        rows_asked = batch_size if allowed.dim() == 4 and allowed.shape[0] > 1 else 1
        allowed = torch.broadcast_to(allowed, (rows_asked, 1, len(rows), kv_length))[:, 0]
    except Exception as e:  # a mask function that is not index-based
        raise ValueError(
            "Nyström attention supports key padding and bidirectional local windows only; "
            f"this model's mask function {getattr(mask_function, '__name__', mask_function)!s} "
            f"could not be evaluated ({e})"
        ) from e
    if bool(allowed.all()):
        return "full"
    future = kv > q
    if not bool((allowed & future).any()):
        raise ValueError(
            "this model asked for a causal attention mask: Nyström landmarks average over all "
            "keys, so future tokens would leak; Nyström attention serves encoders only"
        )
    if _symmetric(allowed, q, kv):
        return "window"
    raise ValueError(
        "Nyström attention supports key padding and bidirectional local windows only; this "
        f"model asked for a {getattr(mask_function, '__name__', mask_function)!s} mask"
    )


def _symmetric(allowed: Tensor, q: Tensor, kv: Tensor) -> bool:
    """Whether the allowed pairs depend on |query − key| only, as in a local window."""
    distance = (kv - q).abs().expand_as(allowed)
    width = distance[allowed].max()
    return bool((allowed == (distance <= width)).all())


# Additive mask values at or below this mask a key (see _key_mask_from_4d).
_MASKED = -1e4


def _key_mask_from_4d(mask: Tensor, n_q: int, n_k: int) -> Tensor:
    """A (B, 1, n_q or 1, n_k) mask → (B, n_k) bool, True = real; refuse anything else."""
    if mask.dtype == torch.bool:
        allowed = mask
    elif not mask.is_floating_point():
        raise ValueError(
            f"attention_mask of 4 dimensions must be bool (True = attend) or an additive float "
            f"mask (0 = attend), got {mask.dtype}"
        )
    else:
        # transformers' additive masks: 0 = attend, a large negative number = masked (the
        # dtype minimum or -inf; -10000 in older BERT code; another dtype's minimum when built
        # in another precision). From -1e4 down exp() is 0 in every float dtype: eager
        # attention gives such keys no weight.
        masked = mask <= _MASKED
        if not torch.compiler.is_compiling() and not bool(((mask == 0) | masked).all()):
            raise ValueError(
                "attention_mask: additive attention biases are not supported by Nyström "
                "attention; a float mask of 4 dimensions must hold 0 (attend) or a large "
                "negative number (masked); or pass a bool mask (True = attend)"
            )
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


# --------------------------------------------------------------------------- attention function


def _attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers AttentionInterface function: (B, H, n, d) inputs → ((B, n, H, d), weights
    or None)."""
    if sliding_window is not None:
        # A local window costs O(n·w) exactly: these layers keep exact attention.
        from transformers.integrations import sdpa_attention

        # The weights are computed below: SDPA's warning that it returns none would be wrong.
        kwargs.pop("output_attentions", None)
        out, weights = sdpa_attention.sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
        if weights is None and _attentions_requested():
            # Every layer's weights, or the tuple would skip these layers.
            weights = _window_weights(query, key, attention_mask, scaling)
        return out, weights
    if getattr(module, "is_causal", False) or kwargs.get("is_causal"):
        raise ValueError(
            f"{type(module).__name__} is causal (is_causal): Nyström landmarks would leak future "
            "tokens"
        )
    _check_no_bias(module, kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if isinstance(groups, int) and groups > 1 and key.shape[1] * groups == query.shape[1]:
        # Grouped-query attention (EuroBERT): each key and value head serves `groups` query
        # heads, repeated as transformers' eager and SDPA functions do.
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    options = get_options(module.config)
    n_q, n_k = query.shape[2], key.shape[2]
    conv = getattr(module, "nystrom_conv", None) if n_q == n_k else None
    k = options.conv_kernel_size
    if k is not None and conv is None and n_q == n_k:
        raise ValueError(
            f"config.{CONFIG_KEY} asks for a convolution skip (conv_kernel_size={k}) but "
            f"{type(module).__name__} has none: transformers does not load it; load the "
            "checkpoint with nystromer.from_pretrained(path), or add new skips with "
            f"nystromer.patch(model, conv_kernel_size={k})"
        )
    mask = None if attention_mask is None else _key_mask_from_4d(attention_mask, n_q, n_k)
    if mask is not None and mask.shape[0] == 1:
        mask = mask.expand(query.shape[0], n_k)  # one mask for the batch, as eager broadcasts
    # Probes (calibrate) watch eager forwards: dynamo cannot read a context variable.
    probe = None if torch.compiler.is_compiling() else _PROBE.get()
    observe = None
    if probe is not None:

        def observe(out: Tensor) -> None:
            probe(AttentionCall(module, query, key, value, mask, scaling, out, options))

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
    weights = None
    if _attentions_requested():
        weights = _all_rows(query, key, mask, scaling, options)
    return out, weights


# Keywords some models pass to the attention function that change what it computes (and the
# eager and SDPA functions apply); Nyström attention has no place for them.
_CHANGING_KWARGS = {
    "position_bias": "an additive position bias (relative attention, as in T5)",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "softcap": "soft-capped attention logits",
    "indices": "sparse attention indices",
    "block_indices": "sparse attention indices",
}


def _check_no_bias(module: nn.Module, kwargs: dict[str, Any]) -> None:
    """Refuse what would otherwise be dropped without a word: a model passing these computes
    something else than the softmax attention Nyström approximates."""
    for name, what in _CHANGING_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{type(module).__name__} passes {name} ({what}) to its attention function; "
                "Nyström attention cannot apply it, and leaving it out would change the model"
            )


def _attentions_requested() -> bool:
    """Whether transformers is collecting attention weights (``output_attentions=True``)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older transformers: nothing is collected this way
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _window_weights(
    query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float | None
) -> Tensor:
    """Exact softmax weights (B, H, n_q, n_k) of a local-window layer, under its dense mask."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = (query @ key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, float("-inf"))
        else:
            logits = logits + attention_mask.float()
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).to(query.dtype)


def _all_rows(
    query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None, options: NystromOptions
) -> Tensor:
    b, h, n_q, _ = query.shape
    size = b * h * n_q * key.shape[2] * query.element_size()
    if size > _WARN_BYTES:
        warnings.warn(
            f"output_attentions=True materialises the (B, H, n, n) attention matrix "
            f"({size / 2**30:.1f} GiB); nystromer.attention_rows computes only the rows you "
            "need",
            stacklevel=3,
        )
    return attention_rows(
        query,
        key,
        torch.arange(n_q, device=query.device),
        mask=mask,
        scale=scaling,
        **options.attention_kwargs(),
    )


# --------------------------------------------------------------------------- registration


def register() -> None:
    """Register ``"nystrom"`` with transformers (imports it); done by ``import nystromer``
    once transformers is imported, so calling it is needed only after unregistering."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask)
    _guard_construction()


def _guard_construction() -> None:
    """Make a model whose attention bypasses the interface refuse ``"nystrom"`` when it is built.

    transformers accepts any registered name for every model class when it resolves
    ``attn_implementation`` in ``PreTrainedModel.__init__`` (``from_pretrained``,
    ``from_config``); a class that never calls the interface (DeBERTa, WavLM, XLM, …) then runs
    its own exact attention, and those that never build a mask through it either do so without
    a word. transformers offers no per-implementation check, so its resolution method is
    wrapped (once; it acts only on ``"nystrom"``).
    """
    from transformers import PreTrainedModel

    original = getattr(PreTrainedModel, "_check_and_adjust_attn_implementation", None)
    if original is None or getattr(original, "_nystromer_guard", False):
        # (A transformers without this method resolves names elsewhere: nothing to guard.)
        return

    @functools.wraps(original)
    def check_and_adjust(self, attn_implementation, *args, **kwargs):
        resolved = original(self, attn_implementation, *args, **kwargs)
        if resolved == IMPLEMENTATION and _bypasses_interface(type(self)):
            raise ValueError(
                f"{type(self).__name__}'s attention does not go through transformers' attention "
                f'interface, so attn_implementation="{IMPLEMENTATION}" cannot reach it: it would '
                "run its own exact attention instead; docs/models.md lists the families that work"
            )
        return resolved

    check_and_adjust._nystromer_guard = True
    PreTrainedModel._check_and_adjust_attn_implementation = check_and_adjust


def _bypasses_interface(cls: type) -> bool:
    """Whether transformers found, in ``cls``'s source, attention modules that do not call the
    interface (a class whose source cannot be read, e.g. defined in a notebook, is not judged)."""
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    return (
        can_set is not None
        and not can_set()
        and getattr(cls, "_can_set_attn_implementation_cached_value", None) is False
    )


# transformers' AttentionInterface lives here: once it has run, registering is possible.
_TRIGGER = "transformers.modeling_utils"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers ``"nystrom"`` right after transformers' modeling utilities are imported, so
    that ``import nystromer`` does not import transformers (seconds) for users who do not use it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            register()
        except Exception as e:  # never break the user's transformers import
            logger.warning("could not register attn_implementation=%r: %s", IMPLEMENTATION, e)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def install() -> None:
    """Register now if transformers is imported, else as soon as it is (no import here)."""
    if _TRIGGER in sys.modules:
        register()
    elif importlib.util.find_spec("transformers") is not None and not any(
        isinstance(f, _RegisterAfterImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterAfterImport())

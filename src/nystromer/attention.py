"""Attention modules: parameters and reshapes around `nystromer.functional`.

``multihead_nystrom_attention`` is the one path from projected, head-split inputs to the merged
output (attention plus the paper's convolution skip, a :class:`ValueConv` module); the modules
here, the Nyströmformer model and patched transformers models all go through it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import _conv, _cpu
from ._checks import (
    check_odd_kernel_size,
    check_probability,
    check_shape,
    check_token_mask,
    positive_int,
)
from ._conv import sequence_conv
from ._torchutil import bypassable
from .attention_map import AttentionMap
from .functional import attention_rows, nystrom_attention
from .options import NystromOptions, resolve_options

__all__ = [
    "NystromAttention",
    "NystromMultiheadAttention",
    "ValueConv",
    "banded_sequence_conv",
    "sequence_conv",
    "multihead_nystrom_attention",
    "value_conv",
    "value_conv_skip",
]


def multihead_nystrom_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    options: NystromOptions,
    *,
    mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    conv: ValueConv | None = None,
    observe: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Nyström attention of projected, head-split inputs, plus the optional convolution skip.

    The one path from projections to the merged output that the modules, the Nyströmformer
    model and the patched transformers models share: heads to the front, the attention
    function, the convolution of the values, heads back.

    Args:
        query: (B, n_q, H, d), the projected queries with the width split into heads.
        key: (B, n_k, H, d).
        value: (B, n_k, H, d_v).
        options: the Nyström settings (``conv_kernel_size`` is the module's business: pass
            ``conv``).
        mask: (B, n_k) bool, True for real keys, or None.
        query_mask: (B, n_q) bool, True for real queries (see
            :func:`~nystromer.nystrom_attention`). The convolution skip convolves the values
            of real keys (``mask``) and is added at real queries (this mask): it is masked by
            both, or by the one given.
        dropout_p: dropout on the attention weights (pass 0 outside training).
        scale: score scale; None is 1/sqrt(d).
        conv: the paper's convolution skip, for self-attention: added on the first n_q values
            (keys appended after the sequence, as nn.MultiheadAttention's ``bias_k``, are not
            convolved).
        observe: called with the attention output (B, H, n_q, d_v) before the skip is added;
            it must not keep the tensor, which may then be updated in place.

    Returns:
        (B, n_q, H, d_v), contiguous: ``.flatten(2)`` merges the heads without a copy.
    """
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = nystrom_attention(
        q,
        k,
        v,
        mask=mask,
        query_mask=query_mask,
        scale=scale,
        dropout_p=dropout_p,
        **options.attention_kwargs(),
    )
    if observe is not None:
        observe(out)
    if conv is not None:
        n_q = q.shape[2]
        if k.shape[2] < n_q:
            raise ValueError(
                "the convolution skip is for self-attention: query and key lengths must match, "
                f"got {n_q} and {k.shape[2]}"
            )
        skip_mask = _skip_mask(mask, query_mask, n_q)
        # Not sliced when nothing is cut off: slicing's backward writes the gradient into a
        # fresh zero tensor of the values' size.
        value = v if v.shape[2] == n_q else v[:, :, :n_q]
        grad = torch.is_grad_enabled() and (out.requires_grad or conv.weight.requires_grad)
        if not bypassable(conv, ValueConv) or torch.compiler.is_compiling() or _cpu.transformed():
            # (A compiler or a torch.func transform traces the plain call; the in-place and
            # recomputing forms are for eager runs.)
            # Hooks (or a subclass's forward) must see the call and may replace its result.
            skip = conv(value, skip_mask)
            out = out + skip if grad else out.add_(skip)
        elif grad:
            out = conv.added_to(out, value, skip_mask)
        else:
            # In place when autograd does not need the attention output, a head at a time.
            conv.add_to_(out, value, skip_mask)
    return out.transpose(1, 2).contiguous()


def _skip_mask(mask: Tensor | None, query_mask: Tensor | None, n_q: int) -> Tensor | None:
    """(B, n_q) bool for the convolution skip: positions that are both real keys (their values
    enter the convolution) and real queries (the skip is added there)."""
    if mask is None or query_mask is mask:
        return query_mask
    if query_mask is None:
        return mask
    # The key mask may be longer (keys appended after the sequence, e.g. bias_k).
    return query_mask & mask[:, :n_q]


def _setting(name: str, settable: bool = True) -> property:
    """A module attribute that reads (and replaces) one field of ``module.options``."""

    def get(self) -> int | None:
        return getattr(self.options, name)

    def put(self, value: int) -> None:
        self.options = self.options.replace(**{name: value})

    doc = f"``options.{name}``" + ("; setting it replaces ``options``." if settable else ".")
    return property(get, put if settable else None, doc=doc)


class _NystromSettings:
    """The Nyström settings of an attention module, readable as attributes as they always
    were; the object behind them is ``self.options``."""

    @property
    def options(self) -> NystromOptions:
        """The module's Nyström settings; assigning replaces them, validated, except
        ``conv_kernel_size``, fixed at construction."""
        options = self._stored_options()
        if options is None:
            raise AttributeError(f"{type(self).__name__} has no options yet")
        return options

    @options.setter
    def options(self, value: NystromOptions) -> None:
        if not isinstance(value, NystromOptions):
            raise TypeError(f"options must be a NystromOptions, got {type(value).__name__}")
        current = self._stored_options()
        # A new kernel size would need a new convolution parameter: the skip would go on with
        # the old one (or none) while options, the repr and a saved config said otherwise.
        if current is not None and value.conv_kernel_size != current.conv_kernel_size:
            raise ValueError(
                f"options.conv_kernel_size is fixed when the module is made "
                f"({current.conv_kernel_size}); got {value.conv_kernel_size}. Make a new "
                f"module for another kernel size"
            )
        self.__dict__["_options"] = value
        self.__dict__.pop("options", None)

    def _stored_options(self) -> NystromOptions | None:
        # In __dict__ directly, past nn.Module's __setattr__ and the property; a module pickled
        # when ``options`` was a plain attribute still has it under that name.
        state = self.__dict__
        return state.get("_options", state.get("options"))

    num_landmarks = _setting("num_landmarks")
    pinv_iterations = _setting("pinv_iterations")
    kmeans_iterations = _setting("kmeans_iterations")
    # A new kernel size would need a new parameter: fixed at construction.
    conv_kernel_size = _setting("conv_kernel_size", settable=False)

    def _settings_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.to_dict().items())


class NystromAttention(_NystromSettings, nn.Module):
    """Multi-head Nyström attention, batch-first, a linear-cost stand-in for self-attention.

    Args:
        embed_dim: E, width of the query input and of the output.
        num_heads: H; ``embed_dim`` must be divisible by it (head size E / H).
        num_landmarks: m, landmarks per head (see :func:`~nystromer.nystrom_attention`).
        pinv_iterations: pseudo-inverse iterations (6 in the paper).
        conv_kernel_size: if set, odd k: adds the paper's depthwise convolution of the (masked)
            values along the sequence, one (k × 1) kernel per head, as a skip connection.
            Self-attention only (n_q == n_k).
        dropout: dropout probability on the attention weights (training only).
        bias: whether the four projections have a bias.
        kdim, vdim: widths of the key and value inputs (default ``embed_dim``).
        kmeans_iterations: Lloyd iterations refining the landmarks from the segment means
            (see :func:`~nystromer.nystrom_attention`); 0 keeps the paper's landmarks.
        options: the four Nyström settings above as one :class:`~nystromer.NystromOptions`,
            instead of the keywords (which must then keep their defaults). The module keeps
            them as ``self.options``; ``self.num_landmarks`` etc. read it.

    Shapes:
        query (B, n_q, E), key (B, n_k, kdim), value (B, n_k, vdim), mask (B, n_k) bool with True
        for real tokens → output (B, n_q, E).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
        conv_kernel_size: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        kmeans_iterations: int = 0,
        options: NystromOptions | None = None,
    ) -> None:
        super().__init__()
        embed_dim = positive_int("embed_dim", embed_dim)
        num_heads = positive_int("num_heads", num_heads)
        kdim = None if kdim is None else positive_int("kdim", kdim)
        vdim = None if vdim is None else positive_int("vdim", vdim)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        self.options = resolve_options(
            options, num_landmarks, pinv_iterations, kmeans_iterations, conv_kernel_size
        )
        check_probability("dropout", dropout)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.conv: ValueConv | None = None
        if self.options.conv_kernel_size is not None:
            self.conv = ValueConv(num_heads, self.options.conv_kernel_size)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` to ``key``/``value`` (both default to ``query``).

        Args:
            query: (B, n_q, E).
            key: (B, n_k, kdim) or None for self-attention.
            value: (B, n_k, vdim) or None (defaults to ``key``).
            mask: (B, n_k) bool, True for real tokens.

        Returns:
            (B, n_q, E); rows of padded queries (self-attention) are the output bias only.
        """
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        out = multihead_nystrom_attention(
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(key)),
            self._heads(self.v_proj(value)),
            self.options,
            mask=mask,
            query_mask=_cross_query_mask(query, key, mask),
            dropout_p=self.dropout if self.training else 0.0,
            conv=self.conv,
        )
        return self.out_proj(out.flatten(2))

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor | None = None) -> None:
        """Raise ValueError naming the first input whose shape does not fit (``value`` None:
        the attention map, which needs no values)."""
        inputs = [("query", query, self.embed_dim), ("key", key, self.kdim)]
        if value is None:
            value = key
        else:
            inputs.append(("value", value, self.vdim))
        for name, t, width in inputs:
            if t.dim() != 3 or t.shape[-1] != width:
                raise ValueError(
                    f"{name} must have shape (batch, seq_len, {width}), got {tuple(t.shape)}"
                )
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"query, key and value must share the batch size and key/value the length, got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if self.conv is not None and query.shape[1] != key.shape[1]:
            raise ValueError(
                "conv_kernel_size is for self-attention: query and key lengths must match, "
                f"got {query.shape[1]} and {key.shape[1]}"
            )

    def attention_map(
        self, query: Tensor, key: Tensor | None = None, *, mask: Tensor | None = None
    ) -> AttentionMap:
        """The attention matrix that :meth:`forward` multiplies the values by, row by row.

        Indexing the result as the dense (B, H, n_q, n_k) tensor computes only the rows named,
        e.g. ``module.attention_map(x)[:, :, 0]``, a class token's heatmap for every head,
        in O((m + r)·n_k) memory per head; the whole matrix only with ``.full()``. A row is
        F·A⁺·B's (:func:`~nystromer.attention_rows`) for this module's projected queries and
        keys: times the projected values, plus the convolution skip, it is :meth:`forward`'s
        output before ``out_proj`` (without dropout, which the map leaves out).

        Args:
            query: (B, n_q, E).
            key: (B, n_k, kdim) or None for self-attention.
            mask: (B, n_k) bool, True for real tokens, as for :meth:`forward`.

        Returns:
            an :class:`~nystromer.attention_map.AttentionMap` of shape (B, H, n_q, n_k). The
            projections are computed now (with autograd, if enabled); the rows when indexed.
        """
        key = query if key is None else key
        self._check_inputs(query, key)
        b, n_q, _ = query.shape
        n_k = key.shape[1]
        if mask is not None:
            check_token_mask("mask", mask)
            check_shape("mask", mask, (b, n_k), "batch, key length")
            # Read when rows are asked for: a copy (B·n_k bools) keeps them this call's when
            # the caller reuses the mask's memory.
            mask = mask.clone()
        q = self._heads(self.q_proj(query)).transpose(1, 2)  # (B, H, n_q, d)
        k = self._heads(self.k_proj(key)).transpose(1, 2)  # (B, H, n_k, d)
        settings = self.options.attention_kwargs()
        query_mask = _cross_query_mask(query, key, mask)

        def rows(b_sel: slice, h_sel: slice, index: Tensor) -> Tensor:
            sample_mask = None if mask is None else mask[b_sel]
            sample_query_mask = None if query_mask is None else query_mask[b_sel]
            return attention_rows(
                q[b_sel, h_sel], k[b_sel, h_sel], index, mask=sample_mask,
                query_mask=sample_query_mask, **settings,
            )  # fmt: skip

        return AttentionMap(rows, (b, self.num_heads, n_q, n_k), q.dtype, q.device)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            + self._settings_repr()
        )


def _cross_query_mask(query: Tensor, key: Tensor, mask: Tensor | None) -> Tensor | None:
    """The query mask of :class:`NystromAttention`: all queries real in cross-attention (key
    not query) of equal lengths, where the attention function would otherwise take the key
    mask for the query mask; None (the function's default) otherwise."""
    if not isinstance(mask, Tensor) or key is query or query.shape[1] != key.shape[1]:
        return None  # (a mask that is no tensor is refused by the attention function)
    return torch.ones(query.shape[0], query.shape[1], dtype=torch.bool, device=mask.device)


class ValueConv(nn.Conv2d):
    """The paper's depthwise convolution of the values along the sequence: the skip that
    :class:`NystromAttention` adds with ``conv_kernel_size``.

    An ``nn.Conv2d(H, H, (k, 1), padding=(k // 2, 0), groups=H, bias=False)``, one (k × 1)
    kernel per head shared by the head's features: weight (H, 1, k, 1), as in the authors' code
    and transformers' checkpoints, so state dicts load unchanged. Its forward takes the key
    padding mask and calls ``nystromer._conv.masked_conv``: the convolution as one over H·d
    channels, channels-last (the form of :func:`sequence_conv`, which runs several times faster
    on the CPU than this H-channel form), with padding zeroed before and after.

    Args:
        num_heads: H.
        kernel_size: k, odd (the length is kept).
        device, dtype: of the weight.
    """

    def __init__(
        self,
        num_heads: int,
        kernel_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_odd_kernel_size("kernel_size", kernel_size)
        super().__init__(
            num_heads,
            num_heads,
            kernel_size=(kernel_size, 1),
            padding=(kernel_size // 2, 0),
            groups=num_heads,
            bias=False,
            device=device,
            dtype=dtype,
        )

    def forward(self, value: Tensor, mask: Tensor | None = None) -> Tensor:
        """Convolve each head's values along the sequence, padding-correct.

        Padding is zeroed before the convolution, so a real position sees what it would see in
        the unpadded sequence (the convolution's own zero padding), and zeroed again after it.

        Args:
            value: (B, H, n, d).
            mask: (B, n) bool, True for real tokens, or None.

        Returns:
            (B, H, n, d), zero at padded positions.
        """
        return _conv.masked_conv(value, self.weight, self.bias, mask)

    def add_to_(self, out: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
        """``out += self(value, mask)`` in place, a block of samples and positions at a time,
        so that the convolution's temporaries stay small (not for autograd).

        Args:
            out: (B, H, n, d), updated in place and returned.
            value, mask: as for :meth:`forward`.
        """
        return _conv.add_(out, value, self.weight, self.bias, mask)

    def added_to(self, out: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
        """``out + self(value, mask)`` for autograd, keeping nothing of its own for the
        backward, which recomputes what it needs a block at a time. Plain
        autograd would allocate the convolution's output and the sum whole (measured in
        docs/benchmarks.md, TransMIL layer).

        Args:
            out: (B, H, n, d).
            value, mask: as for :meth:`forward`.

        Returns:
            (B, H, n, d), a new tensor in out's memory layout.
        """
        return _conv.added(out, value, self.weight, self.bias, mask)


def banded_sequence_conv(value: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Deprecated: use :func:`sequence_conv` (the same convolution)."""
    warnings.warn(
        "nystromer.attention.banded_sequence_conv is deprecated; use "
        "nystromer.attention.sequence_conv",
        DeprecationWarning,
        stacklevel=2,
    )
    return sequence_conv(value, weight, bias)


def value_conv(
    num_heads: int,
    kernel_size: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ValueConv:
    """Deprecated: use ``ValueConv(num_heads, kernel_size, device=..., dtype=...)``."""
    warnings.warn(
        "nystromer.attention.value_conv is deprecated; use nystromer.attention.ValueConv",
        DeprecationWarning,
        stacklevel=2,
    )
    return ValueConv(num_heads, kernel_size, device=device, dtype=dtype)


def value_conv_skip(conv: nn.Conv2d, value: Tensor, mask: Tensor | None) -> Tensor:
    """Deprecated: call the :class:`ValueConv` module, ``conv(value, mask)``.

    Another ``nn.Conv2d`` over (B, H, n, d) values is applied as it is, padding zeroed before
    and after it.
    """
    warnings.warn(
        "nystromer.attention.value_conv_skip is deprecated; call the ValueConv module: "
        "conv(value, mask)",
        DeprecationWarning,
        stacklevel=2,
    )
    if isinstance(conv, ValueConv):
        return conv(value, mask)
    if mask is None:
        return conv(value)
    keep = mask[:, None, :, None].to(value.dtype)
    return conv(value * keep) * keep


def _keep_off_fused_encoder_path(module: nn.Module, args: tuple) -> None:
    # A forward pre-hook that changes nothing. nn.TransformerEncoderLayer has a fused inference
    # path that reads self_attn.in_proj_weight and computes exact attention itself, never calling
    # self_attn; it declines that path when any submodule has a hook, so ours always runs.
    return None


def _padding_from_mask(mask: Tensor, name: str, check_off_cpu: bool = True) -> Tensor:
    """torch's mask conventions → bool, True where masked; refuse additive biases (off the
    CPU only if ``check_off_cpu``: there the check waits for the device)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    masked = mask <= torch.finfo(mask.dtype).min  # -inf or the dtype's minimum
    check = check_off_cpu or mask.device.type == "cpu"
    if check and not torch.compiler.is_compiling() and not bool(((mask == 0) | masked).all()):
        raise ValueError(
            f"{name} holds additive biases other than 0 and -inf; Nyström attention supports "
            "masking padding keys only"
        )
    return masked


class NystromMultiheadAttention(_NystromSettings, nn.MultiheadAttention):
    """Drop-in replacement for :class:`torch.nn.MultiheadAttention` with Nyström attention.

    Same constructor, parameters and state-dict keys (``in_proj_weight``, ``in_proj_bias`` or
    ``q/k/v_proj_weight``, ``out_proj.*``, ``bias_k``, ``bias_v``), same ``forward`` signature
    and layouts (``batch_first``, unbatched inputs), so trained weights load unchanged and
    :class:`torch.nn.TransformerEncoder` runs it. Differences:

    - ``need_weights=True`` returns ``None`` for the weights: the n×n attention matrix is what
      the method never forms.
    - Masks: only key padding. ``key_padding_mask`` (True or -inf = padding, torch's convention)
      and an ``attn_mask`` that masks the same keys for every query and head are accepted;
      causal masks, ``is_causal=True`` and other additive biases raise ValueError (off the
      CPU a float ``key_padding_mask`` is not checked, as that would wait for the device at
      every call: its entries at the dtype's minimum or -inf are padding).
    - Self-attention is recognised by ``query is key``: then padded query positions do not
      shape the landmarks, and their outputs are the output-projection bias.

    Args (beyond nn.MultiheadAttention's):
        num_landmarks: m (see :func:`~nystromer.nystrom_attention`); inputs of at most m keys
            get exact softmax attention, identical to nn.MultiheadAttention.
        pinv_iterations: pseudo-inverse iterations.
        kmeans_iterations: k-means refinement of the landmarks (0: the paper's segment means).
        conv_kernel_size: odd k adds the paper's depthwise convolution skip on the values
            (self-attention only), initialised to zero so the module starts as plain attention;
            its weight appears as ``conv.weight`` in the state dict.
        options: these four settings as one :class:`~nystromer.NystromOptions`, instead of
            the keywords (which must then keep their defaults); kept as ``self.options``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
        conv_kernel_size: int | None = None,
        kmeans_iterations: int = 0,
        options: NystromOptions | None = None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        self.options = resolve_options(
            options, num_landmarks, pinv_iterations, kmeans_iterations, conv_kernel_size
        )
        self.conv: ValueConv | None = None
        if self.options.conv_kernel_size is not None:
            self.conv = ValueConv(
                num_heads, self.options.conv_kernel_size, device=device, dtype=dtype
            )
            nn.init.zeros_(self.conv.weight)
        self.register_forward_pre_hook(_keep_off_fused_encoder_path)

    @classmethod
    def from_multihead_attention(
        cls,
        module: nn.MultiheadAttention,
        *,
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
        conv_kernel_size: int | None = None,
        kmeans_iterations: int = 0,
        options: NystromOptions | None = None,
    ) -> NystromMultiheadAttention:
        """A NystromMultiheadAttention sharing ``module``'s parameters (the same Parameter
        objects, so an optimizer built before the swap keeps updating them).

        The Nyström settings are the constructor's, as keywords or as ``options``.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(
                f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}"
            )
        ref = module.out_proj.weight
        new = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device=ref.device,
            dtype=ref.dtype,
            options=resolve_options(
                options, num_landmarks, pinv_iterations, kmeans_iterations, conv_kernel_size
            ),
        )
        result = new.load_state_dict(module.state_dict(keep_vars=True), strict=False, assign=True)
        if result.unexpected_keys or set(result.missing_keys) - {"conv.weight"}:
            raise RuntimeError(f"parameter layouts differ: {result}")  # cannot happen for MHA
        new.train(module.training)
        return new

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        """Attention of ``query`` over ``key``/``value``, as nn.MultiheadAttention.forward.

        Args:
            query: (L, N, E), or (N, L, E) with ``batch_first``, or (L, E) unbatched; a nested
                tensor (from nn.TransformerEncoder) for self-attention.
            key: (S, N, kdim) / (N, S, kdim) / (S, kdim).
            value: (S, N, vdim) / (N, S, vdim) / (S, vdim).
            key_padding_mask: (N, S) or (S,); bool True, or float -inf, marks padding.
            need_weights, average_attn_weights: accepted for compatibility; weights are None.
            attn_mask: (L, S) or (N·num_heads, L, S); accepted only if it masks the same keys
                for every query and head (then it is key padding); otherwise ValueError.
            is_causal: must be False.

        Returns:
            ``(attn_output, None)``, attn_output in the layout of ``query`` with width E.
        """
        if is_causal:
            raise ValueError(
                "is_causal=True is not supported: Nyström landmarks average over the whole "
                "sequence and would leak future tokens. Keep nn.MultiheadAttention for causal "
                "(decoder) self-attention."
            )
        if query.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, attn_mask)
        self_attention = query is key
        # One projection for all three only when they are one tensor (mha(x, x, y) projects y).
        joint = self_attention and key is value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        for name, t, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.dim() != 3 or t.shape[-1] != width:
                layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
                raise ValueError(
                    f"{name} must be {layout} or unbatched (L, E) with width {width}, got shape "
                    f"{tuple(t.shape)} (batch_first={self.batch_first})"
                )
        b, n_q, _ = query.shape
        n_k = key.shape[1]
        if key.shape[:2] != value.shape[:2] or key.shape[0] != b:
            raise ValueError(
                "query, key and value must share the batch size and key/value the length, got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} (batch first)"
            )
        pad = self._key_padding(key_padding_mask, attn_mask, b, n_q, n_k)

        if self.conv is not None and not self_attention:
            raise ValueError(
                "conv_kernel_size is for self-attention: call with query, key and value "
                "being the same tensor"
            )
        q, k, v = self._project(query, key, value, joint)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(b, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(b, 1, -1)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(b, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, v.new_zeros(b, 1, self.embed_dim)], dim=1)
        extra = k.shape[1] - n_k  # appended bias / zero keys: always real
        real = None
        if pad is not None:
            real = ~pad
            if extra:
                real = torch.cat([real, real.new_ones(b, extra)], dim=1)
        query_mask = None
        if real is not None and self_attention:
            # The key mask itself when no key was appended: the attention function then knows
            # the queries are the keys (no separate check for samples of few real queries).
            query_mask = real if extra == 0 else real[:, :n_q]
        elif real is not None and real.shape[1] == n_q:
            # Cross-attention of equal lengths: the key mask says nothing about the queries.
            query_mask = real.new_ones(b, n_q)
        out = multihead_nystrom_attention(
            *(t.unflatten(-1, (self.num_heads, self.head_dim)) for t in (q, k, v)),
            self.options,
            mask=real,
            query_mask=query_mask,
            dropout_p=self.dropout if self.training else 0.0,
            conv=self.conv,
        )
        out = self.out_proj(out.flatten(2))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, joint: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v projected; ``joint``: query, key and value are one tensor."""
        linear = nn.functional.linear
        bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        if self._qkv_same_embed_dim:
            if joint:
                # One matmul for all three projections, as nn.MultiheadAttention does.
                return linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return linear(query, w_q, b_q), linear(key, w_k, b_k), linear(value, w_v, b_v)

    def _key_padding(
        self,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        b: int,
        n_q: int,
        n_k: int,
    ) -> Tensor | None:
        """Both masks → (B, n_k) bool, True = padding; None when nothing is masked."""
        pad = None
        if key_padding_mask is not None:
            check_shape("key_padding_mask", key_padding_mask, (b, n_k), "batch, key length")
            # nn.TransformerEncoder hands every layer its padding as a float mask (0 / -inf):
            # off the CPU its values are not checked, which would wait for the device at
            # every layer of every call.
            pad = _padding_from_mask(key_padding_mask, "key_padding_mask", check_off_cpu=False)
        if attn_mask is not None:
            masked = _padding_from_mask(attn_mask, "attn_mask")
            h = self.num_heads
            if masked.shape == (n_q, n_k):
                rows = masked[None, None]
            elif masked.shape == (b * h, n_q, n_k):
                rows = masked.view(b, h, n_q, n_k)
            else:
                raise ValueError(
                    f"attn_mask must have shape ({n_q}, {n_k}) or ({b * h}, {n_q}, {n_k}), got "
                    f"{tuple(attn_mask.shape)}"
                )
            if not torch.compiler.is_compiling() and not bool((rows == rows[:, :1, :1]).all()):
                raise ValueError(
                    "attn_mask masks different keys for different queries or heads (a causal or "
                    "structured mask); Nyström attention supports key padding only. Pass padding "
                    "as key_padding_mask."
                )
            from_attn = rows[:, 0, 0].expand(b, n_k)
            pad = from_attn if pad is None else pad | from_attn
        return pad

    def _forward_nested(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> tuple[Tensor, None]:
        # nn.TransformerEncoder packs padded batches into nested tensors in inference; we unpack
        # to a padded batch plus mask, which is what the attention needs anyway.
        if not (query is key and key is value) or not self.batch_first:
            raise ValueError(
                "nested tensor inputs are supported for batch-first self-attention only"
            )
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError("masks cannot be combined with nested tensor inputs")
        lengths = [t.shape[0] for t in query.unbind()]
        padded = torch.nested.to_padded_tensor(query, 0.0)
        pad = torch.arange(padded.shape[1], device=padded.device)[None, :] >= torch.tensor(
            lengths, device=padded.device
        ).view(-1, 1)
        # self.forward, not self(...): this call's hooks have run already, on the nested input.
        out, _ = self.forward(padded, padded, padded, key_padding_mask=pad, need_weights=False)
        parts = [o[:length] for o, length in zip(out.unbind(), lengths, strict=True)]
        return torch.nested.as_nested_tensor(parts, layout=query.layout), None

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"batch_first={self.batch_first}, " + self._settings_repr()
        )

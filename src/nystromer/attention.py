"""Attention modules: parameters and reshapes around `nystromer.functional`."""

from __future__ import annotations

from torch import Tensor, nn

from .functional import nystrom_attention

__all__ = ["NystromAttention"]


class NystromAttention(nn.Module):
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
    ) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        if (
            isinstance(num_landmarks, bool)
            or not isinstance(num_landmarks, int)
            or num_landmarks < 1
        ):
            raise ValueError(f"num_landmarks must be an integer ≥ 1, got {num_landmarks!r}")
        if pinv_iterations < 0:
            raise ValueError(f"pinv_iterations must be ≥ 0, got {pinv_iterations!r}")
        if conv_kernel_size is not None and (conv_kernel_size < 1 or conv_kernel_size % 2 == 0):
            raise ValueError(
                f"conv_kernel_size must be an odd integer ≥ 1 (or None), got {conv_kernel_size!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.dropout = dropout
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.conv: nn.Conv2d | None = None
        if conv_kernel_size is not None:
            # Weight layout (H, 1, k, 1), as in the authors' code and transformers' checkpoints.
            self.conv = nn.Conv2d(
                num_heads,
                num_heads,
                kernel_size=(conv_kernel_size, 1),
                padding=(conv_kernel_size // 2, 0),
                groups=num_heads,
                bias=False,
            )

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

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
        for name, t, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.dim() != 3 or t.shape[-1] != width:
                raise ValueError(
                    f"{name} must have shape (batch, seq_len, {width}), got {tuple(t.shape)}"
                )
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"query, key and value must share the batch size and key/value the length, got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        out = nystrom_attention(
            q,
            k,
            v,
            num_landmarks=self.num_landmarks,
            mask=mask,
            pinv_iterations=self.pinv_iterations,
            dropout_p=self.dropout if self.training else 0.0,
        )
        if self.conv is not None:
            if q.shape[2] != k.shape[2]:
                raise ValueError(
                    "conv_kernel_size is for self-attention: query and key lengths must match, "
                    f"got {q.shape[2]} and {k.shape[2]}"
                )
            # Padding is zeroed first so the skip at real positions sees what it would see
            # for the unpadded sequence (the convolution's own zero padding).
            v_real = v if mask is None else v * mask[:, None, :, None].to(v.dtype)
            skip = self.conv(v_real)
            if mask is not None:
                skip = skip * mask[:, None, :, None].to(skip.dtype)
            out = out + skip
        b, _, n_q, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n_q, self.embed_dim))

    def extra_repr(self) -> str:
        conv = None if self.conv is None else self.conv.kernel_size[0]
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}, "
            f"conv_kernel_size={conv}, dropout={self.dropout}"
        )

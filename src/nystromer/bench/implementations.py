"""The registry of attention implementations that the benchmarks loop over: ours, the naive
formula, exact attention and the peers (optional: :func:`available_implementations` lists the
installed ones). docs/benchmarks.md says what each is and in which layout it gets its inputs.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import _cpu, reference
from ..functional import nystrom_attention, softmax_attention

__all__ = [
    "AttentionConfig",
    "AttentionRunner",
    "Implementation",
    "IMPLEMENTATIONS",
    "PEERS",
    "register_implementation",
    "get_implementation",
    "available_implementations",
    "unavailable_reason",
    "naive_nystrom_attention",
]


@dataclass(frozen=True)
class AttentionConfig:
    """The shape of one benchmark problem, fixed when a runner is built: H, d, n (peers that
    fix the length at construction need it), m, the pseudo-inverse iterations, and where and
    in what precision the runner's modules live."""

    heads: int
    head_dim: int
    seq_len: int
    num_landmarks: int = 64
    pinv_iterations: int = 6
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


class AttentionRunner:
    """A prepared implementation; the default layout is (B, H, n, d) in and out.

    ``prepare`` (unmeasured) turns (B, H, n, d) inputs and a (B, n) bool mask into the
    arguments of ``run``; fresh copies among them are leaves, and ``grad_args`` are the
    positions of those a backward pass differentiates to (the inputs). ``run`` (measured) is the
    attention math, returning the native output, of ``output_shape``; ``to_bhnd`` turns that
    into (B, H, n, d). ``prepare_grad`` (unmeasured) puts a contiguous output gradient in the
    layout the implementation's output has in a model.
    """

    grad_args: tuple[int, ...] = (0, 1, 2)

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple:
        return (q, k, v, mask)

    def prepare_grad(self, grad: Tensor) -> Tensor:
        return grad

    def run(self, *prepared) -> Tensor:
        raise NotImplementedError

    def to_bhnd(self, out: Tensor) -> Tensor:
        return out

    def output_shape(self, batch: int, heads: int, seq_len: int, head_dim: int) -> tuple:
        return (batch, heads, seq_len, head_dim)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, H, n, d) query, key, value and a (B, n) mask → (B, H, n, d) output."""
        return self.to_bhnd(self.run(*self.prepare(q, k, v, mask)))


@dataclass(frozen=True)
class Implementation:
    """One registry entry: its ``name`` (in tables and on the command line), a one-line
    ``description``, ``build(config) -> AttentionRunner``, the import names it ``requires``
    (peers only), ``supports(config, padded)``: None or why the configuration is outside what it
    accepts (e.g. n not a multiple of m), and whether it ``is_peer`` (another project's)."""

    name: str
    description: str
    build: Callable[[AttentionConfig], AttentionRunner]
    requires: tuple[str, ...] = ()
    supports: Callable[[AttentionConfig, bool], str | None] = lambda config, padded: None
    is_peer: bool = False


IMPLEMENTATIONS: dict[str, Implementation] = {}


def register_implementation(impl: Implementation) -> Implementation:
    """Add ``impl`` to :data:`IMPLEMENTATIONS` (replacing an entry of the same name)."""
    IMPLEMENTATIONS[impl.name] = impl
    return impl


def get_implementation(name: str) -> Implementation:
    """The registry entry called ``name``; ValueError naming the known ones otherwise."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {name!r}; expected one of {sorted(IMPLEMENTATIONS)}"
        )
    return IMPLEMENTATIONS[name]


def unavailable_reason(name: str) -> str | None:
    """None when ``name`` can run here, else why not (e.g. its package is not installed)."""
    missing = [m for m in get_implementation(name).requires if importlib.util.find_spec(m) is None]
    return f"not installed (python package(s) {', '.join(missing)} missing)" if missing else None


def available_implementations() -> list[str]:
    """Names of the registered implementations whose requirements are installed."""
    return [name for name in IMPLEMENTATIONS if unavailable_reason(name) is None]


def naive_nystrom_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    num_landmarks: int = 64,
    mask: Tensor | None = None,
    pinv_iterations: int = 6,
    scale: float | None = None,
) -> Tensor:
    """The paper's formula ``F · A⁺ · (B · V)`` with the n×m and m×n kernels materialised.

    :func:`nystromer.reference.nystrom_reference` on each sample's real tokens, all heads at
    once, in at least float32: the peers' evaluation order, so both a numerical cross-check and
    the speed/memory baseline of the unfused formulation. Arguments as in
    :func:`nystromer.nystrom_attention`, for self-attention (B, H, n, d) inputs; with a ``mask``
    every sample needs more than m real tokens when n > m (the fused function switches to exact
    attention below that, which this baseline does not reproduce). Padded query rows are zero.
    """
    n, m = query.shape[2], num_landmarks
    if key.shape[2] != n:
        raise ValueError(
            f"naive_nystrom_attention is self-attention only: query has n={n}, key n={key.shape[2]}"
        )
    if mask is not None and n > m and bool((mask.sum(-1) <= m).any()):
        raise ValueError(
            f"mask: every sample needs more than num_landmarks={m} real tokens, got "
            f"real lengths {mask.sum(-1).tolist()}"
        )
    work = torch.promote_types(query.dtype, torch.float32)
    q, k, v = (t.to(work) for t in (query, key, value))
    out = reference.nystrom_reference(q, k, v, m, mask, iterations=pinv_iterations, scale=scale)
    return out.to(query.dtype)


# --- runners ----------------------------------------------------------------------------------


class _HeadSplitRunner(AttentionRunner):
    """``attention(q, k, v, mask)`` on (B, H, n, d) views of (B, n, H, d) memory, the layout a
    model's head split gives its inputs and output gradient."""

    def __init__(self, attention: Callable[..., Tensor]) -> None:
        self.run = attention

    def prepare(self, q, k, v, mask):
        return (*map(self.prepare_grad, (q, k, v)), mask)

    def prepare_grad(self, grad):
        return grad.transpose(1, 2).contiguous().transpose(1, 2)


def _plain_nystrom_attention(*args, **kwargs) -> Tensor:
    with _cpu.plain():
        return nystrom_attention(*args, **kwargs)


def _nystrom_runner(attention: Callable[..., Tensor]) -> Callable[..., AttentionRunner]:
    def build(c: AttentionConfig) -> AttentionRunner:
        options = {"num_landmarks": c.num_landmarks, "pinv_iterations": c.pinv_iterations}
        return _HeadSplitRunner(lambda q, k, v, mask: attention(q, k, v, mask=mask, **options))

    return build


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(s·QKᵀ)·V with the n×n matrix materialised, padding keys masked out."""
    logits = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, -1) @ v


def _hidden_from_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, H, n, d) ×3 → x = [q | k | v] of shape (B, n, 3·H·d), heads-major in each third."""
    return torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2).flatten(2)


class _LucidrainsRunner(AttentionRunner):
    """PyPI ``nystrom-attention``: identity ``to_qkv`` on x = [q | k | v] chunks it into q, k, v."""

    grad_args = (0,)

    def __init__(self, config: AttentionConfig) -> None:
        from nystrom_attention import NystromAttention as LucidrainsAttention

        h, d = config.heads, config.head_dim
        module = LucidrainsAttention(
            dim=h * d,
            dim_head=d,
            heads=h,
            num_landmarks=config.num_landmarks,
            pinv_iterations=config.pinv_iterations,
            residual=False,  # no convolution skip
        )
        module.to_qkv = module.to_out = nn.Identity()
        self.module = module.to(device=config.device, dtype=config.dtype).eval()
        self.heads = h

    def prepare(self, q, k, v, mask):
        return (_hidden_from_qkv(q, k, v), mask)

    def run(self, x, mask):
        return self.module(x, mask=mask)

    def output_shape(self, batch, heads, seq_len, head_dim):
        return (batch, seq_len, heads * head_dim)

    def to_bhnd(self, out):
        return out.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class _TransformersRunner(_LucidrainsRunner):
    """``transformers``' ``NystromformerSelfAttention``, projections as column selections."""

    def __init__(self, config: AttentionConfig) -> None:
        from transformers import NystromformerConfig
        from transformers.models.nystromformer import modeling_nystromformer as hf

        hd = config.heads * config.head_dim
        hf_config = NystromformerConfig(
            hidden_size=hd,
            num_attention_heads=config.heads,
            num_landmarks=config.num_landmarks,
            segment_means_seq_len=config.seq_len,
            attention_probs_dropout_prob=0.0,
        )
        module = hf.NystromformerSelfAttention(hf_config)
        module.conv_kernel_size = None  # its config only accepts an int kernel size
        del module.conv
        for i, name in enumerate(("query", "key", "value")):  # exact, parameter-free 'Linear's
            delattr(module, name)
            setattr(module, name, functools.partial(torch.narrow, dim=-1, start=i * hd, length=hd))
        # Its forward calls iterative_inv with the default 6 iterations, whatever the config
        # says: pass the configured count, so that every implementation does the same work.
        module.iterative_inv = functools.partial(
            module.iterative_inv, n_iter=config.pinv_iterations
        )
        self.module = module.to(device=config.device, dtype=config.dtype).eval()
        self.heads = config.heads

    def prepare(self, q, k, v, mask):
        if mask is not None:  # additive, as its model passes it: the dtype's minimum at padding
            mask = (~mask[:, None, None, :]).to(q.dtype) * torch.finfo(q.dtype).min
        return (_hidden_from_qkv(q, k, v), mask)

    def run(self, x, additive_mask):
        return self.module(x, attention_mask=additive_mask)[0]


def _transformers_supports(config: AttentionConfig, padded: bool) -> str | None:
    n, m = config.seq_len, config.num_landmarks
    return f"needs n to be a multiple of m (got n={n}, m={m})" if m != n and n % m else None


for _impl in (
    Implementation(
        "nystromer",
        "nystromer.nystrom_attention (fused: two SDPA calls around the m×m pseudo-inverse)",
        _nystrom_runner(nystrom_attention),
    ),
    Implementation(
        "nystromer-plain",
        "nystromer.nystrom_attention without the CPU speed-ups of nystromer._cpu (the plain "
        "definition; the same numbers)",
        _nystrom_runner(_plain_nystrom_attention),
    ),
    Implementation(
        "naive",
        "F·A⁺·(B·V) with the n×m and m×n kernels materialised, same landmarks as nystromer",
        _nystrom_runner(naive_nystrom_attention),
    ),
    Implementation(
        "exact",
        "torch scaled_dot_product_attention (exact softmax)",
        lambda config: _HeadSplitRunner(softmax_attention),
    ),
    Implementation(
        "exact-matmul",
        "softmax(s·QKᵀ)·V with the n×n matrix materialised (the paper's Transformer baseline)",
        lambda config: _HeadSplitRunner(_matmul_attention),
    ),
    Implementation(
        "nystrom-attention",
        "PyPI nystrom-attention (lucidrains) NystromAttention, projections removed",
        _LucidrainsRunner,
        requires=("nystrom_attention", "einops"),
        is_peer=True,
    ),
    Implementation(
        "transformers",
        "transformers NystromformerSelfAttention, projections removed",
        _TransformersRunner,
        requires=("transformers",),
        supports=_transformers_supports,
        is_peer=True,
    ),
):
    register_implementation(_impl)

#: Names of the other projects' implementations, in registry order.
PEERS: tuple[str, ...] = tuple(name for name, impl in IMPLEMENTATIONS.items() if impl.is_peer)

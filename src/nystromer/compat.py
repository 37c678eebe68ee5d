"""A drop-in for the ``nystrom-attention`` package: its classes, arguments and state dicts.

``from nystromer.compat import NystromAttention`` (or ``Nystromformer``) in place of
``from nystrom_attention import ...`` is the whole migration: the constructors take the same
arguments with the same defaults, the parameters have the same names and shapes (so
``load_state_dict(strict=True)`` takes a state dict saved from the package), and ``forward`` has
the same signature. ``numerics=`` chooses what is computed:

- ``"nystromer"`` (default): nystromer's Nyström attention (:func:`~nystromer.nystrom_attention`)
  on the package's projections: no padding tokens, masks that keep padding out of every landmark
  and weight, a pseudo-inverse scaled per matrix, so that a sample's output depends on neither
  the other samples of the batch nor its masked padding; any length, fp16/bf16.
- ``"lucidrains"``: the package's outputs (to float32 rounding), for models trained with it
  that must keep their predictions: zero tokens padded in front to a multiple of m, masked
  tokens zeroed but still counted by the landmark means without a mask, the pseudo-inverse's
  initial scale taken over the whole batch.

``return_attn=True`` returns an :class:`AttentionMap`, indexable like the (B, H, n, n) attention
matrix but computing only the rows asked for.
"""

from __future__ import annotations

from math import ceil

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (
    check_int_at_least,
    check_odd_kernel_size,
    check_probability,
    check_token_mask,
    positive_int,
)
from ._sdpa import sdpa
from ._torchutil import bypassable, without_autocast
from .attention import ValueConv, multihead_nystrom_attention
from .attention_map import AttentionMap
from .functional import (
    iterative_pinv,
    landmark_assignment,
    rows_from_landmarks,
    segment_means,
)
from .options import NystromOptions

__all__ = ["AttentionMap", "NUMERICS", "NystromAttention", "Nystromformer"]

NUMERICS = ("nystromer", "lucidrains")


class _Numerics:
    """The ``numerics`` attribute of both classes: checked on every assignment, and
    ``_numerics_set`` tells the owner (Nystromformer passes it on to its layers)."""

    _numerics: str

    @property
    def numerics(self) -> str:
        """``"nystromer"`` or ``"lucidrains"``; may be changed between calls (on a
        Nystromformer, setting it sets every layer's)."""
        return self._numerics

    @numerics.setter
    def numerics(self, value: str) -> None:
        if value not in NUMERICS:
            raise ValueError(f'numerics must be "nystromer" or "lucidrains", got {value!r}')
        self._numerics = value
        self._numerics_set(value)

    def _numerics_set(self, value: str) -> None:
        pass


class NystromAttention(_Numerics, nn.Module):
    """The ``nystrom-attention`` package's ``NystromAttention``, with a choice of numerics.

    Same arguments, defaults, parameters (``to_qkv``, ``to_out``, ``res_conv``) and forward as
    the package: state dicts load with ``strict=True`` either way.

    Args:
        dim: width of the input and output.
        dim_head: width of each head (queries are scaled by dim_head^-0.5).
        heads: number of heads.
        num_landmarks: m.
        pinv_iterations: iterations of the pseudo-inverse.
        residual: add the depthwise convolution of the values (``res_conv``).
        residual_conv_kernel: its kernel size k (odd).
        eps: added to the landmark counts under a mask (``"lucidrains"`` numerics).
        dropout: dropout after the output projection.
        numerics: ``"nystromer"`` (default) or ``"lucidrains"`` (module docstring).

    Shapes:
        x (B, n, dim), mask (B, n) bool with True for real tokens → (B, n, dim).
    """

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual: bool = True,
        residual_conv_kernel: int = 33,
        eps: float = 1e-8,
        dropout: float = 0.0,
        *,
        numerics: str = "nystromer",
    ) -> None:
        super().__init__()
        self.numerics = numerics
        self.eps = eps
        # (torch's own errors for these name no argument, or none is raised for dim = 0.)
        dim = positive_int("dim", dim)
        dim_head = positive_int("dim_head", dim_head)
        heads = positive_int("heads", heads)
        check_probability("dropout", dropout, one=True)
        inner_dim = heads * dim_head
        # Validates m and the iterations with messages naming them.
        NystromOptions(num_landmarks=num_landmarks, pinv_iterations=pinv_iterations)
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))
        self.residual = residual
        if residual:
            # An even kernel changes the sequence length: the package fails in forward.
            check_odd_kernel_size("residual_conv_kernel", residual_conv_kernel)
            self.res_conv = ValueConv(heads, residual_conv_kernel)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_attn: bool = False,
        return_attn_matrices: bool = False,
    ) -> Tensor | tuple[Tensor, AttentionMap] | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Self-attention over ``x``.

        Args:
            x: (B, n, dim).
            mask: (B, n) bool, True for real tokens, or None.
            return_attn: also return the attention matrix as an :class:`AttentionMap`:
                (B, H, n, n) in ``"nystromer"`` numerics; in ``"lucidrains"`` numerics
                (B, H, n_pad, n_pad) with the package's front padding, so that row
                ``n_pad - n + i`` is token i's, as in the package's dense matrix.
            return_attn_matrices: instead, return the three factors (F, A⁺, B) whose product
                is that matrix: (B, H, n', m), (B, H, m, m), (B, H, m, n') with n' as above.

        Returns:
            (B, n, dim), or ``(out, attn)`` / ``(out, (F, A⁺, B))``.
        """
        mask = _check_input(x, mask, _in_features(self.to_qkv))
        _check_dtype(x, self.to_qkv)
        if x.shape[1] == 0:
            out, attn, factors = self._forward_empty(x)
        elif self.numerics == "lucidrains":
            out, attn, factors = self._forward_lucidrains(x, mask)
        else:
            keep = return_attn or return_attn_matrices
            out, attn, factors = self._forward_nystromer(x, mask, keep)
        if return_attn_matrices:
            return out, factors()
        if return_attn:
            return out, attn
        return out

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (B, n, H, d), in the package's layout of ``to_qkv``'s output."""
        return self.to_qkv(x).unflatten(-1, (3, self.heads, self.dim_head)).unbind(2)

    def _forward_nystromer(self, x, mask, keep_attn: bool):
        heads = (self.heads, self.dim_head)
        if _plain_linear(self.to_qkv):
            # q, k and v as three products with row blocks of to_qkv's weight, not one joint
            # product split in three: autograd then frees their gradients one by one, where
            # the joint product's backward would stack them into a fourth full-size tensor.
            weights = self.to_qkv.weight.unflatten(0, (3, self.heads * self.dim_head))
            q, k, v = (F.linear(x, w).unflatten(-1, heads) for w in weights)
            held = None
        else:
            # Replaced (quantised, an adapter) or hooked: called as the package calls it, and
            # the map keeps its q and k (its weight, if any, is not what it computes).
            q, k, v = self._split(x)
            held = (q, k) if keep_attn else None
        options = NystromOptions(self.num_landmarks, self.pinv_iterations)
        conv = self.res_conv if self.residual else None
        out = multihead_nystrom_attention(q, k, v, options, mask=mask, scale=self.scale, conv=conv)
        # Nothing needs q, k and v any more (autograd keeps what it needs): free them before
        # the output projection allocates its result. An attention map recomputes q and k
        # from x when rows are asked for (unless held), so that holding it costs no n·H·d
        # tensors.
        del q, k, v
        out = self.to_out(out.flatten(2))
        if not keep_attn:
            return out, None, None

        def factors():
            q, k = (t.transpose(1, 2) for t in (held or self._split(x)[:2]))
            m, iterations = self.num_landmarks, self.pinv_iterations
            with without_autocast(q):  # the factors are computed in at least float32
                return _nystromer_factors(q, k, mask, m, iterations, self.scale)

        return out, self._nystromer_map(x, mask, held), factors

    def attention_map(self, x: Tensor, mask: Tensor | None = None) -> AttentionMap:
        """The attention matrix of ``self(x, mask)`` without the output: the map that
        ``return_attn=True`` returns, e.g. ``layer.attention_map(x)[:, :, 0]`` for a class
        token's heatmap.

        In ``"nystromer"`` numerics nothing is computed until rows are asked for, and then
        only the keys and, for the queries, the asked rows and the landmarks (the landmark
        segments' means of x, projected); in ``"lucidrains"`` numerics this runs the
        package's forward, which forms the map's factors. A ``to_qkv`` that is not a plain
        ``nn.Linear`` (quantised, wrapped by an adapter, or hooked) is called once, here, and
        the map holds its q and k.

        Args:
            x: (B, n, dim), the layer's input.
            mask: (B, n) bool, True for real tokens, or None.

        Returns:
            an :class:`AttentionMap`, (B, H, n, n) (``"lucidrains"``: (B, H, n_pad, n_pad)).
        """
        mask = _check_input(x, mask, _in_features(self.to_qkv))
        _check_dtype(x, self.to_qkv)
        if x.shape[1] == 0:
            return self._forward_empty(x)[1]
        if self.numerics == "lucidrains":
            return self._forward_lucidrains(x, mask)[1]
        return self._nystromer_map(x, mask)

    def _forward_empty(self, x: Tensor):
        """An empty bag (n = 0) in either numerics: the empty output, an empty (B, H, 0, 0)
        map and factors with no rows or columns. (The package fails there, dividing by
        ⌈n/m⌉ = 0; the default numerics gave the empty output but failed in the factors.)"""
        b, h, m = x.shape[0], self.heads, self.num_landmarks
        # Through the projections, so that the output is x's and the weights' as always.
        out = self.to_out(self._split(x)[2].flatten(2))
        attn = AttentionMap(_no_rows, (b, h, 0, 0), x.dtype, x.device)

        def factors():
            eye = torch.eye(m, dtype=x.dtype, device=x.device).expand(b, h, m, m)
            return x.new_zeros(b, h, 0, m), eye, x.new_zeros(b, h, m, 0)

        return out, attn, factors

    def _nystromer_map(
        self, x: Tensor, mask: Tensor | None, held: tuple[Tensor, Tensor] | None = None
    ) -> AttentionMap:
        """The (B, H, n, n) map of the ``"nystromer"`` forward over x, computed from x when
        indexed, so that holding it keeps no n·H·d tensor; or, when to_qkv is not a plain
        Linear, from its q and k (B, n, H, d), ``held`` or projected now."""
        b, n, _ = x.shape
        h, d, m = self.heads, self.dim_head, self.num_landmarks
        # The mask is small (B·n bools): a copy keeps the map the forward's when the caller
        # reuses the mask's memory for the next batch.
        mask = None if mask is None else mask.clone()
        if held is None and not _plain_linear(self.to_qkv):
            held = self._split(x)[:2]

        def heads(t: Tensor) -> Tensor:  # (B', L, H'·d) → (B', H', L, d)
            return t.unflatten(-1, (-1, d)).transpose(1, 2)

        if held is not None:

            def inputs(b_sel: slice, h_sel: slice, index: Tensor):
                # q and k as the forward had them, (B, n, H, d).
                qh, kh = (t[b_sel][:, :, h_sel].transpose(1, 2) for t in held)

                def query_landmarks(q_index, counts, valid, work) -> Tensor:
                    return segment_means(qh, q_index, counts, m, work)

                return qh[:, :, index], query_landmarks, kh

        else:
            weight = self.to_qkv.weight
            versions = (_version(x), _version(weight))

            def inputs(b_sel: slice, h_sel: slice, index: Tensor):
                if (_version(x), _version(weight)) != versions:
                    raise RuntimeError(
                        "the attention map's input or to_qkv.weight was modified in place "
                        "after it was made; index the map before changing them"
                    )
                w_q, w_k = (w.flatten(0, 1) for w in weight.unflatten(0, (3, h, d))[:2, h_sel])
                xs = x[b_sel]

                def query_landmarks(q_index, counts, valid, work) -> Tensor:
                    # The means of the projected queries are the projection of x's means.
                    x_means = segment_means(xs[:, None], q_index, counts, m, work)[:, 0]
                    return heads(F.linear(x_means, w_q.to(work)))

                return heads(F.linear(xs[:, index], w_q)), query_landmarks, heads(F.linear(xs, w_k))

        def rows(b_sel: slice, h_sel: slice, index: Tensor) -> Tensor:
            q_rows, query_landmarks, k = inputs(b_sel, h_sel, index)
            # In x's dtype: under autocast the projections may be in another.
            return rows_from_landmarks(
                q_rows, query_landmarks, n, k, index,
                num_landmarks=m, mask=None if mask is None else mask[b_sel],
                pinv_iterations=self.pinv_iterations, scale=self.scale, query_mask=None,
                kmeans_iterations=0,
            ).to(x.dtype)  # fmt: skip

        return AttentionMap(rows, (b, h, n, n), x.dtype, x.device)

    def _forward_lucidrains(self, x, mask):
        b, n, _ = x.shape
        h, m = self.heads, self.num_landmarks
        # The package's layout: zero tokens in front up to a multiple of m, m groups of l.
        pad = -n % m
        l = ceil(n / m)  # noqa: E741
        n_pad = n + pad
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
            if mask is not None:
                mask = F.pad(mask, (pad, 0), value=False)
        q, k, v = (t.transpose(1, 2) for t in self._split(x))  # (B, H, n_pad, d)
        if mask is not None:
            keep = mask[:, None, :, None].to(q.dtype)
            q, k, v = q * keep, k * keep, v * keep
        q = q * self.scale

        # Landmarks: sums over the m groups divided by l, or by the group's real count + eps.
        q_land = q.unflatten(2, (m, l)).sum(3)
        k_land = k.unflatten(2, (m, l)).sum(3)
        land_ok = None
        if mask is None:
            divisor = l
        else:
            counts = mask.unflatten(1, (m, l)).sum(-1)  # (B, m)
            divisor = counts[:, None, :, None] + self.eps
            land_ok = counts > 0
        # (The count's dtype is float32, as in the package; the means keep q's dtype.)
        q_land, k_land = (q_land / divisor).to(q.dtype), (k_land / divisor).to(q.dtype)

        # A⁺, m×m, with the initial scale taken over the whole batch as the package does.
        work = torch.promote_types(q.dtype, torch.float32)
        a = _package_softmax(q_land.to(work) @ k_land.to(work).transpose(-1, -2), land_ok, land_ok)
        a_pinv = iterative_pinv(a, self.pinv_iterations, initial_scale="batch")

        # B·V: m landmark queries over the n_pad keys (fused). An empty landmark's row is all
        # −max in the package, a uniform softmax over every key: the mean of the (zeroed) v.
        # Samples without a real token attend to everything so no row is NaN (then replaced).
        key_ok = None if mask is None else mask | ~mask.any(-1, keepdim=True)
        bv = _sdpa(q_land, k, v, key_ok)
        if land_ok is not None:
            bv = torch.where(land_ok[:, None, :, None], bv, v.mean(2, keepdim=True))
        w = (a_pinv @ bv.to(work)).to(q.dtype)

        # F·W for the last n queries (the package drops the front rows) over the m landmark
        # keys; a masked query's row is all −max, uniform over the landmarks: the mean of W.
        # Reassociating the package's (F·A⁺)·(B·V) as F·(A⁺·(B·V)) avoids the stored n×m F·A⁺.
        q_out = q[:, :, pad:]
        land_key_ok = None if land_ok is None else land_ok | ~land_ok.any(-1, keepdim=True)
        out = _sdpa(q_out, k_land, w, land_key_ok)
        if mask is not None:
            out = torch.where(mask[:, None, pad:, None], out, w.mean(2, keepdim=True))
        if self.residual:
            # The package's convolution over the padded, masked v (front zeros add nothing),
            # not zeroed at masked positions afterwards.
            conv = self.res_conv
            if not bypassable(conv, ValueConv):
                # Hooks or a replaced module see the call, as in the package (no mask: v is
                # zeroed already, and the package's convolution is not zeroed after).
                skip = conv(v)
            else:
                skip = F.conv2d(v, conv.weight, None, padding=conv.padding, groups=h)
            out = out + skip[:, :, pad:]
        out = self.to_out(out.transpose(1, 2).flatten(2))

        if mask is not None and not pad:
            # The caller's mask (F.pad copies it otherwise): the map keeps its own (B·n bools)
            # in case the caller reuses its memory for the next batch.
            mask = mask.clone()

        def f_rows(b_sel, h_sel, index):
            f = q[b_sel, h_sel][:, :, index].to(work) @ k_land[b_sel, h_sel].to(work).mT
            q_ok = None if mask is None else mask[b_sel][:, index]
            return _package_softmax(f, q_ok, None if land_ok is None else land_ok[b_sel])

        def b_kernel(b_sel, h_sel):
            logits = q_land[b_sel, h_sel].to(work) @ k[b_sel, h_sel].to(work).mT
            return _package_softmax(
                logits,
                None if land_ok is None else land_ok[b_sel],
                None if mask is None else mask[b_sel],
            )

        def rows(b_sel: slice, h_sel: slice, index: Tensor) -> Tensor:
            # The package's association, (F·A⁺)·B, restricted to the rows asked for. B (m×n_pad
            # per head) is formed whole: every row needs all of it; O((m + r)·n) memory. In
            # `work` precision whether or not the map is indexed under autocast: a forward
            # under autocast made A⁺ in its lower precision.
            with without_autocast(q):
                f_a = f_rows(b_sel, h_sel, index) @ a_pinv[b_sel, h_sel].to(work)
                return (f_a @ b_kernel(b_sel, h_sel)).to(q.dtype)

        attn = AttentionMap(rows, (b, h, n_pad, n_pad), q.dtype, q.device)
        everything = slice(None)

        def factors():
            f = f_rows(everything, everything, torch.arange(n_pad, device=q.device))
            return (f.to(q.dtype), a_pinv.to(q.dtype), b_kernel(everything, everything).to(q.dtype))

        return out, attn, factors


def _no_rows(b_sel: slice, h_sel: slice, index: Tensor) -> Tensor:
    """The row function of an empty map: never called (AttentionMap computes no row of a
    selection without rows)."""
    raise AssertionError("an empty attention map has no rows to compute")


def _plain_linear(module: nn.Module) -> bool:
    """Whether calling ``module`` is ``F.linear(x, module.weight)``: an ``nn.Linear`` itself
    (not a quantised or parametrised subclass, nor an adapter around one) with no forward
    hooks of its own and no global ones."""
    return bypassable(module, nn.Linear) and module.bias is None


def _version(t: Tensor) -> int | None:
    """t's version counter (bumped by each in-place change); None for an inference tensor
    (made under ``torch.inference_mode()``), which has none."""
    return None if t.is_inference() else t._version


def _in_features(module: nn.Module) -> int | None:
    """The input width of ``to_qkv``, None when a replacement does not say."""
    return getattr(module, "in_features", None)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_ok: Tensor | None) -> Tensor:
    """softmax(Q·Kᵀ)·V (q already scaled) with keys False in the (B, n_k) ``key_ok`` masked."""
    attn_mask = None if key_ok is None else key_ok[:, None, None, :]
    return sdpa(q, k, v, attn_mask, scale=1.0)


def _package_softmax(logits: Tensor, row_ok: Tensor | None, col_ok: Tensor | None) -> Tensor:
    """The package's masked softmax: logits whose row or column is masked become −finfo.max,
    so a fully masked row is uniform. ``row_ok`` (B, r), ``col_ok`` (B, c); logits (B, H, r, c).
    """
    if row_ok is None and col_ok is None:
        return logits.softmax(-1)
    b, _, r, c = logits.shape
    rows = torch.ones(b, r, dtype=torch.bool, device=logits.device) if row_ok is None else row_ok
    cols = torch.ones(b, c, dtype=torch.bool, device=logits.device) if col_ok is None else col_ok
    ok = rows[:, None, :, None] & cols[:, None, None, :]
    return logits.masked_fill(~ok, -torch.finfo(logits.dtype).max).softmax(-1)


def _nystromer_factors(q, k, mask, m, iterations, scale):
    """(F, A⁺, B) with F·A⁺·B the matrix that nystrom_attention applies to V (without the
    convolution): (B, H, n, m), (B, H, m, m), (B, H, m, n).

    A sample with at most m real tokens gets exact attention there; here each of its real
    tokens is its own segment, so its factors are F = softmax over those tokens, A⁺ = I and
    B = the segment membership (B·V is then V itself).
    """
    b, h, n, _ = q.shape
    work = torch.promote_types(q.dtype, torch.float32)
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    index, counts = landmark_assignment(real, n, m, q.device)
    q_land = segment_means(q, index, counts, m, work)
    k_land = segment_means(k, index, counts, m, work)
    nonempty = counts[:, :m] > 0  # (B, m)
    short = counts[:, :m].sum(-1) <= m  # (B,)
    qw, kw = q.to(work), k.to(work)
    f = _masked_softmax(qw @ k_land.mT * scale, nonempty)
    a = _masked_softmax(q_land @ k_land.mT * scale, nonempty)
    a = a * nonempty[:, None, :, None].to(work)  # an empty query segment is no landmark
    a_pinv = iterative_pinv(a, iterations)
    bk = _masked_softmax(q_land @ kw.mT * scale, real)
    member = F.one_hot(index, m + 1)[..., :m].transpose(1, 2).to(work)[:, None]  # (B, 1, m, n)
    eye = torch.eye(m, dtype=work, device=q.device)
    s = short[:, None, None, None]
    a_pinv = torch.where(s, eye, a_pinv)
    bk = torch.where(s, member.expand_as(bk), bk)
    # Padded queries and samples without a real token have zero rows, as in the output.
    keep = real & real.any(-1, keepdim=True)
    f = f * keep[:, None, :, None].to(work)
    return f.to(q.dtype), a_pinv.to(q.dtype), bk.to(q.dtype)


def _masked_softmax(logits: Tensor, key_ok: Tensor) -> Tensor:
    """Softmax over keys with False in the (B, c) ``key_ok`` excluded; a row with no key left
    is zero (not NaN)."""
    logits = logits.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    return torch.nan_to_num(logits.softmax(-1), nan=0.0)


class _PreNorm(nn.Module):
    """LayerNorm, then ``fn`` (parameter names ``norm``, ``fn`` as in the package)."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(self.norm(x), **kwargs)


class _FeedForward(nn.Module):
    """Linear(dim, mult·dim), GELU, Dropout, Linear(mult·dim, dim), named ``net`` as in the
    package."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Nystromformer(_Numerics, nn.Module):
    """The package's ``Nystromformer`` stack: per layer ``x = attn(LayerNorm(x), mask) + x``,
    then ``x = ff(LayerNorm(x)) + x``. Same arguments, defaults and state-dict keys
    (``layers.{i}.0.norm.*``, ``layers.{i}.0.fn.to_qkv.weight``, …, ``layers.{i}.1.fn.net.*``).

    Args:
        dim, depth, dim_head, heads, num_landmarks, pinv_iterations: as the package.
        attn_values_residual, attn_values_residual_conv_kernel: the attention layers'
            ``residual`` and ``residual_conv_kernel``.
        attn_dropout, ff_dropout: dropout after the attention's output projection and inside
            the feed-forward block.
        numerics: ``"nystromer"`` (default) or ``"lucidrains"``, for every layer.

    Shapes:
        x (B, n, dim), mask (B, n) bool with True for real tokens → (B, n, dim).
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        dim_head: int = 64,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        attn_values_residual: bool = True,
        attn_values_residual_conv_kernel: int = 33,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        numerics: str = "nystromer",
    ) -> None:
        super().__init__()
        self.numerics = numerics
        # Checked under the stack's names: the layers would name their own arguments.
        check_int_at_least("depth", depth, 0)
        if attn_values_residual:
            check_odd_kernel_size(
                "attn_values_residual_conv_kernel", attn_values_residual_conv_kernel
            )
        check_probability("attn_dropout", attn_dropout, one=True)
        check_probability("ff_dropout", ff_dropout, one=True)
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            attn = NystromAttention(
                dim=dim,
                dim_head=dim_head,
                heads=heads,
                num_landmarks=num_landmarks,
                pinv_iterations=pinv_iterations,
                residual=attn_values_residual,
                residual_conv_kernel=attn_values_residual_conv_kernel,
                dropout=attn_dropout,
                numerics=numerics,
            )
            ff = _FeedForward(dim=dim, dropout=ff_dropout)
            self.layers.append(nn.ModuleList([_PreNorm(dim, attn), _PreNorm(dim, ff)]))

    def _numerics_set(self, value: str) -> None:
        # The constructor sets numerics before the layers exist; they receive it as an argument.
        for attn, _ in getattr(self, "layers", ()):
            attn.fn.numerics = value

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, n, dim), mask (B, n) bool or None → (B, n, dim)."""
        if self.layers:
            # Checked here, not by the first layer: its LayerNorm comes first and would name
            # neither x nor the width expected.
            mask = _check_input(x, mask, self.layers[0][0].norm.normalized_shape[-1])
        for attn, ff in self.layers:
            x = attn(x, mask=mask) + x
            x = ff(x) + x
        return x


def _check_input(x: Tensor, mask: Tensor | None, dim: int | None) -> Tensor | None:
    """Validate x and mask (x's width against ``dim`` unless None); returns the mask as (B, n)
    (the package also broadcasts a (1, n) mask over the batch)."""
    if not isinstance(x, Tensor) or x.dim() != 3 or (dim is not None and x.shape[-1] != dim):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (batch, seq_len, {dim or 'dim'}), got {got}")
    if mask is None:
        return None
    check_token_mask("mask", mask)
    b, n = x.shape[:2]
    if mask.dim() != 2 or (mask.shape[0] != 1 and mask.shape[0] != b) or mask.shape[1] != n:
        raise ValueError(
            f"mask must have shape ({b}, {n}) (batch, seq_len) to match x, got {tuple(mask.shape)}"
        )
    return mask.expand(b, n)


def _check_dtype(x: Tensor, to_qkv: nn.Module) -> None:
    """Raise TypeError when a plain ``to_qkv`` cannot take x: its weight has another dtype and
    autocast (on for x's device) does not cast both, which it does for float32, float16 and
    bfloat16. The projection would fail with torch's "expected m1 and m2 to have the same
    dtype", which names neither. (A replaced or hooked ``to_qkv``, e.g. quantised or with a
    pre-hook that casts, says for itself what it takes.)"""
    want = to_qkv.weight.dtype if bypassable(to_qkv, nn.Linear) else x.dtype
    if x.dtype == want:
        return
    device = x.device.type
    cast = (torch.float32, torch.float16, torch.bfloat16)
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    if autocast and x.dtype in cast and want in cast:
        return
    raise TypeError(
        f"x must have the layer's dtype {want} (convert x, or the layer with .to(dtype)), "
        f"got {x.dtype}"
    )

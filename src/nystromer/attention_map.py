"""AttentionMap: an attention matrix that computes only the rows it is indexed with.

Nyström attention never forms its n_q×n_k matrix F·A⁺·B; a heatmap needs a few of its rows
(a class token's, per head), each O((m + n)·m) to compute. An :class:`AttentionMap` takes the
indexing of the dense (B, H, n_q, n_k) tensor and passes the rows it names to a row function
(e.g. one built on :func:`~nystromer.attention_rows`). ``nystromer.compat``'s
``return_attn=True`` and :meth:`nystromer.NystromAttention.attention_map` return one.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["AttentionMap", "RowFunction"]

# (batch selection, head selection, row positions) → (B', H', r, n_k) rows of the matrix.
RowFunction = Callable[[slice, slice, Tensor], Tensor]


class AttentionMap:
    """The (B, H, n_q, n_k) attention matrix of one forward, computed only where indexed.

    Index it as the dense tensor: ``attn[:, :, 0]`` is the first query's row for every sample
    and head, (B, H, n_k); ``attn[0, 3, 5:9]``, negative positions, lists, numpy arrays and
    integer or boolean tensors work as for a tensor. Each index computes only the rows it
    names, in O((m + r)·n_k) memory per head. ``full()`` (alias ``to_dense()``) materialises
    the whole matrix, and like any index whose result exceeds ``warn_bytes`` (1 GiB by default;
    settable per object) it warns with the size first. Rows track gradients when the forward
    that made the map did and the indexing does (``torch.no_grad``, ``inference_mode``).

    Attributes:
        shape: torch.Size (B, H, n_q, n_k).
        dtype, device: of the rows it returns.
        warn_bytes: results larger than this warn before they are computed.
    """

    warn_bytes: int = 1 << 30

    def __init__(
        self, rows: RowFunction, shape: tuple[int, int, int, int], dtype: torch.dtype, device
    ) -> None:
        self._rows = rows
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        # The rows track gradients only if the forward did, as the package's dense matrix:
        # a map made under no_grad or inference_mode gives plain tensors when indexed later.
        self._grad = torch.is_grad_enabled()

    @property
    def ndim(self) -> int:
        return 4

    def dim(self) -> int:
        return 4

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        b, h, n_q, n_k = self.shape
        return f"AttentionMap(shape=({b}, {h}, {n_q}, {n_k}), dtype={self.dtype}, rows on demand)"

    def full(self) -> Tensor:
        """The whole (B, H, n_q, n_k) matrix (warns above ``warn_bytes``)."""
        return self[:, :, :, :]

    to_dense = full

    def __getitem__(self, index) -> Tensor:
        items = _expand_index(index)
        dims = _dim_positions(items)
        b, h, n_q, n_k = self.shape
        # Integers and slices on the batch and head axes narrow the work; other indices are
        # applied to the computed rows.
        selections = []
        for axis, size in ((0, b), (1, h)):
            pos = dims[axis]
            sel, items[pos] = _narrow(items[pos], size, axis)
            selections.append(sel)
        pos = dims[2]
        rows, items[pos] = _row_positions(items[pos], n_q, self.device)
        b_sel, h_sel = selections
        n_b, n_h = len(range(b)[b_sel]), len(range(h)[h_sel])
        size = n_b * n_h * rows.numel() * n_k * self.dtype.itemsize
        if size > self.warn_bytes:
            warnings.warn(
                f"computing {n_b * n_h * rows.numel()} attention rows of length {n_k} "
                f"({size / 2**30:.2f} GiB); index only the rows you need, e.g. attn[:, :, 0]",
                stacklevel=2,
            )
        if n_b * n_h * rows.numel() == 0:
            # Nothing to compute (no sample, head or row selected): the row functions need
            # at least one of each.
            computed = torch.zeros(
                n_b, n_h, rows.numel(), n_k, dtype=self.dtype, device=self.device
            )
        else:
            with torch.set_grad_enabled(self._grad and torch.is_grad_enabled()):
                computed = self._rows(b_sel, h_sel, rows)
        return computed[tuple(items)]


def _expand_index(index) -> list:
    """The index as a list with the ellipsis expanded and missing trailing axes filled."""
    items = list(index) if isinstance(index, tuple) else [index]
    items = [_as_index_tensor(it) for it in items]
    for it in items:
        if isinstance(it, Tensor) and it.dtype == torch.bool and it.dim() > 1:
            raise IndexError(
                "attention maps take 1-D boolean indices only; index each axis separately"
            )
    used = sum(not _adds_axis(it) and it is not Ellipsis for it in items)
    if used > 4:
        raise IndexError(f"too many indices for the 4-D attention map: {used}")
    ellipses = [i for i, it in enumerate(items) if it is Ellipsis]
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    fill = [slice(None)] * (4 - used)
    if ellipses:
        items[ellipses[0] : ellipses[0] + 1] = fill
    else:
        items += fill
    return items


def _as_index_tensor(it):
    """A sequence (list, tuple, range) or numpy array or scalar in ``it`` as the tensor torch
    would index with: an empty one as int64, a uint8 one as the boolean mask torch reads."""
    if isinstance(it, (list, tuple, range)) or (
        hasattr(it, "__array__") and not isinstance(it, Tensor)
    ):
        it = torch.as_tensor(it)
        if it.numel() == 0 and it.dim() > 0:
            it = it.long()
    if isinstance(it, Tensor) and it.dtype == torch.uint8:
        it = it.bool()
    return it


def _adds_axis(it) -> bool:
    """Whether the index item ``it`` adds an axis without consuming one: None, or a scalar
    bool (a 0-d mask: an axis of size 1, or of size 0 for False)."""
    if it is None or isinstance(it, bool):
        return True
    return isinstance(it, Tensor) and it.dtype == torch.bool and it.dim() == 0


def _dim_positions(items: list) -> list[int]:
    """Position in ``items`` of the index of each of the four axes (None and scalar bools add
    an axis of their own)."""
    return [i for i, it in enumerate(items) if not _adds_axis(it) and it is not Ellipsis]


def _as_int(it) -> int | None:
    if isinstance(it, Tensor):
        return int(it) if it.dim() == 0 and not it.is_floating_point() else None
    if isinstance(it, bool):
        return None
    try:
        return operator.index(it)
    except TypeError:
        return None


def _narrow(it, size: int, axis: int) -> tuple[slice, object]:
    """(selection of the axis to compute, the index to apply to what is computed)."""
    i = _as_int(it)
    if i is not None:
        if not -size <= i < size:
            raise IndexError(f"index {i} is out of bounds for axis {axis} with size {size}")
        i %= size
        return slice(i, i + 1), 0
    if isinstance(it, slice):
        return it, slice(None)
    return slice(None), it


def _row_positions(it, n: int, device: torch.device) -> tuple[Tensor, object]:
    """(the query rows to compute, the index into the computed rows)."""
    i = _as_int(it)
    if i is not None:
        if not -n <= i < n:
            raise IndexError(f"row {i} is out of bounds for an attention map with {n} rows")
        return torch.tensor([i % n], device=device), 0
    if isinstance(it, slice):
        return torch.arange(n, device=device)[it], slice(None)
    if not isinstance(it, Tensor):
        raise IndexError(
            f"attention maps are indexed by ints, slices, lists, integer tensors or '...', "
            f"got {type(it).__name__}"
        )
    if it.dtype == torch.bool:
        if it.shape != (n,):
            raise IndexError(f"a boolean row index must have shape ({n},), got {tuple(it.shape)}")
        it = it.nonzero().squeeze(1)
    if it.is_floating_point() or it.is_complex():
        raise IndexError(f"row indices must be integers, got dtype {it.dtype}")
    it = it.to(device=device, dtype=torch.long)
    bad = (it < -n) | (it >= n)
    if bool(bad.any()):
        raise IndexError(
            f"rows {it[bad].tolist()[:5]} are out of bounds for an attention map with {n} rows"
        )
    rows, inverse = torch.unique(it % n, return_inverse=True)
    return rows, inverse

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

    Tensor methods that heatmap code calls before selecting rows return maps, so that the
    selection still computes only its rows: ``detach()``, ``clone()``, ``to(...)``, ``cpu()``,
    ``cuda()``, ``float()`` (``double``, ``half``, ``bfloat16``), and ``mean(1)`` / ``sum(1)``
    over the heads, a (B, n_q, n_k) map (``keepdim=True``: (B, 1, n_q, n_k)); e.g.
    ``attn.detach().cpu().mean(1)[:, 0, 1:]``. Everything else a tensor does (``numpy()``,
    ``torch.stack``, operators, ``softmax``, pickling) needs the dense matrix and raises an
    error that says to index the rows or call ``full()``.

    Attributes:
        shape: torch.Size (B, H, n_q, n_k), or (B, n_q, n_k) after a head reduction.
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
        # The row function's own (B, H, n_q, n_k), dtype and device; and what the tensor
        # methods called on the map (casts, a reduction over the heads that keeps the axis)
        # do to its computed rows, in order, and whether the head axis is then dropped.
        self._source = (self.shape, dtype, self.device)
        self._post: tuple[Callable[[Tensor], Tensor], ...] = ()
        self._heads_reduced = False
        self._drop_heads = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"AttentionMap(shape={tuple(self.shape)}, dtype={self.dtype}, rows on demand)"

    def full(self) -> Tensor:
        """The whole matrix, (B, H, n_q, n_k) (warns above ``warn_bytes``)."""
        return self[...]

    to_dense = full

    # --- tensor methods that stay lazy: the rows indexed afterwards are computed then ---------

    def detach(self) -> AttentionMap:
        """The map with rows that track no gradient, as ``Tensor.detach``."""
        return self._derived(grad=False)

    def clone(self) -> AttentionMap:
        """The map itself as a new object (its rows are computed fresh when indexed)."""
        return self._derived()

    __copy__ = clone

    def __deepcopy__(self, memo) -> AttentionMap:
        return self._derived()

    def to(self, *args, **kwargs) -> AttentionMap:
        """The map with rows moved or cast as ``Tensor.to(*args, **kwargs)`` would: a device,
        a dtype, both, or another tensor's."""
        kwargs.pop("copy", None)  # every indexing computes new rows: always a copy
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        return self._derived(
            lambda t: t.to(device=device, dtype=dtype, non_blocking=non_blocking),
            dtype=dtype or self.dtype,
            device=device or self.device,
        )

    def cpu(self) -> AttentionMap:
        return self.to("cpu")

    def cuda(self, device: torch.device | int | str | None = None) -> AttentionMap:
        if isinstance(device, int):
            device = torch.device("cuda", device)
        return self.to(device or "cuda")

    def float(self) -> AttentionMap:
        return self.to(torch.float32)

    def double(self) -> AttentionMap:
        return self.to(torch.float64)

    def half(self) -> AttentionMap:
        return self.to(torch.float16)

    def bfloat16(self) -> AttentionMap:
        return self.to(torch.bfloat16)

    def mean(self, dim=None, keepdim: bool = False, *, dtype=None) -> AttentionMap:
        """The mean over the heads, ``dim=1``, as a map: (B, n_q, n_k), or (B, 1, n_q, n_k)
        with ``keepdim`` (``attn.mean(1)[:, 0]`` computes only query 0's rows)."""
        return self._reduce_heads("mean", dim, keepdim, dtype)

    def sum(self, dim=None, keepdim: bool = False, *, dtype=None) -> AttentionMap:
        """The sum over the heads, ``dim=1``, as a map (as :meth:`mean`)."""
        return self._reduce_heads("sum", dim, keepdim, dtype)

    def _reduce_heads(self, op: str, dim, keepdim: bool, dtype) -> AttentionMap:
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        if (
            self._drop_heads
            or len(dims) != 1
            or not isinstance(dims[0], int)
            or (not -4 <= dims[0] < 4 or dims[0] % 4 != 1)
        ):
            raise TypeError(
                f"an AttentionMap's {op}() reduces over the heads only (dim=1), got dim={dim!r}; "
                f"{_NOT_A_TENSOR}"
            )
        b, _, n_q, n_k = self.shape
        derived = self._derived(
            lambda t: getattr(t, op)(1, keepdim=True, dtype=dtype), dtype=dtype or self.dtype
        )
        derived._heads_reduced = True
        derived._drop_heads = not keepdim
        derived.shape = torch.Size((b, 1, n_q, n_k) if keepdim else (b, n_q, n_k))
        return derived

    def _derived(self, post=None, *, grad=True, dtype=None, device=None) -> AttentionMap:
        derived = object.__new__(AttentionMap)
        derived.__dict__.update(self.__dict__)
        derived._grad = self._grad and grad
        derived._post = self._post + ((post,) if post else ())
        derived.dtype = dtype or self.dtype
        derived.device = torch.device(device or self.device)
        return derived

    # --- everything else a tensor does: refused with what to do instead ----------------------

    def __getattr__(self, name: str):
        if not name.startswith("_") and hasattr(Tensor, name):
            raise AttributeError(f"AttentionMap has no tensor attribute {name!r}: {_NOT_A_TENSOR}")
        raise AttributeError(f"'AttentionMap' object has no attribute {name!r}")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        raise TypeError(f"{name}() was given an AttentionMap: {_NOT_A_TENSOR}")

    def __array__(self, *args, **kwargs):
        raise TypeError(f"an AttentionMap cannot be converted to an array: {_NOT_A_TENSOR}")

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "an AttentionMap cannot be saved or pickled (it computes rows from its forward's "
            "inputs): save the rows you need, e.g. attn[:, :, 0], or attn.full()"
        )

    def __getitem__(self, index) -> Tensor:
        (b, h, n_q, n_k), dtype, device = self._source
        items = _expand_index(index, len(self.shape))
        if self._drop_heads:
            # (B, n_q, n_k): the rows are reduced keeping the head axis; index it at 0.
            items.insert(_dim_positions(items)[0] + 1, 0)
        dims = _dim_positions(items)
        # Integers and slices on the batch and head axes narrow the work; other indices are
        # applied to the computed rows. A reduction over the heads needs every head; the
        # index then applies to the reduced (size 1) axis.
        b_sel, items[dims[0]] = _narrow(items[dims[0]], b, 0)
        h_sel = slice(None)
        if not self._heads_reduced:
            h_sel, items[dims[1]] = _narrow(items[dims[1]], h, 1)
        rows, items[dims[2]] = _row_positions(items[dims[2]], n_q, device)
        n_b, n_h = len(range(b)[b_sel]), len(range(h)[h_sel])
        size = n_b * n_h * rows.numel() * n_k * dtype.itemsize
        if size > self.warn_bytes:
            warnings.warn(
                f"computing {n_b * n_h * rows.numel()} attention rows of length {n_k} "
                f"({size / 2**30:.2f} GiB); index only the rows you need, e.g. attn[:, :, 0]",
                stacklevel=2,
            )
        with torch.set_grad_enabled(self._grad and torch.is_grad_enabled()):
            if n_b * n_h * rows.numel() == 0:
                # Nothing to compute (no sample, head or row selected): the row functions
                # need at least one of each.
                computed = torch.zeros(n_b, n_h, rows.numel(), n_k, dtype=dtype, device=device)
            else:
                computed = self._rows(b_sel, h_sel, rows)
            for post in self._post:
                computed = post(computed)
        return computed[tuple(items)]


_NOT_A_TENSOR = (
    "it is not a tensor but computes the rows it is indexed with. Index the rows you need "
    "(attn[:, :, 0] is every head's row of query 0, a (B, H, n_k) tensor; in "
    "nystromer.compat's lucidrains numerics the first token's row is attn[:, :, -n]) or call "
    "attn.full() for the whole tensor, n_q·n_k numbers per head. .detach(), .clone(), .cpu(), "
    ".to(), .float() and .mean(1) / .sum(1) over the heads return maps."
)

# Operators on the dense matrix (attn * 2, attn > 0.1) get the same advice, not Python's
# "unsupported operand type(s)".
for _name in (
    "add radd sub rsub mul rmul truediv rtruediv floordiv rfloordiv pow rpow matmul rmatmul "
    "lt le gt ge neg pos abs invert and rand or ror xor rxor"
).split():

    def _refuse(self, *args, _op=_name):
        raise TypeError(f"operator __{_op}__ on an AttentionMap: {_NOT_A_TENSOR}")

    setattr(AttentionMap, f"__{_name}__", _refuse)
del _name


def _expand_index(index, ndim: int = 4) -> list:
    """The index of an ``ndim``-D map as a list with the ellipsis expanded and missing
    trailing axes filled."""
    items = list(index) if isinstance(index, tuple) else [index]
    items = [_as_index_tensor(it) for it in items]
    for it in items:
        if isinstance(it, Tensor) and it.dtype == torch.bool and it.dim() > 1:
            raise IndexError(
                "attention maps take 1-D boolean indices only; index each axis separately"
            )
    used = sum(not _adds_axis(it) and it is not Ellipsis for it in items)
    if used > ndim:
        raise IndexError(f"too many indices for the {ndim}-D attention map: {used}")
    ellipses = [i for i, it in enumerate(items) if it is Ellipsis]
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    fill = [slice(None)] * (ndim - used)
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

"""Indexing ops: GatherElements, ScatterElements, GatherND, ScatterND, CumSum, TopK, NonZero, OneHot
and Unique, with their ONNX semantics of opsets 13..21 (ScatterElements/ScatterND ``reduction``
defaults to "none", as before opset 16 added it; GatherND ``batch_dims`` defaults to 0).

The four gathers and scatters share one representation: ``data`` seen as rows, ``data.reshape(R,
*tail)``, and an int array ``lin`` of row numbers, so that what they read or write is ``rows[lin]``
(shape ``lin.shape + tail``). GatherElements/ScatterElements address single elements (``tail`` is
empty); GatherND/ScatterND address the slices that follow the ``k`` indexed axes. The error of a
gather is then a scatter-add of rows (``np.add.at``: repeated indices sum their errors), and the error
of a scatter is a gather. The forwards save ``lin`` (the size of the indices) and the VJPs keep no
input alive (``keep=()``).
"""

from __future__ import annotations

import math

import numpy as np

from gradserve.worker.graph import Node
from gradserve.worker.ops.batch import NONE, BatchRule, BatchView, Rows, along_attr, along_axis, each_output, \
    first_rows, never, refuse
from gradserve.worker.ops.registry import OpError, family, normalize_axis, per_element

defop = family(flops=per_element)


def _unsplit(op: str):
    return never(f"is not known to keep the samples of a batch independent (no rule written for {op})")


def _str_attr(c, name: str, default: str) -> str:
    value = c.attr(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _scalar(a: np.ndarray, what: str, node: str) -> int:
    """A one-element int tensor (TopK's K, CumSum's axis, OneHot's depth) as a Python int."""
    a = np.asarray(a)
    if a.size != 1:
        raise OpError(f"{node}: {what} must have one element, has shape {a.shape}")
    return int(a.reshape(-1)[0])


def _row_numbers(parts: list[np.ndarray], dims: tuple[int, ...], node: str) -> np.ndarray:
    """Row-major flat positions ``sum_i parts[i] * stride_i`` in an array of shape ``dims``, the
    ``parts`` broadcast together; ONNX's negative indices count from the end, others must fit."""
    lin = np.zeros((), np.int64)
    stride = 1
    for p, d in zip(reversed(parts), reversed(dims)):
        p = p.astype(np.int64, copy=False)
        if p.size and (p.min() < -d or p.max() >= d):
            raise OpError(f"{node}: index out of range [{-d}, {d - 1}]")
        lin = lin + np.where(p < 0, p + d, p) * stride
        stride *= d
    return lin


def _elements_rows(c, data: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``lin`` for GatherElements/ScatterElements: ``out[i][j][k] = data[i][indices[i][j][k]][k]``
    (axis 1) is element ``lin[i, j, k]`` of ``data.reshape(-1)``."""
    axis = normalize_axis(int(c.attr("axis", 0)), data.ndim, c.node)
    fits = indices.ndim == data.ndim and all(
        n <= d for a, (n, d) in enumerate(zip(indices.shape, data.shape)) if a != axis)
    if not fits:
        raise OpError(f"{c.node}: indices of shape {indices.shape} do not fit data of shape {data.shape} on axis {axis}")
    # every other axis indexes itself: an arange along that axis
    parts = [indices if a == axis else np.arange(n).reshape((-1,) + (1,) * (indices.ndim - a - 1))
             for a, n in enumerate(indices.shape)]
    return np.broadcast_to(_row_numbers(parts, data.shape, c.node), indices.shape)


def _nd_rows(c, data: np.ndarray, indices: np.ndarray, batch_dims: int = 0) -> tuple[np.ndarray, int]:
    """``lin`` and the number of leading axes it addresses for GatherND/ScatterND: the index tuple
    ``indices[..., :]`` (after ``batch_dims`` shared batch axes) picks one row of
    ``data.reshape(prod(shape[:b + k]), *shape[b + k:])``."""
    b, k = batch_dims, indices.shape[-1] if indices.ndim else 0
    if indices.ndim < 1 or not 0 <= b < min(indices.ndim, data.ndim) or not 1 <= k <= data.ndim - b:
        raise OpError(f"{c.node}: indices of shape {indices.shape} (batch_dims {b}) do not fit data of "
                      f"shape {data.shape}")
    if indices.shape[:b] != data.shape[:b]:
        raise OpError(f"{c.node}: batch axes of indices {indices.shape[:b]} and data {data.shape[:b]} differ")
    # the batch axes index themselves, as GatherElements' other axes do
    nbatch = math.prod(data.shape[:b])
    batch = np.arange(nbatch).reshape(data.shape[:b] + (1,) * (indices.ndim - 1 - b))
    parts = [batch] + [indices[..., j] for j in range(k)]
    lin = _row_numbers(parts, (nbatch,) + data.shape[b:b + k], c.node)
    return np.broadcast_to(lin, indices.shape[:-1]), b + k


def _rows_shape(shape: tuple[int, ...], lead: int) -> tuple[int, ...]:
    return (math.prod(shape[:lead]),) + tuple(shape[lead:])


def _as_rows(a: np.ndarray, lead: int) -> np.ndarray:
    return a.reshape(_rows_shape(a.shape, lead))


# -- gathers ---------------------------------------------------------------------------------------------
def _gather_rows(c, data: np.ndarray, lin: np.ndarray, lead: int) -> np.ndarray:
    c.save(lin=lin, lead=lead)
    return np.take(_as_rows(data, lead), lin, axis=0)


def _gather_vjp(c, g):
    """Scatter-add the error back onto the rows it was read from."""
    lin, lead, shape = c.saved["lin"], c.saved["lead"], c.x.shape
    acc = np.zeros(_rows_shape(shape, lead), g.dtype)  # c.x is a stand-in: shape only
    np.add.at(acc, lin.reshape(-1), g.reshape((lin.size,) + acc.shape[1:]))
    return acc.reshape(shape), None


def _gather_elements(c, data, indices):
    return _gather_rows(c, data, _elements_rows(c, data, indices), data.ndim)


def _gather_nd(c, data, indices):
    lin, lead = _nd_rows(c, data, indices, int(c.attr("batch_dims", 0)))
    return _gather_rows(c, data, lin, lead)


def _gather_elements_batch(view: BatchView, node: Node, tags: list) -> Rows:
    """Exact along another axis than the batch's, with data and indices batched alike."""
    out = along_axis(view, node, tags, int(node.attrs.get("axis", 0)), params=False)
    if not tags[0] == tags[1] == first_rows(tags):
        raise refuse(node, "gathers with data and indices not both batched along one axis")
    return out


defop("GatherElements", _gather_elements, _gather_vjp, keep=(), differentiable=(0,),
      batch=BatchRule(_gather_elements_batch))
defop("GatherND", _gather_nd, _gather_vjp, keep=(), differentiable=(0,), batch=_unsplit("GatherND"))


# -- scatters --------------------------------------------------------------------------------------------
_REDUCE = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter_rows(c, data: np.ndarray, lin: np.ndarray, lead: int, updates: np.ndarray) -> np.ndarray:
    reduction = _str_attr(c, "reduction", "none")
    if reduction != "none" and reduction not in _REDUCE:
        raise OpError(f"{c.node}: unknown reduction '{reduction}'")
    out = data.copy()
    rows = _as_rows(out, lead)  # a view: out is contiguous
    if updates.shape != lin.shape + rows.shape[1:]:
        raise OpError(f"{c.node}: updates of shape {updates.shape}, the indices address {lin.shape + rows.shape[1:]}")
    if reduction == "none":
        rows[lin] = updates  # with repeated indices the last update wins
    else:
        _REDUCE[reduction].at(rows, lin.reshape(-1), updates.reshape((lin.size,) + rows.shape[1:]))
    c.save(lin=lin, lead=lead, reduction=reduction)
    return out


def _scatter_vjp(c, g):
    lin, lead, reduction = c.saved["lin"], c.saved["lead"], c.saved["reduction"]
    if reduction not in ("none", "add"):
        raise OpError(f"{c.node}: no gradient for reduction '{reduction}' (only 'none' and 'add')")
    grows = _as_rows(g, lead)
    dupdates = None
    if c.needs[2]:
        dupdates = np.take(grows, lin, axis=0)
        if reduction == "none":
            # Of updates written to the same row only the last one survives: find which one the
            # forward kept by replaying the same assignment with update numbers; the rest get 0.
            ids = np.arange(lin.size).reshape(lin.shape)
            winner = np.full(grows.shape[0], -1, np.int64)
            winner[lin] = ids
            kept = (winner[lin] == ids).reshape(lin.shape + (1,) * (grows.ndim - 1))
            if not kept.all():
                dupdates = dupdates * kept
    ddata = None
    if c.needs[0]:
        if reduction == "add":
            ddata = g
        else:  # overwritten values had no effect
            ddata = g.copy()
            _as_rows(ddata, lead)[lin] = 0
    return ddata, None, dupdates


def _scatter_elements(c, data, indices, updates):
    return _scatter_rows(c, data, _elements_rows(c, data, indices), data.ndim, updates)


def _scatter_nd(c, data, indices, updates):
    lin, lead = _nd_rows(c, data, indices)
    return _scatter_rows(c, data, lin, lead, updates)


defop("ScatterElements", _scatter_elements, _scatter_vjp, keep=(), differentiable=(0, 2),
      batch=_unsplit("ScatterElements"))
defop("ScatterND", _scatter_nd, _scatter_vjp, keep=(), differentiable=(0, 2), batch=_unsplit("ScatterND"))


# -- CumSum ----------------------------------------------------------------------------------------------
def _cumsum_along(x: np.ndarray, axis: int, exclusive: bool, reverse: bool) -> np.ndarray:
    if reverse:
        x = np.flip(x, axis)
    y = np.cumsum(x, axis=axis, dtype=x.dtype)  # dtype: numpy would widen int32 sums
    if exclusive:
        # shift by one rather than subtract x: exact, and no cancellation
        y = np.concatenate([np.zeros_like(np.take(y, [0], axis)), np.take(y, np.arange(y.shape[axis] - 1), axis)], axis)
    return np.flip(y, axis) if reverse else y


def _cumsum(c, x, axis):
    ax = normalize_axis(_scalar(axis, "CumSum axis", c.node), x.ndim, c.node)
    c.save(axis=ax)
    if x.shape[ax] == 0:
        return x.copy()
    return _cumsum_along(x, ax, bool(c.attr("exclusive", 0)), bool(c.attr("reverse", 0)))


def _cumsum_vjp(c, g):
    # y_j sums x_i over i <= j (or i < j): so x_i's error sums g_j over j >= i (j > i), a cumsum
    # the other way round with the same exclusivity.
    ax = c.saved["axis"]
    if g.shape[ax] == 0:
        return g, None
    return _cumsum_along(g, ax, bool(c.attr("exclusive", 0)), not c.attr("reverse", 0)), None


def _cumsum_batch(view: BatchView, node: Node, tags: list) -> Rows:
    """Exact along another axis than the batch's (a constant axis input)."""
    c = view.const(node, 1)
    if c is None or tags[1] != NONE:
        raise refuse(node, "has an axis that is not a constant")
    return along_axis(view, node, tags, int(c.reshape(-1)[0]))


defop("CumSum", _cumsum, _cumsum_vjp, keep=(), differentiable=(0,), batch=BatchRule(_cumsum_batch, infer="same"))


# -- TopK ------------------------------------------------------------------------------------------------
def _topk(c, x, k):
    axis = normalize_axis(int(c.attr("axis", -1)), x.ndim, c.node)
    kk, n = _scalar(k, "TopK K", c.node), x.shape[axis]
    if not 0 <= kk <= n:
        raise OpError(f"{c.node}: K={kk} out of range for axis {axis} of size {n}")
    # ONNX breaks ties by the lower index, smallest or largest. A stable sort keeps ties in index
    # order ascending; for descending, sort the reversed axis and reverse the result, which puts
    # tied values back in increasing index order. (torch.topk promises no order among ties.)
    if c.attr("largest", 1):
        order = n - 1 - np.flip(np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)
    else:
        order = np.argsort(x, axis=axis, kind="stable")
    # sorted=0 leaves the order unspecified, so sorted output is always conformant
    idx = np.take(order, np.arange(kk), axis=axis).astype(np.int64, copy=False)
    c.save(idx=idx, axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx


def _topk_vjp(c, g, _g_indices=None):
    if g is None:
        return None, None
    dx = np.zeros(c.x.shape, g.dtype)
    np.put_along_axis(dx, c.saved["idx"], g, axis=c.saved["axis"])  # the indices are distinct
    return dx, None


defop("TopK", _topk, _topk_vjp, keep=(), differentiable=(0,),
      batch=BatchRule(each_output(along_attr(-1)), shape_inputs=(1,)))


# -- NonZero, OneHot -------------------------------------------------------------------------------------
def _nonzero(c, x):
    if x.ndim == 0:  # numpy no longer takes 0-d arrays; ONNX's answer has rank(x) = 0 rows
        return np.zeros((0, int(x != 0)), np.int64)
    return np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1)


defop("NonZero", _nonzero, batch=never("has as many outputs as its batch holds nonzeros: samples do not stay apart"))


def _one_hot_positions(c, indices: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per index: its position along the one-hot axis, whether it is in range, the axis, the depth."""
    d = _scalar(depth, "OneHot depth", c.node)  # any numeric type; a float depth is truncated
    if d < 0:
        raise OpError(f"{c.node}: OneHot depth {d} is negative")
    axis = int(c.attr("axis", -1))
    if not -indices.ndim - 1 <= axis <= indices.ndim:
        raise OpError(f"{c.node}: OneHot axis {axis} out of range for rank {indices.ndim + 1}")
    axis %= indices.ndim + 1
    idx = indices.astype(np.int64)  # float indices are truncated, as ONNX's reference does
    idx = np.where(idx < 0, idx + d, idx)  # -depth..-1 count from the end; the rest is all off
    return idx, (idx >= 0) & (idx < d), axis, d


def _one_hot(c, indices, depth, values):
    if values.size != 2:
        raise OpError(f"{c.node}: OneHot values must be [off, on], got shape {values.shape}")
    idx, _, axis, d = _one_hot_positions(c, indices, depth)
    hot = np.expand_dims(idx, axis) == np.arange(d).reshape((-1,) + (1,) * (indices.ndim - axis))
    off, on = values.reshape(-1)
    return np.where(hot, on, off).astype(values.dtype, copy=False)


def _one_hot_vjp(c, g):
    # off and on each fill their positions: the error of on sums g over the hot positions, of off
    # over the rest.
    idx, valid, axis, _ = _one_hot_positions(c, c.inputs[0], c.inputs[1])
    at = np.take_along_axis(np.moveaxis(g, axis, -1), np.where(valid, idx, 0)[..., None], axis=-1)[..., 0]
    d_on = at[valid].sum()
    dvalues = np.array([g.sum() - d_on, d_on], g.dtype).reshape(c.inputs[2].shape)
    return None, None, dvalues


# the VJP reads indices and depth (small); values only for its shape
defop("OneHot", _one_hot, _one_hot_vjp, keep=("x0", "x1"), differentiable=(2,), batch=_unsplit("OneHot"))


# -- Unique ------------------------------------------------------------------------------------------------
def _unique(c, x):
    axis = c.attr("axis")
    if axis is not None:
        axis = normalize_axis(int(axis), x.ndim, c.node)
    y, first, inverse, counts = np.unique(x, return_index=True, return_inverse=True, return_counts=True, axis=axis)
    inverse = inverse.reshape(-1)  # numpy 2.0 shaped it like x
    if not c.attr("sorted", 1):
        # order of first occurrence: renumber the sorted uniques by where they first appear
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        y = np.take(y, order, axis=0 if axis is None else axis)
        first, counts, inverse = first[order], counts[order], rank[inverse]
    return y, first.astype(np.int64), inverse.astype(np.int64), counts.astype(np.int64)


def _unique_vjp(c, g, *_int_errors):
    if g is not None:
        # Y is not a differentiable function of X: a perturbation splits equal values apart
        # (torch.unique has no derivative either). Refuse rather than drop the error silently.
        raise OpError(f"{c.node}: Unique's output Y has no gradient")
    return (None,)


defop("Unique", _unique, _unique_vjp, keep=(), batch=never("finds the unique values of the whole batch"))

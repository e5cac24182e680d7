"""How the shape ops (:mod:`gradserve.worker.ops.shape`) move the batch axis: the rules their rows
name in ``batch=`` (see :mod:`gradserve.worker.ops.batch`), apart from their forwards and VJPs for
the size of the module. Each returns the output's tag or raises the refusal naming the node.
"""

from __future__ import annotations

import math

import numpy as np

from gradserve.worker.graph import Node
from gradserve.worker.ops.batch import NONE, SHAPE, BatchView, Rows, along_axis, batched_at, first_rows, input_shape, \
    refuse

_BIG = 1 << 62  # a slice end at least this large means "to the end"


def reshape(view: BatchView, node: Node, tags: list) -> Rows:
    """Exact when each sample's elements stay runs along one output axis. In row-major order the
    input is P outer blocks (the axes before the batch axis, times its ``outer``), each holding
    the n samples one after the other, blk elements each. An output axis a whose preceding axes
    multiply to a divisor of P, and whose following axes to a divisor of blk, holds the batch the
    same way: (B, T, V) <-> (B*T, V); attention's heads (T, B, E) -> (T, B*H, E/H); and its rows
    (T, B*H, d) -> (T*B*H, d), where the T blocks become ``outer``. Planning checks the output
    at every micro-batch size. A constant shape that spells the batch-derived length out (a
    fixed-batch export of ``x.view(64, -1)``, ``t.reshape(B * T)`` written as ``[30]``) gets -1 there
    in the micro-batches' model: exact, since the layout above holds whatever the batch size."""
    src, dst = view.shape(node.inputs[0]), view.shape(node.outputs[0])
    if tags[1] not in (NONE, SHAPE) or src is None or dst is None or not dst:
        raise refuse(node, "changes the batch axis")
    blocks = math.prod(src[:tags[0].axis]) * tags[0].outer
    blk = math.prod(src) // (blocks * view.n)
    out = None
    for a in range(len(dst)):
        before, after = math.prod(dst[:a]), math.prod(dst[a + 1:])
        if blocks % before == 0 and after and blk % after == 0 and dst[a] == blocks // before * view.n * (blk // after):
            out = Rows(a, blocks // before)
            break
    if out is None:
        raise refuse(node, "moves the batch to another place in the layout, or splits it")
    target = view.const(node, 1)
    if target is not None:
        entries = [int(v) for v in target.reshape(-1)]
        entry = entries[out.axis] if out.axis < len(entries) else None
        copies = entry == 0 and not node.attrs.get("allowzero", 0) and out.axis < len(src) \
            and src[out.axis] == dst[out.axis]
        if entry not in (-1, None) and not copies:
            # The entry spells out the batch-derived length (a fixed-batch export): -1 there gives each
            # micro-batch its own, every other entry pinned to its length, which the batch leaves alone.
            pinned = [-1 if a == out.axis else (dst[a] if e == -1 else e) for a, e in enumerate(entries)]
            view.rewrite(node, 1, np.asarray(pinned, np.int64))
    return out


def flatten(view: BatchView, node: Node, tags: list) -> Rows:
    """Merging the axes after the batch into its rows (or keeping them) is exact."""
    axis = tags[0].axis
    k = int(node.attrs.get("axis", 1))
    k = k % len(view.shape(node.inputs[0]) or (1,)) if k < 0 else k
    if axis == 0 and k >= 1:
        return view.rows(0)
    raise refuse(node, f"flattens the batch axis (axis {axis}) into another one")


def squeeze(view: BatchView, node: Node, tags: list) -> Rows:
    """Squeeze/Unsqueeze: the batch axis moves by the axes removed or inserted before it."""
    axis = first_rows(tags).axis
    axes = view.axes(node, 1)
    in_rank = view.rank(node.inputs[0])
    if in_rank is None:
        raise refuse(node, "has an input of unknown shape")
    if node.op_type == "Squeeze":
        if axes is None:  # every size-1 axis; the batch axis has n*per >= 2 entries (check_size sees b=1)
            axes = [k for k, d in enumerate(input_shape(view, node, 0)) if d == 1]
        axes = sorted(a % in_rank for a in axes)
        if axis in axes:
            raise refuse(node, "squeezes the batch axis")
        return view.rows(axis - sum(a < axis for a in axes))
    if axes is None:
        raise refuse(node, "has axes that are not constants")
    out_rank = in_rank + len(axes)
    inserted = sorted(a % out_rank for a in axes)
    kept = [k for k in range(out_rank) if k not in inserted]
    return view.rows(kept[axis])


def transpose(view: BatchView, node: Node, tags: list) -> Rows:
    """The batch axis goes where the permutation puts it."""
    perm = node.attrs.get("perm")
    if perm is None:
        perm = list(range((view.rank(node.inputs[0]) or 0) - 1, -1, -1))
    if tags[0].axis in perm:
        return view.rows(list(perm).index(tags[0].axis))
    raise refuse(node, "moves the batch axis out of range")


def concat(view: BatchView, node: Node, tags: list) -> Rows:
    """Exact along another axis than the batch's, when every input is batched the same way."""
    out = along_axis(view, node, tags, int(node.attrs.get("axis", 0)), params=False)
    first = first_rows(tags)
    if any(tags[k] != first for k, name in enumerate(node.inputs) if name):
        raise refuse(node, "concatenates a batched value with an unbatched one")
    return out


def slice_axis(view: BatchView, node: Node, tags: list) -> Rows:
    """Slices of other axes are per sample; along the batch axis only the whole of it."""
    axis = first_rows(tags).axis
    starts, ends = view.const(node, 1), view.const(node, 2)
    axes = view.axes(node, 3)
    steps = view.const(node, 4)
    rank = view.rank(node.inputs[0]) or 1
    if len(node.inputs) > 3 and node.inputs[3] and axes is None:
        raise refuse(node, "has axes that are not constants")
    if starts is None or ends is None:
        if axes is not None and axis not in [a % rank for a in axes]:
            return view.rows(axis)
        raise refuse(node, "slices the batch axis with bounds that are not constants")
    axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
    if axis not in axes:
        return view.rows(axis)
    k = axes.index(axis)
    step = 1 if steps is None else int(steps.reshape(-1)[k])
    start, end = int(starts.reshape(-1)[k]), int(ends.reshape(-1)[k])
    full = input_shape(view, node, 0)[axis]
    if step == 1 and (start == 0 or start <= -full):
        if end >= _BIG:
            return view.rows(axis)  # the whole axis: a no-op there
        if end == full:
            raise refuse(node, f"has a constant end ({end}) that holds the batch size along the batch "
                               "axis; each micro-batch needs its own")
    raise refuse(node, "slices the batch axis")


def expand_or_tile(view: BatchView, node: Node, tags: list) -> Rows:
    """Expand/Tile of a batched value: exact when the batch axis is neither broadcast nor repeated."""
    axis = first_rows(tags).axis
    rank = view.rank(node.inputs[0]) or 0
    out_axis = axis + (view.rank(node.outputs[0]) or rank) - rank  # Expand may prepend axes
    if tags[1] == SHAPE:
        return view.rows(out_axis)  # a shape computed from the batch's: planning checks it follows
    c = view.const(node, 1)
    if c is None:
        raise refuse(node, "has a shape that is not a constant")
    sizes = [int(v) for v in c.reshape(-1)]
    # Expand aligns its shape with the output's last axes; Tile has one repeat per axis.
    k = out_axis - ((view.rank(node.outputs[0]) or 0) - len(sizes)) if node.op_type == "Expand" else axis
    entry = sizes[k] if 0 <= k < len(sizes) else 1
    if entry == 1:
        return view.rows(out_axis)
    if node.op_type == "Expand" and entry == input_shape(view, node, 0)[axis]:
        # A no-op along the batch axis that holds the batch size (the legacy exporter's
        # broadcast in mse_loss, from a fixed-batch export): 1 there keeps the input's own size
        # at every batch size, and changes nothing at this one.
        sizes[k] = 1
        view.rewrite(node, 1, np.asarray(sizes, np.int64))
        return view.rows(out_axis)
    raise refuse(node, "repeats or broadcasts along the batch axis")


def pad(view: BatchView, node: Node, tags: list) -> Rows:
    """Exact unless it pads the batch axis."""
    axis = first_rows(tags).axis
    pads = view.const(node, 1) if len(node.inputs) > 1 and node.inputs[1] else node.attrs.get("pads")
    if pads is None or any(isinstance(t, Rows) for t in tags[1:]):
        raise refuse(node, "has pads that are not constants")
    pads = [int(p) for p in np.ravel(pads)]
    rank = view.rank(node.inputs[0]) or 0
    axes = [a % rank for a in view.axes(node, 3) or range(rank)]
    if axis in axes and (pads[axes.index(axis)] or pads[len(axes) + axes.index(axis)]):
        raise refuse(node, "pads the batch axis")
    return view.rows(axis)


def gather(view: BatchView, node: Node, tags: list) -> Rows:
    """An embedding lookup (sample i's indices pick rows of an unbatched table), or a gather from
    batched data along another axis than the batch's."""
    rows = batched_at(tags)
    axis = tags[rows[0]].axis
    g = int(node.attrs.get("axis", 0)) % (view.rank(node.inputs[0]) or 1)
    if tags[1] == SHAPE:
        return _gather_computed(view, node, tags[0], g)
    if rows == [1]:
        return view.rows(g + axis)
    if rows == [0] and g != axis:
        return view.rows(axis if axis < g else axis - 1 + (view.rank(node.inputs[1]) or 0))
    raise refuse(node, "gathers along the batch axis")


def _gather_computed(view: BatchView, node: Node, data: Rows, g: int) -> Rows:
    """A gather from batched data with indices computed from the batch's shape (torch's exporter
    writes ``as_strided`` as a Gather from the flattened input at indices built from its sizes and
    strides). Each micro-batch computes its own indices: exact along another axis than the batch's
    when they do not change with the batch size; along the batch's when sample s's block of them
    is sample 0's shifted by s samples (every sample reads only its own entries) and a micro-batch
    of b samples computes the first b blocks."""
    name = node.inputs[1]
    idx = view.shape_value(name)
    if idx is None:
        raise refuse(node, "uses the batch size as data; each micro-batch would see its own size")
    if g != data.axis:
        view.at_sizes(node, lambda b: None if _equal(view.shape_value(name, b), idx) else
                      f"gathers at indices '{name}' that change with the batch size")
        return view.rows(data.axis if data.axis < g else data.axis - 1 + idx.ndim)
    per = input_shape(view, node, 0)[g] // view.n
    k = _sample_axis(idx, view.n, per) if data.outer == 1 else None
    if k is None:
        raise refuse(node, f"gathers along the batch axis at indices '{name}' that do not keep each sample's "
                           "entries to itself")

    def first_blocks(b: int) -> str | None:
        want = np.take(idx, np.arange(idx.shape[k] // view.n * b), axis=k)
        if _equal(view.shape_value(name, b), want):
            return None
        return f"computes indices '{name}' for {b} samples that are not those of the first {b} of {view.n}"

    view.at_sizes(node, first_blocks)
    return view.rows(g + k)


def _equal(value: np.ndarray | None, want: np.ndarray) -> bool:
    """Whether a shape value (None: planning could not compute it) is ``want``."""
    return value is not None and np.array_equal(value, want)


def _sample_axis(idx: np.ndarray, n: int, per: int) -> int | None:
    """The axis of ``idx`` holding n blocks, sample s's being sample 0's + s*per with sample 0's in
    [0, per): the indices of a gather that keeps every sample's entries to itself."""
    for k in range(idx.ndim):
        if idx.shape[k] % n:
            continue
        blocks = np.moveaxis(idx, k, 0).reshape(n, idx.shape[k] // n, -1)
        first = blocks[0]
        shift = (np.arange(n) * per).reshape(n, 1, 1)
        if first.min(initial=0) >= 0 and first.max(initial=0) < per and np.array_equal(blocks, first + shift):
            return k
    return None

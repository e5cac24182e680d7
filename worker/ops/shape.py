"""Shape and data-movement ops in their opset 13-21 forms: Reshape, Flatten, Transpose, Concat,
Split, Slice, Squeeze, Unsqueeze, Expand, Tile, Pad, Trilu, Gather, and the generators Shape, Size,
ConstantOfShape, Constant and Range.

Shape-like operands (shapes, axes, starts/ends, pads, repeats, indices) are int64 *inputs* since
opset 13 (Pad's ``axes`` since 18); they never get an error (``differentiable=(0,)``), and what the VJP needs from them is put in
``c.save`` by the forward, so the VJPs keep no input alive (``keep=()``) -- they read shapes only.
Outputs may be views of the input (Reshape, Transpose, Slice...); ops never write into their inputs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gradserve.worker.ops import shape_batch as rules
from gradserve.worker.ops.batch import PER_SAMPLE, SHAPE, BatchRule, along_attr, each_output, linear, never
from gradserve.worker.ops.registry import OpError, family, normalize_axis, per_element, unbroadcast

defop = family(flops=per_element)


def _ints(a: np.ndarray | None) -> list[int]:
    return [] if a is None else [int(v) for v in np.asarray(a).reshape(-1).tolist()]


def _axis(c, ndim: int, default: int = 0) -> int:
    return normalize_axis(int(c.attr("axis", default)), ndim, c.node)


def _to_shape(c, g):
    """VJP of any op that only rearranges the elements' shape."""
    return g.reshape(c.x.shape)


# -- reshaping ----------------------------------------------------------------------------------------
def _reshape(c, x, shape):
    dims = _ints(shape)
    if not c.attr("allowzero", 0):
        # 0 copies the input's dimension at the same index (unless allowzero says 0 means 0).
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(c, x):
    axis = int(c.attr("axis", 1))
    if not -x.ndim <= axis <= x.ndim:
        raise OpError(f"{c.node}: Flatten axis {axis} out of range for rank {x.ndim}")
    axis = axis + x.ndim if axis < 0 else axis  # in [0, r]: r flattens everything into the rows
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _squeeze(c, x, axes=None):
    if axes is None:
        return np.squeeze(x)
    ax = tuple(normalize_axis(a, x.ndim, c.node) for a in _ints(axes))
    if any(x.shape[a] != 1 for a in ax):
        raise OpError(f"{c.node}: cannot squeeze axes {_ints(axes)} of shape {x.shape}")
    return np.squeeze(x, axis=ax)


def _unsqueeze(c, x, axes):
    ax = _ints(axes)
    # Axes index the *output*; expand_dims normalizes negatives against the output rank too.
    return np.expand_dims(x, tuple(normalize_axis(a, x.ndim + len(ax), c.node) for a in ax))


def _transpose(c, x):
    perm = c.attr("perm")
    return np.transpose(x, None if perm is None else [int(p) for p in perm])


def _transpose_vjp(c, g):
    perm = c.attr("perm")
    return np.transpose(g, None if perm is None else np.argsort([int(p) for p in perm]))


_SQUEEZE = BatchRule(rules.squeeze, shape_inputs=(1,), reduced=linear)
defop("Reshape", _reshape, _to_shape, keep=(), differentiable=(0,),
      batch=BatchRule(rules.reshape, shape_inputs=(1,), reduced=linear, sized_by_constant=True))
defop("Flatten", _flatten, _to_shape, keep=(), batch=BatchRule(rules.flatten, reduced=linear))
defop("Squeeze", _squeeze, _to_shape, keep=(), differentiable=(0,), batch=_SQUEEZE)
defop("Unsqueeze", _unsqueeze, _to_shape, keep=(), differentiable=(0,), batch=_SQUEEZE)
defop("Transpose", _transpose, _transpose_vjp, keep=(), batch=BatchRule(rules.transpose, reduced=linear))


# DepthToSpace / SpaceToDepth (pixel shuffle): a reshape, a transpose and a reshape; the VJP runs the
# same three steps backwards.
def _blocks(c, x):
    b = int(c.attr("blocksize"))
    if x.ndim != 4 or b < 1:
        raise OpError(f"{c.node}: needs a 4-D input and blocksize >= 1 (got shape {x.shape}, blocksize {b})")
    return (*x.shape, b)


def _depth_to_space(c, x):
    n, ch, h, w, b = _blocks(c, x)
    if ch % (b * b):
        raise OpError(f"{c.node}: {ch} channels do not divide by blocksize^2 = {b * b}")
    if c.attr("mode", "DCR") == "CRD":
        split, perm = (n, ch // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3)
    else:
        split, perm = (n, b, b, ch // (b * b), h, w), (0, 3, 4, 1, 5, 2)
    return _shuffle(c, x, split, perm, (n, ch // (b * b), h * b, w * b))


def _space_to_depth(c, x):
    n, ch, h, w, b = _blocks(c, x)
    if h % b or w % b:
        raise OpError(f"{c.node}: spatial shape {(h, w)} does not divide by blocksize {b}")
    return _shuffle(c, x, (n, ch, h // b, b, w // b, b), (0, 3, 5, 1, 2, 4), (n, ch * b * b, h // b, w // b))


def _shuffle(c, x, split, perm, out):
    moved = x.reshape(split).transpose(perm)
    c.save(moved=moved.shape, perm=perm)
    return moved.reshape(out)


def _shuffle_vjp(c, g):
    return g.reshape(c.saved["moved"]).transpose(np.argsort(c.saved["perm"])).reshape(c.x.shape)


defop("DepthToSpace", _depth_to_space, _shuffle_vjp, keep=(), batch=PER_SAMPLE)
defop("SpaceToDepth", _space_to_depth, _shuffle_vjp, keep=(), batch=PER_SAMPLE)


# -- joining and splitting ----------------------------------------------------------------------------
def _concat(c, *xs):
    return np.concatenate(xs, axis=_axis(c, xs[0].ndim))


def _concat_vjp(c, g):
    axis = _axis(c, g.ndim)
    cuts = np.cumsum([x.shape[axis] for x in c.inputs])[:-1]
    return tuple(np.split(g, cuts, axis=axis))


def _split(c, x, split=None):
    axis, n = _axis(c, x.ndim), c.n_outputs
    if split is not None:
        sizes = _ints(split)
        if len(sizes) != n or sum(sizes) != x.shape[axis] or min(sizes, default=0) < 0:
            raise OpError(f"{c.node}: split {sizes} does not cut axis {axis} of size {x.shape[axis]} into {n}")
    elif c.attr("num_outputs") is not None:
        # Opset 18: chunks of ceil(size / n), the last one smaller when the axis does not divide evenly.
        n, size = int(c.attr("num_outputs")), x.shape[axis]
        chunk = -(-size // n)
        sizes = [min(chunk, max(size - k * chunk, 0)) for k in range(n)]
    else:
        # Opsets 13-17: equal parts, no ragged last chunk.
        if x.shape[axis] % n:
            raise OpError(f"{c.node}: axis {axis} of size {x.shape[axis]} does not split into {n} equal parts")
        sizes = [x.shape[axis] // n] * n
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _split_vjp(c, *gs):
    # Outputs that got no error contribute zeros of their shape.
    parts = [g if g is not None else np.zeros(y.shape, y.dtype) for g, y in zip(gs, c.outputs)]
    return np.concatenate(parts, axis=_axis(c, c.x.ndim)), None


defop("Concat", _concat, _concat_vjp, keep=(), batch=BatchRule(rules.concat))
defop("Split", _split, _split_vjp, keep=(), differentiable=(0,),
      batch=BatchRule(each_output(along_attr(0)), shape_inputs=(1,)))


# -- Slice ----------------------------------------------------------------------------------------------
def _slice(c, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise OpError(f"{c.node}: starts, ends, axes and steps differ in length")
    slices = [slice(None)] * x.ndim
    seen = set()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = normalize_axis(a, x.ndim, c.node)
        if a in seen or st == 0:
            raise OpError(f"{c.node}: repeated axis {a} or zero step")
        seen.add(a)
        d = x.shape[a]
        s, e = s + d if s < 0 else s, e + d if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), d), min(max(e, 0), d)
        else:
            # Counting down, start clamps to [0, d-1] and end to [-1, d-1]; -1 means "past index 0",
            # which Python spells None (a literal -1 would wrap around).
            s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
        slices[a] = slice(s, e if e >= 0 else None, st)
    index = tuple(slices)
    c.save(index=index)
    return x[index]


def _slice_vjp(c, g):
    dx = np.zeros(c.x.shape, g.dtype)
    dx[c.saved["index"]] = g
    return dx


defop("Slice", _slice, _slice_vjp, keep=(), differentiable=(0,),
      batch=BatchRule(rules.slice_axis, shape_inputs=(1, 2, 3, 4), sized_by_constant=True))


# -- broadcasting and repeating ----------------------------------------------------------------------
def _expand(c, x, shape):
    out = np.broadcast_shapes(x.shape, tuple(_ints(shape)))  # bidirectional: shape may hold 1s
    if out == x.shape:
        return x  # values are never written in place, so the input itself will do (no copy)
    return np.broadcast_to(x, out).copy()  # a real array, not a read-only zero-stride view


def _tile(c, x, repeats):
    reps = _ints(repeats)
    if len(reps) != x.ndim or min(reps, default=0) < 0:
        raise OpError(f"{c.node}: repeats {reps} do not match rank {x.ndim}")
    return np.tile(x, reps)


def _tile_vjp(c, g):
    # Output axis i of size r_i * d_i is (r_i, d_i) in row-major order: sum out the r_i axes.
    shape = c.x.shape
    reps = [y // d if d else 0 for y, d in zip(g.shape, shape)]
    if 0 in reps:
        return np.zeros(shape, g.dtype)
    split = [n for pair in zip(reps, shape) for n in pair]
    return g.reshape(split).sum(axis=tuple(range(0, 2 * len(shape), 2)))


# an unbatched value copied to the batch's shape (from Shape) mixes no samples: batched on axis 0
_TILE = BatchRule(rules.expand_or_tile, shape_inputs=(1,), shaped_by=1, sized_by_constant=True)
defop("Expand", _expand, lambda c, g: unbroadcast(g, c.x.shape), keep=(), differentiable=(0,),
      batch=dataclasses.replace(_TILE, reduced=linear))
defop("Tile", _tile, _tile_vjp, keep=(), differentiable=(0,), batch=_TILE)


# -- Pad --------------------------------------------------------------------------------------------------
def _pad(c, x, pads, constant_value=None, axes=None):
    mode = c.attr("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    p, r = _ints(pads), x.ndim
    if axes is not None:  # opset 18: pads name only these axes (begins, then ends); others get 0
        ax = [normalize_axis(a, r, c.node) for a in _ints(axes)]
        if len(p) != 2 * len(ax):
            raise OpError(f"{c.node}: pads has {len(p)} values for {len(ax)} axes")
        full = [0] * (2 * r)
        for k, a in enumerate(ax):
            full[a], full[a + r] = p[k], p[k + len(ax)]
        p = full
    if len(p) != 2 * r:
        raise OpError(f"{c.node}: pads has {len(p)} values, rank {r} needs {2 * r}")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise OpError(f"{c.node}: Pad mode '{mode}' is not supported")
    # Negative pads crop: crop first, then pad by the non-negative amounts.
    crop = tuple(slice(max(-b, 0), d - max(-e, 0)) for b, e, d in zip(p[:r], p[r:], x.shape))
    widths = [(max(b, 0), max(e, 0)) for b, e in zip(p[:r], p[r:])]
    xc = x[crop]
    c.save(crop=crop, widths=widths, mode=mode, cropped=xc.shape)
    if mode == "constant":
        cval = constant_value.item() if constant_value is not None and constant_value.size else 0
        return np.pad(xc, widths, mode="constant", constant_values=cval)
    if any(w != (0, 0) and d == 0 for w, d in zip(widths, xc.shape)):
        raise OpError(f"{c.node}: cannot {mode}-pad an empty axis")
    return np.pad(xc, widths, mode=mode)  # type: ignore[arg-type]  # a str checked above, not a Literal


def _pad_source(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """For each output position along one axis, the input position it copies (edge/reflect/wrap)."""
    j = np.arange(-before, n + after)
    if mode == "wrap":  # opset 19: periodic
        return j % n
    if mode == "edge" or n == 1:  # a single element reflects onto itself
        return np.clip(j, 0, n - 1)
    period = 2 * (n - 1)  # reflect without repeating the edge: 0 1 2 1 0 1 2 ..., as np.pad does
    j = np.abs(j) % period
    return np.where(j >= n, period - j, j)


def _pad_vjp(c, g):
    crop, widths, mode, cropped = c.saved["crop"], c.saved["widths"], c.saved["mode"], c.saved["cropped"]
    dcval = None
    if mode == "constant":
        inner = g[tuple(slice(b, b + n) for (b, _), n in zip(widths, cropped))]
        if len(c.needs) > 2 and c.needs[2]:
            # Every padded position holds the constant: its error is the error outside the interior.
            cv = c.inputs[2]
            dcval = np.asarray(g.sum() - inner.sum(), dtype=cv.dtype).reshape(cv.shape)
    else:
        # Each axis maps output positions to input positions; undo axis by axis, summing the copies.
        inner = g
        for axis, ((b, e), n) in enumerate(zip(widths, cropped)):
            if b or e:
                acc = np.zeros(inner.shape[:axis] + (n,) + inner.shape[axis + 1:], g.dtype)
                # ignore: numpy's stub for ufunc.at takes no tuple of slices and arrays; numpy does
                np.add.at(acc, (slice(None),) * axis + (_pad_source(n, b, e, mode),), inner)  # type: ignore[arg-type]
                inner = acc
    if inner.shape == c.x.shape:
        return inner, None, dcval, None
    dx = np.zeros(c.x.shape, g.dtype)
    dx[crop] = inner
    return dx, None, dcval, None


defop("Pad", _pad, _pad_vjp, keep=(), differentiable=(0, 2), batch=BatchRule(rules.pad))


def _trilu(c, x, k=None):
    kk = int(k) if k is not None else 0
    c.save(k=kk)
    return _triangle(x, kk, c.attr("upper", 1))


def _triangle(x, k: int, upper) -> np.ndarray:
    return np.triu(x, k) if upper else np.tril(x, k)  # both act on the last two axes


# The VJP of a mask is the same mask.
defop("Trilu", _trilu, lambda c, g: _triangle(g, c.saved["k"], c.attr("upper", 1)), keep=(), differentiable=(0,),
      batch=never("is not known to keep the samples of a batch independent (no rule written for Trilu)"))


# -- Gather -------------------------------------------------------------------------------------------
def _gather(c, data, indices):
    axis = _axis(c, data.ndim)
    idx = indices.astype(np.int64, copy=False)
    if idx.size and idx.min() < 0:
        idx = np.where(idx < 0, idx + data.shape[axis], idx)  # ONNX allows negative indices
    c.save(idx=idx, axis=axis)
    return np.take(data, idx, axis=axis)  # raises on out-of-range indices


def _gather_vjp(c, g):
    # A scatter-add: repeated indices sum their errors. The axis is moved to the front so that both
    # the error and the result are (rows, everything else) matrices and np.add.at adds whole rows;
    # for axis 0 (embeddings) that is all views, no copies.
    idx, axis, shape = c.saved["idx"], c.saved["axis"], c.x.shape
    pre, post = shape[:axis], shape[axis + 1:]
    rows = np.moveaxis(g.reshape(pre + (idx.size,) + post), axis, 0).reshape(idx.size, -1)
    acc = np.zeros((shape[axis], rows.shape[1]), g.dtype)
    np.add.at(acc, idx.reshape(-1), rows)
    return np.moveaxis(acc.reshape((shape[axis],) + pre + post), 0, axis), None


defop("Gather", _gather, _gather_vjp, keep=(), differentiable=(0,), batch=BatchRule(rules.gather, shape_inputs=(1,)))


# -- generators: outputs that carry no error ----------------------------------------------------------
def _shape(c, x):
    # start/end follow Python slicing: negatives count from the back, out of range clamps.
    end = c.attr("end")
    return np.array(x.shape[int(c.attr("start", 0)): None if end is None else int(end)], dtype=np.int64)


def _constant_of_shape(c, shape):
    value = c.attr("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value)
    if value.size != 1:
        raise OpError(f"{c.node}: ConstantOfShape value must have one element, has {value.size}")
    return np.full(_ints(shape), value.reshape(-1)[0], dtype=value.dtype)


_CONSTANT_ATTRS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def _constant(c):
    given = [k for k in c.attrs if k in ("value", "sparse_value", "value_string", "value_strings", *_CONSTANT_ATTRS)]
    if len(given) != 1:
        raise OpError(f"{c.node}: Constant needs exactly one value attribute, got {given or 'none'}")
    key = given[0]
    if key == "value":
        return np.array(c.attrs[key])  # a copy: the attribute must outlive any consumer
    if key in _CONSTANT_ATTRS:
        return np.array(c.attrs[key], dtype=_CONSTANT_ATTRS[key])
    raise OpError(f"{c.node}: Constant {key} is not supported")


def _range(c, start, limit, delta):
    s, lim, d = start.item(), limit.item(), delta.item()
    if d == 0:
        raise OpError(f"{c.node}: Range delta is 0")
    n = max(math.ceil((lim - s) / d), 0)  # ONNX: number_of_elements = max(ceil((limit - start) / delta), 0)
    return (s + d * np.arange(n)).astype(start.dtype, copy=False)


_OF_SHAPE = BatchRule(lambda view, node, tags: SHAPE)  # the batch's shape: fine as a shape, not as data
defop("Shape", _shape, batch=_OF_SHAPE)
defop("Size", lambda c, x: np.array(x.size, dtype=np.int64), batch=_OF_SHAPE)
# shaped like the batch (from Shape): one value, the same in every sample, so batched on axis 0
defop("ConstantOfShape", _constant_of_shape,
      batch=BatchRule(None, refused="takes its shape from the batch's data", shape_inputs=(0,), shaped_by=0,
                      sized_by_constant=True))
defop("Constant", _constant, batch=never("has no inputs"))
defop("Range", _range, batch=never("is not known to keep the samples of a batch independent (a sequence from "
                                   "batched scalars)"))

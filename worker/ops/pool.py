"""Pooling: MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool (any number of spatial dims).

Windows are visited one kernel offset at a time: each offset is a strided view of the padded input
with the output's shape, so a pool is prod(kernel) whole-array ufunc calls and never a loop over
pixels. MaxPool keeps which offset won in each window; its VJP adds the error back at that offset,
so overlapping windows sum their errors. The common 2x2/stride-2 MaxPool (windows tiling the
input, one output) has its own path of contiguous passes only (_maxpool_2x2).
"""

from __future__ import annotations

import math

import numpy as np

from gradserve.worker.ops.scratch import scratch
from gradserve.worker.ops.window import geometry, offset_slices, pad_input, padded_extent, spatial_attrs
from gradserve.worker.ops.batch import PER_SAMPLE
from gradserve.worker.ops.registry import OpError, family, per_element

# Every pool works within each sample (its windows never reach across axis 0).
defop = family(batch=PER_SAMPLE, flops=per_element)


class _Pool:
    """Window geometry of one pooling application."""

    def __init__(self, c, x: np.ndarray):
        if x.ndim < 3:
            raise OpError(f"pooling needs an (N, C, *spatial) input, got shape {x.shape}")
        if c.attr("kernel_shape") is None:
            raise OpError("kernel_shape is required")
        self.kernel, self.strides, self.dilations, pads, auto_pad = spatial_attrs(c, x.ndim - 2)
        ceil_mode = bool(c.attr("ceil_mode", 0))
        self.in_shape = x.shape
        self.out, self.lo, self.hi = geometry(x.shape[2:], self.kernel, self.strides, self.dilations, pads, auto_pad, ceil_mode)
        # with ceil_mode the last windows may run past the end pad: extent covers them too
        self.extent = padded_extent(self.out, self.kernel, self.strides, self.dilations)
        self.slices = [(k, (slice(None), slice(None)) + sl) for k, sl in offset_slices(self.kernel, self.out, self.strides, self.dilations)]
        self.plain = all(b == 0 for b in self.lo) and self.extent == tuple(x.shape[2:])
        self.disjoint = all(s >= (k - 1) * d + 1 for k, s, d in zip(self.kernel, self.strides, self.dilations))

    def scatter(self, parts, dtype) -> np.ndarray:
        """dx from per-offset errors: sum of ``parts(k)`` over the windows' offsets, padding cropped."""
        shape = self.in_shape[:2] + self.extent
        dxp = np.zeros(shape, dtype) if self.plain else scratch("pool_dx", shape, dtype)
        if not self.plain:
            dxp.fill(0)
        for k, (_, sl) in enumerate(self.slices):
            parts(k, dxp[sl])
        if self.plain:
            return dxp
        dx = np.zeros(self.in_shape, dtype)
        sizes = [max(0, min(s, e - b)) for b, s, e in zip(self.lo, self.in_shape[2:], self.extent)]
        dx[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes)] = dxp[
            (slice(None), slice(None)) + tuple(slice(b, b + n) for b, n in zip(self.lo, sizes))
        ]
        return dx


def _lowest(dtype) -> float | int:
    return -np.inf if np.dtype(dtype).kind == "f" else np.iinfo(dtype).min


# -- MaxPool ------------------------------------------------------------------------------------------
_POOL_CHUNK = 1 << 18  # input elements per piece of the 2x2 MaxPool passes


def _pairs(a: np.ndarray, name: str) -> np.ndarray:
    """Each element of ``a`` twice along the last axis (np.repeat(a, 2, -1), faster), in scratch
    buffer ``name``."""
    out = scratch(name, a.shape + (2,), a.dtype)
    out[..., 0] = a
    out[..., 1] = a
    return out.reshape(a.shape[:-1] + (2 * a.shape[-1],))


def _rows2x2(p: _Pool, x: np.ndarray) -> np.ndarray | None:
    """For 2x2 windows with stride 2 that tile the input (no begin pad, none past the end): the view
    (N, C, out_h, 2, 2 * out_w) of the covered part of x (window rows side by side), else None."""
    if (len(p.kernel) != 2 or p.kernel != (2, 2) or p.strides != (2, 2) or p.dilations != (1, 1) or any(p.lo)
            or any(e > s for e, s in zip(p.extent, x.shape[2:]))):
        return None
    eh, ew = p.extent
    return x[:, :, :eh, :ew].reshape(x.shape[:2] + (p.out[0], 2, ew))


def _maxpool_2x2(c, p: _Pool, x5: np.ndarray) -> np.ndarray:
    """2x2/stride-2 MaxPool with contiguous passes only: the max of the two window rows, then of
    the column pairs; then per window row a full-resolution mask of where the max sits, cut down
    to the first hit of each window (kernel order, as torch picks) with bit operations on the
    masks seen as uint16 (one per window and row: byte 0 the left column, byte 1 the right).
    A few images at a time."""
    n, ch, oh, _, w = x5.shape
    best = np.empty((n, ch, oh, w // 2), x5.dtype)
    top = np.empty((n, ch, oh, w), bool)
    bot = np.empty((n, ch, oh, w), bool)

    def part(n0, n1):
        xs = x5[n0:n1]
        rows = np.maximum(xs[:, :, :, 0], xs[:, :, :, 1], out=scratch("pool_rows", xs.shape[:3] + xs.shape[4:], xs.dtype))
        b = np.maximum(rows[..., 0::2], rows[..., 1::2], out=best[n0:n1])
        up = _pairs(b, "pool_up")
        t, d = top[n0:n1], bot[n0:n1]
        np.equal(xs[:, :, :, 0], up, out=t)
        np.equal(xs[:, :, :, 1], up, out=d)
        t16, b16 = t.view(np.uint16), d.view(np.uint16)
        tmp = np.left_shift(t16, 8)  # a hit in the left column clears the right one (little endian: left = low byte)
        np.invert(tmp, out=tmp)
        t16 &= tmp
        np.left_shift(b16, 8, out=tmp)
        np.invert(tmp, out=tmp)
        b16 &= tmp
        np.right_shift(t16, 8, out=tmp)  # any hit in the top row clears the bottom row
        tmp |= t16
        tmp &= 1
        tmp -= 1
        b16 &= tmp

    step = max(1, _POOL_CHUNK // max(1, x5[0].size))
    for n0 in range(0, n, step):  # a few images at a time: the passes after the first hit cache
        part(n0, min(n, n0 + step))
    c.save(pool=p, rows_hit=(top, bot))
    return best


def _maxpool(c, x):
    p = _Pool(c, x)
    if c.n_outputs < 2 and np.little_endian:
        x5 = _rows2x2(p, x)
        if x5 is not None:
            return _maxpool_2x2(c, p, x5)
    xp = pad_input(x, p.lo, p.extent, fill=_lowest(x.dtype))
    best = xp[p.slices[0][1]].copy()
    for _, sl in p.slices[1:]:
        np.maximum(best, xp[sl], out=best)
    # which offset holds each window's max: the first, as torch picks (ties are common after ReLU).
    # Byte-sized flags and arithmetic instead of masked assignment, which is several times slower.
    which = np.zeros(best.shape, np.uint8 if len(p.slices) < 256 else np.int32)
    found = xp[p.slices[0][1]] == best
    for k, (_, sl) in enumerate(p.slices[1:], 1):
        hit = xp[sl] == best
        hit &= ~found
        found |= hit
        which += hit.astype(which.dtype) * which.dtype.type(k)
    c.save(pool=p, which=which)
    if c.n_outputs < 2:
        return best
    return best, _indices(c, p, which)


def _indices(c, p: _Pool, which: np.ndarray) -> np.ndarray:
    """ONNX MaxPool Indices: flat position of the max in the unpadded input; storage_order 1 counts
    the spatial dims column-major (as the ONNX reference does)."""
    n_sp = len(p.out)
    spatial = p.in_shape[2:]
    offsets = np.array([k for k in np.ndindex(*p.kernel)], dtype=np.int64).reshape(-1, n_sp)
    col_major = int(c.attr("storage_order", 0)) == 1
    flat = np.zeros(which.shape, np.int64)
    scale = 1
    order = range(n_sp) if col_major else range(n_sp - 1, -1, -1)
    for d in order:
        grid = np.arange(p.out[d], dtype=np.int64) * p.strides[d] - p.lo[d]
        pos = grid.reshape((-1,) + (1,) * (n_sp - 1 - d)) + offsets[which, d] * p.dilations[d]
        flat += pos * scale
        scale *= spatial[d]
    lead = np.arange(p.in_shape[0] * p.in_shape[1], dtype=np.int64).reshape(p.in_shape[:2] + (1,) * n_sp)
    return flat + lead * math.prod(spatial)


def _maxpool_vjp(c, g, *_):
    p: _Pool = c.saved["pool"]
    if g is None:
        return None
    if "rows_hit" in c.saved:  # 2x2 tiles: two contiguous multiplies into the covered part
        top, bot = c.saved["rows_hit"]
        covered = tuple(p.extent) == tuple(p.in_shape[2:])
        dx = np.empty(p.in_shape, g.dtype) if covered else np.zeros(p.in_shape, g.dtype)
        eh, ew = p.extent
        d5 = dx[:, :, :eh, :ew].reshape(p.in_shape[:2] + (p.out[0], 2, ew))

        def part(n0, n1):
            up = _pairs(g[n0:n1], "pool_up")
            np.multiply(top[n0:n1], up, out=d5[n0:n1, :, :, 0])
            np.multiply(bot[n0:n1], up, out=d5[n0:n1, :, :, 1])

        step = max(1, _POOL_CHUNK // max(1, math.prod(p.in_shape[1:])))
        for n0 in range(0, g.shape[0], step):
            part(n0, min(g.shape[0], n0 + step))
        return dx
    which = c.saved["which"]
    disjoint = p.disjoint

    def to_max(k, target):
        hit = which == k
        if disjoint:  # each input position is in at most one window: write, don't add
            np.multiply(g, hit, out=target)
        else:
            target += g * hit

    return p.scatter(to_max, g.dtype)


defop("MaxPool", _maxpool, _maxpool_vjp, keep=())


# -- AveragePool --------------------------------------------------------------------------------------
def _divisor(c, p: _Pool, dtype) -> np.ndarray | float:
    """Number of elements each window averages: prod(kernel), minus padding unless
    count_include_pad, and never the ceil_mode overhang beyond the end pad."""
    include = bool(c.attr("count_include_pad", 0))
    if p.plain:
        return float(math.prod(p.kernel))
    mask = np.zeros(p.extent, dtype)
    if include:
        mask[tuple(slice(0, s + b + e) for s, b, e in zip(p.in_shape[2:], p.lo, p.hi))] = 1
    else:
        mask[tuple(slice(b, b + s) for s, b in zip(p.in_shape[2:], p.lo))] = 1
    count = sum(mask[sl[2:]] for _, sl in p.slices)
    return np.maximum(count, 1)


def _avgpool(c, x):
    p = _Pool(c, x)
    xp = pad_input(x, p.lo, p.extent)
    total = xp[p.slices[0][1]].copy()
    for _, sl in p.slices[1:]:
        total += xp[sl]
    div = _divisor(c, p, x.dtype)
    c.save(pool=p, div=div)
    return (total / div).astype(x.dtype, copy=False)


def _avgpool_vjp(c, g):
    p: _Pool = c.saved["pool"]
    share = (g / c.saved["div"]).astype(g.dtype, copy=False)

    def part(k, target):
        np.add(target, share, out=target)

    return p.scatter(part, g.dtype)


defop("AveragePool", _avgpool, _avgpool_vjp, keep=())


# -- global pools -------------------------------------------------------------------------------------
def _spatial_axes(x) -> tuple[int, ...]:
    if x.ndim < 3:
        raise OpError(f"global pooling needs an (N, C, *spatial) input, got shape {x.shape}")
    return tuple(range(2, x.ndim))


defop(
    "GlobalAveragePool",
    lambda c, x: x.mean(axis=_spatial_axes(x), keepdims=True),
    lambda c, g: np.broadcast_to(g / math.prod(c.x.shape[2:]), c.x.shape).astype(g.dtype),
    keep=(),
)


def _global_max(c, x):
    axes = _spatial_axes(x)
    flat = x.reshape(x.shape[:2] + (-1,))
    arg = flat.argmax(axis=-1)[..., None]  # first maximum, like MaxPool
    c.save(arg=arg)
    return np.take_along_axis(flat, arg, axis=-1).reshape(x.shape[:2] + (1,) * len(axes))


def _global_max_vjp(c, g):
    shape = c.x.shape
    dx = np.zeros(shape[:2] + (math.prod(shape[2:]),), g.dtype)
    np.put_along_axis(dx, c.saved["arg"], g.reshape(shape[:2] + (1,)), axis=-1)
    return dx.reshape(shape)


defop("GlobalMaxPool", _global_max, _global_max_vjp, keep=())

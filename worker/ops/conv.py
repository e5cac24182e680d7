"""Convolution (ONNX ``Conv``, any number of spatial dims) as im2col + BLAS matmul.

The input is padded once into a channel-major copy ``xT`` (C, N, *padded), which the forward saves
for the VJP (X itself is not kept). Columns are built a block at a time into a reused, cache-sized
buffer and multiplied by the weights in one matmul per block (batched over groups); the VJP
rebuilds the same blocks for dW and scatters W^T x error back into the padded input (col2im: one
add per kernel offset). Rebuilding a block in cache costs less than writing, holding and re-reading
the full (C*prod(kernel), N*H*W) column matrix.

The pooling ops reuse the attribute parsing, output geometry and padding helpers from here.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numpy.lib.stride_tricks import as_strided

from gradserve.worker.ops.registry import OpError, defop

# Elements per block of columns: a few MB, so a block and its matmul result stay in L2/L3.
_BLOCK_ELEMS = 1 << 20
# Largest prod(padded)/prod(out) for which stride-1 convs use the shifted (flat) grid.
_FLAT_MAX_RATIO = 2.0

_scratch = threading.local()
_SCRATCH_MAX_BYTES = 64 << 20


def scratch(name: str, shape, dtype) -> np.ndarray:
    """A per-thread reusable buffer for temporaries that never leave the op. Fresh multi-MB arrays
    cost page faults (and zeroing) on first touch, which for a conv layer adds up to a good part of
    the copies themselves; reusing the buffers keeps them mapped and warm. Very large requests are
    not cached, so the pool never holds more than a few of those sizes per thread."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    size = math.prod(shape)
    dtype = np.dtype(dtype)
    if size * dtype.itemsize > _SCRATCH_MAX_BYTES:
        return np.empty(shape, dtype)
    pool = _scratch.__dict__
    buf = pool.get((name, dtype))
    if buf is None or buf.size < size:
        buf = pool[(name, dtype)] = np.empty(max(size, 1), dtype)
    return buf[:size].reshape(shape)


def str_attr(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def spatial_attrs(c, n: int, kernel: tuple[int, ...] | None = None):
    """kernel_shape, strides, dilations, pads (begin..., end...) and auto_pad for ``n`` spatial dims."""
    kernel = tuple(int(k) for k in (c.attr("kernel_shape") or kernel or ()))
    if len(kernel) != n:
        raise OpError(f"kernel_shape {list(kernel)} does not match {n} spatial dims")
    strides = tuple(int(s) for s in (c.attr("strides") or (1,) * n))
    dilations = tuple(int(d) for d in (c.attr("dilations") or (1,) * n))
    pads = tuple(int(p) for p in (c.attr("pads") or (0,) * (2 * n)))
    if len(strides) != n or len(dilations) != n or len(pads) != 2 * n:
        raise OpError(f"strides/dilations/pads do not match {n} spatial dims")
    if min(strides + dilations + kernel) < 1 or min(pads) < 0:
        raise OpError("strides, dilations and kernel_shape must be positive and pads non-negative")
    auto_pad = str_attr(c.attr("auto_pad"), "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise OpError(f"unknown auto_pad '{auto_pad}'")
    return kernel, strides, dilations, pads, auto_pad


def geometry(spatial, kernel, strides, dilations, pads, auto_pad, ceil_mode=False):
    """Output spatial shape and the begin/end pads actually applied (ONNX opset 17 rules, including
    the pooling ceil_mode rule that the last window must start inside the input or its left pad)."""
    n = len(spatial)
    out, lo, hi = [], [], []
    for d in range(n):
        size, s, span = spatial[d], strides[d], (kernel[d] - 1) * dilations[d] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-size // s)
            total = max(0, (o - 1) * s + span - size)
            b = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            e = total - b
        elif auto_pad == "VALID":
            b = e = 0
            o = (size - span) // s + 1
        else:
            b, e = pads[d], pads[n + d]
            rest = size + b + e - span
            if ceil_mode and rest >= 0:
                o = -(-rest // s) + 1
                if (o - 1) * s >= size + b:
                    o -= 1
            else:
                o = rest // s + 1 if rest >= 0 else 0
        if o < 1:
            raise OpError(f"window of {span} does not fit spatial dim {d} of size {size} with pads ({b}, {e})")
        out.append(o)
        lo.append(b)
        hi.append(e)
    return tuple(out), tuple(lo), tuple(hi)


def padded_extent(out, kernel, strides, dilations):
    """Length of each padded spatial dim that the windows actually read."""
    return tuple((o - 1) * s + (k - 1) * d + 1 for o, k, s, d in zip(out, kernel, strides, dilations))


def pad_input(x: np.ndarray, lo, extent, fill=0.0, channel_major=False) -> np.ndarray:
    """``x`` (N, C, *S) placed at offset ``lo`` in a ``fill``-ed buffer of spatial ``extent``
    (cropping what no window reads); (C, N, *extent) if ``channel_major``."""
    n_sp = x.ndim - 2
    if not channel_major and all(b == 0 for b in lo) and tuple(extent) == x.shape[2:]:
        return x
    lead = (x.shape[1], x.shape[0]) if channel_major else x.shape[:2]
    buf = np.zeros(lead + tuple(extent), x.dtype) if fill == 0 else np.full(lead + tuple(extent), fill, x.dtype)
    valid = [max(0, min(x.shape[2 + d], extent[d] - lo[d])) for d in range(n_sp)]
    src = x[(slice(None), slice(None)) + tuple(slice(0, v) for v in valid)]
    buf[(slice(None), slice(None)) + tuple(slice(b, b + v) for b, v in zip(lo, valid))] = src.swapaxes(0, 1) if channel_major else src
    return buf


def window_view(xp: np.ndarray, out, kernel, strides, dilations) -> np.ndarray:
    """Zero-copy view (A, B, *kernel, *out) of a padded (A, B, *extent) array: element
    [a, b, k..., o...] is xp[a, b, o*stride + k*dilation]."""
    st = xp.strides
    sp = st[2:]
    return as_strided(
        xp,
        xp.shape[:2] + tuple(kernel) + tuple(out),
        st[:2] + tuple(s * d for s, d in zip(sp, dilations)) + tuple(s * t for s, t in zip(sp, strides)),
        writeable=False,
    )


def offset_slices(kernel, out, strides, dilations):
    """For each kernel offset (C order): the index tuple of the padded spatial positions it reads."""
    for k in np.ndindex(*kernel):
        yield k, tuple(slice(i * d, i * d + (o - 1) * s + 1, s) for i, d, o, s in zip(k, dilations, out, strides))


class _Conv:
    """Everything the forward and the VJP share about one Conv application.

    Outputs are computed on a grid of positions per channel, flattened over (N, *grid): the output
    grid itself in general, or -- when every stride is 1 -- the padded input grid, on which each
    kernel offset is one constant shift of the flat index. Then a block of columns is Kp long
    contiguous copies and col2im is Kp contiguous adds, instead of short strided rows; the price is
    computing (and discarding) outputs at the padding positions.
    """

    def __init__(self, c, x: np.ndarray, w: np.ndarray):
        if x.ndim < 3 or w.ndim != x.ndim:
            raise OpError(f"Conv needs X (N, C, *spatial) and W (M, C/group, *kernel) of the same rank, got {x.shape} and {w.shape}")
        n_sp = x.ndim - 2
        self.kernel, self.strides, self.dilations, pads, auto_pad = spatial_attrs(c, n_sp, w.shape[2:])
        if self.kernel != w.shape[2:]:
            raise OpError(f"kernel_shape {list(self.kernel)} does not match W {w.shape}")
        self.group = int(c.attr("group", 1))
        self.N, self.C = x.shape[:2]
        self.M, self.Cg = w.shape[:2]
        if self.group < 1 or self.C != self.Cg * self.group or self.M % self.group:
            raise OpError(f"X has {self.C} channels and W is {w.shape}, incompatible with group={self.group}")
        self.in_shape = x.shape
        self.out, self.lo, _ = geometry(x.shape[2:], self.kernel, self.strides, self.dilations, pads, auto_pad)
        self.extent = padded_extent(self.out, self.kernel, self.strides, self.dilations)
        self.Kp = math.prod(self.kernel)
        self.Mg = self.M // self.group
        self.Kg = self.Cg * self.Kp
        # The shifted (flat) grid wastes prod(extent)/prod(out) - 1 of the matmul work; worth it
        # for the usual "same" convolutions, not for tiny maps with large kernels.
        self.flat = all(s == 1 for s in self.strides) and math.prod(self.extent) <= _FLAT_MAX_RATIO * math.prod(self.out)
        self.grid = self.extent if self.flat else self.out
        self.L = math.prod(self.grid)
        self.P = self.N * self.L
        if self.flat:
            fstrides = [math.prod(self.extent[d + 1 :]) for d in range(n_sp)]
            self.shifts = [sum(k * dl * fs for k, dl, fs in zip(kk, self.dilations, fstrides)) for kk in np.ndindex(*self.kernel)]
            self.P_valid = self.P - self.shifts[-1]  # every real output lies below this
            step = max(256, _BLOCK_ELEMS // (self.C * self.Kp))
        else:
            self.offsets = [sl for _, sl in offset_slices(self.kernel, self.out, self.strides, self.dilations)]
            self.P_valid = self.P
            step = self.L * max(1, min(self.N, _BLOCK_ELEMS // max(1, self.C * self.Kp * self.L)))
        self.ranges = [(p0, min(p0 + step, self.P_valid)) for p0 in range(0, self.P_valid, step)]
        self.block = min(step, self.P_valid)

    def pad(self, x: np.ndarray) -> np.ndarray:
        """x padded, channel-major: (C, N, *extent)."""
        return pad_input(x, self.lo, self.extent, channel_major=True)

    def cols(self, xT: np.ndarray, p0: int, p1: int, buf: np.ndarray | None) -> np.ndarray:
        """Columns for grid positions p0:p1 as (group, Cg*Kp, p1-p0), written into ``buf``."""
        pb = p1 - p0
        if self.flat:
            xf = xT.reshape(self.C, self.P)
            if self.Kp == 1:  # 1x1 kernel: the columns are a (strided) slice of x itself
                return xf[:, p0 + self.shifts[0] : p1 + self.shifts[0]].reshape(self.group, self.Kg, pb)
            dst = buf[: self.C * self.Kp * pb].reshape(self.C, self.Kp, pb)
            for k, sh in enumerate(self.shifts):
                np.copyto(dst[:, k], xf[:, p0 + sh : p1 + sh])
        else:
            n0, n1 = p0 // self.L, p1 // self.L
            view = window_view(xT[:, n0:n1].swapaxes(0, 1), self.out, self.kernel, self.strides, self.dilations)
            view = np.moveaxis(view, 0, 1 + len(self.kernel))  # (C, *k, images, *out)
            dst = buf[: view.size].reshape(view.shape)
            np.copyto(dst, view)
        return dst.reshape(self.group, self.Kg, pb)

    def col2im(self, dxT: np.ndarray, dcols: np.ndarray, p0: int, p1: int) -> None:
        """Scatter-add columns (C*Kp, p1-p0) of positions p0:p1 into the padded input error."""
        if self.flat:
            dxf = dxT.reshape(self.C, self.P)
            dcols = dcols.reshape(self.C, self.Kp, p1 - p0)
            for k, sh in enumerate(self.shifts):
                target = dxf[:, p0 + sh : p1 + sh]
                np.add(target, dcols[:, k], out=target)
        else:
            n0, n1 = p0 // self.L, p1 // self.L
            dcols = dcols.reshape((self.C, self.Kp, n1 - n0) + self.out)
            block = dxT[:, n0:n1]
            for k, sl in enumerate(self.offsets):
                target = block[(slice(None), slice(None)) + sl]
                np.add(target, dcols[:, k], out=target)

    def to_grid(self, g: np.ndarray) -> np.ndarray:
        """An output-shaped (N, M, *out) array as (M, N*L) on the grid (zeros at padding positions),
        in a scratch buffer."""
        full = scratch("conv_g", (self.M, self.N) + self.grid, g.dtype)
        lead = (slice(None), slice(None))
        real = tuple(slice(0, o) for o in self.out)
        full[lead + real] = g.swapaxes(0, 1)
        if self.flat:
            for d, o in enumerate(self.out):  # zero the padding positions only: a disjoint cover of them
                full[lead + real[:d] + (slice(o, None),)] = 0
        return full.reshape(self.M, self.P)

    def from_grid(self, yT: np.ndarray) -> np.ndarray:
        """(M, N*L) on the grid -> view (N, M, *out)."""
        v = yT.reshape((self.M, self.N) + self.grid)[(slice(None), slice(None)) + tuple(slice(0, o) for o in self.out)]
        return v.swapaxes(0, 1)


def _conv_forward(c, x, w, b=None):
    cv = _Conv(c, x, w)
    xT = cv.pad(x)
    w3 = w.reshape(cv.group, cv.Mg, cv.Kg)
    yT = scratch("conv_y", (cv.M, cv.P), np.result_type(x, w))
    buf = None if cv.flat and cv.Kp == 1 else scratch("conv_cols", cv.C * cv.Kp * cv.block, x.dtype)
    for p0, p1 in cv.ranges:
        np.matmul(w3, cv.cols(xT, p0, p1, buf), out=yT[:, p0:p1].reshape(cv.group, cv.Mg, p1 - p0))
    y = np.empty((cv.N, cv.M) + cv.out, dtype=yT.dtype)
    if b is not None:
        np.add(cv.from_grid(yT), b.reshape((1, cv.M) + (1,) * len(cv.out)), out=y)  # bias folded into the copy
    else:
        np.copyto(y, cv.from_grid(yT))
    c.save(conv=cv, xT=xT)
    return y


def _conv_vjp(c, g):
    cv: _Conv = c.saved["conv"]
    xT = c.saved["xT"]
    w = c.inputs[1]
    need_x, need_w = c.needs[0], c.needs[1]
    need_b = len(c.needs) > 2 and c.needs[2]
    db = g.sum(axis=(0,) + tuple(range(2, g.ndim))) if need_b else None
    if not (need_x or need_w):
        return None, None, db
    G, Mg, Kg = cv.group, cv.Mg, cv.Kg
    gT = cv.to_grid(g).reshape(G, Mg, cv.P)
    if need_w:
        dw3 = np.zeros((G, Kg, Mg), dtype=g.dtype)
        buf = None if cv.flat and cv.Kp == 1 else scratch("conv_cols", cv.C * cv.Kp * cv.block, xT.dtype)
    if need_x:
        w3T = np.ascontiguousarray(w.reshape(G, Mg, Kg).swapaxes(1, 2))
        dxT = scratch("conv_dx", (cv.C, cv.N) + cv.extent, g.dtype)
        dxT.fill(0)
        dbuf = scratch("conv_dcols", cv.C * cv.Kp * cv.block, g.dtype)
    for p0, p1 in cv.ranges:
        gb = gT[:, :, p0:p1]
        if need_w:
            dw3 += np.matmul(cv.cols(xT, p0, p1, buf), gb.swapaxes(1, 2))
        if need_x:
            out = dbuf[: cv.C * cv.Kp * (p1 - p0)].reshape(G, Kg, p1 - p0)
            # one output channel per group (depthwise): an outer product, which BLAS does slowly
            dcols = np.multiply(w3T, gb, out=out) if Mg == 1 else np.matmul(w3T, gb, out=out)
            cv.col2im(dxT, dcols, p0, p1)
    dw = dw3.swapaxes(1, 2).reshape(w.shape) if need_w else None
    dx = None
    if need_x:
        # crop the padding; input rows/cols that no window reads keep a zero error
        sizes = [max(0, min(s, e - b)) for b, s, e in zip(cv.lo, cv.in_shape[2:], cv.extent)]
        covered = tuple(sizes) == cv.in_shape[2:]
        dx = np.empty(cv.in_shape, dtype=g.dtype) if covered else np.zeros(cv.in_shape, dtype=g.dtype)
        src = dxT[(slice(None), slice(None)) + tuple(slice(b, b + n) for b, n in zip(cv.lo, sizes))].swapaxes(0, 1)
        dst = dx[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes)]
        np.copyto(dst, src)
    return dx, dw, db


defop("Conv", _conv_forward, _conv_vjp, keep="x1")

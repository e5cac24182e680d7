"""Convolution (ONNX ``Conv``, any number of spatial dims) as BLAS matrix products.

Two paths, chosen per call:

- **direct** (stride 1, the usual case): on the flat grid described in :class:`ConvPlan`, each kernel
  offset is one constant shift, so Y = sum_k W_k @ X[:, shift_k:] is Kp GEMMs on *views* of the
  padded input that add into one output (BLAS's beta = 1, through :mod:`.blas`); dW_k is a GEMM of
  the error with the same views and dX gathers the error the same way. No column matrix is built.
- **columns** (strided convs, or when the strided BLAS is unavailable), described below.

Columns: the input is padded once into a channel-major copy ``xT`` (C, N, *padded), which the forward saves
for the VJP (X itself is not kept). Columns are built a block at a time into a reused, cache-sized
buffer and multiplied by the weights in one matmul per block (batched over groups); the VJP
rebuilds the same blocks for dW and scatters W^T x error back into the padded input (col2im: one
add per kernel offset). Rebuilding a block in cache costs less than writing, holding and re-reading
the full (C*prod(kernel), N*H*W) column matrix. The bias (and its error) ride in the matmuls as
one more column of W against a row of ones. With no more output than input channels, dX is
gathered instead (a convolution of the error with the flipped kernel), which needs no col2im.

ConvTranspose and Col2Im, the adjoints that run on these same paths, are in :mod:`.conv_transpose`;
the window geometry Conv shares with them and with pooling is in :mod:`.window`.
"""

from __future__ import annotations

import math

import numpy as np

from gradserve.worker.ops import blas
from gradserve.worker.ops.batch import PER_SAMPLE
from gradserve.worker.ops.registry import OpContext, OpError, family, numel, per_element
from gradserve.worker.ops.scratch import scratch
from gradserve.worker.ops.window import geometry, offset_slices, pad_input, padded_extent, spatial_attrs, window_view

# Every op here works within each sample (input 0's axis 0); the others are parameters.
defop = family(batch=PER_SAMPLE, flops=per_element)

# Elements per block of columns: a few MB, so a block and its matmul result stay in L2/L3.
_BLOCK_ELEMS = 1 << 20
# Largest prod(padded)/prod(out) for which stride-1 convs use the shifted (flat) grid.
_FLAT_MAX_RATIO = 2.0


class ConvPlan:
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
        self.out, self.lo, hi = geometry(x.shape[2:], self.kernel, self.strides, self.dilations, pads, auto_pad)
        self.extent = padded_extent(self.out, self.kernel, self.strides, self.dilations)
        self.Kp = math.prod(self.kernel)
        self.Mg = self.M // self.group
        self.Kg = self.Cg * self.Kp
        # The flat grid: each image (and each row, ...) is followed by a gap of zeros as wide as
        # the larger of its two pads, which serves as the end pad of one and the begin pad of the
        # next (a read before column 0 wraps into the previous row's gap). Its positions past the
        # outputs are computed and discarded: prod(grid)/prod(out) - 1 of the matmul work, worth
        # it for the usual "same" convolutions, not for tiny maps with large kernels.
        self.flat = False
        if all(s == 1 for s in self.strides):
            grid = tuple(max(i + max(b, e), o) for i, b, e, o in zip(x.shape[2:], self.lo, hi, self.out))
            self.flat = math.prod(grid) <= _FLAT_MAX_RATIO * math.prod(self.out)
        self.grid = grid if self.flat else self.out
        self.L = math.prod(self.grid)
        self.P = self.N * self.L
        if self.flat:
            fstrides = [math.prod(self.grid[d + 1 :]) for d in range(n_sp)]
            self.shifts = [sum(k * dl * fs for k, dl, fs in zip(kk, self.dilations, fstrides)) for kk in np.ndindex(*self.kernel)]
            # the buffer: a margin of zeros (the first image's begin pad), then the N images, then
            # room for the reads of the last grid positions
            self.margin = sum(b * fs for b, fs in zip(self.lo, fstrides))
            self.buflen = self.P + max(self.shifts[-1], self.margin)
            last_out = (self.N - 1) * self.L + sum((o - 1) * fs for o, fs in zip(self.out, fstrides))
            self.P_valid = last_out + 1  # every real output lies below this
            step = max(256, _BLOCK_ELEMS // (self.C * self.Kp))
        else:
            self.offsets = [sl for _, sl in offset_slices(self.kernel, self.out, self.strides, self.dilations)]
            self.P_valid = self.P
            step = self.L * max(1, min(self.N, _BLOCK_ELEMS // max(1, self.C * self.Kp * self.L)))
        self.ranges = [(p0, min(p0 + step, self.P_valid)) for p0 in range(0, self.P_valid, step)]
        self.block = min(step, self.P_valid)

    def pad(self, x: np.ndarray) -> np.ndarray:
        """x padded, channel-major: (C, buflen) on the flat grid, else (C, N, *extent)."""
        if not self.flat:
            return pad_input(x, self.lo, self.extent, channel_major=True)
        buf = np.zeros((self.C, self.buflen), x.dtype)
        self.images(buf)[(slice(None), slice(None)) + tuple(slice(0, i) for i in self.in_shape[2:])] = x.swapaxes(0, 1)
        return buf

    def images(self, buf: np.ndarray) -> np.ndarray:
        """View (C, N, *grid) of a flat-grid (C, buflen) buffer, image pixel [.., 0, 0] first."""
        return buf[:, self.margin : self.margin + self.P].reshape((buf.shape[0], self.N) + self.grid)

    def cols(self, xT: np.ndarray, p0: int, p1: int, buf: np.ndarray | None, ones: bool = False) -> np.ndarray:
        """Columns for grid positions p0:p1 as (group, Cg*Kp, p1-p0), written into ``buf``; with
        ``ones`` (group 1 only) a row of ones follows, (1, C*Kp + 1, p1-p0): the bias's column."""
        # the type: ignores: ``buf`` is None only for a 1x1 kernel's columns, which are a slice of x
        pb = p1 - p0
        if ones:
            buf[self.C * self.Kp * pb : (self.C * self.Kp + 1) * pb] = 1  # type: ignore[index]
            self.cols(xT, p0, p1, buf)
            return buf[: (self.C * self.Kp + 1) * pb].reshape(1, self.Kg + 1, pb)  # type: ignore[index]
        if self.flat:
            xf = xT
            if self.Kp == 1:  # 1x1 kernel: the columns are a (strided) slice of x itself
                return xf[:, p0 + self.shifts[0] : p1 + self.shifts[0]].reshape(self.group, self.Kg, pb)
            dst = buf[: self.C * self.Kp * pb].reshape(self.C, self.Kp, pb)  # type: ignore[index]
            for k, sh in enumerate(self.shifts):
                np.copyto(dst[:, k], xf[:, p0 + sh : p1 + sh])
        else:
            n0, n1 = p0 // self.L, p1 // self.L
            view = window_view(xT[:, n0:n1].swapaxes(0, 1), self.out, self.kernel, self.strides, self.dilations)
            view = np.moveaxis(view, 0, 1 + len(self.kernel))  # (C, *k, images, *out)
            dst = buf[: view.size].reshape(view.shape)  # type: ignore[index]
            np.copyto(dst, view)
        return dst.reshape(self.group, self.Kg, pb)

    def col2im(self, dxT: np.ndarray, dcols: np.ndarray, p0: int, p1: int) -> None:
        """Scatter-add columns (C*Kp, p1-p0) of positions p0:p1 into the padded input error."""
        if self.flat:
            dxf = dxT
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

    def to_grid(self, g: np.ndarray, head: int = 0, tail: int = 0) -> np.ndarray:
        """An output-shaped (N, M, *out) array as (M, N*L) on the grid (zeros at padding positions),
        in a scratch buffer; with ``head``/``tail``, returns the whole (M, head + N*L + tail)
        buffer, the grid in the middle and zeros either side."""
        if head or tail:
            ext = scratch("conv_g", (self.M, head + self.P + tail), g.dtype)
            ext[:, :head] = 0
            ext[:, head + self.P :] = 0
            self.to_grid_into(g, ext[:, head : head + self.P].reshape((self.M, self.N) + self.grid))
            return ext
        full = scratch("conv_g", (self.M, self.N) + self.grid, g.dtype)
        self.to_grid_into(g, full)
        return full.reshape(self.M, self.P)

    def to_grid_into(self, g: np.ndarray, full: np.ndarray) -> None:
        """Write g into the (M, N, *grid) view ``full``, zeros at the padding positions."""
        lead = (slice(None), slice(None))
        real = tuple(slice(0, o) for o in self.out)
        full[lead + real] = g.swapaxes(0, 1)
        if self.flat:
            for d, o in enumerate(self.out):  # zero the padding positions only: a disjoint cover of them
                full[lead + real[:d] + (slice(o, None),)] = 0

    def from_grid(self, yT: np.ndarray) -> np.ndarray:
        """(M, N*L) on the grid -> view (N, M, *out)."""
        v = yT.reshape((self.M, self.N) + self.grid)[(slice(None), slice(None)) + tuple(slice(0, o) for o in self.out)]
        return v.swapaxes(0, 1)


# dX by gathering when M <= this * C (see conv_vjp)
_GATHER_RATIO = 1.0
# Stride-1 convs whose groups have at least this many input and output channels run direct (see
# _direct_forward); below it the GEMMs are too thin to beat building columns.
_DIRECT_MIN_CHANNELS = 4
# Bytes of output (or stacked operands, for dW) per block of direct-conv products: bounds the scratch
# memory on large layers; measured best from 16 MB up for the layers of the benchmark CNN.
_DIRECT_BLOCK_BYTES = 16 << 20
_DIRECT_MIN_BLOCK = 4096


def use_direct(cv: ConvPlan, x: np.ndarray, w: np.ndarray) -> bool:
    """Whether this Conv takes the direct path (BLAS-accumulated GEMMs on shifted views)."""
    return cv.flat and x.dtype == w.dtype and min(cv.Cg, cv.Mg) >= _DIRECT_MIN_CHANNELS and blas.available(x.dtype)


def _offset_weights(cv: ConvPlan, w: np.ndarray) -> np.ndarray:
    """W as one (M, Cg) matrix per kernel offset: (Kp, M, Cg), contiguous."""
    return np.ascontiguousarray(w.reshape(cv.M, cv.Cg, cv.Kp).transpose(2, 0, 1))


def _blocks(n: int, rows: int, itemsize: int):
    """Column ranges of [0, n) whose (rows, width) output block stays in cache between the
    Kp products that add into it."""
    step = max(_DIRECT_MIN_BLOCK, _DIRECT_BLOCK_BYTES // max(1, rows * itemsize))
    return [(p0, min(n, p0 + step)) for p0 in range(0, n, step)]


def _groups(cv: ConvPlan) -> list[tuple[slice, slice]]:
    """Per group: its output channels (rows of W, Y, G) and its input channels (rows of X)."""
    return [(slice(g * cv.Mg, (g + 1) * cv.Mg), slice(g * cv.Cg, (g + 1) * cv.Cg)) for g in range(cv.group)]


def _direct_forward(cv: ConvPlan, xT: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Y on the flat grid, (M, P) in scratch: for every kernel offset k, Y += W_k @ (X shifted by
    k) -- a GEMM on a view of the padded input, with no column matrix."""
    wk = _offset_weights(cv, w)
    yT = scratch("conv_y", (cv.M, cv.P), xT.dtype)
    for p0, p1 in _blocks(cv.P_valid, cv.M, xT.itemsize):
        for rows, chans in _groups(cv):
            for k, sh in enumerate(cv.shifts):
                blas.gemm(wk[k, rows], xT[chans, p0 + sh : p1 + sh], yT[rows, p0:p1], accumulate=k > 0)
    return yT


def _direct_dw(cv: ConvPlan, xT: np.ndarray, gT: np.ndarray, shape) -> np.ndarray:
    """dW_k = G @ (X shifted by k)^T over the grid (its padding positions hold zero errors),
    summed over blocks of positions. (One wide product over error rows stacked per shift measured
    18% faster with warm caches and no faster inside a real step, where its extra copies come from
    memory; nor do blocks small enough to stay in L2 help there.)"""
    dwk = np.empty((cv.Kp, cv.M, cv.Cg), gT.dtype)
    for i, (p0, p1) in enumerate(_blocks(cv.P_valid, cv.M + cv.C, xT.itemsize)):
        for rows, chans in _groups(cv):
            for k, sh in enumerate(cv.shifts):
                blas.gemm(gT[rows, p0:p1], xT[chans, p0 + sh : p1 + sh], dwk[k, rows], accumulate=i > 0, trans_b=True)
    return dwk.transpose(1, 2, 0).reshape(shape)


def _direct_dx(cv: ConvPlan, w: np.ndarray, gext: np.ndarray, head: int) -> np.ndarray:
    """dX on the flat grid by gathering: input position q gets sum_k W_k^T g[q + margin - shift_k],
    read from the error grid padded with ``head`` zeros in front (and margin behind). Returns the
    (C, N, *grid) images view of a scratch buffer."""
    wk = _offset_weights(cv, w)
    dxg = scratch("conv_dxg", (cv.C, cv.P), gext.dtype)
    base = head + cv.margin
    for q0, q1 in _blocks(_input_extent(cv), cv.C, gext.itemsize):
        for rows, chans in _groups(cv):
            for k, sh in enumerate(cv.shifts):
                blas.gemm(wk[k, rows], gext[rows, base - sh + q0 : base - sh + q1], dxg[chans, q0:q1],
                          accumulate=k > 0, trans_a=True)
    return dxg.reshape((cv.C, cv.N) + cv.grid)


def _input_extent(cv: ConvPlan) -> int:
    """Flat-grid positions up to and including the last real input pixel."""
    fstrides = [math.prod(cv.grid[d + 1 :]) for d in range(len(cv.grid))]
    return (cv.N - 1) * cv.L + sum((i - 1) * fs for i, fs in zip(cv.in_shape[2:], fstrides)) + 1


def conv_forward(c: OpContext, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """The Conv op's forward: Y = conv(X, W) + B, saving the padded input for :func:`conv_vjp`."""
    cv = ConvPlan(c, x, w)
    xT = cv.pad(x)
    if use_direct(cv, x, w):
        y = np.empty((cv.N, cv.M) + cv.out, dtype=x.dtype)
        from_grid = cv.from_grid(_direct_forward(cv, xT, w))
        if b is None:
            np.copyto(y, from_grid)
        else:
            np.add(from_grid, b.reshape((1, cv.M) + (1,) * len(cv.out)).astype(y.dtype, copy=False), out=y)
        c.save(conv=cv, xT=xT, direct=True)
        return y
    w3 = w.reshape(cv.group, cv.Mg, cv.Kg)
    yT = scratch("conv_y", (cv.M, cv.P), np.result_type(x, w))
    buf = None if cv.flat and cv.Kp == 1 else scratch("conv_cols", (cv.C * cv.Kp + 1) * cv.block, x.dtype)
    # the bias as one more column of W against a row of ones: a plain copy out of the grid after
    # the matmul is about twice as fast as one that also adds
    ones = b is not None and cv.group == 1 and buf is not None
    if ones:
        w3 = np.concatenate([w3, b.reshape(1, cv.M, 1).astype(w3.dtype)], axis=2)  # type: ignore[union-attr]  # ones: b is given
    for p0, p1 in cv.ranges:
        blas.matmul(w3, cv.cols(xT, p0, p1, buf, ones), out=yT[:, p0:p1].reshape(cv.group, cv.Mg, p1 - p0))
    y = np.empty((cv.N, cv.M) + cv.out, dtype=yT.dtype)
    if ones:
        np.copyto(y, cv.from_grid(yT))
    elif b is not None:
        np.add(cv.from_grid(yT), b.reshape((1, cv.M) + (1,) * len(cv.out)), out=y)  # bias folded into the copy
    else:
        np.copyto(y, cv.from_grid(yT))
    c.save(conv=cv, xT=xT)
    return y


def _gather_dx(cv: ConvPlan, w: np.ndarray, gext: np.ndarray, head: int) -> np.ndarray:
    """dX on the flat grid (group 1): input position q gets sum_k W_k^T g[q + margin - shift_k],
    read from the error grid padded with ``head`` zeros in front (and margin behind). Returns the
    (C, N, *grid) images view of a scratch buffer."""
    M, C, Kp = cv.M, cv.C, cv.Kp
    wg = np.ascontiguousarray(w.reshape(M, C, Kp).transpose(1, 2, 0)).reshape(C, Kp * M)
    dxg = scratch("conv_dxg", (C, cv.P), gext.dtype)
    q_valid = _input_extent(cv)
    step = max(256, _BLOCK_ELEMS // (M * Kp))
    buf = scratch("conv_gcols", Kp * M * min(step, q_valid), gext.dtype)
    base = head + cv.margin
    for q0 in range(0, q_valid, step):
        q1 = min(q0 + step, q_valid)
        pb = q1 - q0
        cols = buf[: Kp * M * pb].reshape(Kp, M, pb)
        for k, sh in enumerate(cv.shifts):
            np.copyto(cols[k], gext[:, base - sh + q0 : base - sh + q1])
        blas.matmul(wg, cols.reshape(Kp * M, pb), out=dxg[:, q0:q1])
    return dxg.reshape((C, cv.N) + cv.grid)


def conv_vjp(c: OpContext, g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The Conv op's VJP: (dX, dW, dB) for error ``g``, each None where ``c.needs`` says no."""
    if "direct" in c.saved:
        return _direct_vjp(c, g)
    cv: ConvPlan = c.saved["conv"]
    xT = c.saved["xT"]
    w = c.inputs[1]
    need_x, need_w = c.needs[0], c.needs[1]
    need_b = len(c.needs) > 2 and c.needs[2]
    G, Mg, Kg = cv.group, cv.Mg, cv.Kg
    # dB from the dW matmul, against a row of ones below the columns (the grid's padding
    # positions hold zero errors)
    ones = need_b and need_w and G == 1 and not (cv.flat and cv.Kp == 1)
    db = g.sum(axis=(0,) + tuple(range(2, g.ndim))) if need_b and not ones else None
    if not (need_x or need_w):
        return None, None, db
    # dX by gathering (a convolution of the error with the flipped kernel: Kp shifted copies of the
    # error, one matmul straight into the input grid) when the error has no more channels than X;
    # else by scattering W^T x error back (col2im: Kp adds into the input grid)
    gather = need_x and cv.flat and G == 1 and cv.Kp > 1 and cv.M <= _GATHER_RATIO * cv.C
    if gather:
        head = cv.shifts[-1]
        gext = cv.to_grid(g, head, cv.margin)
        gT = gext[:, head : head + cv.P].reshape(1, cv.M, cv.P)
    else:
        gT = cv.to_grid(g).reshape(G, Mg, cv.P)
    if need_w:
        dw3 = np.zeros((G, Kg + ones, Mg), dtype=g.dtype)
        buf = None if cv.flat and cv.Kp == 1 else scratch("conv_cols", (cv.C * cv.Kp + 1) * cv.block, xT.dtype)
    if gather:
        dx_images = _gather_dx(cv, w, gext, head)
    elif need_x:
        w3T = np.ascontiguousarray(w.reshape(G, Mg, Kg).swapaxes(1, 2))
        dxT = scratch("conv_dx", (cv.C, cv.buflen) if cv.flat else (cv.C, cv.N) + cv.extent, g.dtype)
        dxT.fill(0)
        dbuf = scratch("conv_dcols", cv.C * cv.Kp * cv.block, g.dtype)
    for p0, p1 in cv.ranges:
        gb = gT[:, :, p0:p1]
        if need_w:
            dw3 += blas.matmul(cv.cols(xT, p0, p1, buf, ones), gb.swapaxes(1, 2))
        if need_x and not gather:
            out = dbuf[: cv.C * cv.Kp * (p1 - p0)].reshape(G, Kg, p1 - p0)
            # one output channel per group (depthwise): an outer product, which BLAS does slowly
            dcols = np.multiply(w3T, gb, out=out) if Mg == 1 else blas.matmul(w3T, gb, out=out)
            cv.col2im(dxT, dcols, p0, p1)
    if ones:
        db = dw3[0, Kg].copy()
        dw3 = dw3[:, :Kg]
    dw = dw3.swapaxes(1, 2).reshape(w.shape) if need_w else None
    dx = None
    if need_x:
        # crop the padding; input rows/cols that no window reads keep a zero error
        if gather:
            sizes, src = list(cv.in_shape[2:]), dx_images
        elif cv.flat:  # stride 1: every input position is read
            sizes, src = list(cv.in_shape[2:]), cv.images(dxT)
        else:
            sizes = [max(0, min(s, e - b)) for b, s, e in zip(cv.lo, cv.in_shape[2:], cv.extent)]
            src = dxT[(slice(None), slice(None)) + tuple(slice(b, b + n) for b, n in zip(cv.lo, sizes))]
        covered = tuple(sizes) == cv.in_shape[2:]
        dx = np.empty(cv.in_shape, dtype=g.dtype) if covered else np.zeros(cv.in_shape, dtype=g.dtype)
        src = src[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes)].swapaxes(0, 1)
        dst = dx[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes)]
        np.copyto(dst, src)
    return dx, dw, db


def _direct_vjp(c, g):
    cv: ConvPlan = c.saved["conv"]
    w = c.inputs[1]
    need_x, need_w = c.needs[0], c.needs[1]
    need_b = len(c.needs) > 2 and c.needs[2]
    g = g.astype(w.dtype, copy=False)
    head = cv.shifts[-1] if need_x else 0
    gext = cv.to_grid(g, head, cv.margin) if need_x else cv.to_grid(g)
    gT = gext[:, head : head + cv.P] if need_x else gext
    db = gT[:, : cv.P_valid].sum(axis=1) if need_b else None  # padding positions hold zeros
    dw = _direct_dw(cv, c.saved["xT"], gT, w.shape) if need_w else None
    dx = None
    if need_x:
        dx = np.empty(cv.in_shape, dtype=g.dtype)
        crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in cv.in_shape[2:])
        np.copyto(dx, _direct_dx(cv, w, gext, head)[crop].swapaxes(0, 1))
    return dx, dw, db


def _conv_flops(node, shapes) -> int | None:
    """2 x multiply-adds: each output element sums a kernel's worth (W is (C_out, C_in / group, k...))."""
    w = shapes.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or len(w.shape) < 3:
        return None
    return 2 * numel(shapes.get(node.outputs[0])) * int(np.prod(w.shape[1:], dtype=np.int64))


defop("Conv", conv_forward, conv_vjp, keep="x1", flops=_conv_flops)

"""The adjoints of convolution: ConvTranspose (of Conv) and Col2Im (of im2col, torch's F.fold).

ConvTranspose runs on the Conv code of :mod:`.conv` -- its forward is a Conv's dX, its dX that
Conv's forward, its dW that Conv's dW -- and Col2Im adds columns back into the image one kernel
offset at a time, as the columns path's col2im does. Separate from :mod:`.conv` because they
use the convolution only through its public entry points and add their own geometry (output_shape,
output_padding, the image and block shapes).
"""

from __future__ import annotations

import math

import numpy as np

from gradserve.worker.ops.batch import PER_SAMPLE
from gradserve.worker.ops.conv import ConvPlan, conv_forward, conv_vjp, use_direct
from gradserve.worker.ops.registry import OpContext, OpError, family, numel, per_element
from gradserve.worker.ops.window import geometry, offset_slices, pad_input, padded_extent, spatial_attrs

# Every op here works within each sample (input 0's axis 0); the others are parameters.
defop = family(batch=PER_SAMPLE, flops=per_element)


# -- ConvTranspose ------------------------------------------------------------------------------------
# ConvTranspose is the adjoint of a Conv: with the same W, strides, pads and dilations, the Conv that
# maps an image of ConvTranspose's output shape to one of its input shape has
#   ConvTranspose(X)            = that Conv's dX, given error X,
#   dL/dX of ConvTranspose      = that Conv's forward applied to dL/dY,
#   dL/dW of ConvTranspose      = that Conv's dW, with input dL/dY and error X.
# W is (C, M/group, *kernel) in both readings, so everything below runs the Conv code of :mod:`.conv` on an
# OpContext describing that Conv (explicit pads, auto_pad resolved), and shares all its paths.


def _transpose_attrs(c, x: np.ndarray, w: np.ndarray) -> tuple[dict, tuple[int, ...], tuple[int, ...]]:
    """The attributes of the adjoint Conv (explicit pads), ConvTranspose's output spatial shape (by
    the ONNX rules for output_shape / output_padding / auto_pad) and the rows at the end of each
    spatial dim that lie beyond that Conv's input (output padding no input pixel reaches)."""
    n = x.ndim - 2
    kernel, strides, dilations, pads, auto_pad = spatial_attrs(c, n, w.shape[2:])
    if kernel != w.shape[2:]:
        raise OpError(f"kernel_shape {list(kernel)} does not match W {w.shape}")
    out_pad = tuple(int(p) for p in (c.attr("output_padding") or (0,) * n))
    if len(out_pad) != n or min(out_pad, default=0) < 0:
        raise OpError(f"output_padding {list(out_pad)} must be non-negative, one per spatial dim")
    spatial = x.shape[2:]
    # the output extent with no padding at all
    full = [s * (i - 1) + op + (k - 1) * d + 1 for s, i, op, k, d in zip(strides, spatial, out_pad, kernel, dilations)]
    out_shape = c.attr("output_shape")
    if out_shape is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out_shape = [i * s for i, s in zip(spatial, strides)]
    if out_shape is not None:  # pads are derived (any given are ignored, as the spec says)
        out_shape = [int(o) for o in out_shape][-n:]  # some exporters give (N, C, *spatial)
        total = [f - o for f, o in zip(full, out_shape)]
        if min(total) < 0:
            raise OpError(f"output_shape {out_shape} is larger than ConvTranspose can produce ({full})")
        # the odd pixel is cropped at the end for SAME_UPPER, at the start otherwise (ONNX reference)
        lo = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
        pads = tuple(lo) + tuple(t - b for t, b in zip(total, lo))
    elif auto_pad == "VALID":
        pads = (0,) * (2 * n)
    out = tuple(f - pads[d] - pads[n + d] for d, f in enumerate(full))
    if min(out) < 1:
        raise OpError(f"ConvTranspose output shape {out} is empty")
    # The adjoint Conv sees only the core of Y that some input pixel reaches: output_padding beyond
    # the end pad adds rows past the last window (zero but for the bias), which the Conv geometry
    # would count as further windows. Its end pad is what is left of the pad after output_padding.
    tail = tuple(max(0, op - pads[n + d]) for d, op in enumerate(out_pad))
    adj_pads = tuple(pads[:n]) + tuple(max(0, pads[n + d] - op) for d, op in enumerate(out_pad))
    attrs = {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "pads": adj_pads,
             "group": int(c.attr("group", 1))}
    return attrs, out, tail


def _adjoint_context(attrs: dict, y_shape: tuple[int, ...], w: np.ndarray, needs: tuple[bool, ...]):
    """An OpContext, and its ConvPlan, for the adjoint Conv on an input of ``y_shape`` (a zero-memory
    stand-in: the Conv set-up and VJP read only its shape)."""
    ctx = OpContext(attrs, inputs=(np.broadcast_to(np.zeros((), w.dtype), y_shape), w), needs=needs)
    return ctx, ConvPlan(ctx, ctx.inputs[0], w)


def _conv_transpose(c, x, w, b=None):
    if x.ndim < 3 or w.ndim != x.ndim:
        raise OpError(f"ConvTranspose needs X (N, C, *spatial) and W (C, M/group, *kernel), got {x.shape} and {w.shape}")
    attrs, out, tail = _transpose_attrs(c, x, w)
    group = attrs["group"]
    if w.shape[0] != x.shape[1] or x.shape[1] % group:
        raise OpError(f"X has {x.shape[1]} channels and W is {w.shape}, incompatible with group={group}")
    n, m = x.shape[0], w.shape[1] * group
    core = tuple(o - t for o, t in zip(out, tail))
    ctx, cv = _adjoint_context(attrs, (n, m) + core, w, (True, False, False))
    if cv.out != x.shape[2:]:  # cannot happen for valid attributes; guards the derivation above
        raise OpError(f"ConvTranspose geometry mismatch: {cv.out} vs {x.shape[2:]}")
    # Y = the adjoint Conv's dX for error X; direct (BLAS-accumulated) when that Conv would be
    ctx.save(conv=cv, xT=None)
    if use_direct(cv, x, w):
        ctx.save(direct=True)
    y = conv_vjp(ctx, x.astype(w.dtype, copy=False))[0]
    assert y is not None  # the context asks for dX (needs=(True, False, False))
    if any(tail):
        y_core, y = y, np.zeros((n, m) + out, y.dtype)
        y[_core_index(core)] = y_core
    if b is not None:
        y += b.reshape((1, -1) + (1,) * len(out)).astype(y.dtype, copy=False)
    c.save(attrs=attrs, core=core)
    return y


def _core_index(core: tuple[int, ...]) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(slice(0, k) for k in core)


def _conv_transpose_vjp(c, g):
    x, w = c.inputs[0], c.inputs[1]
    need_x, need_w = c.needs[0], c.needs[1]
    need_b = len(c.needs) > 2 and c.needs[2]
    db = g.sum(axis=(0,) + tuple(range(2, g.ndim))).astype(w.dtype) if need_b else None
    dx = dw = None
    g = g.astype(w.dtype, copy=False)[_core_index(c.saved["core"])]  # the tail rows reach no input
    if need_x or need_w:
        ctx, cv = _adjoint_context(c.saved["attrs"], g.shape, w, (False, need_w, False))
        if need_x:  # the adjoint Conv's forward on the error (which also saves what its dW reads)
            dx = conv_forward(ctx, g, w)
        else:  # only dW: set up what that forward would have saved
            ctx.save(conv=cv, xT=cv.pad(g))
            if use_direct(cv, g, w):
                ctx.save(direct=True)
        if need_w:
            ctx.needs = (False, True, False)
            dw = conv_vjp(ctx, x.astype(w.dtype, copy=False))[1]
    return dx, dw, db


def _conv_transpose_flops(node, shapes) -> int | None:
    """2 x multiply-adds: each input element feeds a kernel's worth (W is (C_in, C_out / group, k...))."""
    w = shapes.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or len(w.shape) < 3:
        return None
    return 2 * numel(shapes.get(node.inputs[0])) * int(np.prod(w.shape[1:], dtype=np.int64))


# The forward reads X and W; the VJP reads X (for dW) and W (for dX), never Y.
defop("ConvTranspose", _conv_transpose, _conv_transpose_vjp, keep=("x0", "x1"), flops=_conv_transpose_flops)


# -- Col2Im (opset 18) --------------------------------------------------------------------------------
# The adjoint of im2col (torch's F.fold): column l of block k holds the pixel at kernel offset k of
# window l, so each kernel offset adds one strided slice of the padded image -- the same col2im a
# Conv's columns path does -- and the pads are cropped. dL/dinput is im2col of the error: the error
# padded the same way and read through the same slices. A loop over kernel offsets, never pixels.


def _col2im_geometry(c, x: np.ndarray, image_shape: np.ndarray, block_shape: np.ndarray):
    """The image shape, kernel, strides, dilations, windows per dim, begin pads and padded extent."""
    image = tuple(int(v) for v in np.asarray(image_shape).reshape(-1))
    block = tuple(int(v) for v in np.asarray(block_shape).reshape(-1))
    n = len(image)
    if n < 1 or len(block) != n or x.ndim != 3:
        raise OpError(f"{c.node}: Col2Im needs input (N, C*prod(block), L) and image_shape, block_shape of one "
                      f"length, got {x.shape}, {list(image)}, {list(block)}")
    kernel, strides, dilations, pads, _ = spatial_attrs(c, n, block)
    out, lo, _ = geometry(image, kernel, strides, dilations, pads, "NOTSET")
    kp = math.prod(kernel)
    if x.shape[1] % kp or x.shape[2] != math.prod(out):
        raise OpError(f"{c.node}: Col2Im input {x.shape} does not hold blocks {list(block)} of the "
                      f"{math.prod(out)} windows of image {list(image)}")
    # every padded position a window reads, and the whole image (a window may stop short of its end)
    extent = tuple(max(e, b + i) for e, b, i in zip(padded_extent(out, kernel, strides, dilations), lo, image))
    return image, kernel, strides, dilations, out, lo, extent


def _col2im(c, x, image_shape, block_shape):
    image, kernel, strides, dilations, out, lo, extent = _col2im_geometry(c, x, image_shape, block_shape)
    n, ch = x.shape[0], x.shape[1] // math.prod(kernel)
    cols = x.reshape((n, ch, math.prod(kernel)) + out)
    buf = np.zeros((n, ch) + extent, x.dtype)
    for k, (_, sl) in enumerate(offset_slices(kernel, out, strides, dilations)):
        target = buf[(slice(None), slice(None)) + sl]
        np.add(target, cols[:, :, k], out=target)
    c.save(geometry=(kernel, strides, dilations, out, lo, extent))
    return np.ascontiguousarray(buf[(slice(None), slice(None)) + tuple(slice(b, b + i) for b, i in zip(lo, image))])


def _col2im_vjp(c, g):
    kernel, strides, dilations, out, lo, extent = c.saved["geometry"]
    x = c.inputs[0]
    if x.dtype.kind != "f" or not c.needs[0]:
        return None, None, None
    gp = pad_input(g.astype(x.dtype, copy=False), lo, extent)
    dx = np.empty((x.shape[0], x.shape[1] // math.prod(kernel), math.prod(kernel)) + out, x.dtype)
    for k, (_, sl) in enumerate(offset_slices(kernel, out, strides, dilations)):
        dx[:, :, k] = gp[(slice(None), slice(None)) + sl]
    return dx.reshape(x.shape), None, None


# The VJP reads only shapes (and the saved geometry); image_shape and block_shape get no error.
defop("Col2Im", _col2im, _col2im_vjp, keep=(), differentiable=(0,))

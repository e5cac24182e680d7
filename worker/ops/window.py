"""Sliding-window geometry shared by every op that slides a kernel over an image: Conv,
ConvTranspose and Col2Im (:mod:`.conv`, :mod:`.conv_transpose`) and pooling (:mod:`.pool`).

The ONNX attributes (kernel_shape, strides, dilations, pads, auto_pad), the output shape and the
pads actually applied, padding an input once, and reading its windows as strided views or as one
slice per kernel offset. Kept apart from the convolution itself so pooling need not import it.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from gradserve.worker.ops.registry import OpError, str_attr


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


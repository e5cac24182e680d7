"""Resize (ONNX opsets 13-21) and the deprecated Upsample: nearest, N-linear and N-cubic
interpolation; and GridSample (opsets 16 and 20: sampling at per-position coordinates, at the end).

Resize is separable: it resizes one axis at a time, and along one axis every output position reads
a fixed number of taps (1 nearest, 2 linear, 4 cubic) at input positions ``idx`` (out, taps) with
weights ``w`` (out, taps). The forward is one gather (``np.take``) per tap; the operator is linear
in X, so the VJP applies the transposes of the per-axis maps in reverse order and needs nothing of
the forward but these small tables (``keep=()``). Because the source coordinate never decreases
along an axis, each tap's indices are sorted, and its scatter-add (``dX[idx] += w * dY``) is a
segment sum: one ``np.add.reduceat`` over the runs of equal indices, then one assignment into the
distinct indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradserve.worker.graph import Node
from gradserve.worker.ops.batch import SHAPE, BatchRule, BatchView, Rows, input_shape, never, per_sample, refuse
from gradserve.worker.ops.registry import OpError, family, normalize_axis, per_element, str_attr

defop = family(flops=per_element)

_COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                "tf_crop_and_resize")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


@dataclass
class _AxisMap:
    """The resampling of one axis: output position o = sum_t w[o, t] * input[idx[o, t]] (+ fill[o])."""

    axis: int
    n_in: int
    idx: np.ndarray  # (out, taps) int, non-decreasing down each column
    w: np.ndarray | None  # (out, taps) float64; None for nearest (a single tap of weight 1)
    fill: np.ndarray | None = None  # (out,) constant added (tf_crop_and_resize extrapolation), or None

    def segments(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Start of each run of equal indices in tap ``t``, and the index of each run."""
        col = self.idx[:, t]
        starts = np.flatnonzero(np.concatenate(([True], col[1:] != col[:-1])))
        return starts, col[starts]


def _source_coords(mode: str, n_out: int, n_in: int, scale: float, roi: tuple[float, float]) -> np.ndarray:
    """x_original for each output position along one axis (the ONNX coordinate_transformation_mode)."""
    o = np.arange(n_out, dtype=np.float64)
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        # the centre of the (fractional) output width maps to the centre of the input
        offset = n_in / 2 * (1 - n_out / (scale * n_in))
        return offset + (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if n_out > 1 else np.zeros(n_out)
    if mode == "align_corners":
        return o * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(n_out)
    if mode == "asymmetric":
        return o / scale
    start, end = roi  # tf_crop_and_resize
    if n_out > 1:
        return start * (n_in - 1) + o * (end - start) * (n_in - 1) / (n_out - 1)
    return np.full(n_out, 0.5 * (start + end) * (n_in - 1))


def _cubic_weights(r: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution weights of the taps at distances 1+r, r, 1-r, 2-r (r in [0, 1))."""
    def near(t):  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t):  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    return np.stack([far(1 + r), near(r), near(1 - r), far(2 - r)], axis=1)


def _axis_map(attrs: dict, node: str, axis: int, n_in: int, n_out: int, scale: float, roi: tuple[float, float]) -> _AxisMap:
    mode = str_attr(attrs.get("mode"), "nearest")
    coord = str_attr(attrs.get("coordinate_transformation_mode"), "half_pixel")
    x = _source_coords(coord, n_out, n_in, scale, roi)
    if mode == "nearest":
        nearest = str_attr(attrs.get("nearest_mode"), "round_prefer_floor")
        if nearest == "round_prefer_floor":
            i = np.ceil(x - 0.5)
        elif nearest == "round_prefer_ceil":
            i = np.floor(x + 0.5)
        elif nearest == "floor":
            i = np.floor(x)
        elif nearest == "ceil":
            i = np.ceil(x)
        else:
            raise OpError(f"{node}: unknown nearest_mode '{nearest}'")
        idx, w = i.astype(np.intp)[:, None], None
    else:
        base = np.floor(x)
        r = x - base
        if mode == "linear":
            offsets, w = np.arange(2), np.stack([1 - r, r], axis=1)
        elif mode == "cubic":
            offsets, w = np.arange(-1, 3), _cubic_weights(r, float(attrs.get("cubic_coeff_a", -0.75)))
        else:
            raise OpError(f"{node}: unknown Resize mode '{mode}'")
        idx = base.astype(np.intp)[:, None] + offsets
        if int(attrs.get("exclude_outside", 0)):  # taps outside the input get weight 0, the rest renormalised
            w = np.where((idx < 0) | (idx >= n_in), 0.0, w)
            total = w.sum(axis=1, keepdims=True)
            w = w / np.where(total == 0, 1.0, total)
    idx = np.clip(idx, 0, n_in - 1)  # beyond the edges, the edge pixel (as edge padding would)
    fill = None
    if coord == "tf_crop_and_resize":
        outside = (x < 0) | (x > n_in - 1)
        if outside.any():
            w = np.ones(idx.shape) if w is None else w
            w = np.where(outside[:, None], 0.0, w)
            fill = np.where(outside, float(attrs.get("extrapolation_value", 0.0)), 0.0)
    if np.any(np.diff(idx, axis=0) < 0):  # a reversed roi: the segment sums of the VJP need sorted taps
        raise OpError(f"{node}: Resize with a decreasing source coordinate (roi end < start) is not supported")
    return _AxisMap(axis, n_in, idx, w, fill)


def _floats(t: np.ndarray | None) -> list[float] | None:
    """An optional 1-D input as floats; absent or empty means not given."""
    if t is None or t.size == 0:
        return None
    return [float(v) for v in np.asarray(t).reshape(-1)]


def _plan(attrs: dict, node: str, x: np.ndarray, roi, scales, sizes) -> tuple[list[_AxisMap], tuple[int, ...]]:
    """The per-axis maps of the axes that change, and the output shape."""
    r = x.ndim
    axes = [normalize_axis(int(a), r, node) for a in (attrs.get("axes") or range(r))]
    if len(set(axes)) != len(axes):
        raise OpError(f"{node}: repeated axis in {axes}")
    scales_f, sizes_f, roi_f = _floats(scales), _floats(sizes), _floats(roi)
    coord = str_attr(attrs.get("coordinate_transformation_mode"), "half_pixel")
    if coord not in _COORD_MODES:
        raise OpError(f"{node}: unknown coordinate_transformation_mode '{coord}'")
    rois = [(0.0, 1.0)] * len(axes)
    if coord == "tf_crop_and_resize":
        if roi_f is None or len(roi_f) != 2 * len(axes):
            raise OpError(f"{node}: tf_crop_and_resize needs roi with 2 values per resized axis")
        rois = [(roi_f[i], roi_f[len(axes) + i]) for i in range(len(axes))]
    ins = [x.shape[a] for a in axes]
    if scales_f is not None and sizes_f is None:
        if len(scales_f) != len(axes) or min(scales_f) <= 0:
            raise OpError(f"{node}: scales {scales_f} must be positive, one per axis of {axes}")
        # floor(in * (roi_end - roi_start) * scale), the scale rounded as the float32 it was given as
        outs = [int(math.floor(n * (e - b) * s)) for n, s, (b, e) in zip(ins, scales_f, rois)]
        used = scales_f
    elif sizes_f is not None and scales_f is None:
        if len(sizes_f) != len(axes):
            raise OpError(f"{node}: sizes {sizes_f} must give one size per axis of {axes}")
        outs = [int(s) for s in sizes_f]
        used = [o / n for o, n in zip(outs, ins)]
        policy = str_attr(attrs.get("keep_aspect_ratio_policy"), "stretch")
        if policy in ("not_larger", "not_smaller"):
            s = min(used) if policy == "not_larger" else max(used)
            used = [s] * len(axes)
            outs = [int(s * n + 0.5) for n in ins]  # round half up
        elif policy != "stretch":
            raise OpError(f"{node}: unknown keep_aspect_ratio_policy '{policy}'")
    else:
        raise OpError(f"{node}: Resize needs exactly one of scales and sizes")
    if min(outs, default=1) < 1:
        raise OpError(f"{node}: Resize to an empty shape {outs}")
    mode = str_attr(attrs.get("mode"), "nearest")
    if int(attrs.get("antialias", 0)) and mode != "nearest" and any(o < n for o, n in zip(outs, ins)):
        raise OpError(f"{node}: Resize with antialias=1 when downsampling is not supported")
    out_shape = list(x.shape)
    maps = []
    for a, n, o, s, rr in zip(axes, ins, outs, used, rois):
        out_shape[a] = o
        if o == n and s == 1 and rr == (0.0, 1.0):
            continue  # an identity along this axis in every mode
        maps.append(_axis_map(attrs, node, a, n, o, s, rr))
    return maps, tuple(out_shape)


def _resample(y: np.ndarray, m: _AxisMap) -> np.ndarray:
    """One axis of the forward: a gather per tap, weighted."""
    shape = (-1,) + (1,) * (y.ndim - m.axis - 1)
    if m.w is None:
        out = np.take(y, m.idx[:, 0], axis=m.axis)
    else:
        out = np.take(y, m.idx[:, 0], axis=m.axis) * m.w[:, 0].astype(y.dtype).reshape(shape)
        for t in range(1, m.idx.shape[1]):
            out += np.take(y, m.idx[:, t], axis=m.axis) * m.w[:, t].astype(y.dtype).reshape(shape)
    if m.fill is not None:
        out += m.fill.astype(y.dtype).reshape(shape)
    return out


def _resize(c, x, roi=None, scales=None, sizes=None, attrs: dict | None = None):
    maps, out_shape = _plan(c.attrs if attrs is None else attrs, c.node, x, roi, scales, sizes)
    y = x
    for m in maps:
        y = _resample(y, m)
    c.save(maps=maps)
    return y.reshape(out_shape) if y is not x else x.copy()


def _resize_vjp(c, g):
    maps: list[_AxisMap] = c.saved["maps"]
    dtype = c.x.dtype
    if dtype.kind != "f":
        return None
    g = g.astype(dtype, copy=False)
    for m in reversed(maps):  # the transpose of each axis map, last axis first
        shape = (-1,) + (1,) * (g.ndim - m.axis - 1)
        dx = np.zeros(g.shape[: m.axis] + (m.n_in,) + g.shape[m.axis + 1 :], dtype)
        lead = (slice(None),) * m.axis
        for t in range(m.idx.shape[1]):
            starts, targets = m.segments(t)
            gw = g if m.w is None else g * m.w[:, t].astype(dtype).reshape(shape)
            dx[lead + (targets,)] += np.add.reduceat(gw, starts, axis=m.axis)
        g = dx
    return g


def _resize_batch(view: BatchView, node: Node, tags: list) -> Rows:
    """Per sample, when the scale along the batch axis is 1 or the size the batch's own (from Shape)."""
    out = per_sample(view, node, tags)
    rank = view.rank(node.inputs[0]) or 0
    axes = [a % rank for a in node.attrs.get("axes", range(rank))]
    if 0 not in axes:
        return out
    k = axes.index(0)
    scales, sizes = view.const(node, 2), view.const(node, 3)
    if scales is not None and scales.size and float(scales.reshape(-1)[k]) == 1.0:
        return out
    if len(node.inputs) > 3 and tags[3] == SHAPE:
        return out  # sizes computed from the batch's shape: planning checks axis 0 follows it
    if sizes is not None and sizes.size and int(sizes.reshape(-1)[k]) == input_shape(view, node, 0)[0]:
        raise refuse(node, f"has constant sizes {sizes.tolist()} that hold the batch size; each micro-batch "
                           "needs its own")
    raise refuse(node, "resizes along the batch axis")


defop("Resize", _resize, _resize_vjp, keep=(), differentiable=(0,),
      batch=BatchRule(_resize_batch, shape_inputs=(1, 2, 3)))


# -- Upsample (deprecated since opset 10) -------------------------------------------------------------
def _upsample(c, x, scales=None):
    """Upsample-7/9: Resize by ``scales`` (input in opset 9, attribute in 7) with asymmetric
    coordinates and, for nearest, the floor of the source coordinate."""
    if scales is None:
        scales = np.asarray(c.attr("scales") or (), np.float32)
    attrs = {"mode": str_attr(c.attr("mode"), "nearest"), "coordinate_transformation_mode": "asymmetric",
             "nearest_mode": "floor"}
    return _resize(c, x, None, scales, attrs=attrs)


defop("Upsample", _upsample, _resize_vjp, keep=(), differentiable=(0,),
      batch=never("is not known to keep the samples of a batch independent (no rule written for Upsample)"))


# -- GridSample (opsets 16 and 20) ----------------------------------------------------------------------
# Y[n, c, o] = sum over taps of w * X[n, c, tap]: each output position o reads T taps per spatial axis
# (1 nearest, 2 linear, 4 cubic) around its own source coordinate, so unlike Resize the taps differ per
# image and position. The forward builds, per spatial axis, the tap indices, weights and the weights'
# slopes (d weight / d coordinate) for every (n, o); the T^r tap combinations are then a loop over
# "kernel offsets", each a gather (forward), a bincount scatter-add (dX) and a channel sum (dgrid).
# Everything follows torch's F.grid_sample (GridSampler.h), which ONNX's GridSample copies.

_GRID_MODES = {"bilinear": "linear", "linear": "linear", "nearest": "nearest", "bicubic": "cubic", "cubic": "cubic"}
_GRID_CUBIC_A = -0.75  # torch's and ONNX's fixed bicubic coefficient


def _cubic_slopes(r: np.ndarray, a: float) -> np.ndarray:
    """d/dr of :func:`_cubic_weights` (the taps at distances 1+r, r, 1-r, 2-r)."""
    def near(t):  # derivative of ((a+2)t - (a+3)) t^2 + 1
        return (3 * (a + 2) * t - 2 * (a + 3)) * t

    def far(t):  # derivative of ((a t - 5a) t + 8a) t - 4a
        return (3 * a * t - 10 * a) * t + 8 * a

    return np.stack([far(1 + r), near(r), -near(1 - r), -far(2 - r)], axis=-1)


def _reflect(u: np.ndarray, twice_low: int, twice_high: int) -> tuple[np.ndarray, np.ndarray]:
    """Reflect coordinates into [twice_low/2, twice_high/2] as often as it takes (torch's
    reflect_coordinates), and the slope of that map (+-1)."""
    if twice_low == twice_high:
        return np.zeros_like(u), np.zeros_like(u)
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    v = u - u.dtype.type(low)
    sign = np.where(v < 0, -1, 1).astype(u.dtype)
    v = np.abs(v)
    extra = np.fmod(v, u.dtype.type(span))
    even = np.floor(v / u.dtype.type(span)) % 2 == 0
    out = np.where(even, extra + u.dtype.type(low), u.dtype.type(span + low) - extra)
    return out.astype(u.dtype, copy=False), np.where(even, sign, -sign)


def _pad_coord(u: np.ndarray, size: int, padding: str, align: bool) -> tuple[np.ndarray, np.ndarray | int]:
    """Source coordinates mapped into the image by ``padding`` (clip, or reflect then clip), and
    the slope of that map: the clip's is 0 on and beyond the border, as in torch's backward."""
    if padding == "zeros":
        return u, 1
    factor: np.ndarray | int = 1
    if padding == "reflection":
        u, factor = _reflect(u, 0, 2 * (size - 1)) if align else _reflect(u, -1, 2 * size - 1)
    hi = u.dtype.type(size - 1)
    factor = np.where((u <= 0) | (u >= hi), 0, factor).astype(u.dtype, copy=False)
    return np.clip(u, 0, hi), factor


class _GridPlan:
    """The taps of one GridSample application: per spatial axis d, ``idx[d]`` (N, Q, T) indices into
    that axis, ``w[d]`` (N, Q, T) weights (zero for taps outside X under zeros padding), ``dw[d]``
    their slopes with respect to the *grid* value (unnormalisation and padding slopes folded in;
    None for nearest)."""

    def __init__(self, attrs: dict, node: str, x_shape: tuple[int, ...], grid: np.ndarray, dtype: np.dtype):
        spatial = x_shape[2:]
        r = len(spatial)
        if r < 1 or grid.ndim != r + 2 or grid.shape[0] != x_shape[0] or grid.shape[-1] != r:
            raise OpError(f"{node}: GridSample needs X (N, C, *spatial) and grid (N, *out, {r}), got {x_shape} and {grid.shape}")
        mode = _GRID_MODES.get(str_attr(attrs.get("mode"), "linear"))
        padding = str_attr(attrs.get("padding_mode"), "zeros")
        if mode is None or padding not in ("zeros", "border", "reflection"):
            raise OpError(f"{node}: unknown GridSample mode '{attrs.get('mode')}' or padding_mode '{padding}'")
        align = bool(int(attrs.get("align_corners", 0)))
        self.mode, self.spatial, self.out = mode, spatial, grid.shape[1:-1]
        n_out = math.prod(self.out)
        g = grid.reshape(grid.shape[0], n_out, r).astype(dtype, copy=False)
        one = dtype.type(1)
        self.idx: list[np.ndarray] = []
        self.w: list[np.ndarray] = []
        self.dw: list[np.ndarray | None] = []
        for d, size in enumerate(spatial):
            gd = g[..., r - 1 - d]  # the grid lists coordinates fastest axis (x = width) first
            # unnormalise in X's dtype with torch's operation order, so floor() agrees with torch's
            if align:
                u, step = (gd + one) / dtype.type(2) * dtype.type(size - 1), (size - 1) / 2
            else:
                u, step = ((gd + one) * dtype.type(size) - one) / dtype.type(2), size / 2
            slope = np.full(u.shape, step, dtype)
            if mode != "cubic":  # cubic pads each integer tap instead (below)
                u, factor = _pad_coord(u, size, padding, align)
                slope = slope * factor
            if mode == "nearest":
                taps, w, dw = np.rint(u)[..., None], np.ones(u.shape + (1,), dtype), None
            else:
                base = np.floor(u)
                frac = u - base
                if mode == "linear":
                    taps = base[..., None] + np.arange(2, dtype=dtype)
                    w = np.stack([one - frac, frac], axis=-1)
                    dw = np.stack([-slope, slope], axis=-1)
                else:
                    taps = base[..., None] + np.arange(-1, 3, dtype=dtype)
                    w = _cubic_weights(frac.reshape(-1), _GRID_CUBIC_A).reshape(frac.shape + (4,)).astype(dtype)
                    dw = _cubic_slopes(frac, _GRID_CUBIC_A).astype(dtype) * slope[..., None]
                    taps = _pad_coord(taps, size, padding, align)[0]
            inside = (taps >= 0) & (taps <= size - 1)
            w = np.where(inside, w, 0).astype(dtype, copy=False)
            dw = None if dw is None else np.where(inside, dw, 0).astype(dtype, copy=False)
            self.idx.append(np.where(inside, taps, 0).astype(np.intp))
            self.w.append(w)
            self.dw.append(dw)
        self.strides = [math.prod(spatial[d + 1 :]) for d in range(r)]

    def taps(self):
        """For each combination of per-axis taps: the flat spatial index (N, Q), the weight (N, Q)
        and the per-axis taps ``t``."""
        r = len(self.spatial)
        for t in np.ndindex(*(self.idx[0].shape[-1],) * r):
            flat = sum(self.idx[d][..., k] * self.strides[d] for d, k in enumerate(t))
            w = math.prod(self.w[d][..., k] for d, k in enumerate(t))
            yield t, flat, w


def _grid_sample(c, x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    floating = x.dtype.kind == "f"
    # coordinates in X's dtype (torch requires grid's to match); the grid's for integer/bool X
    plan = _GridPlan(c.attrs, c.node, x.shape, grid, x.dtype if floating else grid.dtype)
    n, ch = x.shape[:2]
    xf = x.reshape(n, ch, -1)
    c.save(plan=plan)
    if not floating:  # ONNX allows any X; only nearest is a pure gather of its values
        if plan.mode != "nearest":
            raise OpError(f"{c.node}: GridSample mode '{plan.mode}' needs floating X, got {x.dtype}")
        (_, flat, w), = plan.taps()
        y = np.where(w[:, None, :] != 0, np.take_along_axis(xf, flat[:, None, :], axis=2), np.zeros((), x.dtype))
        return y.reshape((n, ch) + plan.out)
    y = np.zeros((n, ch, math.prod(plan.out)), x.dtype)
    for _, flat, w in plan.taps():
        y += np.take_along_axis(xf, flat[:, None, :], axis=2) * w[:, None, :]
    return y.reshape((n, ch) + plan.out)


def _grid_sample_vjp(c, g: np.ndarray):
    plan: _GridPlan = c.saved["plan"]
    x = c.inputs[0]
    n, ch = x.shape[:2]
    size = math.prod(plan.spatial)
    dtype = x.dtype
    if dtype.kind != "f":  # integer X: nearest only, so no error for either input
        return None, (np.zeros(c.inputs[1].shape, c.inputs[1].dtype) if len(c.needs) > 1 and c.needs[1] else None)
    g = g.reshape(n, ch, -1).astype(dtype, copy=False)
    need_x = c.needs[0]
    need_grid = len(c.needs) > 1 and c.needs[1] and plan.mode != "nearest"
    # dX: every tap scatters w * dY into its pixel; one bincount per tap over (n, c, pixel)
    dx = np.zeros(n * ch * size) if need_x else None
    base = (np.arange(n)[:, None, None] * ch + np.arange(ch)[None, :, None]) * size if need_x else None
    # dgrid: sum_c dY * X[tap], times d w / d coordinate (the product of the other axes' weights)
    r = len(plan.spatial)
    du = [np.zeros(g.shape[::2], dtype) for _ in range(r)] if need_grid else None
    xf = x.reshape(n, ch, -1)
    # the type: ignores: dx and base are arrays when need_x, du and plan.dw's entries when need_grid
    for t, flat, w in plan.taps():
        if need_x:
            dx += np.bincount((base + flat[:, None, :]).ravel(), (g * w[:, None, :]).ravel(),  # type: ignore[operator]
                              minlength=dx.size)  # type: ignore[union-attr]
        if need_grid:
            gv = np.einsum("ncq,ncq->nq", g, np.take_along_axis(xf, flat[:, None, :], axis=2))
            for d in range(r):
                others = math.prod(plan.w[e][..., k] for e, k in enumerate(t) if e != d)
                du[d] += gv * plan.dw[d][..., t[d]] * others  # type: ignore[index]
    dgrid = None
    if len(c.needs) > 1 and c.needs[1]:
        grid = c.inputs[1]
        if need_grid:  # back to the grid's layout: coordinate 0 is the last spatial axis
            dgrid = np.stack(du[::-1], axis=-1).reshape(grid.shape).astype(grid.dtype, copy=False)  # type: ignore[index]
        else:  # nearest: piecewise constant in the grid
            dgrid = np.zeros(grid.shape, grid.dtype)
    return (None if dx is None else dx.astype(dtype).reshape(x.shape)), dgrid


# The VJP reads X (for dgrid) and the saved taps, never the grid itself.
def _grid_sample_batch(view: BatchView, node: Node, tags: list) -> Rows:
    """Sample i's image read at sample i's grid points."""
    if tags[0] != Rows(0) or tags[1] != Rows(0):
        raise refuse(node, "samples images and grids that are not both batched on axis 0")
    return Rows(0)


defop("GridSample", _grid_sample, _grid_sample_vjp, keep="x0", batch=BatchRule(_grid_sample_batch))

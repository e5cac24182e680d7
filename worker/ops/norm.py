"""Normalisation: LayerNormalization, InstanceNormalization, GroupNormalization (opset 18 per-group
and opset 21 per-channel scale/bias) and LRN (local response normalisation across channels), and
the statistics helpers they share with BatchNormalization (:mod:`.batchnorm`).

Statistics are computed in at least float32 (float16 inputs are upcast, as ONNX asks), two-pass
(centred) for accuracy. The forwards save the normalised input (BatchNormalization: the centred
input) with the per-group 1/std; that and the small parameters are all the VJPs read,
so the runner need not keep X alive. An elementwise pass over an activation costs about as much
as its arithmetic, so the code counts passes: group sums use einsum (no temporary) and results
are built in place in a single new array.
"""

from __future__ import annotations

import math

import numpy as np

from gradserve.worker.ops.batch import PER_SAMPLE_SAME_SHAPE, BatchRule, along_attr
from gradserve.worker.ops.registry import OpError, family, normalize_axis, per_element, unbroadcast

# Normalisations within each sample (ONNX infers no output shape for some: it is the input's).
defop = family(batch=PER_SAMPLE_SAME_SHAPE, flops=per_element)


def _work_dtype(dtype) -> np.dtype:
    return np.promote_types(dtype, np.float32)


def normalize(x3: np.ndarray, eps: float, mean: np.ndarray | None = None, var: np.ndarray | None = None, scaled: bool = True):
    """x3 (A, G, B): statistics per G over axes A and B (given ones if ``mean``/``var`` are passed).
    Returns (xhat, mean, var, inv) with xhat = (x - mean) * inv -- or just x - mean if not
    ``scaled`` -- and mean/var/inv of shape (G,)."""
    wd = _work_dtype(x3.dtype)
    count = x3.shape[0] * x3.shape[2]
    if mean is None:
        mean = x3.sum(axis=2, dtype=wd).sum(axis=0) / count
    mean = mean.astype(wd, copy=False)
    xhat = np.subtract(x3, mean[:, None], dtype=wd)
    if var is None:
        var = np.einsum("agb,agb->g", xhat, xhat) / count  # population variance, two-pass
    var = var.astype(wd, copy=False)
    inv = 1.0 / np.sqrt(var + wd.type(eps))
    if scaled:
        xhat *= inv[:, None]
    return xhat, mean, var, inv


def normalize_grad(gx3: np.ndarray, xhat: np.ndarray, inv: np.ndarray, scale: np.ndarray | None = None, centred: bool = False):
    """Input error of xhat = (x - mean) * inv through the statistics of each group G of (A, G, B):
    scale * inv * (gx - mean(gx) - xhat * mean(gx * xhat)); ``gx3`` is dL/d(xhat * scale) when
    ``scale`` (G,) is given, else dL/dxhat. With ``centred`` the array passed is x - mean rather
    than xhat. One new array, three in-place passes. Also returns the group sums of gx and gx*xhat."""
    count = xhat.shape[0] * xhat.shape[2]
    sum_g = gx3.sum(axis=2, dtype=xhat.dtype).sum(axis=0)
    sum_gx = np.einsum("agb,agb->g", gx3, xhat)
    if centred:
        sum_gx *= inv
    dx = xhat * (-sum_gx / count * (inv if centred else 1))[:, None]
    dx += gx3
    dx -= (sum_g / count)[:, None]
    dx *= (inv if scale is None else inv * scale)[:, None]
    return dx, sum_g, sum_gx


# -- LayerNormalization -------------------------------------------------------------------------------
_STASH = {1: np.float32, 10: np.float16, 11: np.float64}


def _layernorm(c, x, scale, bias=None):
    axis = normalize_axis(int(c.attr("axis", -1)), x.ndim)
    # stash_type names the dtype of Mean/InvStdDev; the statistics themselves are computed in at
    # least float32 but never below the input's precision (float64 graphs stay float64 throughout)
    stash = np.dtype(_STASH.get(int(c.attr("stash_type", 1)), np.float32))
    rows = x.reshape(1, math.prod(x.shape[:axis]), -1)  # (1, rows, normalised) for normalize
    xhat, mean, _, inv = normalize(rows, float(c.attr("epsilon", 1e-5)))
    xhat = xhat.reshape(x.shape)
    y = np.multiply(xhat, scale, dtype=x.dtype)
    if bias is not None:
        y += bias
    c.save(xhat=xhat, inv=inv, axis=axis)
    n_out = c.n_outputs
    if n_out == 1:
        return y
    stat_shape = x.shape[:axis] + (1,) * (x.ndim - axis)
    return (y, mean.reshape(stat_shape).astype(stash), inv.reshape(stat_shape).astype(stash))[:n_out]


def _layernorm_vjp(c, gy, g_mean=None, g_inv=None):
    x, scale = c.inputs[0], c.inputs[1]
    bias = c.inputs[2] if len(c.inputs) > 2 else None
    xhat, inv, axis = c.saved["xhat"], c.saved["inv"], c.saved["axis"]
    needs = list(c.needs) + [False] * (3 - len(c.needs))
    n_rows = math.prod(x.shape[:axis])
    size = xhat.size // max(n_rows, 1)
    dx = dscale = dbias = None
    if gy is not None:
        simple = scale.shape == x.shape[axis:]  # Scale/B cover exactly the normalised dims
        if needs[1]:
            if simple:
                dscale = np.einsum("rh,rh->h", gy.reshape(n_rows, -1), xhat.reshape(n_rows, -1)).reshape(scale.shape)
            else:
                dscale = unbroadcast(gy * xhat, scale.shape)
        if needs[2] and bias is not None:
            dbias = gy.reshape(n_rows, -1).sum(axis=0).reshape(bias.shape) if bias.shape == x.shape[axis:] else unbroadcast(gy, bias.shape)
        if needs[0]:
            gx = (gy * scale).reshape(1, n_rows, -1)
            dx = normalize_grad(gx, xhat.reshape(1, n_rows, -1), inv)[0].reshape(x.shape)
    if needs[0] and (g_mean is not None or g_inv is not None):
        extra = np.zeros((n_rows, size), xhat.dtype) if dx is None else dx.reshape(n_rows, size)
        if g_mean is not None:
            extra += g_mean.reshape(n_rows, 1) / size
        if g_inv is not None:
            # d inv / d x = -inv^3 (x - mean) / size = -inv^2 xhat / size
            extra -= xhat.reshape(n_rows, size) * (g_inv.reshape(n_rows) * inv * inv / size)[:, None]
        dx = extra.reshape(x.shape)
    return dx, dscale, dbias


defop("LayerNormalization", _layernorm, _layernorm_vjp, keep=("x1", "x2"),
      batch=BatchRule(along_attr(-1, trailing=True), infer="same"))  # it and the axes after it


# -- InstanceNormalization ----------------------------------------------------------------------------
def _instancenorm(c, x, scale, bias):
    if x.ndim < 3:
        raise OpError(f"InstanceNormalization needs an (N, C, *spatial) input, got shape {x.shape}")
    xhat, _, _, inv = normalize(x.reshape(1, x.shape[0] * x.shape[1], -1), float(c.attr("epsilon", 1e-5)))
    xhat = xhat.reshape(x.shape[0], x.shape[1], -1)
    y = np.multiply(xhat, scale[:, None], dtype=x.dtype)
    y += bias[:, None]
    c.save(xhat=xhat, inv=inv)
    return y.reshape(x.shape)


def _instancenorm_vjp(c, g):
    x, scale = c.inputs[0], c.inputs[1]
    xhat, inv = c.saved["xhat"], c.saved["inv"]
    n, ch = x.shape[:2]
    g3 = g.reshape(n, ch, -1)
    dx = None
    if c.needs[0]:
        gx = (g3 * scale[:, None]).reshape(1, n * ch, -1)
        dx = normalize_grad(gx, xhat.reshape(1, n * ch, -1), inv)[0].reshape(x.shape)
    dscale = np.einsum("ncl,ncl->c", g3, xhat) if c.needs[1] else None
    dbias = g3.sum(axis=(0, 2)) if c.needs[2] else None
    return dx, dscale, dbias


defop("InstanceNormalization", _instancenorm, _instancenorm_vjp, keep=("x1", "x2"))


# -- GroupNormalization -------------------------------------------------------------------------------
def _per_channel(v: np.ndarray, channels: int, groups: int, name: str) -> np.ndarray:
    """Scale or bias as a per-channel (C,) vector: opset 21 gives it per channel, opset 18 per group
    (repeated over the group's channels); with one channel per group the two forms coincide."""
    if v.shape == (channels,):
        return v
    if v.shape == (groups,):
        return np.repeat(v, channels // groups)
    raise OpError(f"GroupNormalization {name} must have shape ({channels},) or ({groups},), got {v.shape}")


def _groupnorm(c, x, scale, bias):
    if x.ndim < 2:
        raise OpError(f"GroupNormalization needs an (N, C, ...) input, got shape {x.shape}")
    n, ch = x.shape[:2]
    groups = int(c.attr("num_groups", 0))
    if groups < 1 or ch % groups:
        raise OpError(f"GroupNormalization num_groups={groups} does not divide {ch} channels")
    if int(c.attr("stash_type", 1)) not in _STASH:
        raise OpError(f"GroupNormalization: unknown stash_type {c.attr('stash_type')}")
    # statistics per (image, group): rows of the group's channels and positions; as in
    # LayerNormalization, in at least float32 and never below the input's precision
    xhat, _, _, inv = normalize(x.reshape(1, n * groups, -1), float(c.attr("epsilon", 1e-5)))
    xhat = xhat.reshape(n, ch, -1)
    s = _per_channel(scale, ch, groups, "scale")
    y = np.multiply(xhat, s[:, None], dtype=x.dtype)
    y += _per_channel(bias, ch, groups, "bias")[:, None]
    c.save(xhat=xhat, inv=inv, groups=groups)
    return y.reshape(x.shape)


def _groupnorm_vjp(c, g):
    x, scale, bias = c.inputs[0], c.inputs[1], c.inputs[2]
    xhat, inv, groups = c.saved["xhat"], c.saved["inv"], c.saved["groups"]
    n, ch = x.shape[:2]
    g3 = g.reshape(n, ch, -1)

    def fold(per_channel: np.ndarray, like: np.ndarray) -> np.ndarray:
        """A per-channel error summed back onto the parameter's own form (per group in opset 18)."""
        if like.shape != (ch,):
            per_channel = per_channel.reshape(groups, -1).sum(axis=1)
        return per_channel.astype(like.dtype, copy=False)

    dx = dscale = dbias = None
    if c.needs[0]:
        gx = (g3 * _per_channel(scale, ch, groups, "scale")[:, None]).reshape(1, n * groups, -1)
        dx = normalize_grad(gx, xhat.reshape(1, n * groups, -1), inv)[0].reshape(x.shape).astype(x.dtype, copy=False)
    if c.needs[1]:
        dscale = fold(np.einsum("ncl,ncl->c", g3, xhat), scale)
    if c.needs[2]:
        dbias = fold(g3.sum(axis=(0, 2)), bias)
    return dx, dscale, dbias


# the VJP reads the saved normalised input and the scale, not X
defop("GroupNormalization", _groupnorm, _groupnorm_vjp, keep=("x1", "x2"))


# -- LRN ----------------------------------------------------------------------------------------------
def _channel_window_sum(a: np.ndarray, before: int, after: int) -> np.ndarray:
    """out[:, c] = sum of a[:, i] for c - before <= i <= c + after (clipped to the channels): one
    shifted add per offset of the (small) window."""
    out = a.copy()
    ch = a.shape[1]
    for i in range(1, min(before, ch - 1) + 1):
        out[:, i:] += a[:, :-i]
    for i in range(1, min(after, ch - 1) + 1):
        out[:, :-i] += a[:, i:]
    return out


def _lrn_window(c) -> tuple[int, int, float, float, float, int]:
    size = int(c.attr("size", 0))
    if size < 1:
        raise OpError(f"LRN needs a positive size, got {size}")
    # the window of channel c is [c - floor((size-1)/2), c + ceil((size-1)/2)]
    return (size - 1) // 2, size // 2, float(c.attr("alpha", 1e-4)), float(c.attr("beta", 0.75)), float(c.attr("bias", 1.0)), size


def _lrn(c, x):
    if x.ndim < 3:
        raise OpError(f"LRN needs an (N, C, *spatial) input, got shape {x.shape}")
    before, after, alpha, beta, bias, size = _lrn_window(c)
    d = _channel_window_sum(np.square(x), before, after)
    d *= alpha / size
    d += bias
    c.save(d=d)
    return x * d ** -beta


def _lrn_vjp(c, g):
    """y = x d^-beta with d = bias + alpha/size * window sum of x^2, so
    dx = g d^-beta - (2 alpha beta / size) x * (transposed window sum of g x d^(-beta-1))."""
    x, d = c.inputs[0], c.saved["d"]
    before, after, alpha, beta, _, size = _lrn_window(c)
    p = d ** -beta
    t = g * x
    t *= p
    t /= d
    dx = g * p
    dx -= (2 * alpha * beta / size) * x * _channel_window_sum(t, after, before)  # the window, reflected
    return dx.astype(x.dtype, copy=False)


defop("LRN", _lrn, _lrn_vjp, keep="x0")

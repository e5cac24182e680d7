"""Normalisation: BatchNormalization (training and inference mode), LayerNormalization,
InstanceNormalization, GroupNormalization (opset 18 per-group and opset 21 per-channel scale/bias)
and LRN (local response normalisation across channels).

Statistics are computed in at least float32 (float16 inputs are upcast, as ONNX asks), two-pass
(centred) for accuracy. The forwards save the centred input (BatchNormalization) or the normalised
input (the others) with the per-group 1/std; that and the small parameters are all the VJPs read,
so the runner need not keep X alive. An elementwise pass over an activation costs about as much
as its arithmetic, so the code counts passes: group sums use einsum (no temporary) and results
are built in place in a single new array. Training-mode BatchNormalization of float32 data (the
CNN hot path) goes further: it saves X itself, and its forward and VJP each read X (and the error)
twice, chunk by chunk so that the several ufuncs per chunk run in cache (_batchnorm_train32).
"""

from __future__ import annotations

import math

import numpy as np

from gradserve.worker.ops.registry import OpError, defop, normalize_axis, unbroadcast


def _work_dtype(dtype) -> np.dtype:
    return np.promote_types(dtype, np.float32)


def _normalize(x3: np.ndarray, eps: float, mean: np.ndarray | None = None, var: np.ndarray | None = None, scaled: bool = True):
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


def _normalize_grad(gx3: np.ndarray, xhat: np.ndarray, inv: np.ndarray, scale: np.ndarray | None = None, centred: bool = False):
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


# -- BatchNormalization -------------------------------------------------------------------------------
def _bn_view(x: np.ndarray) -> np.ndarray:
    """(N, C, rest) view; ONNX allows a 1-D input of size N, meaning C = 1."""
    if x.ndim == 1:
        return x.reshape(-1, 1, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


# Rows per chunk in the float32 BatchNormalization passes: a chunk of each array in flight stays
# in L2, so the 2-4 ufunc passes per chunk read memory once.
_CHUNK_BYTES = 256 << 10


def _chunks(rows: int, length: int):
    step = max(1, _CHUNK_BYTES // (4 * max(1, length)))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _row_stats(a2: np.ndarray, b2: np.ndarray, centre: np.ndarray | None = None):
    """Per-row sums of a2 and of a2 * b2 (float32). With a
    per-row ``centre`` (rows, 1), the second sum is of a2 * (b2 - centre) -- of (b2 - centre)^2
    if a2 is b2 -- the centred copy of a chunk only ever in cache: dearer, but free of the
    cancellation in sum(a*b) - c * sum(a)."""
    # Row sums as a BLAS matrix-vector product: several times faster than np.add.reduce (measured
    # 0.2 against 0.8 ms on 8 MB), at the cost of reading a2 once more.
    s1 = a2 @ np.ones(a2.shape[1], a2.dtype)
    if centre is None:
        return s1, np.einsum("ij,ij->i", a2, b2)
    s2 = np.empty(a2.shape[0], a2.dtype)
    chunks = _chunks(*a2.shape)
    tmp = np.empty((chunks[0][1] - chunks[0][0], a2.shape[1]), a2.dtype)
    for r0, r1 in chunks:
        t = np.subtract(b2[r0:r1], centre[r0:r1], out=tmp[: r1 - r0])
        np.einsum("ij,ij->i", t if a2 is b2 else a2[r0:r1], t, out=s2[r0:r1])
    return s1, s2


# Largest mean^2 / variance for which float32 statistics use the uncentred sums: their
# cancellation then costs at most ~eps32 * 17 relative (~1e-6).
_UNCENTRED_MAX = 16.0


def _channel_total(rows: np.ndarray, shape3) -> np.ndarray:
    """Per-row results (N*C,) summed over the batch, in float64."""
    return rows.reshape(shape3[0], shape3[1]).sum(axis=0, dtype=np.float64)


def _per_row(v: np.ndarray, shape3) -> np.ndarray:
    """A per-channel (C,) vector as a float32 column for the (N*C, L) rows."""
    return np.tile(v.astype(np.float32), shape3[0])[:, None]


def _batchnorm_train32(c, x3: np.ndarray, scale, bias, eps: float):
    """Training-mode BatchNormalization of float32 data, chunk by chunk of rows (so x is read from
    memory twice: once for the sums of x and x^2, once for y = x * a + b'). The sums are taken per
    row in float32 and across rows in float64; the variance is E[x^2] - mean^2 unless the mean is
    large against the spread (mean^2 > _UNCENTRED_MAX * var), where a third, centred pass gives
    it without cancellation. Saves x itself (no centred copy)."""
    x3 = np.ascontiguousarray(x3)
    x2 = x3.reshape(-1, x3.shape[2])
    count = x3.shape[0] * x3.shape[2]
    s1, s2 = _row_stats(x2, x2)
    mu = _channel_total(s1, x3.shape) / count
    v = np.maximum(_channel_total(s2, x3.shape) / count - mu * mu, 0.0)
    centred = bool(np.any(mu * mu > _UNCENTRED_MAX * v))
    if centred:
        centre = _per_row(mu, x3.shape)
        _, s2 = _row_stats(x2, x2, centre)  # sums of (x - m)^2, with m rounded to float32
        shift = _channel_total(s1, x3.shape) / count - centre[: x3.shape[1], 0].astype(np.float64)
        v = np.maximum(_channel_total(s2, x3.shape) / count - shift * shift, 0.0)
    inv64 = 1.0 / np.sqrt(v + eps)
    a = scale.astype(np.float64) * inv64
    y = np.empty(x3.shape, np.float32)
    y2 = y.reshape(x2.shape)
    a_r = _per_row(a, x3.shape)
    if centred:  # y = (x - m) * a + B: no large terms to cancel
        b_r = _per_row(bias.astype(np.float64), x3.shape)
        for r0, r1 in _chunks(*x2.shape):
            np.subtract(x2[r0:r1], centre[r0:r1], out=y2[r0:r1])
            y2[r0:r1] *= a_r[r0:r1]
            y2[r0:r1] += b_r[r0:r1]
    else:  # y = x * a + (B - m * a)
        b_r = _per_row(bias.astype(np.float64) - mu * a, x3.shape)
        for r0, r1 in _chunks(*x2.shape):
            np.multiply(x2[r0:r1], a_r[r0:r1], out=y2[r0:r1])
            y2[r0:r1] += b_r[r0:r1]
    mu, v, inv = mu.astype(np.float32), v.astype(np.float32), inv64.astype(np.float32)
    c.save(x3=x3, mu=mu, v=v, inv=inv, centred=centred)
    return y, mu, v


def _batchnorm(c, x, scale, bias, mean, var):
    eps = float(c.attr("epsilon", 1e-5))
    training = bool(c.attr("training_mode", 0))
    n_out = c.n_outputs
    if not training and n_out > 1:
        raise OpError("BatchNormalization outputs running_mean/running_var only with training_mode=1")
    x3 = _bn_view(x)
    channels = x3.shape[1]
    for name, t in (("scale", scale), ("B", bias), ("input_mean", mean), ("input_var", var)):
        if t.shape != (channels,):
            raise OpError(f"{name} must have shape ({channels},), got {t.shape}")
    if training and x.dtype == np.float32 and x3.size:
        y, mu, v = _batchnorm_train32(c, x3, scale, bias, eps)
    else:
        # keep x - mean (not xhat): y = (x - mean) * (scale * inv) + B is then two passes
        xc, mu, v, inv = _normalize(x3, eps, None if training else mean, None if training else var, scaled=False)
        y = np.multiply(xc, (scale * inv).astype(xc.dtype)[:, None], dtype=x.dtype)
        y += bias.astype(x.dtype)[:, None]
        c.save(xc=xc, mu=mu, v=v, inv=inv)
    y = y.reshape(x.shape)
    if not training or n_out == 1:
        return y
    mom = float(c.attr("momentum", 0.9))
    running_mean = (mean * mom + mu * (1 - mom)).astype(mean.dtype)
    running_var = (var * mom + v * (1 - mom)).astype(var.dtype)
    return (y, running_mean, running_var)[:n_out]


def _batchnorm_vjp32(c, gy):
    """VJP of _batchnorm_train32 from x itself: with xhat = (x - mean) * inv and a = scale * inv,
    dx = a * g + k * x + c0 for per-channel k, c0; chunk by chunk, as the forward."""
    x, scale = c.inputs[0], c.inputs[1]
    x3, mu, inv = c.saved["x3"], c.saved["mu"].astype(np.float64), c.saved["inv"].astype(np.float64)
    needs = list(c.needs) + [False] * (5 - len(c.needs))
    g3 = np.ascontiguousarray(_bn_view(gy), dtype=np.float32)
    g2, x2 = g3.reshape(-1, g3.shape[2]), x3.reshape(-1, x3.shape[2])
    count = x3.shape[0] * x3.shape[2]
    centred = c.saved["centred"]
    if centred:
        centre = _per_row(mu, x3.shape)
        rows_g, rows_gx = _row_stats(g2, x2, centre)
        sum_g = _channel_total(rows_g, x3.shape)
        sum_gxhat = _channel_total(rows_gx, x3.shape) * inv  # sum of g * xhat
    else:
        rows_g, rows_gx = _row_stats(g2, x2)
        sum_g = _channel_total(rows_g, x3.shape)
        sum_gxhat = (_channel_total(rows_gx, x3.shape) - mu * sum_g) * inv
    dx = None
    if needs[0]:
        a = scale.astype(np.float64) * inv
        k = -a * inv * sum_gxhat / count
        # centred: k * (x - m) + c0 with c0 = -a * mean(g); else k * x + (c0 - k * m)
        c0 = -a * sum_g / count if centred else -a * sum_g / count - k * mu
        a_r, k_r, c_r = (_per_row(v, x3.shape) for v in (a, k, c0))
        dx = np.empty(x3.shape, np.float32)
        d2 = dx.reshape(x2.shape)
        chunks = _chunks(*x2.shape)
        tmp = np.empty((chunks[0][1] - chunks[0][0], x2.shape[1]), np.float32)
        for r0, r1 in chunks:
            t = tmp[: r1 - r0]
            np.multiply(g2[r0:r1], a_r[r0:r1], out=d2[r0:r1])
            if centred:
                np.subtract(x2[r0:r1], centre[r0:r1], out=t)
                t *= k_r[r0:r1]
            else:
                np.multiply(x2[r0:r1], k_r[r0:r1], out=t)
            t += c_r[r0:r1]
            d2[r0:r1] += t
        dx = dx.reshape(x.shape)
    dscale = sum_gxhat.astype(scale.dtype) if needs[1] else None
    dbias = sum_g.astype(c.inputs[2].dtype) if needs[2] else None
    return dx, dscale, dbias, None, None


def _batchnorm_vjp(c, gy, g_rm=None, g_rv=None):
    x, scale = c.inputs[0], c.inputs[1]
    if "x3" in c.saved:
        if g_rm is None and g_rv is None:
            if gy is None:
                return None, None, None, None, None
            return _batchnorm_vjp32(c, gy)
        c.saved["xc"] = np.subtract(c.saved["x3"], c.saved["mu"][:, None])  # the general path below
    xc, inv = c.saved["xc"], c.saved["inv"]
    training = bool(c.attr("training_mode", 0))
    needs = list(c.needs) + [False] * (5 - len(c.needs))
    count = xc.shape[0] * xc.shape[2]
    dx = dscale = dbias = dmean = dvar = None
    if gy is not None:
        g3 = _bn_view(gy)
        if training and needs[0]:
            dx, sum_g, sum_gx = _normalize_grad(g3, xc, inv, scale.astype(xc.dtype), centred=True)
        else:
            sum_g = g3.sum(axis=2, dtype=xc.dtype).sum(axis=0)
            sum_gx = np.einsum("agb,agb->g", g3, xc) * inv  # sum of g * xhat
        if not training:
            dx = g3 * (scale * inv)[:, None] if needs[0] else None
            dmean = -sum_g * scale * inv if needs[3] else None
            dvar = -0.5 * scale * inv * inv * sum_gx if needs[4] else None
        dscale = sum_gx if needs[1] else None
        dbias = sum_g if needs[2] else None
    if training and (g_rm is not None or g_rv is not None):
        # running stats = momentum * input stats + (1 - momentum) * batch statistics
        mom = float(c.attr("momentum", 0.9))
        if g_rm is not None:
            dmean = mom * g_rm
        if g_rv is not None:
            dvar = mom * g_rv
        if needs[0]:
            # d mean/dx = 1/count; d var/dx = 2 (x - mean)/count
            extra = np.zeros(xc.shape, xc.dtype) if dx is None else dx
            if g_rm is not None:
                extra += ((1 - mom) / count * g_rm)[:, None]
            if g_rv is not None:
                extra += xc * ((1 - mom) * 2.0 / count * g_rv)[:, None]
            dx = extra
    if dx is not None:
        dx = dx.reshape(x.shape)
    return dx, dscale, dbias, dmean, dvar


# the VJP reads the saved x - mean, not X: the runner may free the activation
defop("BatchNormalization", _batchnorm, _batchnorm_vjp, keep=("x1", "x2", "x3", "x4"))


# -- LayerNormalization -------------------------------------------------------------------------------
_STASH = {1: np.float32, 10: np.float16, 11: np.float64}


def _layernorm(c, x, scale, bias=None):
    axis = normalize_axis(int(c.attr("axis", -1)), x.ndim)
    # stash_type names the dtype of Mean/InvStdDev; the statistics themselves are computed in at
    # least float32 but never below the input's precision (float64 graphs stay float64 throughout)
    stash = np.dtype(_STASH.get(int(c.attr("stash_type", 1)), np.float32))
    rows = x.reshape(1, math.prod(x.shape[:axis]), -1)  # (1, rows, normalised) for _normalize
    xhat, mean, _, inv = _normalize(rows, float(c.attr("epsilon", 1e-5)))
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
            dx = _normalize_grad(gx, xhat.reshape(1, n_rows, -1), inv)[0].reshape(x.shape)
    if needs[0] and (g_mean is not None or g_inv is not None):
        extra = np.zeros((n_rows, size), xhat.dtype) if dx is None else dx.reshape(n_rows, size)
        if g_mean is not None:
            extra += g_mean.reshape(n_rows, 1) / size
        if g_inv is not None:
            # d inv / d x = -inv^3 (x - mean) / size = -inv^2 xhat / size
            extra -= xhat.reshape(n_rows, size) * (g_inv.reshape(n_rows) * inv * inv / size)[:, None]
        dx = extra.reshape(x.shape)
    return dx, dscale, dbias


defop("LayerNormalization", _layernorm, _layernorm_vjp, keep=("x1", "x2"))


# -- InstanceNormalization ----------------------------------------------------------------------------
def _instancenorm(c, x, scale, bias):
    if x.ndim < 3:
        raise OpError(f"InstanceNormalization needs an (N, C, *spatial) input, got shape {x.shape}")
    xhat, _, _, inv = _normalize(x.reshape(1, x.shape[0] * x.shape[1], -1), float(c.attr("epsilon", 1e-5)))
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
        dx = _normalize_grad(gx, xhat.reshape(1, n * ch, -1), inv)[0].reshape(x.shape)
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
    xhat, _, _, inv = _normalize(x.reshape(1, n * groups, -1), float(c.attr("epsilon", 1e-5)))
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
        dx = _normalize_grad(gx, xhat.reshape(1, n * groups, -1), inv)[0].reshape(x.shape).astype(x.dtype, copy=False)
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

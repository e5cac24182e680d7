"""The numba kernels themselves (imported through :func:`gradserve.worker.kernels.get`, never
directly: that sets the cache directory first).

Conventions: arrays arrive contiguous; arithmetic is float64 whatever the storage (the loops are
bound by memory, not arithmetic), results are stored in the output's dtype. Parallel loops run
over channels, so each thread reads whole channels and a channel read twice in a row (statistics,
then normalisation) comes the second time from cache.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any

import numba
import numpy as np
from numba import prange

from gradserve.worker.kernels import ERF32, thread_budget


def _threadsafe_layer() -> bool:
    """Whether numba has a threading layer that several threads may launch kernels on at once
    (OpenMP or TBB; its fallback, "workqueue", aborts the process if two threads do, as two jobs
    of the gRPC service may). Kernels are compiled serial without one."""
    for layer in ("omppool", "tbbpool"):
        try:
            importlib.import_module(f"numba.np.ufunc.{layer}")
            return True
        except ImportError:
            continue
    return False


PARALLEL = _threadsafe_layer()
if PARALLEL and not os.environ.get("NUMBA_THREADING_LAYER"):
    # ignore: numba.config defines its options at run time (from the environment)
    numba.config.THREADING_LAYER = "threadsafe"  # type: ignore[attr-defined]
# error_model="numpy": a float division by zero gives inf or nan, as numpy does, instead of raising;
# that check would keep every loop with a division from vectorising.
_JIT: dict[str, Any] = dict(cache=True, nogil=True, error_model="numpy")
# Sums may be reassociated (so they vectorise) and multiply-adds fused; no assumptions about NaN or
# infinity. Inlined helpers take their caller's flags, so every kernel carries them.
_FAST = {"reassoc", "contract"}


def _parallel(kernel, inputs: tuple[int, ...]):
    """The kernel as the ops call it: on this thread's budget of threads (see
    :func:`gradserve.worker.kernels.threads`), with the arrays at positions ``inputs`` always passed
    read-only. numba compiles one version per argument type, and read-only is part of the type:
    arrays from Ray's object store (parameters, another stage's activations) are read-only, a
    process's own are not, so without this a worker's first job would compile (or load) versions
    that the warm-up did not make."""

    def launch(*args):
        if PARALLEL:
            numba.set_num_threads(thread_budget())
        arrays = list(args)
        for i in inputs:
            if arrays[i].flags.writeable:
                arrays[i] = arrays[i].view()
                arrays[i].flags.writeable = False
        return kernel(*arrays)

    launch.__doc__, launch.__name__ = kernel.__doc__, kernel.__name__.lstrip("_")
    launch.kernel = kernel  # type: ignore[attr-defined]  # the dispatcher, for its compiled signatures
    return launch


# -- batch normalisation (training mode), with an optional ReLU and max pool after it ---------------
@numba.njit(inline="always", fastmath=_FAST, **_JIT)
def _stats(x3, c):
    """Mean and (population) variance of channel c of x3 (N, C, L), in float64, shifted by the
    channel's first value so that a large mean costs no accuracy."""
    n_img, _, length = x3.shape
    shift = np.float64(x3[0, c, 0])
    s1 = 0.0
    s2 = 0.0
    for n in range(n_img):
        for i in range(length):
            d = np.float64(x3[n, c, i]) - shift
            s1 += d
            s2 += d * d
    count = n_img * length
    m = s1 / count
    return shift + m, max(s2 / count - m * m, 0.0)


@numba.njit(inline="always", fastmath=_FAST, **_JIT)
def _channel_coefficients(x3, c, scale, bias, eps, stats, coef):
    """Channel c's statistics into stats[:, c] (mean, variance, 1/sqrt(variance + eps), float64),
    and y = (x - mean) * a + B's mean, a = scale / std and B into coef[:, c], in x's dtype: the
    elementwise work then runs at its width (float32 has twice the lanes). x - mean is exact-ish
    where it matters (x near the mean); B absorbs the rounding of the mean."""
    mean, var = _stats(x3, c)
    inv = 1.0 / math.sqrt(var + eps)
    stats[0, c], stats[1, c], stats[2, c] = mean, var, inv
    a = scale[c] * inv
    coef[0, c], coef[1, c] = mean, a
    coef[2, c] = bias[c] + (coef[0, c] - mean) * a  # B, less what rounding the mean moved y by


@numba.njit(parallel=PARALLEL, fastmath=_FAST, **_JIT)
def _bn_forward(x3, scale, bias, eps, relu, y3, stats, coef):
    """y = BatchNorm(x) with batch statistics, then max(y, 0) if ``relu``. x3, y3: (N, C, L).
    stats (3, C) float64 receives each channel's mean, variance and 1/sqrt(variance + eps); coef
    (3, C), of x's dtype, is scratch."""
    n_img, channels, length = x3.shape
    for c in prange(channels):
        _channel_coefficients(x3, c, scale, bias, eps, stats, coef)
        m, a, b = coef[0, c], coef[1, c], coef[2, c]
        zero = m - m
        for n in range(n_img):
            for i in range(length):
                v = (x3[n, c, i] - m) * a + b
                y3[n, c, i] = max(v, zero) if relu else v


@numba.njit(inline="always", fastmath=_FAST, **_JIT)
def _backward_coefficients(c, sg, sgx, count, scale, stats, dscale, dbias, coef):
    """From channel c's sums of the error (sg) and of the error times (x - mean) (sgx): dL/dscale
    and dL/dB, and in coef[1:4, c] the a, k, c0 of dx = a g + k (x - mean) + c0."""
    inv = stats[2, c]
    shift = coef[0, c] - stats[0, c]  # what rounding the mean to x's dtype moved it by
    sgxhat = (sgx + shift * sg) * inv
    dscale[c], dbias[c] = sgxhat, sg
    a = scale[c] * inv
    k = -a * inv * sgxhat / count
    coef[1, c], coef[2, c], coef[3, c] = a, k, k * shift - a * sg / count


@numba.njit(parallel=PARALLEL, fastmath=_FAST, **_JIT)
def _bn_backward(x3, g3, y3, scale, stats, relu, dx3, dscale, dbias, coef):
    """VJP of :func:`bn_forward`: given dL/dy (g3) and its output y3 (read only with ``relu``: the
    error passes where y > 0), writes dL/dx into dx3 (unless it is empty) and dL/dscale, dL/dB.
    Sums in float64; coef (4, C), of x's dtype, is scratch."""
    n_img, channels, length = x3.shape
    count = n_img * length
    for c in prange(channels):
        coef[0, c] = stats[0, c]
        m = coef[0, c]
        zero = m - m
        sg = 0.0
        sgx = 0.0
        for n in range(n_img):
            for i in range(length):
                g = g3[n, c, i] if not relu or y3[n, c, i] > 0 else zero
                sg += g
                sgx += g * (x3[n, c, i] - m)
        _backward_coefficients(c, sg, sgx, count, scale, stats, dscale, dbias, coef)
        if dx3.size:
            af, k, c0 = coef[1, c], coef[2, c], coef[3, c]
            for n in range(n_img):
                for i in range(length):
                    g = g3[n, c, i] if not relu or y3[n, c, i] > 0 else zero
                    dx3[n, c, i] = af * g + k * (x3[n, c, i] - m) + c0


@numba.njit(parallel=PARALLEL, fastmath=_FAST, **_JIT)
def _bn_pool_forward(x4, scale, bias, eps, relu, pool, y4, where, stats, coef):
    """MaxPool(y) (then max(., 0) if ``relu``) of y = BatchNorm(x) with batch statistics, without
    writing y. x4 (N, C, H, W); ``pool`` = (kh, kw, sh, sw, dh, dw, ph, pw): kernel, strides,
    dilations and begin pads; y4 (N, C, OH, OW). ``where`` (N, C, OH, OW) int32 receives the flat
    position (in H*W) of each window's maximum -- the first, in kernel order, as torch and the
    unfused MaxPool pick -- or -1 where no error passes back (the ReLU cut it). stats and coef as
    in :func:`bn_forward`."""
    n_img, channels, h, w = x4.shape
    oh, ow = y4.shape[2], y4.shape[3]
    tiles = pool == (2, 2, 2, 2, 1, 1, 0, 0) and 2 * oh <= h and 2 * ow <= w
    x3 = x4.reshape(n_img, channels, h * w)
    for c in prange(channels):
        _channel_coefficients(x3, c, scale, bias, eps, stats, coef)
        m, a, b = coef[0, c], coef[1, c], coef[2, c]
        for n in range(n_img):
            if tiles:
                _pool_2x2(x4[n, c], m, a, b, relu, y4[n, c], where[n, c])
            else:
                _pool_any(x4[n, c], m, a, b, relu, pool, y4[n, c], where[n, c])


@numba.njit(inline="always", **_JIT)
def _pool_2x2(x2, m, a, b, relu, y2, where2):
    """One image's channel: 2x2 windows with stride 2 from the top left (no pad, no dilation).
    Branch-free, so the loop over a row of windows vectorises: the first maximum of each pair,
    then of the two pairs (ties keep the earlier one, as kernel order asks)."""
    w = x2.shape[1]
    for oi in range(y2.shape[0]):
        i = 2 * oi
        for oj in range(y2.shape[1]):
            j = 2 * oj
            v0 = (x2[i, j] - m) * a + b
            v1 = (x2[i, j + 1] - m) * a + b
            v2 = (x2[i + 1, j] - m) * a + b
            v3 = (x2[i + 1, j + 1] - m) * a + b
            top = v1 > v0
            b01 = v1 if top else v0
            o01 = 1 if top else 0
            bottom = v3 > v2
            b23 = v3 if bottom else v2
            o23 = w + 1 if bottom else w
            low = b23 > b01
            best = b23 if low else b01
            at = i * w + j + (o23 if low else o01)
            cut = relu and not best > 0
            y2[oi, oj] = m - m if cut else best
            where2[oi, oj] = -1 if cut else at


@numba.njit(inline="always", **_JIT)
def _pool_any(x2, m, a, b, relu, pool, y2, where2):
    """One image's channel, any window geometry (positions outside the image never win)."""
    h, w = x2.shape
    kh, kw, sh, sw, dh, dw, ph, pw = pool
    for oi in range(y2.shape[0]):
        for oj in range(y2.shape[1]):
            best = -np.inf
            at = -1
            for ki in range(kh):
                i = oi * sh - ph + ki * dh
                if i < 0 or i >= h:
                    continue
                for kj in range(kw):
                    j = oj * sw - pw + kj * dw
                    if j < 0 or j >= w:
                        continue
                    v = (x2[i, j] - m) * a + b
                    if v > best:
                        best = v
                        at = i * w + j
            if relu and not best > 0:
                best = 0.0
                at = -1
            y2[oi, oj] = best
            where2[oi, oj] = at


@numba.njit(parallel=PARALLEL, fastmath=_FAST, **_JIT)
def _bn_pool_backward(x3, g3, where3, scale, stats, dx3, dscale, dbias, coef):
    """VJP of :func:`bn_pool_forward`, from x3 (N, C, H*W), the error g3 and positions where3
    (N, C, OH*OW): the error at y is g at each window's maximum (summed where windows overlap),
    so the statistics' sums run over the pooled values only; dx is then written in one pass.
    coef as in :func:`bn_backward`."""
    n_img, channels, length = x3.shape
    windows = g3.shape[2]
    count = n_img * length
    for c in prange(channels):
        coef[0, c] = stats[0, c]
        m = coef[0, c]
        sg = 0.0
        sgx = 0.0
        for n in range(n_img):
            for o in range(windows):
                p = where3[n, c, o]
                if p >= 0:
                    g = g3[n, c, o]
                    sg += g
                    sgx += g * (x3[n, c, p] - m)
        _backward_coefficients(c, sg, sgx, count, scale, stats, dscale, dbias, coef)
        if dx3.size:
            af, k, c0 = coef[1, c], coef[2, c], coef[3, c]
            for n in range(n_img):
                for i in range(length):
                    dx3[n, c, i] = k * (x3[n, c, i] - m) + c0
                for o in range(windows):
                    p = where3[n, c, o]
                    if p >= 0:
                        dx3[n, c, p] += af * g3[n, c, o]


# -- activations' VJPs (ReLU, tanh, sigmoid), from their outputs, in one pass -------------------------
RELU, TANH, SIGMOID = 0, 1, 2  # activation codes
_ACTIVATION_CHUNK = 1 << 14  # elements per parallel piece


@numba.njit(fastmath=_FAST, **_JIT)
def _activation_piece(g1, y1, kind, dx1):
    # The branch on ``kind`` outside the loops and plain loops over a slice: these vectorise (the
    # same loops written inline in the prange body measured 1.7x slower).
    if kind == RELU:
        for i in range(g1.size):
            dx1[i] = g1[i] * (1.0 if y1[i] > 0 else 0.0)
    elif kind == TANH:
        for i in range(g1.size):
            dx1[i] = g1[i] * (1.0 - y1[i] * y1[i])
    else:
        for i in range(g1.size):
            dx1[i] = g1[i] * (y1[i] * (1.0 - y1[i]))


@numba.njit(parallel=PARALLEL, fastmath=_FAST, **_JIT)
def _activation_vjp(g1, y1, kind, dx1):
    """``dx1 = g1 * f'(x)`` from ``y1 = f(x)`` (flat arrays): ReLU y > 0, tanh 1 - y^2, sigmoid
    y (1 - y); one read of g and y (numpy needs two or three passes and their temporaries). The
    ReLU multiplies by 0 or 1, as ``g * (y > 0)`` does: a NaN error stays NaN."""
    n = g1.size
    for b in prange((n + _ACTIVATION_CHUNK - 1) // _ACTIVATION_CHUNK):
        i0 = b * _ACTIVATION_CHUNK
        i1 = min(n, i0 + _ACTIVATION_CHUNK)
        _activation_piece(g1[i0:i1], y1[i0:i1], kind, dx1[i0:i1])


# -- squared difference (a mean-squared-error loss) -------------------------------------------------
@numba.njit(fastmath=_FAST, **_JIT)
def _squares_piece(a1, b1):
    total = 0.0
    for i in range(a1.size):
        v = np.float64(a1[i]) - np.float64(b1[i])
        total += v * v
    return total


@numba.njit(parallel=PARALLEL, fastmath=_FAST, **_JIT)
def _squared_difference(a1, b1):
    """The sum of the squares of ``a1 - b1`` (flat arrays), in float64, in one read of each. Each
    chunk sums on its own and the chunks' sums are added in order, so the result does not depend
    on the number of threads."""
    n = a1.size
    chunks = (n + _ACTIVATION_CHUNK - 1) // _ACTIVATION_CHUNK
    sums = np.zeros(chunks)
    for b in prange(chunks):
        i0 = b * _ACTIVATION_CHUNK
        i1 = min(n, i0 + _ACTIVATION_CHUNK)
        sums[b] = _squares_piece(a1[i0:i1], b1[i0:i1])
    total = 0.0
    for b in range(chunks):
        total += sums[b]
    return total


@numba.njit(fastmath=_FAST, **_JIT)
def _scaled_piece(a1, b1, scale, out1):
    for i in range(a1.size):
        out1[i] = (a1[i] - b1[i]) * scale


@numba.njit(parallel=PARALLEL, fastmath=_FAST, **_JIT)
def _scaled_difference(a1, b1, scale, out1):
    """``out1 = (a1 - b1) * scale`` (flat arrays, scale of their dtype) in one pass."""
    n = a1.size
    for b in prange((n + _ACTIVATION_CHUNK - 1) // _ACTIVATION_CHUNK):
        i0 = b * _ACTIVATION_CHUNK
        i1 = min(n, i0 + _ACTIVATION_CHUNK)
        _scaled_piece(a1[i0:i1], b1[i0:i1], scale, out1[i0:i1])


# -- erf and GELU (its erf form), and their VJPs, one pass each ---------------------------------------
# numpy spends ~25 passes over memory on erf (a rational function, term by term) and more on the
# VJPs; here each element is done in registers. Arithmetic in float64. The erf is libm's when
# ``exact`` (float64 data), else Eigen's single-precision rational approximation (a few float32 ulp,
# as numpy's float32 path computes it). GELU's tanh form stays with numpy, whose vectorised tanh
# beats a scalar one here.
ERF, GELU = 0, 1  # function codes
_SQRT_HALF, _RSQRT_2PI = 0.7071067811865476, 0.3989422804014327


_ERF32_P, _ERF32_Q = ERF32  # numba folds these global tuples in as constants


@numba.njit(inline="always", fastmath=_FAST, **_JIT)
def _erf32(x):
    x = min(max(x, -4.0), 4.0)  # erf(4) rounds to 1 in float32
    t = x * x
    p = _ERF32_P[0]
    for k in range(1, len(_ERF32_P)):
        p = p * t + _ERF32_P[k]
    q = _ERF32_Q[0]
    for k in range(1, len(_ERF32_Q)):
        q = q * t + _ERF32_Q[k]
    # In float64 the approximation overshoots |erf| = 1 by ~5e-8 near the clip, where float32
    # rounds it to 1: clamp, so that 1 + erf(-big) is 0 there too (GELU(-inf) is then nan, as numpy's).
    return min(max(x * p / q, -1.0), 1.0)


@numba.njit(fastmath=_FAST, **_JIT)
def _erf_piece(x1, g1, kind, exact, out1):
    # Plain loops with the branches outside them, so the forwards vectorise.
    forward = g1.size == 0
    if kind == ERF and forward:
        if exact:
            for i in range(x1.size):
                out1[i] = math.erf(np.float64(x1[i]))
        else:
            for i in range(x1.size):
                out1[i] = _erf32(np.float64(x1[i]))
    elif forward:
        if exact:
            for i in range(x1.size):
                x = np.float64(x1[i])
                out1[i] = x * 0.5 * (1.0 + math.erf(x * _SQRT_HALF))
        else:
            for i in range(x1.size):
                x = np.float64(x1[i])
                out1[i] = x * 0.5 * (1.0 + _erf32(x * _SQRT_HALF))
    else:  # GELU'(x) = Phi(x) + x phi(x); out1 holds exp(-x^2 / 2) on entry
        for i in range(x1.size):
            x = np.float64(x1[i])
            cdf = 0.5 * (1.0 + (math.erf(x * _SQRT_HALF) if exact else _erf32(x * _SQRT_HALF)))
            out1[i] = g1[i] * (cdf + x * _RSQRT_2PI * np.float64(out1[i]))


@numba.njit(parallel=PARALLEL, fastmath=_FAST, **_JIT)
def _erf_family(x1, g1, kind, exact, out1):
    """``kind`` (:data:`ERF` or :data:`GELU`, erf form) of flat ``x1`` into ``out1`` when ``g1``
    is empty, else GELU's VJP ``g1 * GELU'(x1)``, with ``out1`` holding ``exp(-x1^2 / 2)`` on
    entry: numpy vectorises exp, a compiled loop here would call libm once per element (erf's own
    VJP, just an exp, stays numpy's). ``exact``: libm's erf (else float32's approximation)."""
    n = x1.size
    for b in prange((n + _ACTIVATION_CHUNK - 1) // _ACTIVATION_CHUNK):
        i0 = b * _ACTIVATION_CHUNK
        i1 = min(n, i0 + _ACTIVATION_CHUNK)
        _erf_piece(x1[i0:i1], g1[i0:i1] if g1.size else g1, kind, exact, out1[i0:i1])


bn_forward, bn_backward = _parallel(_bn_forward, (0, 1, 2)), _parallel(_bn_backward, (0, 1, 2, 3, 4))
bn_pool_forward = _parallel(_bn_pool_forward, (0, 1, 2))
bn_pool_backward = _parallel(_bn_pool_backward, (0, 1, 2, 3, 4))
activation_vjp, erf_family = _parallel(_activation_vjp, (0, 1)), _parallel(_erf_family, (0, 1))
squared_difference, scaled_difference = _parallel(_squared_difference, (0, 1)), _parallel(_scaled_difference, (0, 1))


def warm_up() -> None:
    """Compile or load every kernel for float32 and float64 (tiny inputs)."""
    for dtype in (np.float32, np.float64):
        x = np.linspace(-1, 1, 2 * 2 * 16, dtype=dtype).reshape(2, 2, 4, 4)
        s, b = np.ones(2, dtype), np.zeros(2, dtype)
        stats, coef = np.empty((3, 2)), np.empty((4, 2), dtype)
        x3 = x.reshape(2, 2, 16)
        y3 = np.empty_like(x3)
        d1, d2 = np.empty(2), np.empty(2)
        for relu in (False, True):
            bn_forward(x3, s, b, 1e-5, relu, y3, stats, coef)
            bn_backward(x3, y3, y3, s, stats, relu, np.empty_like(x3), d1, d2, coef)
        y = np.empty((2, 2, 2, 2), dtype)
        where = np.empty((2, 2, 2, 2), np.int32)
        bn_pool_forward(x, s, b, 1e-5, True, (2, 2, 2, 2, 1, 1, 0, 0), y, where, stats, coef)
        bn_pool_backward(x3, y.reshape(2, 2, 4), where.reshape(2, 2, 4), s, stats, np.empty_like(x3), d1, d2, coef)
        for kind in (RELU, TANH, SIGMOID):
            activation_vjp(x.reshape(-1), x.reshape(-1), kind, np.empty(x.size, dtype))
        squared_difference(x.reshape(-1), x.reshape(-1))
        scaled_difference(x.reshape(-1), x.reshape(-1), dtype(2), np.empty(x.size, dtype))
        for kind, g in ((ERF, x.reshape(-1)[:0]), (GELU, x.reshape(-1)[:0]), (GELU, x.reshape(-1))):
            erf_family(x.reshape(-1), g, kind, dtype == np.float64, np.empty(x.size, dtype))

"""Elementwise ops. Binary ops broadcast like numpy; their VJPs undo it with ``unbroadcast``.
Unary VJPs are ``g * f'(x)``, written with the output ``c.y`` where that is cheaper.

Float outputs keep the input dtype: constants are Python floats (weak under NEP 50), and results
that numpy would promote (``float32 ** int64``, the float64 ``erf``) are cast back.
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

from gradserve.worker.ops.registry import OpError, defop, unbroadcast


def _needs(c, i: int) -> bool:
    return i < len(c.needs) and c.needs[i]


# -- binary, broadcasting ---------------------------------------------------------------------------
defop("Add", lambda c, a, b: a + b,
      lambda c, g: (unbroadcast(g, c.inputs[0].shape) if c.needs[0] else None,
                    unbroadcast(g, c.inputs[1].shape) if c.needs[1] else None), keep=())
defop("Sub", lambda c, a, b: a - b,
      lambda c, g: (unbroadcast(g, c.inputs[0].shape) if c.needs[0] else None,
                    unbroadcast(-g, c.inputs[1].shape) if c.needs[1] else None), keep=())
defop("Mul", lambda c, a, b: a * b,
      lambda c, g: (unbroadcast(g * c.inputs[1], c.inputs[0].shape) if c.needs[0] else None,
                    unbroadcast(g * c.inputs[0], c.inputs[1].shape) if c.needs[1] else None), keep="x")
defop("Div", lambda c, a, b: a / b,
      lambda c, g: (unbroadcast(g / c.inputs[1], c.inputs[0].shape) if c.needs[0] else None,
                    unbroadcast(-g * c.y / c.inputs[1], c.inputs[1].shape) if c.needs[1] else None))


def _pow(c, a, b):
    # ONNX Pow: the output has the base's type, whatever the exponent's (numpy would promote
    # float32 ** int64 to float64). A one-element exponent goes in as a Python scalar (NEP 50: weak).
    if b.size == 1 and b.ndim <= a.ndim:
        e = b.item()
        return (a * a if e == 2 else np.power(a, e)).astype(a.dtype, copy=False)
    return np.power(a, b).astype(a.dtype, copy=False)


def _pow_vjp(c, g):
    a, b, z = c.inputs[0], c.inputs[1], c.y
    da = db = None
    if c.needs[0]:
        da = unbroadcast(g * (b * np.power(a, b - 1)).astype(a.dtype, copy=False), a.shape)
    if c.needs[1] and b.dtype.kind == "f":
        # d(a^b)/db = a^b log a; at a == 0 (and b > 0) the limit is 0, not 0 * -inf. Negative bases
        # give nan, as in torch: the real power has no derivative in b there.
        with np.errstate(divide="ignore", invalid="ignore"):
            dz = np.where((a == 0) & (b >= 0), 0, z * np.log(a))
        db = unbroadcast(g * dz.astype(b.dtype, copy=False), b.shape)
    return da, db


defop("Pow", _pow, _pow_vjp)


# -- variadic, broadcasting -------------------------------------------------------------------------
def _extreme_vjp(c, g):
    """Max/Min: the error goes to the first input attaining the extreme (a valid subgradient; torch
    instead splits ties evenly between two inputs)."""
    y = c.y
    free = np.ones(g.shape, dtype=bool)  # positions whose error is not yet given away
    grads = []
    for k, x in enumerate(c.inputs):
        hit = free & (x == y)
        free &= ~hit
        grads.append(unbroadcast(np.where(hit, g, 0), x.shape) if c.needs[k] else None)
    return tuple(grads)


defop("Max", lambda c, *xs: reduce(np.maximum, xs), _extreme_vjp)
defop("Min", lambda c, *xs: reduce(np.minimum, xs), _extreme_vjp)
defop("Sum", lambda c, *xs: reduce(np.add, xs),
      lambda c, g: tuple(unbroadcast(g, x.shape) for x in c.inputs), keep=())
defop("Mean", lambda c, *xs: (reduce(np.add, xs) / len(xs)).astype(xs[0].dtype, copy=False),
      lambda c, g: tuple(unbroadcast(g, x.shape) / len(c.inputs) for x in c.inputs), keep=())


# -- unary ----------------------------------------------------------------------------------------------
def _sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows; both branches are the same function
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)  # a Python float: keeps float32 float32

defop("Neg", lambda c, x: -x, lambda c, g: -g, keep=())
defop("Identity", lambda c, x: x, lambda c, g: g, keep=())
defop("Exp", lambda c, x: np.exp(x), lambda c, g: g * c.y, keep="y")
defop("Log", lambda c, x: np.log(x), lambda c, g: g / c.x, keep="x")
defop("Sqrt", lambda c, x: np.sqrt(x), lambda c, g: g * 0.5 / c.y, keep="y")
defop("Reciprocal", lambda c, x: 1 / x, lambda c, g: -g * c.y * c.y, keep="y")
defop("Abs", lambda c, x: np.abs(x), lambda c, g: g * np.sign(c.x), keep="x")
defop("Tanh", lambda c, x: np.tanh(x), lambda c, g: g * (1 - c.y * c.y), keep="y")
defop("Sigmoid", lambda c, x: _sigmoid(x), lambda c, g: g * c.y * (1 - c.y), keep="y")
defop("Softplus", lambda c, x: np.logaddexp(0, x), lambda c, g: g * _sigmoid(c.x), keep="x")
_RELU_CHUNK = 1 << 16  # elements per piece of the Relu VJP: its mask stays in L1/L2


def _relu_vjp(c, g):
    y = c.y
    if y.size < (1 << 17) or g.shape != y.shape or not (g.flags.c_contiguous and y.flags.c_contiguous):
        return g * (y > 0)
    out = np.empty(g.shape, g.dtype)
    gf, yf, of = g.reshape(-1), y.reshape(-1), out.reshape(-1)
    mask = np.empty(_RELU_CHUNK, np.bool_)
    for i0 in range(0, y.size, _RELU_CHUNK):
        i1 = min(i0 + _RELU_CHUNK, y.size)
        np.multiply(gf[i0:i1], np.greater(yf[i0:i1], 0, out=mask[: i1 - i0]), out=of[i0:i1])
    return out


defop("Relu", lambda c, x: np.maximum(x, 0), _relu_vjp, keep="y")
# alpha may be any sign, so the VJP reads x, not y.
defop("LeakyRelu", lambda c, x: np.where(x > 0, x, x * float(c.attr("alpha", 0.01))),
      lambda c, g: np.where(c.x > 0, g, g * float(c.attr("alpha", 0.01))), keep="x")
defop("Erf", lambda c, x: _erf(x), lambda c, g: g * (_TWO_OVER_SQRT_PI * np.exp(-c.x * c.x)), keep="x")


# -- erf ------------------------------------------------------------------------------------------------
# float64: W. J. Cody's rational Chebyshev approximations (Math. Comp. 23, 1969; netlib specfun
# CALERF), within ~1e-15 relative of math.erf. |x| <= 0.46875: erf = x P(x^2)/Q(x^2); beyond that
# erfc(|x|) = exp(-x^2) R(|x|), with R in |x| up to 4 and in 1/x^2 past it. (Cody splits exp(-x^2)
# to keep erfc itself accurate; erf = 1 - erfc does not need that.) Coefficients are listed highest
# degree first for _horner.
_ERF_SMALL = ((1.85777706184603153e-1, 3.16112374387056560e00, 1.13864154151050156e02,
               3.77485237685302021e02, 3.20937758913846947e03),
              (1.0, 2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
               2.84423683343917062e03))
_ERF_MID = ((2.15311535474403846e-8, 5.64188496988670089e-1, 8.88314979438837594e00,
             6.61191906371416295e01, 2.98635138197400131e02, 8.81952221241769090e02,
             1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03),
            (1.0, 1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
             1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
             3.43936767414372164e03, 1.23033935480374942e03))
_ERF_BIG = ((1.63153871373020978e-2, 3.05326634961232344e-1, 3.60344899949804439e-1,
             1.25781726111229246e-1, 1.60837851487422766e-2, 6.58749161529837803e-4),
            (1.0, 2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1,
             6.05183413124413191e-2, 2.33520497626869185e-3))
_RSQRT_PI = 0.5641895835477562869
# float32 (and float16): Eigen's / XLA's single-precision erf, x P(x^2)/Q(x^2) on x clipped to
# [-4, 4] (erf(4) rounds to 1 in float32); a few ulp, ~10x faster than the float64 path.
_ERF32 = ((-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
           -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02),
          (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
           -1.42647390514189e-02))


def _horner(t: np.ndarray, coeffs) -> np.ndarray:
    acc = t * coeffs[0]  # in place after the first product: one temporary per polynomial
    acc += coeffs[1]
    for k in coeffs[2:]:
        acc *= t
        acc += k
    return acc


def _rational(t: np.ndarray, num_den) -> np.ndarray:
    r = _horner(t, num_den[0])
    r /= _horner(t, num_den[1])
    return r


def _erf(x: np.ndarray) -> np.ndarray:
    if x.dtype in (np.float32, np.float16):
        xc = np.clip(x.astype(np.float32, copy=False), -4.0, 4.0)
        y = _rational(xc * xc, _ERF32)
        y *= xc
        return y.astype(x.dtype, copy=False)
    x64 = np.asarray(x, dtype=np.float64)
    ax = np.abs(x64)
    out = np.empty_like(x64)
    small = ax <= 0.46875
    xs = x64[small]
    out[small] = xs * _rational(xs * xs, _ERF_SMALL)
    rest = ~small  # nan lands here and stays nan
    y = ax[rest]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mid = y <= 4.0
        erfcx = np.empty_like(y)  # exp(y^2) erfc(y)
        erfcx[mid] = _rational(y[mid], _ERF_MID)
        yb = y[~mid]
        z = 1 / (yb * yb)
        erfcx[~mid] = (_RSQRT_PI - z * _rational(z, _ERF_BIG)) / yb
        erfc = np.exp(-y * y)
        erfc *= erfcx
        erfc[np.isinf(y)] = 0.0  # 0 * inf
        np.subtract(1.0, erfc, out=erfc)
        out[rest] = np.copysign(erfc, x64[rest])
    return out.astype(x.dtype, copy=False)  # ONNX: the output has the input's type, ints included


# -- clipping and selection -------------------------------------------------------------------------
def _clip(c, x, lo=None, hi=None):
    # min(max(x, lo), hi): if lo > hi every value becomes hi, as ONNX specifies.
    if lo is not None:
        x = np.maximum(x, lo)
    if hi is not None:
        x = np.minimum(x, hi)
    return x


def _clip_vjp(c, g):
    x, lo, hi = (list(c.inputs) + [None, None])[:3]
    t = x if lo is None else np.maximum(x, lo)
    pass_hi = np.ones((), bool) if hi is None else t <= hi  # ties pass the error to x, like torch
    pass_lo = np.ones((), bool) if lo is None else x >= lo
    dx = g * (pass_hi & pass_lo) if c.needs[0] else None
    dlo = np.sum(g, where=pass_hi & ~pass_lo).astype(lo.dtype).reshape(lo.shape) if _needs(c, 1) else None
    dhi = np.sum(g, where=~pass_hi).astype(hi.dtype).reshape(hi.shape) if _needs(c, 2) else None
    return dx, dlo, dhi


defop("Clip", _clip, _clip_vjp, keep="x")
defop("Where", lambda c, cond, a, b: np.where(cond, a, b),
      lambda c, g: (None,
                    unbroadcast(np.where(c.inputs[0], g, 0), c.inputs[1].shape) if c.needs[1] else None,
                    unbroadcast(np.where(c.inputs[0], 0, g), c.inputs[2].shape) if c.needs[2] else None),
      keep="x0", differentiable=(1, 2))

# -- comparisons and logic: no error flows through a bool ---------------------------------------------
defop("Equal", lambda c, a, b: np.equal(a, b))
defop("Less", lambda c, a, b: np.less(a, b))
defop("LessOrEqual", lambda c, a, b: np.less_equal(a, b))
defop("Greater", lambda c, a, b: np.greater(a, b))
defop("GreaterOrEqual", lambda c, a, b: np.greater_equal(a, b))
defop("Not", lambda c, x: np.logical_not(x))
defop("And", lambda c, a, b: np.logical_and(a, b))
defop("Or", lambda c, a, b: np.logical_or(a, b))
defop("Xor", lambda c, a, b: np.logical_xor(a, b))

# -- Cast, Dropout -----------------------------------------------------------------------------------------
# ONNX TensorProto.DataType codes numpy can represent (no bfloat16, float8 or strings).
ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def onnx_dtype(code) -> np.dtype:
    """The numpy dtype of an ONNX TensorProto.DataType code."""
    try:
        return np.dtype(ONNX_DTYPES[int(code)])
    except (KeyError, TypeError):
        raise OpError(f"unsupported ONNX data type {code!r}") from None


def _cast_vjp(c, g):
    # Only float -> float casts carry an error back; float -> int/bool has a zero derivative.
    if c.x.dtype.kind == "f" and c.y.dtype.kind == "f":
        return g.astype(c.x.dtype, copy=False)
    return None


defop("Cast", lambda c, x: x.astype(onnx_dtype(c.attr("to")), copy=False), _cast_vjp, keep=())


def _dropout(c, x, ratio=None, training_mode=None):
    # Deterministic gradients: Dropout is the identity (inference semantics) whatever training_mode
    # says; the optional mask output is then all True.
    if c.n_outputs > 1:
        return x, np.ones(x.shape, dtype=bool)
    return x


defop("Dropout", _dropout, lambda c, g, gmask=None: (g, None, None), keep=(), differentiable=(0,))

"""One-input elementwise math: Neg, Exp, Log, Sqrt, Abs..., the trigonometric and hyperbolic
functions, Erf (and the erf that GELU uses), and the piecewise-constant ops (rounding, IsNaN, IsInf).
Their VJPs are ``g * f'(x)``, written with the output ``c.y`` where that is cheaper.

Separate from :mod:`.elementwise` (several inputs, broadcasting) and :mod:`.activations`: these are
plain functions of one value with no attributes to speak of, and erf's approximations are long.

Float outputs keep the input dtype: constants are Python floats (weak under NEP 50), and results
that numpy would promote (the float64 ``erf``) are cast back.
"""

from __future__ import annotations

import math

import numpy as np

from gradserve.worker import kernels
from gradserve.worker.ops.batch import ELEMENTWISE, ELEMENTWISE_LINEAR
from gradserve.worker.ops.registry import family, per_element

# Every op here keeps each element's value to itself, so a batched input's samples stay apart.
defop = family(batch=ELEMENTWISE, flops=per_element)

_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)  # a Python float: keeps float32 float32

defop("Neg", lambda c, x: -x, lambda c, g: -g, keep=(), batch=ELEMENTWISE_LINEAR)
defop("Identity", lambda c, x: x, lambda c, g: g, keep=(), batch=ELEMENTWISE_LINEAR)
defop("Exp", lambda c, x: np.exp(x), lambda c, g: g * c.y, keep="y")
defop("Log", lambda c, x: np.log(x), lambda c, g: g / c.x, keep="x")
defop("Sqrt", lambda c, x: np.sqrt(x), lambda c, g: g * 0.5 / c.y, keep="y")
defop("Reciprocal", lambda c, x: 1 / x, lambda c, g: -g * c.y * c.y, keep="y")
defop("Abs", lambda c, x: np.abs(x), lambda c, g: g * np.sign(c.x), keep="x")


def _erf_op(c, x):
    y = erf_compiled("ERF", x)
    return erf(x) if y is None else y


# The VJP stays numpy's: one exp, which numpy vectorises and a compiled loop would not.
defop("Erf", _erf_op, lambda c, g: g * (_TWO_OVER_SQRT_PI * np.exp(-c.x * c.x)), keep="x")

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
# float32 (and float16): Eigen's / XLA's single-precision erf (see kernels.ERF32); a few ulp, ~10x
# faster than the float64 path.
_ERF32 = kernels.ERF32


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


def erf(x: np.ndarray) -> np.ndarray:
    """The error function of ``x`` in numpy, in ``x``'s dtype (the fallback of :func:`erf_compiled`)."""
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


def erf_compiled(kind: str, x: np.ndarray, g: np.ndarray | None = None) -> np.ndarray | None:
    """``kind`` ("ERF" or "GELU", its erf form) of ``x``, or with ``g`` GELU's VJP ``g * GELU'(x)``,
    in one compiled pass (numpy takes ~25 passes for the erf alone); None where the kernels cannot
    take it (no numba, another dtype, a broadcast error, a small array)."""
    fits = x.size >= kernels.MIN_SIZE and x.dtype in (np.float32, np.float64) and (g is None or g.shape == x.shape)
    k = kernels.get() if fits else None
    if k is None:
        return None
    out = np.empty(x.shape, x.dtype)
    if g is not None:  # the density's exp(-x^2 / 2), vectorised by numpy, in the output (see the kernel)
        np.multiply(x, x, out=out)
        out *= -0.5
        np.exp(out, out=out)
    flat = np.ascontiguousarray(x).reshape(-1)
    k.erf_family(flat, flat[:0] if g is None else np.ascontiguousarray(g, x.dtype).reshape(-1), getattr(k, kind),
                 x.dtype == np.float64, out.reshape(-1))
    return out

# -- trigonometric and hyperbolic ---------------------------------------------------------------------------
defop("Sin", lambda c, x: np.sin(x), lambda c, g: g * np.cos(c.x), keep="x")
defop("Cos", lambda c, x: np.cos(x), lambda c, g: -g * np.sin(c.x), keep="x")
defop("Tan", lambda c, x: np.tan(x), lambda c, g: g * (1.0 + c.y * c.y), keep="y")
defop("Asin", lambda c, x: np.arcsin(x), lambda c, g: g / np.sqrt(1.0 - c.x * c.x), keep="x")
defop("Acos", lambda c, x: np.arccos(x), lambda c, g: -g / np.sqrt(1.0 - c.x * c.x), keep="x")
defop("Atan", lambda c, x: np.arctan(x), lambda c, g: g / (1.0 + c.x * c.x), keep="x")
defop("Sinh", lambda c, x: np.sinh(x), lambda c, g: g * np.cosh(c.x), keep="x")
defop("Cosh", lambda c, x: np.cosh(x), lambda c, g: g * np.sinh(c.x), keep="x")
defop("Asinh", lambda c, x: np.arcsinh(x), lambda c, g: g / np.sqrt(c.x * c.x + 1.0), keep="x")
# (x - 1)(x + 1), not x^2 - 1: no cancellation near x = 1.
defop("Acosh", lambda c, x: np.arccosh(x), lambda c, g: g / np.sqrt((c.x - 1.0) * (c.x + 1.0)), keep="x")
defop("Atanh", lambda c, x: np.arctanh(x), lambda c, g: g / ((1.0 - c.x) * (1.0 + c.x)), keep="x")

# -- piecewise constant and integer ops: zero or no derivative, so no VJP ------------------------------------
defop("Floor", lambda c, x: np.floor(x))
defop("Ceil", lambda c, x: np.ceil(x))
defop("Round", lambda c, x: np.round(x))  # halves to even, as ONNX specifies
defop("Sign", lambda c, x: np.sign(x))
defop("IsNaN", lambda c, x: np.isnan(x))


def _is_inf(c, x):
    inf = np.isinf(x)
    pos, neg = bool(c.attr("detect_positive", 1)), bool(c.attr("detect_negative", 1))
    if pos and neg:
        return inf
    if pos or neg:
        return inf & ((x > 0) if pos else (x < 0))
    return np.zeros(x.shape, bool)


defop("IsInf", _is_inf)

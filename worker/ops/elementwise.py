"""Elementwise ops. Binary ops broadcast like numpy; their VJPs undo it with ``unbroadcast``.
Unary VJPs are ``g * f'(x)``, written with the output ``c.y`` where that is cheaper.

Float outputs keep the input dtype: constants are Python floats (weak under NEP 50), and results
that numpy would promote (``float32 ** int64``, the float64 ``erf``) are cast back.
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

from gradserve.worker import kernels
from gradserve.worker.ops.conv import str_attr
from gradserve.worker.graph import Node
from gradserve.worker.ops.batch import ELEMENTWISE, ELEMENTWISE_LINEAR, NONE, SHAPE, BatchRule, Rows, elementwise, \
    linear, refuse
from gradserve.worker.ops.registry import OpError, family, per_element, split_ties, unbroadcast

# Every op here keeps each element's value to itself, so a batched input's samples stay apart.
defop = family(batch=ELEMENTWISE, flops=per_element)


def _needs(c, i: int) -> bool:
    return i < len(c.needs) and c.needs[i]


# -- binary, broadcasting ---------------------------------------------------------------------------
def _sum_of_reductions(node: Node, tags: list, reduced: list) -> object:
    """Add/Sub of batch reductions: one of the same kind; a batch-independent term would be
    counted once per micro-batch."""
    if NONE in tags or SHAPE in tags:
        raise refuse(node, "adds a term that does not depend on the batch; split into micro-batches it "
                           "would be counted once per micro-batch")
    if len(set(reduced)) == 1 and reduced[0][0] != "count":
        return reduced[0]
    raise refuse(node, "adds batch reductions of different kinds (a sum and a mean, or cross-entropies)")


def _scaled_reduction(node: Node, tags: list, reduced: list) -> object:
    """Mul (either factor) or Div (the numerator) of one batch reduction by a batch-independent
    factor: still linear in it."""
    if len(reduced) == 1 and (node.op_type == "Mul" or tags[0] in reduced):
        return reduced[0]
    raise refuse(node, "is not linear in the batch reduction below it")


_SUMMED = BatchRule(elementwise, infer="broadcast", reduced=_sum_of_reductions)
_SCALED = BatchRule(elementwise, infer="broadcast", reduced=_scaled_reduction)

defop("Add", lambda c, a, b: a + b,
      lambda c, g: (unbroadcast(g, c.inputs[0].shape) if c.needs[0] else None,
                    unbroadcast(g, c.inputs[1].shape) if c.needs[1] else None), keep=(), batch=_SUMMED)
defop("Sub", lambda c, a, b: a - b,
      lambda c, g: (unbroadcast(g, c.inputs[0].shape) if c.needs[0] else None,
                    unbroadcast(-g, c.inputs[1].shape) if c.needs[1] else None), keep=(), batch=_SUMMED)
defop("Mul", lambda c, a, b: a * b,
      lambda c, g: (unbroadcast(g * c.inputs[1], c.inputs[0].shape) if c.needs[0] else None,
                    unbroadcast(g * c.inputs[0], c.inputs[1].shape) if c.needs[1] else None), keep="x",
      batch=_SCALED)
def _div(c, a, b):
    if a.dtype.kind in "iu":  # ONNX integer division truncates toward zero (C's, not Python's //)
        return np.trunc(a / b).astype(a.dtype)
    return a / b


defop("Div", _div,
      lambda c, g: (unbroadcast(g / c.inputs[1], c.inputs[0].shape) if c.needs[0] else None,
                    unbroadcast(-g * c.y / c.inputs[1], c.inputs[1].shape) if c.needs[1] else None),
      batch=_SCALED)


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
    """Max/Min: the error splits evenly among the inputs attaining the extreme (see split_ties)."""
    return tuple(e if c.needs[k] else None for k, e in enumerate(split_ties(g, c.y, c.inputs)))


defop("Max", lambda c, *xs: reduce(np.maximum, xs), _extreme_vjp)
defop("Min", lambda c, *xs: reduce(np.minimum, xs), _extreme_vjp)
defop("Sum", lambda c, *xs: reduce(np.add, xs),
      lambda c, g: tuple(unbroadcast(g, x.shape) for x in c.inputs), keep=())
defop("Mean", lambda c, *xs: (reduce(np.add, xs) / len(xs)).astype(xs[0].dtype, copy=False),
      lambda c, g: tuple(unbroadcast(g, x.shape) / len(c.inputs) for x in c.inputs), keep=())


# -- unary ----------------------------------------------------------------------------------------------
def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow, and exact in relative terms for very negative x (where
    0.5 tanh(x / 2) + 0.5 rounds to 0): the Sigmoid op's and the RNN gates'."""
    e = np.exp(-np.abs(x))  # never overflows; both branches are the same function
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)  # a Python float: keeps float32 float32

defop("Neg", lambda c, x: -x, lambda c, g: -g, keep=(), batch=ELEMENTWISE_LINEAR)
defop("Identity", lambda c, x: x, lambda c, g: g, keep=(), batch=ELEMENTWISE_LINEAR)
defop("Exp", lambda c, x: np.exp(x), lambda c, g: g * c.y, keep="y")
defop("Log", lambda c, x: np.log(x), lambda c, g: g / c.x, keep="x")
defop("Sqrt", lambda c, x: np.sqrt(x), lambda c, g: g * 0.5 / c.y, keep="y")
defop("Reciprocal", lambda c, x: 1 / x, lambda c, g: -g * c.y * c.y, keep="y")
defop("Abs", lambda c, x: np.abs(x), lambda c, g: g * np.sign(c.x), keep="x")
# Activations whose VJP the compiled kernels run in one pass from the output y: op type -> kernel code
FAST_ACTIVATIONS = {"Relu": "RELU", "Tanh": "TANH", "Sigmoid": "SIGMOID"}
_KERNEL_MIN_SIZE = kernels.MIN_SIZE  # below this, numba's call overhead outweighs the passes it saves


def activation_vjp(op_type: str, y: np.ndarray, g: np.ndarray, min_size: int = _KERNEL_MIN_SIZE) -> np.ndarray | None:
    """dL/dx = g * f'(x) for a :data:`FAST_ACTIVATIONS` op with output ``y``, in one compiled pass
    (numpy takes two or three, with temporaries); None where the kernels cannot take it (no numba,
    another dtype, a broadcast error, fewer than ``min_size`` elements)."""
    k = kernels.get() if y.size >= min_size and y.dtype in (np.float32, np.float64) and g.shape == y.shape else None
    if k is None:
        return None
    dx = np.empty(y.shape, y.dtype)
    k.activation_vjp(np.ascontiguousarray(g, y.dtype).reshape(-1), np.ascontiguousarray(y).reshape(-1),
                     getattr(k, FAST_ACTIVATIONS[op_type]), dx.reshape(-1))
    return dx


def _fast(op_type: str, numpy_vjp):
    """The VJP of a :data:`FAST_ACTIVATIONS` op: the compiled pass, or ``numpy_vjp`` where it cannot run."""

    def vjp(c, g):
        dx = activation_vjp(op_type, c.y, g)
        return numpy_vjp(c, g) if dx is None else dx

    return vjp


defop("Tanh", lambda c, x: np.tanh(x), _fast("Tanh", lambda c, g: g * (1 - c.y * c.y)), keep="y")
defop("Sigmoid", lambda c, x: sigmoid(x), _fast("Sigmoid", lambda c, g: g * c.y * (1 - c.y)), keep="y")
defop("Softplus", lambda c, x: np.logaddexp(0, x), lambda c, g: g * sigmoid(c.x), keep="x")
defop("Relu", lambda c, x: np.maximum(x, 0), _fast("Relu", lambda c, g: g * (c.y > 0)), keep="y")
# alpha may be any sign, so the VJP reads x, not y.
defop("LeakyRelu", lambda c, x: np.where(x > 0, x, x * float(c.attr("alpha", 0.01))),
      lambda c, g: np.where(c.x > 0, g, g * float(c.attr("alpha", 0.01))), keep="x")
def _erf_op(c, x):
    y = erf_compiled("ERF", x)
    return _erf(x) if y is None else y


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


defop("Cast", lambda c, x: x.astype(onnx_dtype(c.attr("to")), copy=False), _cast_vjp, keep=(),
      batch=ELEMENTWISE_LINEAR)


def _dropout(c, x, ratio=None, training_mode=None):
    # Deterministic gradients: Dropout is the identity (inference semantics) whatever training_mode
    # says; the optional mask output is then all True.
    if c.n_outputs > 1:
        return x, np.ones(x.shape, dtype=bool)
    return x


defop("Dropout", _dropout, lambda c, g, gmask=None: (g, None, None), keep=(), differentiable=(0,))


# -- activations ------------------------------------------------------------------------------------------
# ONNX stores float attributes as float32, so an exported alpha=0.7 arrives as 0.699999988; in
# float64 that is off by ~1e-8 relative from the model it came from (torch computes with 0.7). A
# float32-valued attribute therefore means the shortest decimal that rounds to it, or a well-known
# constant that does (torch's Hardsigmoid slope 1/6, the Selu constants). Float32 math is unaffected:
# the snapped value rounds back to the stored one.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_GAMMA = 1.0507009873554804934193349852946
_EXACT_CONSTANTS = (1 / 6, _SELU_ALPHA, _SELU_GAMMA)


def _float_attr(c, name: str, default: float) -> float:
    """A float attribute as a Python float (weak under NEP 50), snapped as said above."""
    value = float(c.attr(name, default))
    f32 = np.float32(value)
    if f32 != value:
        return value  # not a float32 (a default, or set programmatically): taken as given
    for exact in _EXACT_CONSTANTS:
        if f32 == np.float32(exact):
            return exact
    return float(str(f32))  # numpy prints the shortest decimal that round-trips


def _hard_swish(c, x):
    # ONNX: x * max(0, min(1, x/6 + 1/2)); written as torch computes it, x * clamp(x + 3, 0, 6) / 6.
    return x * np.minimum(np.maximum(x + 3.0, 0.0), 6.0) / 6.0


def _hard_swish_vjp(c, g):
    x = c.x  # d/dx: 0 below -3, x/3 + 1/2 on [-3, 3], 1 above 3 (at the kinks, as torch does)
    return np.where(x < -3.0, 0.0, np.where(x <= 3.0, g * (x / 3.0 + 0.5), g)).astype(g.dtype, copy=False)


defop("HardSwish", _hard_swish, _hard_swish_vjp, keep="x")


def _hard_sigmoid(c, x):
    alpha, beta = _float_attr(c, "alpha", 0.2), _float_attr(c, "beta", 0.5)
    return np.minimum(np.maximum(x * alpha + beta, 0.0), 1.0)


# Strictly between the clamps, the slope is alpha; the output says where that is.
defop("HardSigmoid", _hard_sigmoid,
      lambda c, g: g * ((c.y > 0) & (c.y < 1)) * _float_attr(c, "alpha", 0.2), keep="y")


def _elu_like(c, x, alpha: float, scale: float = 1.0, input_scale: float = 1.0):
    """scale * x for x > 0, scale * alpha * (exp(input_scale * x) - 1) otherwise (Elu, Selu, Celu).
    The VJP reads the branch off the output's sign, which gives it away unless the negative branch
    can be positive too (scale * alpha * input_scale < 0) or the positive one negative (scale < 0);
    then the forward saves the mask x > 0 (a bool per element) for the VJP."""
    pos = x > 0
    with np.errstate(over="ignore"):
        neg = np.expm1(x * input_scale) * (scale * alpha)
    if (scale < 0 or scale * alpha * input_scale < 0) and _needs(c, 0):
        c.save(pos=pos)
    return np.where(pos, x * scale if scale != 1.0 else x, neg)


def _elu_like_vjp(c, g, alpha: float, scale: float = 1.0, input_scale: float = 1.0):
    y = c.y
    pos = c.saved.get("pos")
    if pos is None:
        pos = y > 0
    # On the negative branch y = s a (e^(k x) - 1), so dy/dx = k s a e^(k x) = k (y + s a).
    return np.where(pos, g * scale, g * (input_scale * (y + scale * alpha))).astype(g.dtype, copy=False)


defop("Elu", lambda c, x: _elu_like(c, x, _float_attr(c, "alpha", 1.0)),
      lambda c, g: _elu_like_vjp(c, g, _float_attr(c, "alpha", 1.0)), keep="y")


def _selu_attrs(c) -> tuple[float, float]:
    return _float_attr(c, "alpha", _SELU_ALPHA), _float_attr(c, "gamma", _SELU_GAMMA)


defop("Selu", lambda c, x: _elu_like(c, x, *_selu_attrs(c)),
      lambda c, g: _elu_like_vjp(c, g, *_selu_attrs(c)), keep="y")


def _celu_alpha(c) -> float:
    alpha = _float_attr(c, "alpha", 1.0)
    if alpha == 0:
        raise OpError(f"{c.node}: Celu needs a nonzero alpha")
    return alpha


# Celu = max(0, x) + min(0, a (e^(x/a) - 1)): Elu with input scale 1/a. Its negative branch is <= 0
# whatever the sign of a, so the output's sign always tells the branch.
defop("Celu", lambda c, x: _elu_like(c, x, _celu_alpha(c), 1.0, 1 / _celu_alpha(c)),
      lambda c, g: _elu_like_vjp(c, g, _celu_alpha(c), 1.0, 1 / _celu_alpha(c)), keep="y")


def _prelu_vjp(c, g):
    # slope broadcasts to X (ONNX unidirectional broadcasting), so the output has X's shape.
    x, slope = c.inputs
    if x.dtype.kind != "f":
        return None, None
    neg = x < 0  # the kink x == 0 goes right (slope 1), like torch
    dx = np.where(neg, g * slope, g) if c.needs[0] else None
    dslope = None
    if _needs(c, 1):
        dslope = unbroadcast(np.where(neg, g * x, 0.0), slope.shape).astype(slope.dtype, copy=False)
    return dx, dslope


defop("PRelu", lambda c, x, slope: np.where(x < 0, x * slope, x).astype(x.dtype, copy=False), _prelu_vjp, keep="x")
defop("ThresholdedRelu", lambda c, x: np.where(x > _float_attr(c, "alpha", 1.0), x, 0.0).astype(x.dtype, copy=False),
      lambda c, g: g * (c.x > _float_attr(c, "alpha", 1.0)), keep="x")
# d/dx x / (1 + |x|) = 1 / (1 + |x|)^2, from x: 1 - |y| would cancel for large |x|.
defop("Softsign", lambda c, x: x / (1.0 + np.abs(x)), lambda c, g: g / np.square(1.0 + np.abs(c.x)), keep="x")


def _mish_vjp(c, g):
    x = c.x
    t = np.tanh(np.logaddexp(0.0, x))  # x tanh(softplus x): d/dx = t + x (1 - t^2) sigmoid(x)
    return g * (t + x * (1.0 - t * t) * sigmoid(x))


defop("Mish", lambda c, x: x * np.tanh(np.logaddexp(0.0, x)), _mish_vjp, keep="x")

_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_RSQRT_2PI = 1 / math.sqrt(2 * math.pi)
_GELU_KAPPA = 0.044715


def _gelu_tanh(c) -> bool:
    approximate = str_attr(c.attr("approximate"), "none")
    if approximate not in ("none", "tanh"):
        raise OpError(f"{c.node}: Gelu approximate={approximate!r}, expected 'none' or 'tanh'")
    return approximate == "tanh"


def erf_compiled(kind: str, x: np.ndarray, g: np.ndarray | None = None) -> np.ndarray | None:
    """``kind`` ("ERF" or "GELU", its erf form) of ``x``, or with ``g`` GELU's VJP ``g * GELU'(x)``,
    in one compiled pass (numpy takes ~25 passes for the erf alone); None where the kernels cannot
    take it (no numba, another dtype, a broadcast error, a small array)."""
    fits = x.size >= _KERNEL_MIN_SIZE and x.dtype in (np.float32, np.float64) and (g is None or g.shape == x.shape)
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


def _gelu(c, x):
    # Both forms are written in torch's order of operations, so float64 agrees to the last bits.
    if _gelu_tanh(c):
        return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + _GELU_KAPPA * x * x * x)))
    y = erf_compiled("GELU", x)
    return x * 0.5 * (1.0 + _erf(x * _SQRT_HALF)) if y is None else y


def _gelu_vjp(c, g):
    x = c.x
    if _gelu_tanh(c):
        t = np.tanh(_SQRT_2_OVER_PI * (x + _GELU_KAPPA * x * x * x))
        dt = _SQRT_2_OVER_PI * (1.0 + 3 * _GELU_KAPPA * x * x)
        return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dt)
    dx = erf_compiled("GELU", x, g)
    if dx is not None:
        return dx
    # Phi(x) + x phi(x), with Phi the normal CDF and phi its density.
    return g * (0.5 * (1.0 + _erf(x * _SQRT_HALF)) + x * _RSQRT_2PI * np.exp(-0.5 * x * x))


defop("Gelu", _gelu, _gelu_vjp, keep="x")


def _shrink(c, x):
    lambd, bias = _float_attr(c, "lambd", 0.5), _float_attr(c, "bias", 0.0)
    # Integer inputs are allowed: the arithmetic goes through float and the output keeps x's type.
    return np.where(x < -lambd, x + bias, np.where(x > lambd, x - bias, 0)).astype(x.dtype, copy=False)


def _shrink_vjp(c, g):
    if c.x.dtype.kind != "f":
        return None
    return g * (np.abs(c.x) > _float_attr(c, "lambd", 0.5))  # slope 1 outside [-lambd, lambd], 0 inside


defop("Shrink", _shrink, _shrink_vjp, keep="x")

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
defop("BitwiseAnd", lambda c, a, b: np.bitwise_and(a, b))
defop("BitwiseOr", lambda c, a, b: np.bitwise_or(a, b))
defop("BitwiseXor", lambda c, a, b: np.bitwise_xor(a, b))
defop("BitwiseNot", lambda c, x: np.bitwise_not(x))


def _bit_shift(c, x, y):
    direction = str_attr(c.attr("direction"), "")
    if direction == "LEFT":
        return np.left_shift(x, y)
    if direction == "RIGHT":
        return np.right_shift(x, y)
    raise OpError(f"{c.node}: BitShift direction {direction!r}, expected 'LEFT' or 'RIGHT'")


defop("BitShift", _bit_shift)


# -- Mod -----------------------------------------------------------------------------------------------------
def _mod(c, a, b):
    # fmod=1: C fmod, the sign of the dividend (torch.fmod). fmod=0: the sign of the divisor, as
    # Python's % (torch.remainder). ONNX requires fmod=1 for floats; fmod=0 on floats is accepted
    # with the divisor-sign meaning, as onnx's reference implementation does.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.fmod(a, b) if c.attr("fmod", 0) else np.mod(a, b)


def _mod_vjp(c, g):
    # y = a - b q with q = trunc(a/b) (fmod) or floor(a/b), piecewise constant: dA = g, dB = -g q.
    # q is read back from the forward's own result ((a - y) / b is an integer up to rounding), so it
    # agrees with y where a/b rounds across an integer.
    a, b = c.inputs
    if a.dtype.kind != "f":
        return None, None
    da = unbroadcast(g, a.shape) if c.needs[0] else None
    db = None
    if c.needs[1]:
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.round((a - c.y) / b)
        db = unbroadcast(-g * q, b.shape)
    return da, db


defop("Mod", _mod, _mod_vjp)

# -- CastLike: Cast to the second input's type (its values are never read) ------------------------------------
# saturate (opset 19+) only concerns float8 targets, which numpy cannot represent.
defop("CastLike", lambda c, x, like: x.astype(like.dtype, copy=False),
      lambda c, g: (_cast_vjp(c, g), None), keep=(), differentiable=(0,),
      # input 1 gives only its dtype: the output is batched as input 0 is
      batch=BatchRule(lambda view, node, tags: tags[0] if isinstance(tags[0], Rows) else NONE,
                      shape_inputs=(1,), reduced=linear))

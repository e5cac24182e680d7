"""Activations: Relu, Sigmoid, Tanh and their compiled VJPs, the Relu family (LeakyRelu, PRelu,
Elu, Selu, Celu, ThresholdedRelu), the smooth ones (Softplus, Softsign, Mish, Gelu) and the hard
ones (HardSigmoid, HardSwish, Shrink).

Separate from :mod:`.unary` (plain math) because these carry the attribute conventions of the
neural-network exporters (float32 attributes snapped to the constants meant, see _float_attr) and
the compiled one-pass VJPs, which the graph rewrites and the fused Gemm read (FAST_ACTIVATIONS).
"""

from __future__ import annotations

import math

import numpy as np

from gradserve.worker import kernels
from gradserve.worker.ops.batch import ELEMENTWISE
from gradserve.worker.ops.registry import OpError, family, per_element, str_attr, unbroadcast
from gradserve.worker.ops.unary import erf, erf_compiled

# Every op here keeps each element's value to itself, so a batched input's samples stay apart.
defop = family(batch=ELEMENTWISE, flops=per_element)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow, and exact in relative terms for very negative x (where
    0.5 tanh(x / 2) + 0.5 rounds to 0): the Sigmoid op's and the RNN gates'."""
    e = np.exp(-np.abs(x))  # never overflows; both branches are the same function
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


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
    if (scale < 0 or scale * alpha * input_scale < 0) and c.wants_error(0):
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
    if c.wants_error(1):
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


def _gelu(c, x):
    # Both forms are written in torch's order of operations, so float64 agrees to the last bits.
    if _gelu_tanh(c):
        return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + _GELU_KAPPA * x * x * x)))
    y = erf_compiled("GELU", x)
    return x * 0.5 * (1.0 + erf(x * _SQRT_HALF)) if y is None else y


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
    return g * (0.5 * (1.0 + erf(x * _SQRT_HALF)) + x * _RSQRT_2PI * np.exp(-0.5 * x * x))


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

"""Elementwise ops of two or more inputs, and the selections, comparisons, logic, casts and bitwise
ops. Binary ops broadcast like numpy; their VJPs undo it with ``unbroadcast``.

One-input math (exp, log, trigonometry, erf, rounding) is in :mod:`.unary` and the activations in
:mod:`.activations`: split by what a reader looks for, as the three families share only the batch
rule.

Float outputs keep the input dtype: constants are Python floats (weak under NEP 50), and results
that numpy would promote (``float32 ** int64``) are cast back.
"""

from __future__ import annotations

from functools import reduce

import numpy as np

from gradserve.worker.graph import Node
from gradserve.worker.ops.batch import ELEMENTWISE, ELEMENTWISE_LINEAR, NONE, SHAPE, BatchRule, Rows, Tag, \
    elementwise, linear, refuse
from gradserve.worker.ops.registry import OpError, family, per_element, split_ties, str_attr, unbroadcast

# Every op here keeps each element's value to itself, so a batched input's samples stay apart.
defop = family(batch=ELEMENTWISE, flops=per_element)

# -- binary, broadcasting ---------------------------------------------------------------------------
def _sum_of_reductions(node: Node, tags: list, reduced: list) -> Tag:
    """Add/Sub of batch reductions: one of the same kind; a batch-independent term would be
    counted once per micro-batch."""
    if NONE in tags or SHAPE in tags:
        raise refuse(node, "adds a term that does not depend on the batch; split into micro-batches it "
                           "would be counted once per micro-batch")
    if len(set(reduced)) == 1 and reduced[0][0] != "count":
        return reduced[0]
    raise refuse(node, "adds batch reductions of different kinds (a sum and a mean, or cross-entropies)")


def _scaled_reduction(node: Node, tags: list, reduced: list) -> Tag:
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
    dlo = np.sum(g, where=pass_hi & ~pass_lo).astype(lo.dtype).reshape(lo.shape) if c.wants_error(1) else None
    dhi = np.sum(g, where=~pass_hi).astype(hi.dtype).reshape(hi.shape) if c.wants_error(2) else None
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

# -- bitwise: integers only, no derivative -------------------------------------------------------------
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

"""Reductions (ReduceSum/Mean/Max/Min/Prod/SumSquare/L1/L2/LogSum/LogSumExp), Softmax/LogSoftmax/Hardmax
and ArgMax/ArgMin, in every form they take in opsets 13-21.

``axes`` is an attribute of every reduction but ReduceSum up to opset 17, and an optional int64
*input* from opset 18 (ReduceSum since 13), which also brought ``noop_with_empty_axes``: no axes
means all axes, or none at all (the identity) with ``noop_with_empty_axes=1``. Each forward saves the
normalized axes; the VJP lays the error out with the reduced axes kept (size 1) and broadcasts it
back over the input.

ReduceMax/ReduceMin split the error *evenly* among tied extremes (as ``torch.amax`` does), so the
error summed over a slice is always the incoming one.
"""

from __future__ import annotations

import numpy as np

from gradserve.worker.graph import Node
from gradserve.worker.ops.batch import BatchRule, BatchView, Tag, along_attr, first_rows, linear, never, refuse
from gradserve.worker.ops.registry import OpError, family, normalize_axis, per_element, split_ties

defop = family(flops=per_element)


def _norm_axes(c, x: np.ndarray, axes: np.ndarray | None = None) -> tuple[int, ...]:
    """The reduced axes, sorted and non-negative, from the ``axes`` input (opset 18+; ReduceSum
    13+) or attribute (up to 17). None or empty means every axis, or none with noop_with_empty_axes."""
    if axes is None:
        axes = c.attr("axes")
    listed = [] if axes is None else [int(a) for a in np.ravel(axes)]
    if not listed:
        return () if c.attr("noop_with_empty_axes", 0) else tuple(range(x.ndim))
    out = tuple(sorted(normalize_axis(a, x.ndim, c.node) for a in listed))
    if len(set(out)) != len(out):
        raise OpError(f"{c.node}: repeated axes {listed}")
    return out


def _keep_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _kd(c, a: np.ndarray) -> np.ndarray:
    """``a`` (an output or its error) with the reduced axes present, size 1."""
    return a.reshape(_keep_shape(c.x.shape, c.saved["axes"]))


def _reducer(fn):
    """Forward of a reduction: ``fn(x, axes) -> reduced with keepdims`` (axes may be empty)."""

    def forward(c, x, axes=None):
        axes = _norm_axes(c, x, axes)
        c.save(axes=axes)
        y = fn(x, axes)
        return y if c.attr("keepdims", 1) else y.reshape([d for i, d in enumerate(x.shape) if i not in axes])

    return forward


def _count(c) -> int:
    return int(np.prod([c.x.shape[a] for a in c.saved["axes"]], dtype=np.int64))


def _extreme_vjp(c, g):
    """ReduceMax/ReduceMin: the error splits evenly among the tied extremes (see split_ties)."""
    return split_ties(_kd(c, g), _kd(c, c.y), [c.x], c.saved["axes"])[0]


def _prod_vjp(c, g):
    # d prod / d x_i = product of the others. y / x_i unless x_i == 0: with exactly one zero in the
    # slice, that zero gets the product of the nonzeros; with two or more, everything gets 0.
    x, axes = c.x, c.saved["axes"]
    zero = x == 0
    n_zero = zero.sum(axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        plain = _kd(c, c.y) / x
    others = np.prod(np.where(zero, 1, x), axis=axes, keepdims=True)
    d = np.where(n_zero == 0, plain, np.where(zero & (n_zero == 1), others, 0))
    return _kd(c, g) * d.astype(x.dtype, copy=False)


def _l2_vjp(c, g):
    y = _kd(c, c.y)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(y > 0, _kd(c, g) / y, 0)  # the subgradient 0 at the origin, like torch
    return c.x * scale.astype(c.x.dtype, copy=False)


def _logsumexp(x, axes):
    m = np.max(x, axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)  # all -inf (or an inf) slices: no shift, no nan
    with np.errstate(divide="ignore"):  # an all -inf slice sums to 0: log gives the right -inf
        return np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m


def _reduce_batch(view: BatchView, node: Node, tags: list) -> Tag:
    """A reduction within each sample keeps the batch; over the batch axis only a sum or a mean is
    exact (the micro-batches' losses are then weighted and summed)."""
    axis = first_rows(tags).axis
    rank = view.rank(node.inputs[0])
    if rank is None:
        raise refuse(node, "has an input of unknown shape")
    axes = view.axes(node, 1)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] and view.const(node, 1) is None:
        raise refuse(node, "has axes that are not constants")
    if not axes:  # omitted or empty: every axis, unless asked to do nothing
        if node.attrs.get("noop_with_empty_axes", 0):
            return view.rows(axis)
        axes = list(range(rank))
    axes = [a % rank for a in axes]
    if axis not in axes:  # a reduction within each sample
        return view.rows(axis if node.attrs.get("keepdims", 1) else axis - sum(a < axis for a in axes))
    if node.op_type == "ReduceMean":
        return ("mean", None)
    if node.op_type == "ReduceSum":
        return ("sum", None)
    raise refuse(node, "reduces over the batch with something other than a sum or a mean")


# the axes input (opset 18+) is int64: no error; it is read as a shape
_AXES_INPUT = {"differentiable": (0,), "batch": BatchRule(_reduce_batch, shape_inputs=(1,))}
_LINEAR = {**_AXES_INPUT, "batch": BatchRule(_reduce_batch, shape_inputs=(1,), reduced=linear)}
defop("ReduceSum", _reducer(lambda x, a: np.sum(x, axis=a, keepdims=True)),
      lambda c, g: np.broadcast_to(_kd(c, g), c.x.shape).copy(), keep=(), **_LINEAR)
defop("ReduceMean", _reducer(lambda x, a: np.mean(x, axis=a, keepdims=True)),
      lambda c, g: np.broadcast_to(_kd(c, g), c.x.shape) * (1 / _count(c)), keep=(), **_LINEAR)
defop("ReduceMax", _reducer(lambda x, a: np.max(x, axis=a, keepdims=True)), _extreme_vjp, **_AXES_INPUT)
defop("ReduceMin", _reducer(lambda x, a: np.min(x, axis=a, keepdims=True)), _extreme_vjp, **_AXES_INPUT)
defop("ReduceProd", _reducer(lambda x, a: np.prod(x, axis=a, keepdims=True)), _prod_vjp, **_AXES_INPUT)
defop("ReduceSumSquare", _reducer(lambda x, a: np.sum(x * x, axis=a, keepdims=True)),
      lambda c, g: _kd(c, g) * (2 * c.x), keep="x", **_AXES_INPUT)
defop("ReduceL1", _reducer(lambda x, a: np.sum(np.abs(x), axis=a, keepdims=True)),
      lambda c, g: _kd(c, g) * np.sign(c.x), keep="x", **_AXES_INPUT)
defop("ReduceL2", _reducer(lambda x, a: np.sqrt(np.sum(x * x, axis=a, keepdims=True))), _l2_vjp, **_AXES_INPUT)
defop("ReduceLogSum", _reducer(lambda x, a: np.log(np.sum(x, axis=a, keepdims=True))),
      lambda c, g: np.broadcast_to(_kd(c, g) / np.exp(_kd(c, c.y)), c.x.shape).astype(c.x.dtype, copy=False),
      keep="y", **_AXES_INPUT)
defop("ReduceLogSumExp", _reducer(_logsumexp), lambda c, g: _kd(c, g) * np.exp(c.x - _kd(c, c.y)), **_AXES_INPUT)


# -- softmax family: one axis (opset 13 semantics), default the last ----------------------------------
def _axis(c, x, default=-1) -> int:
    return normalize_axis(int(c.attr("axis", default)), x.ndim, c.node)


def _softmax(c, x):
    axis = _axis(c, x)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def _softmax_vjp(c, g):
    y = c.y
    gy = g * y
    gy -= y * np.sum(gy, axis=_axis(c, y), keepdims=True)  # y * (g - <g, y>)
    return gy


def _log_softmax(c, x):
    axis = _axis(c, x)
    s = x - np.max(x, axis=axis, keepdims=True)
    s -= np.log(np.sum(np.exp(s), axis=axis, keepdims=True))
    return s


_ALONG_AXIS = BatchRule(along_attr(-1), infer="same")  # exact when the batch is not along it
defop("Softmax", _softmax, _softmax_vjp, keep="y", batch=_ALONG_AXIS)
defop("LogSoftmax", _log_softmax,
      lambda c, g: g - np.exp(c.y) * np.sum(g, axis=_axis(c, c.y), keepdims=True), keep="y", batch=_ALONG_AXIS)


# -- index-valued: no error -------------------------------------------------------------------------
def _arg(fn):
    def forward(c, x):
        axis = _axis(c, x, 0)
        keepdims = bool(c.attr("keepdims", 1))
        if c.attr("select_last_index", 0):
            # The last extreme is the first one of the reversed axis.
            idx = x.shape[axis] - 1 - fn(np.flip(x, axis), axis=axis, keepdims=keepdims)
        else:
            idx = fn(x, axis=axis, keepdims=keepdims)
        return idx.astype(np.int64, copy=False)

    return forward


def _hardmax(c, x):
    axis = _axis(c, x)
    y = np.zeros_like(x)
    np.put_along_axis(y, np.argmax(x, axis=axis, keepdims=True), 1, axis=axis)
    return y


_ARG_UNSPLIT = never("is not known to keep the samples of a batch independent (no rule written for ArgMax/ArgMin: "
                     "with keepdims=0 the batch axis moves)")
defop("ArgMax", _arg(np.argmax), batch=_ARG_UNSPLIT)
defop("ArgMin", _arg(np.argmin), batch=_ARG_UNSPLIT)
defop("Hardmax", _hardmax, batch=_ALONG_AXIS)

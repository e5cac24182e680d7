"""Reductions, softmax family and arg-reductions: opset 17 axes handling, VJPs, forwards vs numpy."""

import numpy as np
import pytest

from gradcheck import assert_matches_reference, check_vjp, run_op
from gradserve.worker.autodiff import backward, compile_program, forward
from gradserve.worker.graph import Node

rng = np.random.default_rng(3)


def vjp(op, inputs, g, attrs=None):
    """dL/d(input 0) for the error ``g`` at the single output."""
    names = [f"x{i}" for i in range(len(inputs))]
    prog = compile_program([Node("n", op, names, ["y"], dict(attrs or {}))], names, ["y"], ["x0"])
    return backward(prog, forward(prog, dict(zip(names, inputs))), {"y": g})["x0"]


AXES = [None, [1], [-1, 0], [0, 1, 2], [2]]


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_sum_axes_input(axes, keepdims):
    x = rng.standard_normal((2, 3, 4))
    inputs = [x] if axes is None else [x, np.array(axes, np.int64)]
    check_vjp("ReduceSum", inputs, {"keepdims": keepdims})
    want = np.sum(x, axis=None if axes is None else tuple(axes), keepdims=bool(keepdims))
    np.testing.assert_allclose(run_op("ReduceSum", inputs, {"keepdims": keepdims})[0], want)


def test_reduce_sum_empty_axes():
    x = rng.standard_normal((2, 3))
    empty = np.array([], np.int64)
    # noop_with_empty_axes: no axes (absent or empty) is the identity
    for inputs in ([x], [x, empty]):
        np.testing.assert_array_equal(run_op("ReduceSum", inputs, {"noop_with_empty_axes": 1})[0], x)
        check_vjp("ReduceSum", inputs, {"noop_with_empty_axes": 1})
    np.testing.assert_allclose(run_op("ReduceSum", [x, empty], {"keepdims": 0})[0], x.sum())


REDUCERS = {
    "ReduceMean": lambda x, a, k: np.mean(x, axis=a, keepdims=k),
    "ReduceMax": lambda x, a, k: np.max(x, axis=a, keepdims=k),
    "ReduceMin": lambda x, a, k: np.min(x, axis=a, keepdims=k),
    "ReduceProd": lambda x, a, k: np.prod(x, axis=a, keepdims=k),
    "ReduceSumSquare": lambda x, a, k: np.sum(x * x, axis=a, keepdims=k),
    "ReduceL1": lambda x, a, k: np.sum(np.abs(x), axis=a, keepdims=k),
    "ReduceL2": lambda x, a, k: np.sqrt(np.sum(x * x, axis=a, keepdims=k)),
    "ReduceLogSumExp": lambda x, a, k: np.log(np.sum(np.exp(x), axis=a, keepdims=k)),
}


@pytest.mark.parametrize("op", sorted(REDUCERS))
@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_axes_attribute(op, axes, keepdims):
    x = rng.standard_normal((2, 3, 4))
    if op == "ReduceL1":
        x = np.where(np.abs(x) < 0.1, 0.5, x)  # away from the kink
    attrs = {"keepdims": keepdims} if axes is None else {"axes": axes, "keepdims": keepdims}
    check_vjp(op, [x], attrs)
    want = REDUCERS[op](x, None if axes is None else tuple(axes), bool(keepdims))
    (y,) = run_op(op, [x], attrs)
    assert y.shape == np.shape(want)
    np.testing.assert_allclose(y, want, rtol=1e-12)


@pytest.mark.parametrize("op", sorted(REDUCERS) + ["ReduceSum", "Softmax", "LogSoftmax"])
def test_float32_stays_float32(op):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    assert run_op(op, [x])[0].dtype == np.float32
    assert vjp(op, [x], np.ones_like(run_op(op, [x])[0])).dtype == np.float32


def test_reduce_max_splits_ties_evenly():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    g = vjp("ReduceMax", [x], np.array([6.0, 9.0]), {"axes": [1], "keepdims": 0})
    np.testing.assert_allclose(g, [[0.0, 3.0, 3.0], [3.0, 3.0, 3.0]])
    g = vjp("ReduceMin", [x], np.array([[6.0]]), {})
    np.testing.assert_allclose(g, [[6.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("op, fn", [("ReduceMax", "amax"), ("ReduceMin", "amin")])
def test_reduce_extreme_ties_match_torch(op, fn):
    torch = pytest.importorskip("torch")
    x = np.array([[[1.0, 3.0], [3.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]], [[-1.0, 5.0], [-1.0, -1.0]]])
    for axes, keepdims in (([1, 2], 0), ([0], 1), ([2], 0)):
        g = rng.standard_normal(run_op(op, [x], {"axes": axes, "keepdims": keepdims})[0].shape)
        t = torch.tensor(x, requires_grad=True)
        getattr(torch, fn)(t, dim=axes, keepdim=bool(keepdims)).backward(torch.from_numpy(g))
        np.testing.assert_allclose(vjp(op, [x], g, {"axes": axes, "keepdims": keepdims}), t.grad.numpy(), rtol=1e-15)


def test_reduce_prod_with_zeros():
    x = np.array([[2.0, 0.0, 3.0], [0.0, 0.0, 5.0], [1.0, 2.0, 4.0]])
    g = vjp("ReduceProd", [x], np.ones(3), {"axes": [1], "keepdims": 0})
    np.testing.assert_allclose(g, [[0.0, 6.0, 0.0], [0.0, 0.0, 0.0], [8.0, 4.0, 2.0]])


def test_reduce_l2_at_zero():
    g = vjp("ReduceL2", [np.zeros((2, 3))], np.ones(2), {"axes": [1], "keepdims": 0})
    np.testing.assert_array_equal(g, np.zeros((2, 3)))


def test_reduce_logsumexp_large():
    x = np.array([[1000.0, 1000.0], [-np.inf, -np.inf]])
    np.testing.assert_allclose(
        run_op("ReduceLogSumExp", [x], {"axes": [1], "keepdims": 0})[0], [1000.0 + np.log(2.0), -np.inf]
    )


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [None, -1, 0, 1, -2])
def test_softmax(op, axis):
    x = rng.standard_normal((2, 3, 4)) * 3
    attrs = {} if axis is None else {"axis": axis}
    check_vjp(op, [x], attrs)
    ax = -1 if axis is None else axis
    e = np.exp(x - x.max(axis=ax, keepdims=True))
    p = e / e.sum(axis=ax, keepdims=True)
    np.testing.assert_allclose(run_op(op, [x], attrs)[0], p if op == "Softmax" else np.log(p), rtol=1e-12, atol=1e-14)


def test_softmax_extreme_logits():
    x = np.array([[1000.0, 0.0, -1000.0]])
    np.testing.assert_allclose(run_op("Softmax", [x])[0], [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(run_op("LogSoftmax", [x])[0], [[0.0, -1000.0, -2000.0]])


@pytest.mark.parametrize("op,fn", [("ArgMax", np.argmax), ("ArgMin", np.argmin)])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("last", [0, 1])
def test_arg_reductions(op, fn, axis, keepdims, last):
    x = rng.integers(0, 3, (3, 4, 5)).astype(np.float64)  # plenty of ties
    attrs = {"axis": axis, "keepdims": keepdims, "select_last_index": last}
    (y,) = run_op(op, [x], attrs)
    assert y.dtype == np.int64
    if last:
        n = x.shape[axis]
        want = n - 1 - fn(np.flip(x, axis), axis=axis, keepdims=bool(keepdims))
        # the chosen index holds the extreme and no later index does
        assert np.all(
            np.take_along_axis(x, want if keepdims else np.expand_dims(want, axis), axis)
            == (x.max(axis, keepdims=True) if op == "ArgMax" else x.min(axis, keepdims=True))
        )
    else:
        want = fn(x, axis=axis, keepdims=bool(keepdims))
    np.testing.assert_array_equal(y, want)


def test_arg_default_axis_and_hardmax():
    x = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(run_op("ArgMax", [x])[0], np.argmax(x, axis=0)[None, :])
    (h,) = run_op("Hardmax", [x])
    np.testing.assert_array_equal(h, np.eye(4)[np.argmax(x, axis=1)])


_X = rng.standard_normal((4, 5, 6)).astype(np.float32)
REFERENCE_CASES = [
    ("ReduceSum", [_X, np.array([-1, 0], np.int64)], {"keepdims": 0}),
    ("ReduceSum", [_X], {"noop_with_empty_axes": 1}),
    ("ReduceMean", [_X], {"axes": [1, 2]}),
    ("ReduceMax", [_X], {"axes": [-1], "keepdims": 0}),
    ("ReduceProd", [_X], {"axes": [0]}),
    ("ReduceLogSumExp", [_X], {"axes": [1]}),
    ("ReduceL2", [_X], {"axes": [0, 2], "keepdims": 0}),
    ("ReduceL1", [_X], {}),
    ("ArgMax", [np.round(_X)], {"axis": 1, "select_last_index": 1}),
    ("ArgMin", [np.round(_X)], {"axis": -1, "keepdims": 0}),
    ("Softmax", [_X], {"axis": 0}),
    ("LogSoftmax", [_X], {}),
    ("Hardmax", [_X], {"axis": 1}),
]


@pytest.mark.parametrize("op,inputs,attrs", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_forward_matches_onnx_reference(op, inputs, attrs):
    assert_matches_reference(op, inputs, attrs, rtol=1e-5)

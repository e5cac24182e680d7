"""Indexing ops (GatherElements, ScatterElements, GatherND, ScatterND, CumSum, TopK, NonZero, OneHot):
forwards against onnx's reference implementation, VJPs against finite differences (float64)."""

import numpy as np
import pytest

from gradcheck import check_vjp, onnx_reference, run_op
from gradserve.worker.autodiff import NodeError, backward, compile_program, forward
from gradserve.worker.graph import Node

rng = np.random.default_rng(7)
I64 = lambda v: np.array(v, np.int64)  # noqa: E731


def assert_matches_reference(op, inputs, attrs=None, n_outputs=1, opset=18):
    ours, theirs = run_op(op, inputs, attrs, n_outputs), onnx_reference(op, inputs, attrs, n_outputs, opset=opset)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


def input_error(op, inputs, g, attrs=None, wrt=0, n_outputs=1):
    """dL/d(input ``wrt``) for the output error ``g`` (at the first output)."""
    names = [f"x{i}" for i in range(len(inputs))]
    outs = [f"y{i}" for i in range(n_outputs)]
    prog = compile_program([Node("n", op, names, outs, dict(attrs or {}))], names, outs, [names[wrt]])
    return backward(prog, forward(prog, dict(zip(names, inputs))), {"y0": g})[names[wrt]]


# -- GatherElements --------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_gather_elements(axis):
    data = rng.standard_normal((3, 4, 5))
    shape = list(data.shape)
    shape[axis] = 6  # more indices than the axis holds: duplicates are certain
    n = data.shape[axis]
    indices = rng.integers(-n, n, size=shape)  # negative indices count from the end
    # (onnx's reference mishandles axis=-1, so it gets the axis normalized)
    np.testing.assert_array_equal(
        run_op("GatherElements", [data, indices], {"axis": axis})[0],
        onnx_reference("GatherElements", [data, indices], {"axis": axis % 3})[0],
    )
    check_vjp("GatherElements", [data, indices], {"axis": axis})


def test_gather_elements_duplicates_add():
    data = rng.standard_normal((2, 3))
    indices = I64([[1, 1, -2], [0, 2, 2]])  # -2 is 1 again
    g = np.ones((2, 3))
    np.testing.assert_array_equal(
        input_error("GatherElements", [data, indices], g, {"axis": 1}), [[0, 3, 0], [1, 0, 2]]
    )
    check_vjp("GatherElements", [data, indices], {"axis": 1})


def test_gather_elements_smaller_indices_and_float32():
    # indices may be shorter than data on the other axes too
    data = rng.standard_normal((4, 5)).astype(np.float32)
    indices = rng.integers(0, 4, size=(2, 3))
    y = run_op("GatherElements", [data, indices], {"axis": 0})[0]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, data[indices, np.arange(3)])
    check_vjp("GatherElements", [data.astype(np.float64), indices], {"axis": 0})
    with pytest.raises(NodeError, match="out of range"):
        run_op("GatherElements", [data, I64([[4]])], {"axis": 0})


# -- ScatterElements -------------------------------------------------------------------------------------
def _distinct_along(shape, axis, n, rng):
    """Indices without duplicates along ``axis`` (a prefix of a permutation per line), some negative."""
    idx = np.argsort(rng.random(shape[:axis] + (n,) + shape[axis + 1 :]), axis=axis)
    idx = np.take(idx, np.arange(shape[axis]), axis=axis)
    return np.where(rng.random(idx.shape) < 0.5, idx - n, idx)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("axis", [0, -1])
def test_scatter_elements_forward(reduction, axis):
    data = rng.standard_normal((4, 5))
    shape = [4, 5]
    shape[axis] = 3
    indices = (
        _distinct_along(tuple(shape), axis % 2, data.shape[axis], rng)
        if reduction == "none"
        else rng.integers(-data.shape[axis], data.shape[axis], size=shape)
    )
    updates = rng.standard_normal(shape)
    attrs = {"axis": axis, "reduction": reduction}
    assert_matches_reference("ScatterElements", [data, indices, updates], attrs)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_elements_vjp(axis):
    data = rng.standard_normal((4, 5))
    shape = [4, 5]
    shape[axis] = 3
    n = data.shape[axis]
    unique = _distinct_along(tuple(shape), axis % 2, n, rng)
    updates = rng.standard_normal(shape)
    check_vjp("ScatterElements", [data, unique, updates], {"axis": axis})  # opset 13 form: no reduction
    check_vjp("ScatterElements", [data, unique, updates], {"axis": axis, "reduction": "none"}, opset=16)
    dup = rng.integers(-n, n, size=shape)
    check_vjp("ScatterElements", [data, dup, updates], {"axis": axis, "reduction": "add"}, opset=16)


def test_scatter_elements_duplicates():
    data = np.zeros((1, 3))
    indices = I64([[2, 0, -1]])  # 2 and -1 are the same column
    updates = np.array([[1.0, 2.0, 3.0]])
    g = np.array([[10.0, 20.0, 30.0]])
    # add: both land, both get the error
    y = run_op("ScatterElements", [data, indices, updates], {"axis": 1, "reduction": "add"})[0]
    np.testing.assert_array_equal(y, [[2, 0, 4]])
    du = input_error("ScatterElements", [data, indices, updates], g, {"axis": 1, "reduction": "add"}, wrt=2)
    np.testing.assert_array_equal(du, [[30, 10, 30]])
    # none: the last one wins (ONNX leaves this undefined); only the winner gets the error
    y = run_op("ScatterElements", [data, indices, updates], {"axis": 1})[0]
    np.testing.assert_array_equal(y, [[2, 0, 3]])
    du = input_error("ScatterElements", [data, indices, updates], g, {"axis": 1}, wrt=2)
    np.testing.assert_array_equal(du, [[0, 10, 30]])
    dd = input_error("ScatterElements", [data, indices, updates], g, {"axis": 1}, wrt=0)
    np.testing.assert_array_equal(dd, [[0, 20, 0]])
    check_vjp("ScatterElements", [rng.standard_normal((1, 3)), indices, updates], {"axis": 1})


@pytest.mark.parametrize("reduction", ["mul", "max", "min"])
def test_scatter_no_gradient_for_other_reductions(reduction):
    data, updates = rng.standard_normal((2, 3)), rng.standard_normal((2, 1))
    with pytest.raises(NodeError, match=f"no gradient for reduction '{reduction}'"):
        input_error(
            "ScatterElements", [data, I64([[0], [2]]), updates], np.ones((2, 3)), {"axis": 1, "reduction": reduction}
        )
    with pytest.raises(NodeError, match=f"no gradient for reduction '{reduction}'"):
        input_error("ScatterND", [data, I64([[0, 1]]), updates[0]], np.ones((2, 3)), {"reduction": reduction})


# -- GatherND / ScatterND ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data_shape,indices_shape,batch_dims",
    [
        ((2, 3), (4, 2), 0),  # whole index tuples: elements
        ((2, 3, 4), (5, 1), 0),  # a prefix: slices of rank 2
        ((2, 3, 4), (2, 3, 2), 0),  # several leading index axes
        ((2, 3, 4), (2, 1), 1),  # Example 5 of the spec
        ((2, 3, 4), (2, 5, 2), 1),
        ((2, 3, 4, 5), (2, 3, 4, 1), 2),
        ((3, 4), (2,), 0),  # a rank-1 indices tensor: one tuple
    ],
)
def test_gather_nd(data_shape, indices_shape, batch_dims):
    data = rng.standard_normal(data_shape)
    k = indices_shape[-1]
    dims = np.array(data_shape[batch_dims : batch_dims + k])
    indices = (rng.integers(0, 1 << 30, size=indices_shape) % dims) - dims * rng.integers(0, 2, size=indices_shape)
    attrs = {"batch_dims": batch_dims} if batch_dims else {}
    assert_matches_reference("GatherND", [data, indices], attrs)
    check_vjp("GatherND", [data, indices], attrs)


def test_gather_nd_duplicates_add():
    data = rng.standard_normal((3, 2))
    indices = I64([[1], [-2], [0]])
    g = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(input_error("GatherND", [data, indices], g), [[4, 5], [2, 4], [0, 0]])
    check_vjp("GatherND", [data, indices])


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_nd_forward(reduction):
    data = rng.standard_normal((4, 3, 2))
    indices = I64([[[0, 1]], [[3, -1]]]) if reduction == "none" else I64([[[0, 1]], [[0, 1]], [[-4, 2]]])
    updates = rng.standard_normal(indices.shape[:-1] + (2,))
    assert_matches_reference("ScatterND", [data, indices, updates], {"reduction": reduction})


@pytest.mark.parametrize("indices", [[[2], [0]], [[1, 2], [-1, 0], [0, 0]], [[0, 1, 1], [3, 2, 0]]])
def test_scatter_nd_vjp(indices):
    data = rng.standard_normal((4, 3, 2))
    indices = I64(indices)
    updates = rng.standard_normal(indices.shape[:-1] + data.shape[indices.shape[-1] :])
    assert_matches_reference("ScatterND", [data, indices, updates])
    check_vjp("ScatterND", [data, indices, updates])  # opset 13 form
    check_vjp("ScatterND", [data, indices, updates], {"reduction": "none"}, opset=16)
    check_vjp("ScatterND", [data, indices, updates], {"reduction": "add"}, opset=16)
    dup = np.concatenate([indices, indices[:1]])  # a repeated index tuple: add sums both
    updates = rng.standard_normal(dup.shape[:-1] + data.shape[indices.shape[-1] :])
    assert_matches_reference("ScatterND", [data, dup, updates], {"reduction": "add"})
    check_vjp("ScatterND", [data, dup, updates], {"reduction": "add"}, opset=16)
    check_vjp("ScatterND", [data, dup, updates], {"reduction": "none"}, opset=16)  # the last one wins


# -- CumSum -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis", [np.array(1, np.int64), np.array(-1, np.int32), np.array(0, np.int32)])
def test_cumsum(exclusive, reverse, axis):
    x = rng.standard_normal((3, 4))
    attrs = {"exclusive": exclusive, "reverse": reverse}
    assert_matches_reference("CumSum", [x, axis], attrs)
    check_vjp("CumSum", [x, axis], attrs)


def test_cumsum_types():
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    y = run_op("CumSum", [x, I64(1)])[0]
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, [[0, 1, 3], [3, 7, 12]])
    x32 = rng.standard_normal(5).astype(np.float32)
    assert run_op("CumSum", [x32, I64(0)], {"exclusive": 1})[0].dtype == np.float32
    assert run_op("CumSum", [np.zeros((2, 0)), I64(1)])[0].shape == (2, 0)


# -- TopK ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("largest", [1, 0])
@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("k", [1, 3])
def test_topk(largest, axis, k):
    x = rng.standard_normal((4, 5, 3))
    attrs = {"axis": axis, "largest": largest}
    assert_matches_reference("TopK", [x, I64([k])], attrs, n_outputs=2)
    check_vjp("TopK", [x, I64([k])], attrs, n_outputs=2)


def test_topk_ties_and_unsorted():
    # ONNX: ties go to the lower index, for largest and smallest alike
    x = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, 1.0]])
    for largest, want in [(1, [1, 2, 4, 3]), (0, [0, 5, 3, 1])]:
        values, indices = run_op("TopK", [x, I64([4])], {"largest": largest}, n_outputs=2)
        np.testing.assert_array_equal(indices, [want])
        np.testing.assert_array_equal(values, x[:, want])
        assert_matches_reference("TopK", [x, I64([4])], {"largest": largest}, n_outputs=2)
    xi = np.array([5, 7, 7, -3], np.int32)  # integer data: no negation trick that could overflow
    np.testing.assert_array_equal(run_op("TopK", [xi, I64([3])], n_outputs=2)[1], [1, 2, 0])
    # sorted=0: any order is allowed; ours is sorted. K=0 and K=n are legal.
    check_vjp("TopK", [rng.standard_normal((3, 4)), I64([2])], {"sorted": 0}, n_outputs=2)
    assert run_op("TopK", [x, I64([0])], n_outputs=2)[0].shape == (1, 0)
    check_vjp("TopK", [rng.standard_normal((3, 4)), I64([4])], {"axis": 1}, n_outputs=2)
    g = np.array([[10.0, 20.0]])
    np.testing.assert_array_equal(input_error("TopK", [x, I64([2])], g, n_outputs=2), [[0, 10, 20, 0, 0, 0]])


# -- NonZero, OneHot ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "x",
    [
        np.array([[1.0, 0.0], [0.0, -2.0], [3.0, 0.0]]),
        np.array([0, 2, 0, 4], np.int32),
        np.zeros((2, 3), bool),
        np.array([[[True, False]], [[True, True]]]),
    ],
)
def test_nonzero(x):
    assert_matches_reference("NonZero", [x])


def test_nonzero_scalar():
    assert run_op("NonZero", [np.array(2.0)])[0].shape == (0, 1)
    assert run_op("NonZero", [np.array(0.0)])[0].shape == (0, 0)


@pytest.mark.parametrize("axis", [-1, 0, 1, -2, 2])
def test_one_hot(axis):
    indices = I64([[0, 3, -1], [-4, 5, 2]])  # -1 and -4 count from the end; 5 is out of range
    depth = I64(4)
    values = np.array([-0.5, 2.0])
    assert_matches_reference("OneHot", [indices, depth, values], {"axis": axis})
    check_vjp("OneHot", [indices, depth, values], {"axis": axis})
    g = np.ones(run_op("OneHot", [indices, depth, values], {"axis": axis})[0].shape)
    np.testing.assert_array_equal(input_error("OneHot", [indices, depth, values], g, {"axis": axis}, wrt=2), [19, 5])


def test_one_hot_types():
    # float indices and depth, float32 values; a one-element depth tensor
    indices = np.array([1.0, 2.0, 0.0], np.float32)
    values = np.array([0, 1], np.float32)
    y = run_op("OneHot", [indices, np.array([3.0], np.float32), values])[0]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.eye(3, dtype=np.float32)[[1, 2, 0]])
    assert_matches_reference("OneHot", [indices, np.array(3.0, np.float32), values])  # the reference wants 0-d
    y = run_op("OneHot", [I64(2), I64(3), np.array([0, 5], np.int64)])[0]
    np.testing.assert_array_equal(y, [0, 0, 5])


# -- Unique -------------------------------------------------------------------------------------------------
def test_unique_spec_examples():
    x = np.array([2.0, 1.0, 1.0, 3.0, 4.0, 3.0])
    y, first, inverse, counts = run_op("Unique", [x], {"sorted": 0}, n_outputs=4)
    for got, want in zip((y, first, inverse, counts), ([2, 1, 3, 4], [0, 1, 3, 4], [0, 1, 1, 2, 3, 2], [1, 2, 2, 1])):
        np.testing.assert_array_equal(got, want)
    assert_matches_reference("Unique", [x], {"sorted": 0}, n_outputs=4)
    assert_matches_reference("Unique", [x], n_outputs=4)
    x = np.array([[1, 3], [2, 3]], np.int32)
    y, first, inverse, counts = run_op("Unique", [x], n_outputs=4)
    for got, want in zip((y, first, inverse, counts), ([1, 2, 3], [0, 2, 1], [0, 2, 1, 2], [1, 1, 2])):
        np.testing.assert_array_equal(got, want)
    assert y.dtype == np.int32


@pytest.mark.parametrize("axis,sorted_", [(0, 1), (0, 0), (1, 0), (-1, 1)])
def test_unique_axis(axis, sorted_):
    x = np.array([[1, 0, 0], [1, 0, 0], [2, 3, 4], [1, 0, 0]], np.int64)
    y, first, inverse, counts = run_op("Unique", [x], {"axis": axis, "sorted": sorted_}, n_outputs=4)
    a = axis % 2
    np.testing.assert_array_equal(np.take(x, first, axis=a), y)  # Y holds the first occurrences
    np.testing.assert_array_equal(np.take(y, inverse, axis=a), x)  # and rebuilds X
    assert counts.sum() == x.shape[a] and len(set(first.tolist())) == len(first)
    if sorted_:
        np.testing.assert_array_equal(y, np.unique(x, axis=a))
    else:
        assert list(first) == sorted(first)
    if a == 0:
        assert_matches_reference("Unique", [x], {"axis": axis, "sorted": sorted_}, n_outputs=4)


def test_unique_has_no_gradient():
    x = np.array([2.0, 1.0, 1.0])
    with pytest.raises(NodeError, match="no gradient"):
        input_error("Unique", [x], np.ones(2))

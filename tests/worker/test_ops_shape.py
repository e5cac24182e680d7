"""Shape and data-movement ops: opset 17 input/attribute semantics, VJPs, forwards vs numpy."""

import numpy as np
import pytest

from gradcheck import assert_matches_reference, check_vjp, run_op
from gradserve.worker.autodiff import backward, compile_program, forward
from gradserve.worker.graph import Node
from gradserve.worker.ops import OpError

rng = np.random.default_rng(4)
I64 = lambda v: np.array(v, np.int64)  # noqa: E731
INT64_MAX = np.iinfo(np.int64).max


def vjp(op, inputs, g, attrs=None):
    names = [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)]
    prog = compile_program([Node("n", op, names, ["y"], dict(attrs or {}))], [n for n in names if n], ["y"], ["x0"])
    return backward(prog, forward(prog, {n: x for n, x in zip(names, inputs) if n}), {"y": g})["x0"]


@pytest.mark.parametrize(
    "shape,allowzero,want",
    [
        ([4, -1], 0, (4, 6)),
        ([0, 0, -1], 0, (2, 3, 4)),
        ([-1], 0, (24,)),
        ([2, 0, 4], 0, (2, 3, 4)),
        ([0, 12], 1, None),
    ],
)
def test_reshape(shape, allowzero, want):
    x = rng.standard_normal((2, 3, 4))
    attrs = {"allowzero": allowzero}
    if want is None:  # allowzero: 0 is a real zero, and 24 elements do not fit (0, 12)
        with pytest.raises(Exception):
            run_op("Reshape", [x, I64(shape)], attrs)
        z = np.zeros((0, 3))
        assert run_op("Reshape", [z, I64([3, 0])], attrs)[0].shape == (3, 0)
        return
    assert run_op("Reshape", [x, I64(shape)], attrs)[0].shape == want
    check_vjp("Reshape", [x, I64(shape)], attrs)


@pytest.mark.parametrize("axis,want", [(0, (1, 24)), (1, (2, 12)), (-1, (6, 4)), (3, (24, 1)), (-3, (1, 24))])
def test_flatten(axis, want):
    x = rng.standard_normal((2, 3, 4))
    assert run_op("Flatten", [x], {"axis": axis})[0].shape == want
    check_vjp("Flatten", [x], {"axis": axis})


@pytest.mark.parametrize("perm", [None, [0, 2, 1], [2, 0, 1]])
def test_transpose(perm):
    x = rng.standard_normal((2, 3, 4))
    attrs = {} if perm is None else {"perm": perm}
    np.testing.assert_array_equal(run_op("Transpose", [x], attrs)[0], np.transpose(x, perm))
    check_vjp("Transpose", [x], attrs)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(axis):
    shapes = [(2, 3, 4), (2, 3, 4), (2, 3, 4)]
    xs = []
    for k, s in enumerate(shapes):
        s = list(s)
        s[axis] += k  # different sizes along the axis
        xs.append(rng.standard_normal(s))
    np.testing.assert_array_equal(run_op("Concat", xs, {"axis": axis})[0], np.concatenate(xs, axis))
    check_vjp("Concat", xs, {"axis": axis})


def test_split():
    x = rng.standard_normal((6, 4))
    parts = run_op("Split", [x, I64([1, 2, 3])], {"axis": 0}, n_outputs=3)
    for p, w in zip(parts, np.split(x, [1, 3])):
        np.testing.assert_array_equal(p, w)
    check_vjp("Split", [x, I64([1, 2, 3])], n_outputs=3)
    check_vjp("Split", [x, I64([1, 3])], {"axis": -1}, n_outputs=2)
    # no split input: equal parts
    parts = run_op("Split", [x], {"axis": 1}, n_outputs=2)
    assert [p.shape for p in parts] == [(6, 2), (6, 2)]
    check_vjp("Split", [x], {"axis": 1}, n_outputs=2)
    check_vjp("Split", [x], n_outputs=3, grad_outputs=[0, 2])  # an output with no error
    with pytest.raises(Exception, match="equal parts"):
        run_op("Split", [x], {"axis": 0}, n_outputs=4)


SLICES = [
    # starts, ends, axes, steps, the numpy index it means
    ([1], [3], None, None, np.s_[1:3]),
    ([0, 1], [INT64_MAX, -1], [1, 2], None, np.s_[:, 0:, 1:-1]),
    ([-1], [-INT64_MAX], [0], [-1], np.s_[::-1]),
    ([3, 5], [0, 1], [-2, -1], [-2, -3], np.s_[:, 3:0:-2, 5:1:-3]),
    ([-100], [100], [2], [2], np.s_[:, :, ::2]),
    ([10], [-10], [1], [-1], np.s_[:, ::-1]),
    ([2], [2], [0], [1], np.s_[2:2]),
    ([1, 0], [-INT64_MAX, INT64_MAX], [0, 2], [-1, 3], np.s_[1::-1, :, ::3]),
]


@pytest.mark.parametrize("starts,ends,axes,steps,index", SLICES)
def test_slice(starts, ends, axes, steps, index):
    x = rng.standard_normal((4, 5, 6))
    inputs = [x, I64(starts), I64(ends)]
    if axes is not None or steps is not None:
        inputs.append(I64(axes if axes is not None else list(range(len(starts)))))
    if steps is not None:
        inputs.append(I64(steps))
    np.testing.assert_array_equal(run_op("Slice", inputs)[0], x[index])
    check_vjp("Slice", inputs)


def test_slice_axes_without_steps_and_omitted_axes():
    x = rng.standard_normal((4, 5))
    np.testing.assert_array_equal(run_op("Slice", [x, I64([1]), I64([4]), None, I64([2])])[0], x[1:4:2])


def test_squeeze_unsqueeze():
    x = rng.standard_normal((1, 3, 1, 4))
    assert run_op("Squeeze", [x])[0].shape == (3, 4)
    assert run_op("Squeeze", [x, I64([-2])])[0].shape == (1, 3, 4)
    check_vjp("Squeeze", [x, I64([0, 2])])
    check_vjp("Squeeze", [x])
    with pytest.raises(Exception):
        run_op("Squeeze", [x, I64([1])])
    y = rng.standard_normal((3, 4))
    assert run_op("Unsqueeze", [y, I64([-1, 0])])[0].shape == (1, 3, 4, 1)
    assert run_op("Unsqueeze", [y, I64([1, 3])])[0].shape == (3, 1, 4, 1)
    check_vjp("Unsqueeze", [y, I64([0, -1])])


@pytest.mark.parametrize(
    "xs,shape,want",
    [
        ((3, 1), [2, 3, 4], (2, 3, 4)),
        ((3, 4), [1, 1], (3, 4)),
        ((1, 4), [3, 1], (3, 4)),
        ((), [2, 2], (2, 2)),
    ],
)
def test_expand(xs, shape, want):
    x = np.asarray(rng.standard_normal(xs))
    (y,) = run_op("Expand", [x, I64(shape)])
    assert y.shape == want and y.flags.writeable
    np.testing.assert_array_equal(y, np.broadcast_to(x, want))
    check_vjp("Expand", [x, I64(shape)])


@pytest.mark.parametrize("xs,reps", [((2, 3), [2, 3]), ((2, 3), [1, 1]), ((3,), [4]), ((2, 1, 3), [1, 2, 2])])
def test_tile(xs, reps):
    x = rng.standard_normal(xs)
    np.testing.assert_array_equal(run_op("Tile", [x, I64(reps)])[0], np.tile(x, reps))
    check_vjp("Tile", [x, I64(reps)])


@pytest.mark.parametrize("axis,ishape", [(0, (5,)), (0, (2, 3)), (1, (4,)), (-1, (2, 2)), (1, ())])
def test_gather(axis, ishape):
    data = rng.standard_normal((4, 5, 3))
    n = data.shape[axis]
    idx = rng.integers(-n, n, ishape)
    np.testing.assert_array_equal(
        run_op("Gather", [data, idx], {"axis": axis})[0], np.take(data, np.where(idx < 0, idx + n, idx), axis=axis)
    )
    check_vjp("Gather", [data, idx], {"axis": axis})


def test_gather_repeated_indices_sum():
    table = rng.standard_normal((5, 3))
    idx = np.array([[1, 1], [-4, 3]], np.int64)  # 1 three times (-4 is 1)
    g = rng.standard_normal((2, 2, 3))
    dt = vjp("Gather", [table, idx], g)
    want = np.zeros_like(table)
    want[1] = g[0, 0] + g[0, 1] + g[1, 0]
    want[3] = g[1, 1]
    np.testing.assert_allclose(dt, want)
    check_vjp("Gather", [table, idx.astype(np.int32)])
    with pytest.raises(Exception):
        run_op("Gather", [table, np.array([5])])


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
@pytest.mark.parametrize("pads", [[1, 0, 2, 3], [0, 2, 1, 0], [-1, 1, 2, -2], [2, 3, 4, 5]])
def test_pad(mode, pads):
    x = rng.standard_normal((4, 3))
    inputs = [x, I64(pads)]
    if mode == "constant":
        inputs.append(np.array(0.7))
    (y,) = run_op("Pad", inputs, {"mode": mode})
    crop = x[max(-pads[0], 0) : 4 - max(-pads[2], 0), max(-pads[1], 0) : 3 - max(-pads[3], 0)]
    widths = [(max(pads[0], 0), max(pads[2], 0)), (max(pads[1], 0), max(pads[3], 0))]
    kw = {"constant_values": 0.7} if mode == "constant" else {}
    np.testing.assert_array_equal(y, np.pad(crop, widths, mode=mode, **kw))
    check_vjp("Pad", inputs, {"mode": mode})


def test_pad_default_constant():
    x = rng.standard_normal((2, 2))
    np.testing.assert_array_equal(run_op("Pad", [x, I64([1, 1, 1, 1])])[0], np.pad(x, 1))
    check_vjp("Pad", [x, I64([0, 1, 1, 0])])


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [None, 0, 1, -2])
def test_trilu(upper, k):
    x = rng.standard_normal((2, 4, 5))
    inputs = [x] if k is None else [x, I64(k)]
    want = (np.triu if upper else np.tril)(x, 0 if k is None else k)
    np.testing.assert_array_equal(run_op("Trilu", inputs, {"upper": upper})[0], want)
    check_vjp("Trilu", inputs, {"upper": upper})


def test_shape_and_size():
    x = np.zeros((2, 3, 4, 5))
    for attrs, want in [
        ({}, [2, 3, 4, 5]),
        ({"start": 1}, [3, 4, 5]),
        ({"end": -1}, [2, 3, 4]),
        ({"start": -2, "end": 10}, [4, 5]),
        ({"start": 3, "end": 1}, []),
    ]:
        (y,) = run_op("Shape", [x], attrs)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, want)
    (s,) = run_op("Size", [x])
    assert s.dtype == np.int64 and s.shape == () and s == 120


def test_constant_of_shape():
    (y,) = run_op("ConstantOfShape", [I64([2, 3])])
    assert y.dtype == np.float32 and y.shape == (2, 3) and not y.any()
    (y,) = run_op("ConstantOfShape", [I64([4])], {"value": np.array([7], np.int64)})
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, [7, 7, 7, 7])
    assert run_op("ConstantOfShape", [I64([])], {"value": np.array([1.5])})[0].shape == ()


def test_constant():
    t = rng.standard_normal((2, 3)).astype(np.float32)
    (y,) = run_op("Constant", [], {"value": t})
    np.testing.assert_array_equal(y, t)
    assert y.dtype == np.float32 and y is not t
    for attrs, want, dtype in [
        ({"value_float": 1.5}, 1.5, np.float32),
        ({"value_floats": [1.0, 2.5]}, [1.0, 2.5], np.float32),
        ({"value_int": 3}, 3, np.int64),
        ({"value_ints": [1, 2]}, [1, 2], np.int64),
    ]:
        (y,) = run_op("Constant", [], attrs)
        assert y.dtype == dtype
        np.testing.assert_array_equal(y, want)
    with pytest.raises(Exception):
        run_op("Constant", [], {})


@pytest.mark.parametrize(
    "start,limit,delta", [(0, 5, 1), (10, 4, -3), (1, 1, 1), (3, 9, 2), (0.5, 2.0, 0.25), (1.0, -1.0, -0.3)]
)
def test_range(start, limit, delta):
    dtype = np.int64 if isinstance(start, int) else np.float32
    (y,) = run_op("Range", [np.array(start, dtype), np.array(limit, dtype), np.array(delta, dtype)])
    assert y.dtype == dtype
    np.testing.assert_allclose(y, np.arange(start, limit, delta, dtype=dtype), rtol=1e-6)


def test_float32_preserved():
    x = rng.standard_normal((2, 3)).astype(np.float32)
    for op, extra in [
        ("Reshape", [I64([3, 2])]),
        ("Expand", [I64([2, 2, 3])]),
        ("Tile", [I64([2, 1])]),
        ("Pad", [I64([1, 1, 0, 0])]),
        ("Slice", [I64([1]), I64([3]), I64([1])]),
        ("Gather", [I64([1, 0])]),
    ]:
        (y,) = run_op(op, [x] + extra)
        assert y.dtype == np.float32, op
        assert vjp(op, [x] + extra, np.ones_like(y)).dtype == np.float32, op


def test_op_errors_name_the_problem():
    x = rng.standard_normal((2, 3))
    with pytest.raises(Exception, match="repeated axis"):
        run_op("Slice", [x, I64([0, 0]), I64([1, 1]), I64([1, -1])])
    with pytest.raises(Exception, match="pads"):
        run_op("Pad", [x, I64([1, 1])])
    assert issubclass(OpError, ValueError)


_X = rng.standard_normal((4, 5, 6)).astype(np.float32)
REFERENCE_CASES = [
    ("Slice", [_X, I64([-1]), I64([-100]), I64([1]), I64([-2])], {}),
    ("Slice", [_X, I64([10, -3]), I64([-10, 5]), I64([0, 2]), I64([-1, 1])], {}),
    ("Pad", [_X[0], I64([1, 0, 2, 2]), np.array(1.5, np.float32)], {"mode": "constant"}),
    ("Pad", [_X[0], I64([3, 2, 4, 1])], {"mode": "reflect"}),
    ("Pad", [_X[0], I64([3, 0, 0, 6])], {"mode": "edge"}),
    ("Flatten", [_X], {"axis": -2}),
    ("Reshape", [_X, I64([0, -1, 3])], {}),
    ("Squeeze", [_X[:1, :, :1], I64([0, -1])], {}),
    ("Unsqueeze", [_X, I64([-1, 1])], {}),
    ("Expand", [_X[:, :1], I64([2, 1, 1, 1])], {}),
    ("Tile", [_X, I64([1, 2, 1])], {}),
    ("Gather", [_X, I64([[0, -1], [2, 2]])], {"axis": 1}),
    ("Trilu", [_X, I64(-1)], {"upper": 0}),
    ("Shape", [_X], {"start": -2}),
    ("Range", [np.array(1.0, np.float32), np.array(-2.0, np.float32), np.array(-0.7, np.float32)], {}),
    ("ConstantOfShape", [I64([2, 3])], {"value": np.array([3], np.int32)}),
    ("Transpose", [_X], {"perm": [1, 2, 0]}),
]


@pytest.mark.parametrize("op,inputs,attrs", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_forward_matches_onnx_reference(op, inputs, attrs):
    assert_matches_reference(op, inputs, attrs)


@pytest.mark.parametrize("split", [None, [1, 3]])
def test_split_matches_onnx_reference(split):
    assert_matches_reference("Split", [_X] + ([] if split is None else [I64(split)]), {"axis": 0}, n_outputs=2)

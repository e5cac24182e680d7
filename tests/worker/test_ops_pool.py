import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_vjp, run_op

rng = np.random.default_rng(0)
T = torch.from_numpy

# attrs, and the matching torch call (kernel, stride, padding, dilation, ceil_mode) or None
MAX_CASES = {
    "2x2_s2": ({"kernel_shape": [2, 2], "strides": [2, 2]}, (2, 2, 0, 1, False)),
    "3x3_s2_p1_ceil": (
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
        (3, 2, 1, 1, True),
    ),
    "2x2_s2_ceil": ({"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, (2, 2, 0, 1, True)),
    "overlapping_s1": ({"kernel_shape": [3, 3]}, (3, 1, 0, 1, False)),
    "dilation2": ({"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]}, (2, 1, 1, 2, False)),
    "asym_pads": ({"kernel_shape": [3, 2], "pads": [1, 0, 2, 1], "strides": [1, 2]}, None),
    "same_upper": ({"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, None),
    "same_lower": ({"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"}, None),
}


@pytest.mark.parametrize("name", list(MAX_CASES))
def test_maxpool(name):
    attrs, ref = MAX_CASES[name]
    x = rng.standard_normal((2, 3, 7, 6))
    check_vjp("MaxPool", [x], attrs)
    if ref:
        k, s, p, d, ceil = ref
        y, idx = run_op("MaxPool", [x], attrs, n_outputs=2)
        ty, tidx = F.max_pool2d(T(x), k, s, p, d, ceil_mode=ceil, return_indices=True)
        np.testing.assert_array_equal(y, ty.numpy())
        plane = np.arange(6).reshape(2, 3, 1, 1) * 42  # ONNX indices count over the whole tensor
        np.testing.assert_array_equal(idx, tidx.numpy() + plane)


def test_maxpool_indices_storage_order_1_and_1d():
    x = rng.standard_normal((2, 2, 5, 4))
    idx = run_op("MaxPool", [x], {"kernel_shape": [2, 2], "storage_order": 1}, n_outputs=2)[1]
    _, tidx = F.max_pool2d(T(x), 2, 1, return_indices=True)
    h, w = np.divmod(tidx.numpy(), 4)
    np.testing.assert_array_equal(idx, h + w * 5 + np.arange(4).reshape(2, 2, 1, 1) * 20)
    x1 = rng.standard_normal((2, 3, 9))
    check_vjp("MaxPool", [x1], {"kernel_shape": [3], "strides": [2], "pads": [1, 1]})
    np.testing.assert_array_equal(
        run_op("MaxPool", [x1], {"kernel_shape": [3], "strides": [2], "pads": [1, 1]})[0],
        F.max_pool1d(T(x1), 3, 2, 1).numpy(),
    )


def test_maxpool_ties_route_each_error_once():
    # after a ReLU many windows are all zeros: each window's error must land on exactly one element
    x = np.maximum(rng.standard_normal((2, 2, 6, 6)), 0)
    x[0, 0] = 0.0
    attrs = {"kernel_shape": [3, 3], "strides": [1, 1]}
    from gradserve.worker.autodiff import backward, compile_program, forward
    from gradserve.worker.graph import Node

    prog = compile_program([Node("n", "MaxPool", ["x"], ["y"], attrs)], ["x"], ["y"], ["x"])
    tape = forward(prog, {"x": x})
    g = rng.standard_normal(tape.outputs["y"].shape)
    dx = backward(prog, tape, {"y": g})["x"]
    np.testing.assert_allclose(dx.sum(axis=(2, 3)), g.sum(axis=(2, 3)))
    xt = T(x).requires_grad_()
    F.max_pool2d(xt, 3, 1).backward(T(g))
    np.testing.assert_allclose(dx, xt.grad.numpy())


AVG_CASES = {
    "2x2_s2": ({"kernel_shape": [2, 2], "strides": [2, 2]}, (2, 2, 0, False)),
    "3x3_s2_p1": ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (3, 2, 1, False)),
    "3x3_s2_p1_ceil": (
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
        (3, 2, 1, True),
    ),
    "2x2_s2_p1_ceil_drop_last": (
        {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
        (2, 2, 1, True),
    ),
    "3x3_s2_ceil": ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, (3, 2, 0, True)),
    "overlapping_s1_p1": ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (3, 1, 1, False)),
    "asym_pads": ({"kernel_shape": [3, 2], "pads": [0, 1, 2, 0]}, None),
    "same_lower": ({"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}, None),
}


@pytest.mark.parametrize("name", list(AVG_CASES))
@pytest.mark.parametrize("include_pad", [0, 1])
def test_averagepool(name, include_pad):
    attrs, ref = AVG_CASES[name]
    attrs = {**attrs, "count_include_pad": include_pad}
    x = rng.standard_normal((2, 3, 7, 6))
    # ceil_mode drops a last window that would start in the end pad (torch, onnxruntime and the ONNX
    # reference implementation do); ONNX's C++ shape inference for AveragePool-11 does not
    check_vjp("AveragePool", [x], attrs, check_shapes="drop_last" not in name)
    if ref:
        k, s, p, ceil = ref
        y = run_op("AveragePool", [x], attrs)[0]
        ty = F.avg_pool2d(T(x), k, s, p, ceil_mode=ceil, count_include_pad=bool(include_pad))
        np.testing.assert_allclose(y, ty.numpy(), rtol=1e-12, atol=1e-12)


def test_averagepool_asymmetric_pads_divisor():
    x = np.ones((1, 1, 3, 3))
    y0 = run_op("AveragePool", [x], {"kernel_shape": [2, 2], "pads": [1, 0, 0, 1]})[0]
    np.testing.assert_allclose(y0, np.ones((1, 1, 3, 3)))  # padding not counted: mean of ones
    y1 = run_op("AveragePool", [x], {"kernel_shape": [2, 2], "pads": [1, 0, 0, 1], "count_include_pad": 1})[0]
    np.testing.assert_allclose(y1[0, 0], [[0.5, 0.5, 0.25], [1, 1, 0.5], [1, 1, 0.5]])


def test_global_pools():
    x = rng.standard_normal((2, 3, 4, 5))
    for op, ref in (
        ("GlobalAveragePool", x.mean(axis=(2, 3), keepdims=True)),
        ("GlobalMaxPool", x.max(axis=(2, 3), keepdims=True)),
    ):
        check_vjp(op, [x])
        np.testing.assert_allclose(run_op(op, [x])[0], ref)
        check_vjp(op, [rng.standard_normal((2, 3, 5))])


def test_pool_float32_dtype():
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    for op, attrs in (
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
        ("GlobalAveragePool", {}),
        ("GlobalMaxPool", {}),
    ):
        assert run_op(op, [x], attrs)[0].dtype == np.float32


def test_pool_errors():
    with pytest.raises(Exception, match="kernel_shape"):
        run_op("MaxPool", [rng.standard_normal((1, 1, 4, 4))], {})
    with pytest.raises(Exception, match="does not fit"):
        run_op("AveragePool", [rng.standard_normal((1, 1, 2, 2))], {"kernel_shape": [3, 3]})


@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (2, 2, 7, 5)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_maxpool_2x2_tiles_ties_match_torch(shape, dtype):
    # the 2x2/stride-2 fast path: ties (all-zero windows after a ReLU, and planted ties between
    # every pair of window positions) route the error to the first maximum, as torch does
    x = np.maximum(rng.standard_normal(shape), 0).astype(dtype)
    x[0, 0] = 0.0
    x[1, 0, 0:2, 0:2] = [[1.0, 1.0], [0.5, 1.0]]
    x[1, 0, 0:2, 2:4] = [[0.5, 2.0], [2.0, 2.0]]
    x[1, 0, 2:4, 0:2] = [[0.5, 0.5], [3.0, 3.0]]
    x[1, 0, 2:4, 2:4] = [[0.5, 4.0], [0.5, 4.0]]
    x[1, 1, 0:2, 0:2] = [[0.5, 0.5], [0.5, 5.0]]
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2]}
    from gradserve.worker.autodiff import backward, compile_program, forward
    from gradserve.worker.graph import Node

    prog = compile_program([Node("n", "MaxPool", ["x"], ["y"], attrs)], ["x"], ["y"], ["x"])
    tape = forward(prog, {"x": x})
    y = tape.outputs["y"]
    g = rng.standard_normal(y.shape).astype(dtype)
    dx = backward(prog, tape, {"y": g})["x"]
    xt = T(x).requires_grad_()
    ty = F.max_pool2d(xt, 2, 2)
    ty.backward(T(g))
    np.testing.assert_array_equal(y, ty.detach().numpy())
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx, xt.grad.numpy())

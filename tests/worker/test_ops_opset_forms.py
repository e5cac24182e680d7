"""Ops whose form changed between opsets 13 and 21 run every form: reductions with ``axes`` as an
input and ``noop_with_empty_axes`` (opset 18), Split with ``num_outputs`` (18), Pad with ``axes``
(18) and mode ``wrap`` (19). Forwards against onnx's reference implementation at that opset, VJPs
by finite differences, output shapes by ONNX shape inference at that opset."""

import numpy as np
import pytest

from gradcheck import check_vjp, onnx_reference, run_op
from gradserve.worker.autodiff import backward, compile_program, forward
from gradserve.worker.graph import Node

rng = np.random.default_rng(7)
I64 = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
X = rng.standard_normal((3, 4, 5))

REDUCTIONS = [
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
]
AXES_FORMS = [
    ([X, I64([1])], {}),
    ([X, I64([-1, 0])], {"keepdims": 0}),
    ([X], {}),  # no axes: all of them
    ([X, I64([])], {"keepdims": 0}),  # empty axes: all of them
    ([X, I64([])], {"noop_with_empty_axes": 1}),  # empty axes and noop: the identity
    ([X], {"noop_with_empty_axes": 1, "keepdims": 0}),
]


@pytest.mark.parametrize("op", REDUCTIONS)
@pytest.mark.parametrize("form", range(len(AXES_FORMS)))
def test_reductions_with_axes_input(op, form):
    inputs, attrs = AXES_FORMS[form]
    if op in ("ReduceL1", "ReduceL2", "ReduceProd"):
        inputs = [np.abs(inputs[0]) + 0.5, *inputs[1:]]  # away from the kinks at 0
    (ours,) = run_op(op, inputs, attrs)
    (theirs,) = onnx_reference(op, inputs, attrs, opset=18)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    check_vjp(op, inputs, attrs, opset=18)


def test_mean_of_a_dynamo_export_form():
    """torch's dynamo exporter writes F.mse_loss's mean as ReduceMean with noop_with_empty_axes=0
    and no axes: the mean of everything."""
    (y,) = run_op("ReduceMean", [X], {"keepdims": 0, "noop_with_empty_axes": 0})
    assert y.shape == () and np.isclose(y, X.mean())


@pytest.mark.parametrize("size,n", [(6, 3), (7, 3), (5, 2), (4, 4)])
def test_split_num_outputs(size, n):
    x = rng.standard_normal((2, size))
    attrs = {"axis": 1, "num_outputs": n}
    ours, theirs = run_op("Split", [x], attrs, n_outputs=n), onnx_reference("Split", [x], attrs, n, opset=18)
    assert [a.shape for a in ours] == [b.shape for b in theirs]
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    check_vjp("Split", [x], attrs, n_outputs=n, opset=18)


PADS = [
    ([X, I64([1, 2, 0, 1]), np.array(0.5), I64([0, 2])], {"mode": "constant"}),
    ([X, I64([1, 0, 2, 2]), None, I64([-1, 1])], {"mode": "reflect"}),
    ([X, I64([2, 1]), None, I64([1])], {"mode": "edge"}),
    ([X, I64([0, 2, 1, 0, 1, 3]), None, None], {"mode": "wrap"}),
    ([X, I64([3, 1]), None, I64([-2])], {"mode": "wrap"}),
]


@pytest.mark.parametrize("case", range(len(PADS)))
def test_pad_axes_and_wrap(case):
    inputs, attrs = PADS[case]
    (ours,) = run_op("Pad", inputs, attrs)
    (theirs,) = onnx_reference("Pad", inputs, attrs, opset=19)
    np.testing.assert_array_equal(ours, theirs)
    check_vjp("Pad", inputs, attrs, opset=19)


@pytest.mark.parametrize(
    "op,attrs,shape",
    [
        ("DepthToSpace", {"blocksize": 2}, (2, 8, 3, 2)),
        ("DepthToSpace", {"blocksize": 2, "mode": "CRD"}, (2, 8, 3, 2)),
        ("DepthToSpace", {"blocksize": 3, "mode": "DCR"}, (1, 9, 2, 2)),
        ("SpaceToDepth", {"blocksize": 2}, (2, 3, 4, 6)),
    ],
)
def test_pixel_shuffles(op, attrs, shape):
    """DepthToSpace (torch's PixelShuffle) and SpaceToDepth: forwards against onnx's reference."""
    x = rng.standard_normal(shape)
    (ours,), (theirs,) = run_op(op, [x], attrs), onnx_reference(op, [x], attrs, opset=13)
    np.testing.assert_array_equal(ours, theirs)
    check_vjp(op, [x], attrs)


def test_integer_division_truncates_toward_zero():
    """Exporters compute chunk sizes with int64 Div (torch.chunk); the result stays int64 and
    rounds toward zero, as ONNX and its reference say."""
    a, b = I64([7, -7, 9, 2]), I64([2, 2, -4, 3])
    (ours,) = run_op("Div", [a, b])
    (theirs,) = onnx_reference("Div", [a, b])
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, [3, -3, -2, 0])


def test_reduce_log_sum():
    x = np.abs(X) + 0.1
    for attrs, inputs in (({"keepdims": 0}, [x, I64([1])]), ({"axes": [0, 2]}, [x])):
        (ours,) = run_op("ReduceLogSum", inputs, attrs)
        (theirs,) = onnx_reference("ReduceLogSum", inputs, attrs, opset=18 if len(inputs) > 1 else 17)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)
        check_vjp("ReduceLogSum", inputs, attrs, opset=18 if len(inputs) > 1 else 17)


@pytest.mark.parametrize("shape", [(3, 3), (2, 4, 4), (2, 1, 2, 2)])
def test_det_forward_and_vjp(shape):
    import torch

    x = rng.standard_normal(shape)
    (ours,) = run_op("Det", [x])
    np.testing.assert_allclose(ours, torch.linalg.det(torch.from_numpy(x)).numpy(), rtol=1e-12)
    check_vjp("Det", [x])


def test_det_gradient_of_a_singular_matrix_is_the_adjugate():
    """At a singular matrix d det / dX = adj(X)^T, the cofactor matrix, which is not zero for rank
    n - 1. The oracle is the closed form from 2 x 2 minors: torch's own answer here depends on the
    CPU (zeros on an AMD EPYC, the adjugate on a Xeon), so it is no oracle at a singular point."""
    x = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.5, -1.0, 2.0]])  # rank 2
    cofactors = np.array(
        [[(-1) ** (i + j) * np.linalg.det(np.delete(np.delete(x, i, 0), j, 1)) for j in range(3)] for i in range(3)]
    )
    prog = compile_program([Node("n", "Det", ["x0"], ["y0"])], ["x0"], ["y0"], ["x0"])
    ours = backward(prog, forward(prog, {"x0": x}), {"y0": np.array(1.0)})["x0"]
    np.testing.assert_allclose(ours, cofactors, rtol=1e-10, atol=1e-12)
    assert np.abs(ours).max() > 1

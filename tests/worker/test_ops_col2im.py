"""Col2Im (opset 18): the forward against torch's F.fold (2-D) and onnx's reference (1-D to 3-D), the
VJP (im2col of the error) against finite differences in float64 and against torch's F.unfold, for
strides, dilations and symmetric and asymmetric pads."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_vjp, onnx_reference, run_op

# (image, block, dilations, pads (begin..., end...), strides)
CASES_2D = [
    ((8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (2, 2)),  # nn.Fold's usual overlapping windows
    ((6, 7), (2, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
    ((7, 9), (2, 3), (2, 1), (0, 2, 0, 2), (1, 3)),  # dilated, strided, padded along one dim
    ((5, 6), (2, 2), (1, 1), (0, 0, 0, 0), (2, 2)),  # non-overlapping patches
    ((9, 9), (3, 2), (2, 1), (2, 0, 2, 0), (2, 3)),  # the last window stops short of the last column
]
CASES_ASYMMETRIC = [
    ((7, 6), (3, 2), (1, 2), (1, 0, 2, 1), (2, 1)),
    ((6,), (3,), (2,), (0, 3), (1,)),
    ((4, 5, 3), (2, 3, 2), (1, 1, 2), (1, 0, 1, 0, 2, 1), (2, 1, 1)),
]


def windows(image, block, dilations, pads, strides) -> int:
    n = len(image)
    return math.prod(
        (i + pads[d] + pads[n + d] - (k - 1) * dl - 1) // s + 1
        for d, (i, k, dl, s) in enumerate(zip(image, block, dilations, strides))
    )


def make(case, channels=3, batch=2, seed=0, dtype=np.float64):
    image, block, dilations, pads, strides = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels * math.prod(block), windows(*case))).astype(dtype)
    ins = [x, np.array(image, np.int64), np.array(block, np.int64)]
    return ins, {"dilations": list(dilations), "pads": list(pads), "strides": list(strides)}


@pytest.mark.parametrize("case", CASES_2D)
def test_matches_torch_fold_and_unfold(case):
    image, block, dilations, pads, strides = case
    ins, attrs = make(case)
    y = run_op("Col2Im", ins, attrs)[0]
    kw = dict(kernel_size=block, dilation=dilations, padding=pads[:2], stride=strides)
    xt = torch.tensor(ins[0], requires_grad=True)
    yt = F.fold(xt, image, **kw)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    # the VJP is im2col of the error: torch's F.unfold, and torch autograd through F.fold
    from gradserve.worker.autodiff import backward, compile_program, forward
    from gradserve.worker.graph import Node

    node = Node("n", "Col2Im", ["x", "image", "block"], ["y"], attrs)
    prog = compile_program([node], ["x", "image", "block"], ["y"], ["x"])
    u = np.random.default_rng(1).standard_normal(y.shape)
    dx = backward(prog, forward(prog, {"x": ins[0], "image": ins[1], "block": ins[2]}), {"y": u})["x"]
    np.testing.assert_array_equal(dx, F.unfold(torch.tensor(u), **kw).numpy())
    yt.backward(torch.tensor(u))
    np.testing.assert_array_equal(dx, xt.grad.numpy())


@pytest.mark.parametrize("case", CASES_2D + CASES_ASYMMETRIC)
def test_matches_onnx_reference(case):
    ins, attrs = make(case)
    want = onnx_reference("Col2Im", ins, attrs, opset=18)[0]
    np.testing.assert_allclose(run_op("Col2Im", ins, attrs)[0], want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("case", CASES_2D + CASES_ASYMMETRIC)
def test_vjp(case):
    ins, attrs = make(case)
    check_vjp("Col2Im", ins, attrs, opset=18)


def test_default_attributes_and_float32():
    case = ((5, 4), (2, 3), (1, 1), (0, 0, 0, 0), (1, 1))
    ins, _ = make(case, dtype=np.float32)
    y = run_op("Col2Im", ins, {})[0]
    assert y.dtype == np.float32 and y.shape == (2, 3, 5, 4)
    np.testing.assert_allclose(y, F.fold(torch.tensor(ins[0]), (5, 4), (2, 3)).numpy(), rtol=1e-6)


def test_bad_shapes():
    ins, attrs = make(CASES_2D[0])
    with pytest.raises(Exception, match="does not hold blocks"):
        run_op("Col2Im", [ins[0][:, :, :-1], ins[1], ins[2]], attrs)
    with pytest.raises(Exception, match="Col2Im needs"):
        run_op("Col2Im", [ins[0], ins[1], np.array([3], np.int64)], attrs)

"""GridSample (opsets 16 and 20): forwards against torch's F.grid_sample and onnx's reference, VJPs (to X
and to the grid) against finite differences in float64 and against torch autograd, for every mode (both
spellings), padding mode and align_corners, in 1, 2 and 3 spatial dims."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_vjp, onnx_reference, run_op

OLD_MODES = {"linear": "bilinear", "nearest": "nearest", "cubic": "bicubic"}  # opset 16's spellings
PADDINGS = ["zeros", "border", "reflection"]
COMBOS = list(itertools.product(["linear", "nearest", "cubic"], PADDINGS, [0, 1]))


def make_grid(rng, n: int, spatial: tuple[int, ...], out: tuple[int, ...], align: int) -> np.ndarray:
    """A grid (n, *out, r) whose source coordinates lie between -3 and size+2 pixels, each a quarter or
    0.3 of a pixel from the nearest integer (+-0.05): away from the points where bilinear and bicubic
    switch taps (integers), where nearest rounds (halves), and from the clip and reflection borders
    (integers or halves), so the op is smooth within the finite-difference step."""
    coords = []
    for size in spatial[::-1]:  # the grid lists the last spatial axis first
        base = rng.integers(-3, size + 2, (n,) + out)
        u = base + rng.choice([0.25, 0.7], (n,) + out) + rng.uniform(-0.05, 0.05, (n,) + out)
        coords.append(2 * u / (size - 1) - 1 if align else (2 * u + 1) / size - 1)
    return np.stack(coords, axis=-1)


def attrs(mode: str, padding: str, align: int, old: bool = False) -> dict:
    return {"mode": OLD_MODES[mode] if old else mode, "padding_mode": padding, "align_corners": align}


def torch_grid_sample(x, grid, mode, padding, align):
    """X and the grid as torch leaves, and torch's F.grid_sample of them."""
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(grid, requires_grad=True)
    y = F.grid_sample(xt, gt, mode=OLD_MODES[mode], padding_mode=padding, align_corners=bool(align))
    return xt, gt, y


@pytest.mark.parametrize("mode,padding,align", COMBOS)
def test_forward_and_grads_match_torch_2d(mode, padding, align):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5, 6))
    grid = rng.uniform(-1.4, 1.4, (2, 4, 7, 2))  # arbitrary points, some outside the image
    for old in (False, True):
        y = run_op("GridSample", [x, grid], attrs(mode, padding, align, old))[0]
        xt, gt, yt = torch_grid_sample(x, grid, mode, padding, align)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    # the VJP through the engine against torch autograd
    from gradserve.worker.autodiff import backward, compile_program, forward
    from gradserve.worker.graph import Node

    node = Node("n", "GridSample", ["x", "g"], ["y"], attrs(mode, padding, align))
    prog = compile_program([node], ["x", "g"], ["y"], ["x", "g"])
    u = rng.standard_normal(y.shape)
    errs = backward(prog, forward(prog, {"x": x, "g": grid}), {"y": u})
    yt.backward(torch.tensor(u))
    np.testing.assert_allclose(errs["x"], xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(errs["g"], gt.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("align", [0, 1])
def test_forward_matches_torch_3d(mode, padding, align):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 2, 3, 4, 5))
    grid = rng.uniform(-1.3, 1.3, (2, 2, 3, 4, 3))
    y = run_op("GridSample", [x, grid], attrs(mode, padding, align))[0]
    _, _, yt = torch_grid_sample(x, grid, mode, padding, align)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_float32_keeps_dtype_and_matches_torch():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, (2, 5, 4, 2)).astype(np.float32)
    for mode, padding, align in COMBOS:
        y = run_op("GridSample", [x, grid], attrs(mode, padding, align))[0]
        assert y.dtype == np.float32
        _, _, yt = torch_grid_sample(x, grid, mode, padding, align)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial,out", [((7,), (5,)), ((4, 5), (3, 4)), ((3, 4, 3), (2, 2, 3))])
@pytest.mark.parametrize("mode,padding,align", COMBOS)
def test_forward_matches_onnx_reference(spatial, out, mode, padding, align):
    """onnx's reference computes coordinates in float32; it clamps the continuous coordinate before
    bicubic under border padding, where torch (and gradserve) clamp each tap, so that case is
    compared on points inside the image only."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2) + spatial)
    lim = 0.6 if (mode, padding) == ("cubic", "border") else 1.4
    grid = rng.uniform(-lim, lim, (2,) + out + (len(spatial),))
    a = attrs(mode, padding, align)
    want = onnx_reference("GridSample", [x, grid], a, opset=20)[0]
    np.testing.assert_allclose(run_op("GridSample", [x, grid], a)[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,padding,align", COMBOS)
def test_vjp_2d(mode, padding, align):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 5, 6))
    grid = make_grid(rng, 2, (5, 6), (4, 3), align)
    check_vjp("GridSample", [x, grid], attrs(mode, padding, align, old=True), opset=16)
    check_vjp("GridSample", [x, grid], attrs(mode, padding, align), opset=20)


@pytest.mark.parametrize("spatial,out", [((7,), (6,)), ((3, 4, 5), (2, 3, 2))])
@pytest.mark.parametrize("mode,padding,align", COMBOS)
def test_vjp_nd(spatial, out, mode, padding, align):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 2) + spatial)
    grid = make_grid(rng, 2, spatial, out, align)
    check_vjp("GridSample", [x, grid], attrs(mode, padding, align), opset=20)


def test_defaults_are_bilinear_zeros_not_aligned():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 2, 4, 4))
    grid = rng.uniform(-1.2, 1.2, (1, 3, 3, 2))
    y = run_op("GridSample", [x, grid], {})[0]
    _, _, yt = torch_grid_sample(x, grid, "linear", "zeros", 0)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_only_x_or_only_grid_wanted():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 2, 5, 4))
    grid = make_grid(rng, 2, (5, 4), (3, 3), 0)
    check_vjp("GridSample", [x, grid], attrs("cubic", "reflection", 0), wrt=[0], opset=20)
    check_vjp("GridSample", [x, grid], attrs("cubic", "reflection", 0), wrt=[1], opset=20)


def test_bad_attributes():
    x, grid = np.zeros((1, 1, 3, 3)), np.zeros((1, 2, 2, 2))
    with pytest.raises(Exception, match="mode"):
        run_op("GridSample", [x, grid], {"mode": "area"})
    with pytest.raises(Exception, match="GridSample needs"):
        run_op("GridSample", [x, np.zeros((1, 2, 2, 3))], {})


@pytest.mark.parametrize("padding", PADDINGS)
def test_integer_x_nearest(padding):
    """ONNX allows X of any type; nearest then gathers its values (linear and cubic are refused)."""
    rng = np.random.default_rng(9)
    x = rng.integers(-50, 50, (2, 3, 4, 5)).astype(np.int32)
    grid = rng.uniform(-1.4, 1.4, (2, 3, 4, 2)).astype(np.float32)
    a = attrs("nearest", padding, 0)
    y = run_op("GridSample", [x, grid], a)[0]
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, run_op("GridSample", [x.astype(np.float32), grid], a)[0].astype(np.int32))
    np.testing.assert_array_equal(y, onnx_reference("GridSample", [x, grid], a, opset=20)[0])
    with pytest.raises(Exception, match="needs floating X"):
        run_op("GridSample", [x, grid], attrs("linear", padding, 0))

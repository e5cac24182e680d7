import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_vjp, onnx_reference, run_op
from gradserve.worker.ops import blas
from gradserve.worker.ops import conv as conv_mod

rng = np.random.default_rng(0)


def torch_conv(x, w, b, attrs):
    """torch reference for explicit pads (asymmetric pads applied with F.pad)."""
    n = x.ndim - 2
    pads = attrs.get("pads", [0] * 2 * n)
    tx = torch.from_numpy(x)
    pad_arg = []
    for d in reversed(range(n)):
        pad_arg += [pads[d], pads[n + d]]
    tx = F.pad(tx, pad_arg)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return fn(
        tx,
        torch.from_numpy(w),
        None if b is None else torch.from_numpy(b),
        stride=attrs.get("strides", 1),
        dilation=attrs.get("dilations", 1),
        groups=attrs.get("group", 1),
    ).numpy()


# (C, M, kernel, attrs)
CASES = {
    "plain": (3, 4, (3, 3), {}),
    "pad1": (3, 4, (3, 3), {"pads": [1, 1, 1, 1]}),
    "stride2": (3, 4, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "asym_pads": (2, 3, (3, 2), {"pads": [0, 1, 2, 0]}),
    "dilation2": (2, 3, (3, 3), {"dilations": [2, 2], "pads": [2, 1, 2, 1]}),
    "stride_dilation": (2, 2, (2, 3), {"strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 0, 2]}),
    "group2": (4, 6, (3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    "depthwise": (4, 4, (3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    "depthwise_x2_stride2": (3, 6, (3, 3), {"group": 3, "strides": [2, 2]}),
    "pointwise": (4, 5, (1, 1), {}),
    "pointwise_stride2": (4, 5, (1, 1), {"strides": [2, 2]}),
    "kernel_not_reaching_end": (2, 2, (2, 2), {"strides": [3, 3]}),
    # no more output than input channels: the channel-major path gathers dX instead of col2im
    "fewer_out_pad1": (4, 3, (3, 3), {"pads": [1, 1, 1, 1]}),
    "fewer_out_asym_dilation": (5, 2, (3, 2), {"dilations": [2, 1], "pads": [2, 0, 1, 1]}),
    "fewer_out_big_pads": (3, 3, (2, 3), {"pads": [3, 0, 1, 4]}),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_vjp_and_forward(name, bias):
    c_in, m, k, attrs = CASES[name]
    x = rng.standard_normal((2, c_in, 7, 8))
    w = rng.standard_normal((m, c_in // attrs.get("group", 1)) + k)
    b = rng.standard_normal(m) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    check_vjp("Conv", inputs, attrs)
    y = run_op("Conv", inputs, attrs)[0]
    np.testing.assert_allclose(y, torch_conv(x, w, b, attrs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("strides,dilations", [([1, 1], [1, 1]), ([2, 2], [1, 1]), ([2, 3], [2, 1])])
def test_conv_auto_pad(auto_pad, strides, dilations):
    x = rng.standard_normal((2, 2, 7, 8))
    w = rng.standard_normal((3, 2, 3, 2))
    attrs = {"auto_pad": auto_pad, "strides": strides, "dilations": dilations}
    check_vjp("Conv", [x, w], attrs)
    if dilations == [1, 1]:  # the ONNX reference ignores dilations when computing SAME pads
        np.testing.assert_allclose(
            run_op("Conv", [x, w], attrs)[0], onnx_reference("Conv", [x, w], attrs)[0], rtol=1e-10, atol=1e-10
        )


def test_conv1d_and_conv3d():
    x1, w1 = rng.standard_normal((2, 3, 9)), rng.standard_normal((4, 3, 3))
    attrs1 = {"strides": [2], "pads": [1, 2], "dilations": [2]}
    check_vjp("Conv", [x1, w1, rng.standard_normal(4)], attrs1)
    np.testing.assert_allclose(
        run_op("Conv", [x1, w1], attrs1)[0], torch_conv(x1, w1, None, attrs1), rtol=1e-10, atol=1e-10
    )
    x3, w3 = rng.standard_normal((1, 2, 4, 5, 4)), rng.standard_normal((2, 1, 2, 3, 2))
    attrs3 = {"group": 2, "pads": [1, 1, 0, 0, 1, 1]}
    check_vjp("Conv", [x3, w3], attrs3)
    np.testing.assert_allclose(
        run_op("Conv", [x3, w3], attrs3)[0], torch_conv(x3, w3, None, attrs3), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"strides": [2, 2], "pads": [1, 0, 1, 0]}])
def test_conv_many_blocks(monkeypatch, attrs):
    """Tiny blocks: columns are built and scattered in many pieces (both the shifted and the general path)."""
    monkeypatch.setattr(conv_mod, "_BLOCK_ELEMS", 64)
    x, w, b = rng.standard_normal((3, 2, 6, 7)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    check_vjp("Conv", [x, w, b], attrs)
    np.testing.assert_allclose(run_op("Conv", [x, w, b], attrs)[0], torch_conv(x, w, b, attrs), rtol=1e-10, atol=1e-10)


def test_conv_first_layer_skips_input_error():
    # only W and B want errors (the data input is a feed): dX is not computed, dW/dB still right
    x, w, b = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    check_vjp("Conv", [x, w, b], {"pads": [1, 1, 1, 1]}, wrt=[1, 2])
    check_vjp("Conv", [x, w, b], {"pads": [1, 1, 1, 1]}, wrt=[0])


def test_conv_float32_matches_torch_and_keeps_dtype():
    x = rng.standard_normal((4, 8, 12, 12)).astype(np.float32)
    w = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    y = run_op("Conv", [x, w, b], {"pads": [1, 1, 1, 1]})[0]
    assert y.dtype == np.float32
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "attrs,w_shape,match",
    [
        ({"group": 2}, (4, 3, 3, 3), "group"),
        ({"kernel_shape": [2, 2]}, (4, 3, 3, 3), "kernel_shape"),
        ({"pads": [1, 1]}, (4, 3, 3, 3), "pads"),
        ({"auto_pad": "BOGUS"}, (4, 3, 3, 3), "auto_pad"),
    ],
)
def test_conv_bad_attributes(attrs, w_shape, match):
    with pytest.raises(Exception, match=match):
        run_op("Conv", [rng.standard_normal((1, 3, 5, 5)), rng.standard_normal(w_shape)], attrs)


def test_conv_grads_match_torch_across_calls():
    """Repeated VJPs of different shapes reuse scratch buffers: no stale values may leak in."""
    from gradserve.worker.autodiff import backward, compile_program, forward
    from gradserve.worker.graph import Node

    for shape, attrs in [
        ((2, 3, 9, 8), {"pads": [1, 1, 1, 1]}),
        ((3, 3, 6, 7), {"pads": [1, 2, 0, 1]}),
        ((2, 3, 9, 8), {"pads": [1, 1, 1, 1]}),
        ((2, 3, 9, 8), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ]:
        x, w, b = rng.standard_normal(shape), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
        prog = compile_program(
            [Node("c", "Conv", ["x", "w", "b"], ["y"], attrs)], ["x", "w", "b"], ["y"], ["x", "w", "b"]
        )
        tape = forward(prog, {"x": x, "w": w, "b": b})
        g = rng.standard_normal(tape.outputs["y"].shape)
        errs = backward(prog, tape, {"y": g})
        ts = [torch.from_numpy(a).requires_grad_() for a in (x, w, b)]
        pads = attrs["pads"]
        ty = F.conv2d(F.pad(ts[0], [pads[1], pads[3], pads[0], pads[2]]), ts[1], ts[2], stride=attrs.get("strides", 1))
        ty.backward(torch.from_numpy(g))
        for name, t in zip("xwb", ts):
            np.testing.assert_allclose(errs[name], t.grad.numpy(), rtol=1e-10, atol=1e-10)


PATHS = ["columns", "direct"]


def use_path(monkeypatch, path):
    """Steer Conv onto one of its two code paths: the channel-major column matrix, or the direct sum
    of GEMMs over shifted views (stride 1, when the strided BLAS is there), the latter in tiny
    blocks so products cross block boundaries.
    Returns a list that collects one entry per direct forward, to show the path really ran."""
    monkeypatch.setattr(conv_mod, "_DIRECT_MIN_CHANNELS", 1 if path == "direct" else 1 << 30)
    monkeypatch.setattr(conv_mod, "_DIRECT_MIN_BLOCK", 16)
    monkeypatch.setattr(conv_mod, "_DIRECT_BLOCK_BYTES", 64)
    calls = []
    real = conv_mod._direct_forward
    monkeypatch.setattr(conv_mod, "_direct_forward", lambda *a: calls.append(1) or real(*a))
    return calls


def test_strided_blas_is_available_here():
    """The direct path must not silently fall back on the machines we benchmark on."""
    assert blas.available(np.float32) and blas.available(np.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_conv2d_all_paths(monkeypatch, name, path):
    """Every case through every path, with and without dX (``wrt=[1, 2]``: a first layer's VJP);
    direct: only stride-1 cases, the others fall back to columns."""
    direct_calls = use_path(monkeypatch, path)
    c_in, m, k, attrs = CASES[name]
    x = rng.standard_normal((3, c_in, 7, 8))
    w = rng.standard_normal((m, c_in // attrs.get("group", 1)) + k)
    b = rng.standard_normal(m)
    check_vjp("Conv", [x, w, b], attrs)
    check_vjp("Conv", [x, w, b], attrs, wrt=[1, 2])
    check_vjp("Conv", [x, w], attrs)
    np.testing.assert_allclose(run_op("Conv", [x, w, b], attrs)[0], torch_conv(x, w, b, attrs), rtol=1e-10, atol=1e-10)
    stride1 = all(s == 1 for s in attrs.get("strides", [1, 1]))
    assert bool(direct_calls) == (path == "direct" and stride1)


@pytest.mark.parametrize("path", PATHS)
def test_conv_1d_3d_auto_pad_all_paths(monkeypatch, path):
    direct_calls = use_path(monkeypatch, path)
    x1, w1 = rng.standard_normal((2, 3, 9)), rng.standard_normal((4, 3, 3))
    for attrs1 in ({"strides": [2], "pads": [1, 2], "dilations": [2]}, {"pads": [2, 1], "dilations": [2]}):
        check_vjp("Conv", [x1, w1, rng.standard_normal(4)], attrs1)
        np.testing.assert_allclose(
            run_op("Conv", [x1, w1], attrs1)[0], torch_conv(x1, w1, None, attrs1), rtol=1e-10, atol=1e-10
        )
    x3, w3 = rng.standard_normal((2, 2, 4, 5, 4)), rng.standard_normal((3, 2, 2, 3, 2))
    attrs3 = {"pads": [1, 1, 0, 0, 1, 1]}
    check_vjp("Conv", [x3, w3, rng.standard_normal(3)], attrs3)
    np.testing.assert_allclose(
        run_op("Conv", [x3, w3], attrs3)[0], torch_conv(x3, w3, None, attrs3), rtol=1e-10, atol=1e-10
    )
    x = rng.standard_normal((2, 2, 7, 8))
    w = rng.standard_normal((3, 2, 3, 2))
    for auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        check_vjp("Conv", [x, w], {"auto_pad": auto_pad})
    assert bool(direct_calls) == (path == "direct")


@pytest.mark.parametrize("path", PATHS)
def test_conv_float32_grads_match_torch_all_paths(monkeypatch, path):
    direct_calls = use_path(monkeypatch, path)
    monkeypatch.setattr(conv_mod, "_BLOCK_ELEMS", 4096)  # several column blocks
    from gradserve.worker.autodiff import backward, compile_program, forward
    from gradserve.worker.graph import Node

    x = rng.standard_normal((9, 3, 10, 10)).astype(np.float32)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    attrs = {"pads": [1, 1, 1, 1]}
    prog = compile_program([Node("n", "Conv", ["x", "w", "b"], ["y"], attrs)], ["x", "w", "b"], ["y"], ["x", "w", "b"])
    tape = forward(prog, {"x": x, "w": w, "b": b})
    g = rng.standard_normal(tape.outputs["y"].shape).astype(np.float32)
    errs = backward(prog, tape, {"y": g})
    tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    ty = F.conv2d(tx, tw, tb, padding=1)
    ty.backward(torch.from_numpy(g))
    np.testing.assert_allclose(tape.outputs["y"], ty.detach().numpy(), rtol=1e-4, atol=1e-4)
    for name, t in (("x", tx), ("w", tw), ("b", tb)):
        assert errs[name].dtype == np.float32
        np.testing.assert_allclose(errs[name], t.grad.numpy(), rtol=1e-4, atol=1e-3)
    assert bool(direct_calls) == (path == "direct")


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"pads": [2, 1, 0, 2], "dilations": [1, 2]}])
def test_conv_gathered_input_error_many_blocks(monkeypatch, attrs):
    """The channel-major path with M <= C gathers dX (shifted copies of the error, one matmul into
    the input grid); tiny blocks make the shifted reads cross block and image boundaries."""
    calls = []
    real = conv_mod._gather_dx
    monkeypatch.setattr(conv_mod, "_gather_dx", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(conv_mod, "_BLOCK_ELEMS", 64)
    x, w, b = rng.standard_normal((3, 4, 6, 7)), rng.standard_normal((3, 4, 3, 3)), rng.standard_normal(3)
    check_vjp("Conv", [x, w, b], attrs)
    assert calls
    np.testing.assert_allclose(run_op("Conv", [x, w, b], attrs)[0], torch_conv(x, w, b, attrs), rtol=1e-10, atol=1e-10)

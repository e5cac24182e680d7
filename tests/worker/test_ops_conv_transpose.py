"""ConvTranspose: forward against torch's conv_transpose (with pads and output_padding applied by
cropping / extending its unpadded result) and a naive loop; VJPs by finite differences in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_vjp, run_op

rng = np.random.default_rng(0)


def torch_conv_transpose(x, w, b, attrs):
    """torch oracle: the full (unpadded) transposed conv, extended by output_padding zeros at the end,
    then cropped by the begin/end pads (which torch only takes symmetric)."""
    n = x.ndim - 2
    group = attrs.get("group", 1)
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    y = fn(
        torch.from_numpy(x),
        torch.from_numpy(w),
        stride=attrs.get("strides", 1),
        dilation=attrs.get("dilations", 1),
        groups=group,
    ).numpy()
    y = np.pad(y, [(0, 0), (0, 0)] + [(0, p) for p in attrs.get("output_padding", [0] * n)])
    pads = attrs.get("pads", [0] * 2 * n)
    y = y[(slice(None), slice(None)) + tuple(slice(pads[d], y.shape[2 + d] - pads[n + d]) for d in range(n))]
    return y if b is None else y + b.reshape((1, -1) + (1,) * n)


# (C in, M out, spatial, kernel, attrs)
CASES = {
    "plain": (3, 4, (5, 4), (3, 3), {}),
    "stride2": (3, 4, (5, 4), (3, 3), {"strides": [2, 2]}),
    "stride2_pads_outpad": (3, 5, (4, 5), (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    "asym_pads": (2, 3, (4, 4), (3, 2), {"strides": [2, 1], "pads": [1, 0, 0, 1]}),
    "group2_outpad": (
        4,
        6,
        (5, 4),
        (3, 2),
        {"group": 2, "strides": [2, 2], "pads": [1, 0, 1, 1], "output_padding": [1, 0]},
    ),
    "depthwise": (4, 4, (5, 5), (3, 3), {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "dilation": (3, 4, (5, 4), (3, 3), {"dilations": [2, 1], "strides": [1, 2]}),
    "dilation_outpad": (2, 2, (4, 4), (2, 2), {"dilations": [3, 2], "output_padding": [2, 1]}),
    "stride1_pads_many_channels": (20, 24, (5, 4), (3, 3), {"pads": [1, 1, 1, 1]}),  # the direct BLAS path
    "pointwise": (5, 6, (3, 3), (1, 1), {"strides": [2, 2]}),
    "stride4_kernel2": (2, 3, (3, 3), (2, 2), {"strides": [4, 3]}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_torch(name):
    c, m, spatial, kernel, attrs = CASES[name]
    group = attrs.get("group", 1)
    x = rng.standard_normal((2, c) + spatial)
    w = rng.standard_normal((c, m // group) + kernel)
    b = rng.standard_normal(m)
    np.testing.assert_allclose(
        run_op("ConvTranspose", [x, w, b], attrs)[0], torch_conv_transpose(x, w, b, attrs), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        run_op("ConvTranspose", [x, w], attrs)[0], torch_conv_transpose(x, w, None, attrs), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("name", list(CASES))
def test_vjp(name):
    c, m, spatial, kernel, attrs = CASES[name]
    group = attrs.get("group", 1)
    x = rng.standard_normal((2, c) + spatial)
    w = rng.standard_normal((c, m // group) + kernel)
    check_vjp("ConvTranspose", [x, w, rng.standard_normal(m)], attrs)
    check_vjp("ConvTranspose", [x, w], attrs)
    check_vjp("ConvTranspose", [x, w], attrs, wrt=[1])  # dW alone (no dX)
    check_vjp("ConvTranspose", [x, w], attrs, wrt=[0])


def test_naive_loop():
    """A loop straight from the definition: each input pixel scatters W into the output."""
    x = rng.standard_normal((2, 4, 3, 4))
    w = rng.standard_normal((4, 3, 3, 2))
    s, d, p, group = (2, 1), (1, 2), (1, 0, 0, 1), 2
    y = run_op("ConvTranspose", [x, w], {"strides": s, "dilations": d, "pads": p, "group": group})[0]
    n, c, h, wd = x.shape
    mg, cg = w.shape[1], c // group
    full = np.zeros((n, mg * group, s[0] * (h - 1) + 2 * d[0] + 1, s[1] * (wd - 1) + d[1] + 1))
    for ci in range(c):
        for mi in range(mg):
            for i in range(h):
                for j in range(wd):
                    for a in range(3):
                        for e in range(2):
                            full[:, ci // cg * mg + mi, i * s[0] + a * d[0], j * s[1] + e * d[1]] += (
                                x[:, ci, i, j] * w[ci, mi, a, e]
                            )
    np.testing.assert_allclose(y, full[:, :, p[0] : full.shape[2] - p[2], p[1] : full.shape[3] - p[3]], atol=1e-12)


@pytest.mark.parametrize("n_sp", [1, 3])
def test_1d_3d(n_sp):
    spatial, kernel = (5, 4, 3)[:n_sp], (3, 2, 2)[:n_sp]
    attrs = {"strides": [2] * n_sp, "pads": [1] * n_sp + [0] * n_sp, "output_padding": [1] * n_sp, "group": 2}
    x = rng.standard_normal((2, 4) + spatial)
    w = rng.standard_normal((4, 3) + kernel)
    b = rng.standard_normal(6)
    np.testing.assert_allclose(
        run_op("ConvTranspose", [x, w, b], attrs)[0], torch_conv_transpose(x, w, b, attrs), atol=1e-12
    )
    check_vjp("ConvTranspose", [x, w, b], attrs)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad(auto_pad):
    """SAME_*: output = input * stride, the odd cropped pixel at the end (UPPER) or start (LOWER)."""
    x = rng.standard_normal((2, 3, 4, 5))
    w = rng.standard_normal((3, 2, 3, 4))
    attrs = {"strides": [2, 2], "auto_pad": auto_pad}
    y = run_op("ConvTranspose", [x, w], attrs)[0]
    full = torch_conv_transpose(x, w, None, {"strides": [2, 2]})  # (9, 12)
    if auto_pad == "VALID":
        want = full
    else:
        total = [full.shape[2] - 8, full.shape[3] - 10]  # 1, 2
        lo = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
        want = full[:, :, lo[0] : lo[0] + 8, lo[1] : lo[1] + 10]
    np.testing.assert_allclose(y, want, atol=1e-12)
    check_vjp("ConvTranspose", [x, w], attrs)


def test_output_shape():
    """output_shape derives the pads (ignoring any given); here 1 row of total crop, 2 columns."""
    x = rng.standard_normal((2, 3, 4, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    attrs = {"strides": [2, 2], "output_shape": [8, 9], "pads": [5, 5, 5, 5]}
    y = run_op("ConvTranspose", [x, w], attrs)[0]
    full = torch_conv_transpose(x, w, None, {"strides": [2, 2]})  # (9, 11)
    np.testing.assert_allclose(y, full[:, :, 1:9, 1:10], atol=1e-12)  # start gets the larger half
    check_vjp("ConvTranspose", [x, w, rng.standard_normal(2)], attrs)
    # with output_padding counted in the size the output can reach
    attrs = {"strides": [2, 2], "output_shape": [10, 12], "output_padding": [1, 1]}
    assert run_op("ConvTranspose", [x, w], attrs)[0].shape == (2, 2, 10, 12)
    check_vjp("ConvTranspose", [x, w], attrs)


def test_float32_keeps_dtype_and_matches():
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    w = rng.standard_normal((8, 8, 4, 4)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    attrs = {"strides": [2, 2], "pads": [1, 1, 1, 1]}
    y = run_op("ConvTranspose", [x, w, b], attrs)[0]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, torch_conv_transpose(x, w, b, attrs), rtol=1e-4, atol=1e-4)


def test_refuses_bad_attributes():
    x = rng.standard_normal((1, 2, 3, 3))
    w = rng.standard_normal((2, 2, 3, 3))
    with pytest.raises(Exception, match="larger than ConvTranspose can produce"):
        run_op("ConvTranspose", [x, w], {"output_shape": [20, 20]})
    with pytest.raises(Exception, match="incompatible with group"):
        run_op("ConvTranspose", [x, rng.standard_normal((3, 2, 3, 3))], {})


def test_output_padding_beyond_stride():
    """output_padding at least the stride (allowed with dilation): rows no input reaches, bias only."""
    x = rng.standard_normal((2, 2, 4, 4))
    w = rng.standard_normal((2, 3, 2, 2))
    b = rng.standard_normal(3)
    attrs = {"dilations": [3, 2], "output_padding": [2, 1], "pads": [0, 0, 1, 0]}
    y = run_op("ConvTranspose", [x, w, b], attrs)[0]
    full = torch_conv_transpose(x, w, None, {"dilations": [3, 2]})
    want = np.pad(full, [(0, 0), (0, 0), (0, 2), (0, 1)])[:, :, :-1] + b.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(y, want, atol=1e-12)
    check_vjp("ConvTranspose", [x, w, b], attrs)

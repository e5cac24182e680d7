"""Resize and Upsample: forwards against onnx's reference implementation and torch's F.interpolate,
VJPs by finite differences in float64 for every mode, coordinate mode and input form."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_vjp, onnx_reference, run_op

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3, 8, 6))

UP_SCALES = np.array([1, 1, 2, 1.5], np.float32)
DOWN_SCALES = np.array([1, 1, 0.25, 0.5], np.float32)  # exact in float32, as are the output sizes
UP_SIZES = np.array([2, 3, 11, 9], np.int64)
DOWN_SIZES = np.array([2, 3, 3, 4], np.int64)
FORMS = {
    "up_scales": (UP_SCALES, None),
    "down_scales": (DOWN_SCALES, None),
    "up_sizes": (None, UP_SIZES),
    "down_sizes": (None, DOWN_SIZES),
}
COORDS = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "half_pixel_symmetric"]
NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]


def inputs(x, roi=None, scales=None, sizes=None):
    """Resize's inputs with absent ones as None, trailing ones dropped."""
    ins = [x, roi, scales, sizes]
    while ins[-1] is None:
        ins.pop()
    return ins


def check(ins, attrs, opset=19, rtol=1e-12, check_shapes=True):
    """Forward against the onnx reference, VJP against finite differences."""
    y = run_op("Resize", ins, attrs)[0]
    want = onnx_reference("Resize", ins, attrs, opset=opset)[0]
    assert y.shape == want.shape and y.dtype == ins[0].dtype
    np.testing.assert_allclose(y, want, rtol=rtol, atol=rtol)
    check_vjp("Resize", ins, attrs, opset=opset, check_shapes=check_shapes)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("coord", COORDS[:4])
@pytest.mark.parametrize("nearest_mode", NEAREST)
def test_nearest(nearest_mode, coord, form):
    scales, sizes = FORMS[form]
    check(
        inputs(X, None, scales, sizes),
        {"mode": "nearest", "coordinate_transformation_mode": coord, "nearest_mode": nearest_mode},
    )


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("coord", COORDS)
@pytest.mark.parametrize("exclude_outside", [0, 1])
def test_linear(coord, form, exclude_outside):
    scales, sizes = FORMS[form]
    check(
        inputs(X, None, scales, sizes),
        {"mode": "linear", "coordinate_transformation_mode": coord, "exclude_outside": exclude_outside},
    )


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("coord", COORDS)
@pytest.mark.parametrize("exclude_outside", [0, 1])
def test_cubic(coord, form, exclude_outside):
    scales, sizes = FORMS[form]
    attrs = {
        "mode": "cubic",
        "coordinate_transformation_mode": coord,
        "exclude_outside": exclude_outside,
        "cubic_coeff_a": -0.5,
    }
    # the reference computes the cubic weights in float32 (its cubic_coeff_a is a float32)
    check(inputs(X, None, scales, sizes), attrs, rtol=1e-5)


def test_half_pixel_symmetric_nearest():
    check(inputs(X, None, UP_SCALES), {"mode": "nearest", "coordinate_transformation_mode": "half_pixel_symmetric"})


def test_fractional_output_width():
    """in * scale not an integer (7 * 0.5 = 3.5 -> 3): align_corners divides by the integer output
    length as the spec (and onnxruntime) say, where onnx's reference divides by 3.5;
    half_pixel_symmetric centres the output: x = offset + (o + 0.5) / scale - 0.5,
    offset = in / 2 * (1 - 3 / 3.5)."""
    x = np.arange(7.0).reshape(1, 1, 1, 7)
    scales = np.array([1, 1, 1, 0.5], np.float32)
    y = run_op("Resize", [x, None, scales], {"mode": "linear", "coordinate_transformation_mode": "align_corners"})[0]
    np.testing.assert_allclose(y.ravel(), [0, 3, 6])
    y = run_op(
        "Resize", [x, None, scales], {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}
    )[0]
    np.testing.assert_allclose(y.ravel(), [1, 3, 5])  # offset 0.5: x = 2 o + 1
    for coord in ("align_corners", "half_pixel_symmetric"):
        check_vjp(
            "Resize",
            [rng.standard_normal((2, 2, 5, 7)), None, np.array([1, 1, 0.7, 0.5], np.float32)],
            {"mode": "linear", "coordinate_transformation_mode": coord},
        )


@pytest.mark.parametrize("policy", ["stretch", "not_larger", "not_smaller"])
def test_axes_and_aspect_ratio(policy):
    """opset 18+: axes name the resized dims (negative allowed); sizes keep the aspect ratio."""
    attrs = {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": policy}
    check(inputs(X, None, None, np.array([11, 9], np.int64)), attrs)
    check(inputs(X, None, None, np.array([3, 4], np.int64)), {**attrs, "mode": "nearest"})
    check(inputs(X, None, np.array([1.5, 0.5], np.float32)), {"mode": "linear", "axes": [3, 2]})
    # negative axes (which the reference does not take) mean the same
    sizes = np.array([11, 9], np.int64)
    np.testing.assert_array_equal(
        run_op("Resize", [X, None, None, sizes], {**attrs, "axes": [-2, -1]})[0],
        run_op("Resize", [X, None, None, sizes], attrs)[0],
    )


def test_opset13_forms():
    """opset 13: roi is always in the input list, often as an empty tensor; scales may be an empty
    tensor when sizes are given."""
    empty = np.zeros(0, np.float32)
    attrs = {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}
    check([X, empty, UP_SCALES], attrs, opset=13)
    # (ONNX shape inference takes an empty scales *graph input* as given, unlike an empty initializer)
    check([X, empty, empty, UP_SIZES], attrs, opset=13, check_shapes=False)
    check([X, None, None, DOWN_SIZES], {"mode": "nearest"}, opset=13)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_tf_crop_and_resize(mode):
    roi = np.array([0, 0, -0.2, 0.15, 1, 1, 0.9, 1.3], np.float32)  # partly outside: extrapolated
    attrs = {"mode": mode, "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 0.25}
    # (the reference computes the source coordinates from the float32 roi in float32)
    check(inputs(X, roi, None, np.array([2, 3, 6, 8], np.int64)), attrs, rtol=1e-5)


def test_resize_other_axes_and_identity():
    """Batch/channel axes resized too; a resize to the same size copies."""
    check(inputs(X, None, np.array([2, 0.5, 1, 1], np.float32)), {"mode": "nearest"})
    y = run_op("Resize", [X, None, np.ones(4, np.float32)], {"mode": "linear"})[0]
    np.testing.assert_array_equal(y, X)
    check_vjp("Resize", [X, None, np.ones(4, np.float32)], {"mode": "linear"})


def test_1d_3d():
    x1 = rng.standard_normal((2, 3, 6))
    check(inputs(x1, None, np.array([1, 1, 2.5], np.float32)), {"mode": "linear"})
    x3 = rng.standard_normal((1, 2, 3, 4, 5))
    check(inputs(x3, None, None, np.array([1, 2, 5, 3, 7], np.int64)), {"mode": "linear"})


def test_integer_input_and_float32():
    xi = np.arange(24, dtype=np.int64).reshape(1, 2, 3, 4)
    y = run_op("Resize", [xi, None, UP_SCALES], {"mode": "nearest"})[0]
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, onnx_reference("Resize", [xi, None, UP_SCALES], {"mode": "nearest"}, opset=19)[0])
    x32 = X.astype(np.float32)
    y = run_op("Resize", [x32, None, UP_SCALES], {"mode": "linear"})[0]
    assert y.dtype == np.float32
    np.testing.assert_allclose(
        y, onnx_reference("Resize", [x32, None, UP_SCALES], {"mode": "linear"}, opset=19)[0], rtol=1e-5, atol=1e-6
    )


def test_antialias():
    """antialias=1 changes nothing when upsampling, and is refused when downsampling."""
    attrs = {"mode": "linear", "antialias": 1}
    check(inputs(X, None, UP_SCALES), attrs)
    with pytest.raises(Exception, match="antialias"):
        run_op("Resize", [X, None, DOWN_SCALES], attrs)


def test_refuses_bad_inputs():
    with pytest.raises(Exception, match="exactly one of scales and sizes"):
        run_op("Resize", [X, None, UP_SCALES, UP_SIZES], {})
    with pytest.raises(Exception, match="unknown"):
        run_op("Resize", [X, None, UP_SCALES], {"mode": "area"})


# -- against torch's F.interpolate ----------------------------------------------------------------------
TORCH_CASES = {
    # name: (F.interpolate kwargs, Resize attrs)
    "nearest": (
        {"mode": "nearest"},
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
    ),
    "nearest_exact": (
        {"mode": "nearest-exact"},
        {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_ceil"},
    ),
    "bilinear": (
        {"mode": "bilinear", "align_corners": False},
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
    ),
    "bilinear_align": (
        {"mode": "bilinear", "align_corners": True},
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
    ),
    "bicubic": (
        {"mode": "bicubic", "align_corners": False},
        {"mode": "cubic", "coordinate_transformation_mode": "pytorch_half_pixel"},
    ),
    "bicubic_align": (
        {"mode": "bicubic", "align_corners": True},
        {"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
    ),
}


@pytest.mark.parametrize("size", [(10, 14), (3, 4), (8, 3)])
@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_against_torch(name, size):
    kwargs, attrs = TORCH_CASES[name]
    want = F.interpolate(torch.from_numpy(X), size=size, **kwargs).numpy()
    y = run_op("Resize", [X, None, None, np.array((2, 3) + size, np.int64)], attrs)[0]
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)


def test_upsample():
    """Upsample (opset 9): Resize with asymmetric coordinates, floor for nearest."""
    scales = np.array([1, 1, 2, 3], np.float32)
    for mode in ("nearest", "linear"):
        y = run_op("Upsample", [X, scales], {"mode": mode})[0]
        want = F.interpolate(
            torch.from_numpy(X),
            scale_factor=(2, 3),
            mode="nearest" if mode == "nearest" else "bilinear",
            align_corners=None if mode == "nearest" else False,
        ).numpy()
        if mode == "nearest":
            np.testing.assert_array_equal(y, want)
            np.testing.assert_array_equal(y, onnx_reference("Upsample", [X, scales], {"mode": mode}, opset=9)[0])
        else:  # asymmetric, not torch's half-pixel: compare with Resize itself
            np.testing.assert_array_equal(
                y,
                run_op("Resize", [X, None, scales], {"mode": "linear", "coordinate_transformation_mode": "asymmetric"})[
                    0
                ],
            )
        check_vjp("Upsample", [X, scales], {"mode": mode}, opset=9)

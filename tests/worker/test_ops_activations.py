"""Activations, trigonometric/hyperbolic, piecewise-constant and integer elementwise ops, Mod and
CastLike: VJPs against finite differences (float64, inputs away from kinks and inside domains),
forwards against torch or onnx's reference implementation, dtypes kept, and the ops without a
derivative registered without a VJP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_vjp, onnx_reference, run_op
from gradserve.worker.ops import OpContext, get_op

SHAPE = (4, 5)


def away_from(points, shape=SHAPE, scale=3.0, gap=0.05, seed=0):
    """Standard normal values times ``scale``, nudged at least ``gap`` away from every kink in ``points``
    (so the central differences never straddle one)."""
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    for p in points:
        near = np.abs(x - p) < gap
        x[near] = p + np.where(x[near] >= p, gap, -gap) * 2
    return x


def fwd(op_type, inputs, attrs=None):
    return run_op(op_type, inputs, attrs)[0]


# -- finite differences ----------------------------------------------------------------------------------
# (op, attrs, kinks to avoid or a generator of inputs, opset for the shape check)
UNARY = [
    ("HardSwish", {}, [-3.0, 3.0], 17),
    ("HardSigmoid", {}, [-2.5, 2.5], 17),
    ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}, [-3.0, 3.0], 17),
    ("HardSigmoid", {"alpha": -0.7, "beta": 0.2}, [0.2 / 0.7, -0.8 / 0.7], 17),
    ("Elu", {}, [0.0], 17),
    ("Elu", {"alpha": 0.3}, [0.0], 17),
    ("Elu", {"alpha": -0.5}, [0.0], 17),  # the negative branch is positive: the VJP uses a saved mask
    ("Selu", {}, [0.0], 17),
    ("Selu", {"alpha": 2.0, "gamma": 0.5}, [0.0], 17),
    ("Selu", {"alpha": 1.5, "gamma": -2.0}, [0.0], 17),
    ("Celu", {}, [0.0], 17),
    ("Celu", {"alpha": 2.5}, [0.0], 17),
    ("Celu", {"alpha": -1.5}, [0.0], 17),
    ("ThresholdedRelu", {}, [1.0], 17),
    ("ThresholdedRelu", {"alpha": -0.5}, [-0.5], 17),
    ("Softsign", {}, [], 17),
    ("Mish", {}, [], 18),
    ("Gelu", {}, [], 20),
    ("Gelu", {"approximate": "none"}, [], 20),
    ("Gelu", {"approximate": "tanh"}, [], 20),
    ("Shrink", {}, [-0.5, 0.5], 17),
    ("Shrink", {"lambd": 1.5, "bias": 0.7}, [-1.5, 1.5], 17),
    ("Sin", {}, [], 17),
    ("Cos", {}, [], 17),
    ("Atan", {}, [], 17),
    ("Sinh", {}, [], 17),
    ("Cosh", {}, [], 17),
    ("Asinh", {}, [], 17),
]


@pytest.mark.parametrize("op,attrs,kinks,opset", UNARY, ids=lambda v: str(v) if isinstance(v, (str, dict)) else "")
def test_unary_vjp(op, attrs, kinks, opset):
    check_vjp(op, [away_from(kinks)], attrs, opset=opset)


# Ops with a restricted domain: inputs drawn inside it.
rng = np.random.default_rng(1)
DOMAIN = {
    "Tan": rng.uniform(-1.4, 1.4, SHAPE),
    "Asin": rng.uniform(-0.95, 0.95, SHAPE),
    "Acos": rng.uniform(-0.95, 0.95, SHAPE),
    "Acosh": rng.uniform(1.05, 6.0, SHAPE),
    "Atanh": rng.uniform(-0.95, 0.95, SHAPE),
}


@pytest.mark.parametrize("op", sorted(DOMAIN))
def test_domain_vjp(op):
    check_vjp(op, [DOMAIN[op]])


@pytest.mark.parametrize(
    "x_shape,slope_shape",
    [((4, 5), (5,)), ((2, 3, 4, 4), (3, 1, 1)), ((3, 4), (1,)), ((3, 4), (3, 4)), ((2, 3, 4), ())],
)
def test_prelu_vjp(x_shape, slope_shape):
    x = away_from([0.0], x_shape)
    slope = np.random.default_rng(2).uniform(-0.5, 0.9, slope_shape)
    check_vjp("PRelu", [x, np.asarray(slope)])


@pytest.mark.parametrize("fmod", [0, 1])
@pytest.mark.parametrize("shapes", [((4, 5), (4, 5)), ((3, 4), (4,)), ((2, 3), (1,))])
def test_mod_vjp(fmod, shapes):
    r = np.random.default_rng(3)
    b = r.uniform(0.7, 2.0, shapes[1]) * r.choice([-1.0, 1.0], shapes[1])
    a = r.uniform(-6.0, 6.0, shapes[0])
    q = a / b  # keep a/b away from integers, where the remainder jumps
    a = np.where(np.abs(q - np.round(q)) < 0.05, a + 0.2 * b, a)
    # Only the broadcast shape matters for the kink check; the gradient flows to both inputs.
    check_vjp("Mod", [a, b], {"fmod": fmod})


def test_castlike_vjp():
    x = np.random.default_rng(4).standard_normal(SHAPE)
    check_vjp("CastLike", [x, np.zeros(1, np.float64)], opset=17)
    assert get_op("CastLike").can_differentiate(0) and not get_op("CastLike").can_differentiate(1)


# -- forwards against torch --------------------------------------------------------------------------------
HALF = 1 / 6  # torch's Hardsigmoid slope, which an ONNX attribute can only hold as float32
TORCH = [
    ("HardSwish", {}, F.hardswish),
    ("HardSigmoid", {"alpha": float(np.float32(HALF)), "beta": 0.5}, F.hardsigmoid),
    ("Elu", {}, F.elu),
    ("Elu", {"alpha": 0.3}, lambda x: F.elu(x, 0.3)),
    ("Selu", {}, F.selu),
    # the float32-rounded defaults, as an exporter writes them, mean the exact constants
    ("Selu", {"alpha": float(np.float32(1.6732632423543772)), "gamma": float(np.float32(1.0507009873554805))}, F.selu),
    ("Celu", {}, F.celu),
    ("Celu", {"alpha": 2.5}, lambda x: F.celu(x, 2.5)),
    ("ThresholdedRelu", {"alpha": 0.5}, lambda x: F.threshold(x, 0.5, 0.0)),
    ("Softsign", {}, F.softsign),
    ("Mish", {}, F.mish),
    ("Gelu", {}, F.gelu),
    ("Gelu", {"approximate": "tanh"}, lambda x: F.gelu(x, approximate="tanh")),
    ("Shrink", {"lambd": 0.5, "bias": 0.5}, lambda x: F.softshrink(x, 0.5)),
    ("Shrink", {"lambd": 0.7, "bias": 0.0}, lambda x: F.hardshrink(x, 0.7)),
    ("Sin", {}, torch.sin),
    ("Cos", {}, torch.cos),
    ("Tan", {}, torch.tan),
    ("Atan", {}, torch.atan),
    ("Sinh", {}, torch.sinh),
    ("Cosh", {}, torch.cosh),
    ("Asinh", {}, torch.asinh),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("op,attrs,fn", TORCH, ids=lambda v: str(v) if isinstance(v, (str, dict)) else "")
def test_forward_vs_torch(op, attrs, fn, dtype):
    x = (np.random.default_rng(5).standard_normal((6, 7)) * 3).astype(dtype)
    x[0, :5] = [-3.0, 3.0, 0.0, -30.0, 30.0]  # the kinks and the far tails
    got = fwd(op, [x], attrs)
    want = fn(torch.from_numpy(x)).numpy()
    assert got.dtype == dtype
    tol = {np.float64: 1e-14, np.float32: 2e-6}[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "op,fn,lo,hi",
    [
        ("Asin", torch.asin, -1, 1),
        ("Acos", torch.acos, -1, 1),
        ("Acosh", torch.acosh, 1, 9),
        ("Atanh", torch.atanh, -1, 1),
    ],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_domain_forward_vs_torch(op, fn, lo, hi, dtype):
    x = np.random.default_rng(6).uniform(lo, hi, (5, 5)).astype(dtype)
    got = fwd(op, [x])
    assert got.dtype == dtype
    np.testing.assert_allclose(got, fn(torch.from_numpy(x)).numpy(), rtol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape,slope_shape", [((4, 5), (5,)), ((2, 3, 4, 4), (3, 1, 1)), ((3, 4), (1,))])
def test_prelu_forward_vs_torch(x_shape, slope_shape, dtype):
    r = np.random.default_rng(7)
    x = r.standard_normal(x_shape).astype(dtype)
    slope = r.uniform(-0.5, 0.9, slope_shape).astype(dtype)
    got = fwd("PRelu", [x, slope])
    want = F.prelu(torch.from_numpy(x), torch.from_numpy(slope.reshape(-1))).numpy()
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_prelu_gradients_vs_torch():
    r = np.random.default_rng(8)
    x = torch.tensor(r.standard_normal((2, 3, 4, 4)), requires_grad=True)
    w = torch.tensor(r.uniform(-0.5, 0.9, 3), requires_grad=True)
    g = r.standard_normal((2, 3, 4, 4))
    F.prelu(x, w).backward(torch.from_numpy(g))
    op = get_op("PRelu")
    c = OpContext({}, inputs=[x.detach().numpy(), w.detach().numpy().reshape(3, 1, 1)], needs=[True, True])
    c.outputs = [op.forward(c, *c.inputs)]
    dx, dw = op.vjp(c, g)
    np.testing.assert_allclose(dx, x.grad.numpy(), rtol=1e-13)
    np.testing.assert_allclose(dw.reshape(-1), w.grad.numpy(), rtol=1e-13)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_agrees_with_torch_to_rounding(approximate, dtype):
    # For x < 0, 1 + erf(x / sqrt 2) (or 1 + tanh) cancels: both torch and we round that sum, so
    # "to rounding" means within a few eps of the scale |x| / 2 of the terms, not of the result.
    x = np.linspace(-9, 9, 20000).astype(dtype)
    got = fwd("Gelu", [x], {"approximate": approximate})
    assert got.dtype == dtype
    want = F.gelu(torch.from_numpy(x), approximate=approximate).numpy()
    exact = F.gelu(torch.from_numpy(x.astype(np.float64)), approximate=approximate).numpy()
    unit = np.finfo(dtype).eps * (np.abs(want) + 0.5 * np.abs(x))
    assert np.max(np.abs(got - want) / unit) <= (1.5 if dtype == np.float64 else 8)  # torch float32 is ~5 off
    assert np.max(np.abs(got - exact) / unit) <= (1.5 if dtype == np.float64 else 4)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_vjp_vs_torch(approximate):
    x = torch.linspace(-7, 7, 301, dtype=torch.float64, requires_grad=True)
    F.gelu(x, approximate=approximate).sum().backward()
    op = get_op("Gelu")
    c = OpContext({"approximate": approximate}, inputs=[x.detach().numpy()], needs=[True])
    # absolute: the derivative's terms are O(|x|) and cancel for x < 0, in torch as here
    np.testing.assert_allclose(op.vjp(c, np.ones(301)), x.grad.numpy(), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "op,attrs",
    [
        ("Mish", {}),
        ("Softsign", {}),
        ("Selu", {}),
        ("Elu", {"alpha": 0.5}),
        ("Celu", {"alpha": 0.5}),
        ("ThresholdedRelu", {"alpha": 0.3}),
        ("Shrink", {"lambd": 0.3, "bias": 0.2}),
        ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
        ("HardSwish", {}),
        ("Tan", {}),
        ("Gelu", {}),
        ("Gelu", {"approximate": "tanh"}),
    ],
)
def test_forward_vs_onnx_reference(op, attrs, dtype):
    x = (np.random.default_rng(9).standard_normal((5, 6)) * 2).astype(dtype)
    got = fwd(op, [x], attrs)
    want = onnx_reference(op, [x], attrs, opset=20)[0]
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize(
    "op",
    [
        "Elu",
        "Selu",
        "Celu",
        "HardSwish",
        "HardSigmoid",
        "Mish",
        "Gelu",
        "Softsign",
        "Sin",
        "Tan",
        "Acosh",
        "PRelu",
        "Shrink",
        "ThresholdedRelu",
    ],
)
def test_float32_stays_float32(op):
    x = np.random.default_rng(10).uniform(1.1, 2.0, (3, 4)).astype(np.float32)
    inputs = [x, np.full((4,), 0.25, np.float32)] if op == "PRelu" else [x]
    y = fwd(op, inputs)
    assert y.dtype == np.float32
    c = OpContext({}, inputs=inputs, outputs=[y], needs=[True] * len(inputs))
    grads = get_op(op).vjp(c, np.ones_like(y))
    for g, inp in zip(grads if isinstance(grads, tuple) else (grads,), inputs):
        assert g.dtype == np.float32 and g.shape == inp.shape


def test_float32_attributes_mean_their_decimal():
    # An exported alpha=0.7 is stored as float32 0.699999988; in float64 it must act as 0.7, as in torch.
    x = np.linspace(-4, 2, 13)
    got = fwd("Elu", [x], {"alpha": float(np.float32(0.7))})
    np.testing.assert_allclose(got, F.elu(torch.from_numpy(x), 0.7).numpy(), rtol=1e-15)
    got = fwd("HardSigmoid", [x], {"alpha": float(np.float32(0.3)), "beta": float(np.float32(0.6))})
    np.testing.assert_allclose(got, np.clip(0.3 * x + 0.6, 0, 1), rtol=1e-15)


def test_integer_inputs():
    x = np.array([-5, -1, 0, 1, 5], np.int32)
    cases = [("Shrink", {"lambd": 1.5, "bias": 1.0}, [x]), ("PRelu", {}, [x, np.array([2], np.int32)])]
    for op, attrs, inputs in cases:
        got = fwd(op, inputs, attrs)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, onnx_reference(op, inputs, attrs, opset=20)[0])
    c = OpContext({}, inputs=[x, np.array([2], np.int32)], needs=[True, True])
    assert get_op("PRelu").vjp(c, np.ones(5)) == (None, None)


def test_celu_alpha_zero_is_an_error():
    with pytest.raises(Exception, match="nonzero alpha"):
        fwd("Celu", [np.ones(3)], {"alpha": 0.0})


# -- ops without a derivative --------------------------------------------------------------------------------
NO_VJP = [
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "IsNaN",
    "IsInf",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
    "BitwiseNot",
    "BitShift",
]


@pytest.mark.parametrize("op", NO_VJP)
def test_registered_without_vjp(op):
    assert get_op(op) is not None and get_op(op).vjp is None


def test_floor_ceil_round_sign():
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, -0.2, 0.7, 0.0, 2.49999], np.float32)
    np.testing.assert_array_equal(fwd("Round", [x]), [-2, -2, -0, 0, 2, 2, 4, -0, 1, 0, 2])  # halves to even
    for op, fn in (("Floor", torch.floor), ("Ceil", torch.ceil), ("Round", torch.round), ("Sign", torch.sign)):
        y = fwd(op, [x])
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, fn(torch.from_numpy(x)).numpy())
        np.testing.assert_array_equal(y, onnx_reference(op, [x], None, opset=20)[0])
    ints = np.array([-3, 0, 7], np.int64)
    np.testing.assert_array_equal(fwd("Sign", [ints]), [-1, 0, 1])
    assert fwd("Sign", [ints]).dtype == np.int64


@pytest.mark.parametrize(
    "attrs", [{}, {"detect_negative": 0}, {"detect_positive": 0}, {"detect_negative": 0, "detect_positive": 0}]
)
def test_isinf_isnan(attrs):
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -1.0, 1e308], np.float64)
    got = fwd("IsInf", [x], attrs)
    assert got.dtype == np.bool_
    pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    np.testing.assert_array_equal(got, [bool(pos), bool(neg), False, False, False, False])
    np.testing.assert_array_equal(got, onnx_reference("IsInf", [x], attrs, opset=20)[0])
    np.testing.assert_array_equal(fwd("IsNaN", [x]), [False, False, True, False, False, False])


def test_bitwise_and_shift():
    a = np.array([0b1100, 0b1010, 255, 0], np.uint8)
    b = np.array([0b1010, 0b0110, 15, 1], np.uint8)
    for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor"):
        np.testing.assert_array_equal(fwd(op, [a, b]), onnx_reference(op, [a, b], None, opset=18)[0])
    np.testing.assert_array_equal(fwd("BitwiseNot", [a]), onnx_reference("BitwiseNot", [a], None, opset=18)[0])
    ai = np.array([-5, 3, 0], np.int32)
    np.testing.assert_array_equal(fwd("BitwiseNot", [ai]), [4, -4, -1])
    s = np.array([1, 2, 3, 0], np.uint8)
    np.testing.assert_array_equal(fwd("BitShift", [a, s], {"direction": "LEFT"}), a << s)
    np.testing.assert_array_equal(fwd("BitShift", [a, s], {"direction": "RIGHT"}), a >> s)
    np.testing.assert_array_equal(
        fwd("BitShift", [a, s], {"direction": "RIGHT"}),
        onnx_reference("BitShift", [a, s], {"direction": "RIGHT"}, opset=20)[0],
    )
    with pytest.raises(Exception, match="direction"):
        fwd("BitShift", [a, s], {"direction": "UP"})


# -- Mod ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_mod_integers(dtype):
    a = np.array([7, -7, 7, -7, 0, 5], dtype)
    b = np.array([3, 3, -3, -3, 4, 5], dtype)
    py = fwd("Mod", [a, b])  # fmod=0: the sign of the divisor, like Python's %
    np.testing.assert_array_equal(py, [1, 2, -2, -1, 0, 0])
    np.testing.assert_array_equal(py, torch.remainder(torch.from_numpy(a), torch.from_numpy(b)).numpy())
    c = fwd("Mod", [a, b], {"fmod": 1})  # the sign of the dividend, like C
    np.testing.assert_array_equal(c, [1, -1, 1, -1, 0, 0])
    np.testing.assert_array_equal(c, torch.fmod(torch.from_numpy(a), torch.from_numpy(b)).numpy())
    assert py.dtype == c.dtype == dtype
    ctx = OpContext({}, inputs=[a, b], outputs=[py], needs=[True, True])
    assert get_op("Mod").vjp(ctx, np.ones(6)) == (None, None)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mod_floats(dtype):
    r = np.random.default_rng(11)
    a = (r.standard_normal((4, 5)) * 5).astype(dtype)
    b = (r.uniform(0.5, 2, (5,)) * r.choice([-1, 1], 5)).astype(dtype)
    got = fwd("Mod", [a, b], {"fmod": 1})
    assert got.dtype == dtype
    np.testing.assert_allclose(got, torch.fmod(torch.from_numpy(a), torch.from_numpy(b)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got, onnx_reference("Mod", [a, b], {"fmod": 1}, opset=20)[0], rtol=1e-6)
    got0 = fwd("Mod", [a, b])
    np.testing.assert_allclose(
        got0, torch.remainder(torch.from_numpy(a), torch.from_numpy(b)).numpy(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("fmod,torch_fn", [(1, torch.fmod), (0, torch.remainder)])
def test_mod_gradients_vs_torch(fmod, torch_fn):
    r = np.random.default_rng(12)
    a = torch.tensor(r.standard_normal((4, 5)) * 5, requires_grad=True)
    b = torch.tensor(r.uniform(0.5, 2, (5,)) * r.choice([-1, 1], 5), requires_grad=True)
    g = r.standard_normal((4, 5))
    torch_fn(a, b).backward(torch.from_numpy(g))
    op = get_op("Mod")
    c = OpContext({"fmod": fmod}, inputs=[a.detach().numpy(), b.detach().numpy()], needs=[True, True])
    c.outputs = [op.forward(c, *c.inputs)]
    da, db = op.vjp(c, g)
    np.testing.assert_allclose(da, a.grad.numpy(), rtol=1e-13)
    np.testing.assert_allclose(db, b.grad.numpy(), rtol=1e-13)


# -- CastLike ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "src,dst",
    [
        (np.float32, np.float64),
        (np.float64, np.float32),
        (np.float32, np.int64),
        (np.int32, np.float32),
        (np.float32, np.bool_),
    ],
)
def test_castlike(src, dst):
    x = np.array([[1.7, -2.2, 0.0], [3.0, -0.5, 9.0]]).astype(src)
    like = np.zeros(2, dst)
    y = fwd("CastLike", [x, like])
    assert y.dtype == dst
    np.testing.assert_array_equal(y, onnx_reference("CastLike", [x, like], None, opset=19)[0])
    c = OpContext({}, inputs=[x, like], outputs=[y], needs=[True, False])
    dx, dlike = get_op("CastLike").vjp(c, np.ones(y.shape, y.dtype))
    assert dlike is None
    if np.dtype(src).kind == "f" and np.dtype(dst).kind == "f":
        assert dx.dtype == src and dx.shape == x.shape
    else:
        assert dx is None

"""Elementwise ops beyond the smoke test: VJPs by the dot-product test, forwards against numpy/torch."""

import math

import numpy as np
import pytest

from gradcheck import assert_matches_reference, check_vjp, run_op
from gradserve.worker.autodiff import backward, compile_program, forward
from gradserve.worker.graph import Node

rng = np.random.default_rng(1)


def vjp(op, inputs, g, wrt, attrs=None, n_outputs=1):
    """Run forward + backward of one node; return the errors of the inputs in ``wrt``."""
    names = [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)]
    outs = [f"y{i}" for i in range(n_outputs)]
    prog = compile_program(
        [Node("n", op, names, outs, dict(attrs or {}))], [n for n in names if n], outs, [names[i] for i in wrt]
    )
    tape = forward(prog, {n: x for n, x in zip(names, inputs) if n})
    errs = backward(prog, tape, {"y0": g})
    return [errs.get(names[i]) for i in wrt]


def away_from(x, points=(0.0,), gap=0.1):
    """Move values off kinks so finite differences do not straddle them."""
    for p in points:
        near = np.abs(x - p) < gap
        x = np.where(near, p + np.copysign(gap, x - p), x)
    return x


POSITIVE = lambda s: rng.uniform(0.5, 2.0, s)  # noqa: E731
ANY = lambda s: rng.standard_normal(s)  # noqa: E731
NONZERO = lambda s: away_from(rng.standard_normal(s), gap=0.3)  # noqa: E731

UNARY = [
    ("Sqrt", {}, POSITIVE),
    ("Log", {}, POSITIVE),
    ("Sigmoid", {}, ANY),
    ("Softplus", {}, ANY),
    ("Abs", {}, NONZERO),
    ("Reciprocal", {}, NONZERO),
    ("LeakyRelu", {}, NONZERO),
    ("LeakyRelu", {"alpha": 0.2}, NONZERO),
    ("LeakyRelu", {"alpha": -1.5}, NONZERO),
    ("Erf", {}, ANY),
    ("Identity", {}, ANY),
    ("Exp", {}, ANY),
    ("Tanh", {}, ANY),
    ("Neg", {}, ANY),
    ("Relu", {}, NONZERO),
]


@pytest.mark.parametrize("op,attrs,make", UNARY, ids=[f"{u[0]}{u[1] or ''}" for u in UNARY])
def test_unary_vjp(op, attrs, make):
    check_vjp(op, [make((4, 3))], attrs)


@pytest.mark.parametrize("op,attrs,make", UNARY, ids=[f"{u[0]}{u[1] or ''}" for u in UNARY])
def test_unary_keeps_float32(op, attrs, make):
    x = make((5,)).astype(np.float32)
    (y,) = run_op(op, [x], attrs)
    assert y.dtype == np.float32
    g = vjp(op, [x], np.ones_like(x), [0], attrs)[0]
    assert g.dtype == np.float32


def test_unary_forwards():
    x = rng.standard_normal(50) * 5
    np.testing.assert_allclose(run_op("LeakyRelu", [x])[0], np.where(x > 0, x, 0.01 * x))
    np.testing.assert_allclose(run_op("Softplus", [x])[0], np.log1p(np.exp(x)), rtol=1e-12)
    np.testing.assert_allclose(run_op("Sigmoid", [x])[0], 1 / (1 + np.exp(-x)), rtol=1e-12)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # stable at the extremes
        big = np.array([-1000.0, 1000.0, 0.0])
        np.testing.assert_array_equal(run_op("Sigmoid", [big])[0], [0.0, 1.0, 0.5])
        np.testing.assert_allclose(run_op("Softplus", [big])[0], [0.0, 1000.0, math.log(2)])


def test_erf_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.concatenate(
        [
            np.linspace(-7, 7, 20001),
            rng.standard_normal(2000) * 3,
            [0.46875, -0.46875, 4.0, -4.0, 1e-300, -0.0, 30.0, -30.0],
        ]
    )
    want = torch.erf(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_op("Erf", [x])[0], want, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(run_op("Erf", [x])[0], [math.erf(v) for v in x], rtol=2e-15, atol=1e-300)
    x32 = x.astype(np.float32)
    y32 = run_op("Erf", [x32])[0]
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, torch.erf(torch.from_numpy(x32)).numpy(), rtol=1e-6, atol=1e-7)
    y = run_op("Erf", [np.array([np.inf, -np.inf, np.nan])])[0]
    np.testing.assert_array_equal(y, [1.0, -1.0, np.nan])


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 5)), ((2, 2), ())])
def test_pow_vjp(shapes):
    a = rng.uniform(0.5, 2.0, shapes[0])
    b = np.asarray(rng.uniform(-2.0, 3.0, shapes[1]))
    check_vjp("Pow", [a, b])


def test_pow_only_base():
    a = rng.standard_normal((3, 4))  # negative bases: no exponent error wanted
    check_vjp("Pow", [a, np.array(3.0)], wrt=[0])
    check_vjp("Pow", [a, np.array(2.0)], wrt=[0])  # the x*x fast path


def test_pow_integer_exponent_keeps_base_type():
    a = rng.uniform(0.5, 2.0, (3,)).astype(np.float32)
    for b in (np.array(3, np.int64), np.array([2, 3, 1], np.int64), np.array(0.5)):
        (y,) = run_op("Pow", [a, b])
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, a.astype(np.float64) ** b, rtol=1e-6)
    check_vjp("Pow", [a.astype(np.float64), np.array([2, 3, 1], np.int64)])


def test_pow_exponent_error_at_zero_base():
    (da, db) = vjp("Pow", [np.array([0.0, 2.0]), np.array([2.0, 2.0])], np.ones(2), [0, 1])
    np.testing.assert_allclose(da, [0.0, 4.0])
    np.testing.assert_allclose(db, [0.0, 4.0 * math.log(2.0)])


@pytest.mark.parametrize("op", ["Max", "Min", "Sum", "Mean"])
@pytest.mark.parametrize("shapes", [[(3, 4)], [(3, 4), (3, 4)], [(2, 3, 4), (4,), (3, 1)]])
def test_variadic_vjp(op, shapes):
    check_vjp(op, [rng.standard_normal(s) for s in shapes])


def test_max_min_forward_and_ties():
    xs = [rng.standard_normal((2, 3)), rng.standard_normal(3), rng.standard_normal((2, 1))]
    np.testing.assert_array_equal(run_op("Max", xs)[0], np.maximum(np.maximum(xs[0], xs[1]), xs[2]))
    np.testing.assert_array_equal(run_op("Min", xs)[0], np.minimum(np.minimum(xs[0], xs[1]), xs[2]))
    # a tie splits the error evenly between the inputs that attain the extreme
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 5.0, 0.0])
    da, db = vjp("Max", [a, b], np.array([10.0, 20.0, 30.0]), [0, 1])
    np.testing.assert_array_equal(da, [5.0, 0.0, 30.0])
    np.testing.assert_array_equal(db, [5.0, 20.0, 0.0])


@pytest.mark.parametrize("op, fn", [("Max", "maximum"), ("Min", "minimum")])
def test_max_min_ties_match_torch(op, fn):
    """At ties torch.maximum/minimum give each input half the error, broadcast inputs included
    (a scalar tied with two entries gets both halves); three tied inputs get a third each, as
    torch.amax over the stacked inputs does."""
    torch = pytest.importorskip("torch")
    a, b = np.array([[1.0, 2.0, 3.0], [4.0, 4.0, -1.0]]), np.array([1.0, 5.0, 3.0])
    s = np.array(4.0)
    for inputs in ([a, b], [a, s], [s, b]):
        g = rng.standard_normal(np.broadcast_shapes(*(x.shape for x in inputs)))
        ts = [torch.tensor(x, requires_grad=True) for x in inputs]
        getattr(torch, fn)(*ts).backward(torch.from_numpy(g))
        got = vjp(op, inputs, g, [0, 1])
        for mine, t in zip(got, ts):
            np.testing.assert_allclose(mine, t.grad.numpy(), rtol=1e-15)
    three = [np.array([1.0, 2.0]), np.array([1.0, 0.0]), np.array([1.0, 2.0])]
    ts = [torch.tensor(x, requires_grad=True) for x in three]
    reduce_ = torch.amax if op == "Max" else torch.amin
    reduce_(torch.stack(ts), dim=0).backward(torch.tensor([3.0, 4.0], dtype=torch.float64))
    for mine, t in zip(vjp(op, three, np.array([3.0, 4.0]), [0, 1, 2]), ts):
        np.testing.assert_allclose(mine, t.grad.numpy(), rtol=1e-15)


@pytest.mark.parametrize("bounds", [(-0.5, 0.5), (None, 0.3), (-0.3, None), (None, None), (0.4, -0.4)])
def test_clip(bounds):
    x = away_from(rng.standard_normal((4, 5)), [b for b in bounds if b is not None])
    inputs = [x] + [None if b is None else np.array(b) for b in bounds]
    while inputs[-1] is None and len(inputs) > 1:
        inputs.pop()
    check_vjp("Clip", inputs)
    lo, hi = bounds
    want = x if lo is None else np.maximum(x, lo)
    want = want if hi is None else np.minimum(want, hi)  # min > max: everything becomes max
    np.testing.assert_array_equal(run_op("Clip", inputs)[0], want)


def test_clip_ties_pass_error_to_input():
    (dx,) = vjp("Clip", [np.array([-1.0, 0.0, 1.0]), np.array(-1.0), np.array(1.0)], np.ones(3), [0])
    np.testing.assert_array_equal(dx, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4), (3, 4)), ((3, 1), (4,), (3, 4)), ((4,), (2, 1, 4), ())])
def test_where(shapes):
    cond = rng.standard_normal(shapes[0]) > 0
    a, b = rng.standard_normal(shapes[1]), np.asarray(rng.standard_normal(shapes[2]))
    check_vjp("Where", [cond, a, b])
    np.testing.assert_array_equal(run_op("Where", [cond, a, b])[0], np.where(cond, a, b))


def test_comparisons_and_logic():
    a, b = rng.integers(0, 3, (3, 4)).astype(np.float32), rng.integers(0, 3, (4,)).astype(np.float32)
    for op, fn in [
        ("Equal", np.equal),
        ("Less", np.less),
        ("Greater", np.greater),
        ("LessOrEqual", np.less_equal),
        ("GreaterOrEqual", np.greater_equal),
    ]:
        (y,) = run_op(op, [a, b])
        assert y.dtype == np.bool_
        np.testing.assert_array_equal(y, fn(a, b))
    p, q = a > 0, b > 1
    for op, fn in [("And", np.logical_and), ("Or", np.logical_or), ("Xor", np.logical_xor)]:
        np.testing.assert_array_equal(run_op(op, [p, q])[0], fn(p, q))
    np.testing.assert_array_equal(run_op("Not", [p])[0], ~p)


def test_cast():
    x = np.array([-1.7, 0.2, 2.9])
    assert run_op("Cast", [x], {"to": 1})[0].dtype == np.float32
    np.testing.assert_array_equal(run_op("Cast", [x], {"to": 7})[0], np.array([-1, 0, 2], np.int64))
    np.testing.assert_array_equal(run_op("Cast", [x], {"to": 9})[0], [True, True, True])
    check_vjp("Cast", [rng.standard_normal((2, 3))], {"to": 11})
    # float64 -> float32 -> back: the error is cast back to the input's dtype
    (g,) = vjp("Cast", [x], np.ones(3, np.float32), [0], {"to": 1})
    assert g.dtype == np.float64
    # float -> int: no error reaches the input
    assert vjp("Cast", [x], np.ones(3, np.int64), [0], {"to": 7})[0] is None


def test_dropout_is_identity():
    x = rng.standard_normal((3, 4))
    y, mask = run_op("Dropout", [x, np.array(0.5), np.array(True)], n_outputs=2)
    np.testing.assert_array_equal(y, x)
    assert mask.dtype == np.bool_ and mask.all() and mask.shape == x.shape
    check_vjp("Dropout", [x])
    check_vjp("Dropout", [x, np.array(0.3)], wrt=[0], n_outputs=2)


_X = rng.standard_normal((4, 5, 6)).astype(np.float32)
REFERENCE_CASES = [
    ("Clip", [_X, np.array(0.5, np.float32), np.array(-0.5, np.float32)], {}),
    ("Clip", [_X, None, np.array(0.1, np.float32)], {}),
    ("Pow", [np.abs(_X), np.array(3, np.int64)], {}),
    ("Pow", [np.abs(_X), _X[0]], {}),
    ("LeakyRelu", [_X], {}),
    ("Erf", [_X], {}),
    ("Softplus", [_X], {}),
    ("Sigmoid", [_X], {}),
    ("Mean", [_X, _X[0], _X[0, 0]], {}),
    ("Max", [_X, _X[0] * 2], {}),
    ("Min", [_X[:, :1], _X[0]], {}),
    ("Cast", [_X * 10], {"to": 7}),
    ("Cast", [_X], {"to": 10}),
    ("Where", [_X > 0, _X, _X[0]], {}),
]


@pytest.mark.parametrize("op,inputs,attrs", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_forward_matches_onnx_reference(op, inputs, attrs):
    assert_matches_reference(op, inputs, attrs, rtol=1e-5)

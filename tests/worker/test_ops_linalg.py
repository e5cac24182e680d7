"""MatMul and Gemm: VJPs by the dot-product test over numpy's matmul shape cases and Gemm's flags."""

import dataclasses

import numpy as np
import pytest

from gradcheck import assert_matches_reference, check_vjp, run_op
from gradserve.worker.autodiff import backward, compile_program, forward
from gradserve.worker.graph import Node

rng = np.random.default_rng(2)

MATMUL_SHAPES = [
    ((3, 4), (4, 5)),
    ((4,), (4, 5)),
    ((3, 4), (4,)),
    ((4,), (4,)),
    ((2, 3, 4), (4, 5)),  # batched activation x weight (the folded weight error)
    ((2, 3, 4), (2, 4, 5)),
    ((2, 1, 3, 4), (3, 4, 5)),  # batch dims broadcast both ways
    ((3, 4), (2, 4, 5)),
    ((4,), (2, 4, 5)),
    ((2, 3, 4), (4,)),
    ((1, 3, 4), (2, 4, 5)),
]


@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES)
def test_matmul_vjp(sa, sb):
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    check_vjp("MatMul", [a, b])
    check_vjp("MatMul", [a, b], wrt=[0])
    check_vjp("MatMul", [a, b], wrt=[1])
    np.testing.assert_allclose(run_op("MatMul", [a, b])[0], np.matmul(a, b))


def test_matmul_skips_unneeded_error():
    # Only the weight wants an error: the input's error is never computed, and the result is right.
    x, w = rng.standard_normal((5, 3)), rng.standard_normal((3, 2))
    node = Node("n", "MatMul", ["x", "w"], ["y"])
    prog = compile_program([node], ["x", "w"], ["y"], ["w"])
    g = rng.standard_normal((5, 2))
    errs = backward(prog, forward(prog, {"x": x, "w": w}), {"y": g})
    assert set(errs) == {"w"}
    np.testing.assert_allclose(errs["w"], x.T @ g)


def test_matmul_float32():
    a, b = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    assert run_op("MatMul", [a, b])[0].dtype == np.float32


C_SHAPES = [None, (3, 5), (5,), (1, 5), (3, 1), ()]


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", C_SHAPES)
def test_gemm_vjp(trans_a, trans_b, c_shape):
    m, k, n = 3, 4, 5
    a = rng.standard_normal((k, m) if trans_a else (m, k))
    b = rng.standard_normal((n, k) if trans_b else (k, n))
    inputs = [a, b] + ([] if c_shape is None else [np.asarray(rng.standard_normal(c_shape))])
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": 0.7, "beta": -1.3}
    check_vjp("Gemm", inputs, attrs)
    check_vjp("Gemm", inputs, {"transA": trans_a, "transB": trans_b})  # alpha = beta = 1
    want = 0.7 * (a.T if trans_a else a) @ (b.T if trans_b else b)
    if c_shape is not None:
        want = want - 1.3 * inputs[2]
    np.testing.assert_allclose(run_op("Gemm", inputs, attrs)[0], want, rtol=1e-12)


def test_gemm_partial_needs():
    a, b, c = rng.standard_normal((3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    for wrt in ([0], [1], [2], [1, 2]):
        check_vjp("Gemm", [a, b, c], {"alpha": 2.0}, wrt=wrt)


def test_gemm_float32_and_beta_zero():
    a, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    c = np.full(5, np.nan, np.float32)  # beta = 0: C is not read
    (y,) = run_op("Gemm", [a, b, c], {"alpha": 0.5, "beta": 0.0})
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, 0.5 * a @ b, rtol=1e-6)


@pytest.mark.parametrize("op,attrs", [("MatMul", {}), ("Gemm", {"transB": 1, "alpha": 0.5})])
def test_zero_bubble_split(op, attrs):
    # backward(defer=...) runs the VJP twice on one context: once for the activation's error, once
    # (later) for the weight's. Each call must honor c.needs and leave the shared error untouched.
    from gradserve.worker.autodiff import backward_deferred

    x, w = rng.standard_normal((4, 3)), rng.standard_normal((5, 3) if attrs.get("transB") else (3, 5))
    node = Node("n", op, ["x", "w"], ["y"], attrs)
    prog = compile_program([node], ["x", "w"], ["y"], ["x", "w"])
    g = rng.standard_normal((4, 5))
    full = backward(prog, forward(prog, {"x": x, "w": w}), {"y": g.copy()})
    tape = forward(prog, {"x": x, "w": w})
    first = backward(prog, tape, {"y": g.copy()}, defer=["w"])
    assert set(first) == {"x"}
    later = backward_deferred(prog, [tape])
    assert set(later) == {"w"}
    np.testing.assert_allclose(first["x"], full["x"])
    np.testing.assert_allclose(later["w"], full["w"])


_X = rng.standard_normal((4, 5, 6)).astype(np.float32)
REFERENCE_CASES = [
    ("Gemm", [_X[0], _X[1].T, _X[2, 0, :5]], {"alpha": 0.5, "beta": 2.0}),
    ("Gemm", [_X[0].T, _X[1], _X[2, :, :1]], {"transA": 1, "transB": 1}),
    ("Gemm", [_X[0].T, _X[1].T], {"transA": 1}),
    ("MatMul", [_X, _X[0].T], {}),
    ("MatMul", [_X[0, :, 0], _X[:, :, :2]], {}),
]


@pytest.mark.parametrize("op,inputs,attrs", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_forward_matches_onnx_reference(op, inputs, attrs):
    assert_matches_reference(op, inputs, attrs, rtol=1e-5)


MERGE_CASES = [
    ("MatMul", {}, (5, 3), (3, 4), None),
    ("MatMul", {}, (2, 5, 3), (3, 4), None),  # batched activation, 2-D weight: rows folded
    ("MatMul", {"batch_axis": 1}, (2, 5, 3), (3, 4), None),  # sequence-first: split along axis 1
    ("Gemm", {"transB": 1, "alpha": 0.5}, (5, 3), (4, 3), (4,)),
    ("Gemm", {"transA": 1, "beta": 2.0}, (3, 5), (3, 4), (1, 4)),  # micro-batch rows are A's columns
]


@pytest.mark.parametrize("op,attrs,a_shape,w_shape,c_shape", MERGE_CASES)
def test_deferred_weight_errors_of_micro_batches_fold_into_one_product(op, attrs, a_shape, w_shape, c_shape):
    """backward_deferred over several tapes (micro-batches of different sizes) runs each product's
    weight error once, over all rows, and equals the sum of the per-micro-batch errors."""
    from gradserve.worker.autodiff import backward_deferred

    attrs = dict(attrs)
    batch_axis = attrs.pop("batch_axis", 1 if attrs.get("transA") else 0)
    inputs = ["x", "w"] + (["c"] if c_shape else [])
    node = Node("n", op, inputs, ["y"], attrs)
    params = {"w": rng.standard_normal(w_shape), **({"c": rng.standard_normal(c_shape)} if c_shape else {})}
    prog = compile_program([node], inputs, ["y"], inputs)
    tapes, per_mb = [], []
    for rows in (2, 5, 1):  # micro-batch sizes
        shape = list(a_shape)
        shape[batch_axis] = rows
        x = rng.standard_normal(shape)
        y = forward(prog, {"x": x, **params}).outputs["y"]
        g = rng.standard_normal(y.shape)
        per_mb.append(backward(prog, forward(prog, {"x": x, **params}), {"y": g.copy()}))
        tape = forward(prog, {"x": x, **params})
        backward(prog, tape, {"y": g}, defer=list(params))
        tapes.append(tape)
    calls = []
    real = prog.ops[0].vjp
    prog.ops[0] = dataclasses.replace(prog.ops[0], vjp=lambda c, *g: calls.append(1) or real(c, *g))
    got = backward_deferred(prog, tapes)
    assert len(calls) == 1 and all(not t.deferred for t in tapes)
    for name in params:
        np.testing.assert_allclose(got[name], sum(e[name] for e in per_mb), rtol=1e-12, atol=1e-12)


def test_batched_weights_are_not_folded():
    from gradserve.worker.autodiff import backward_deferred

    prog = compile_program([Node("n", "MatMul", ["x", "w"], ["y"])], ["x", "w"], ["y"], ["x", "w"])
    w = rng.standard_normal((2, 3, 4))
    tapes, total = [], 0
    for _ in range(2):
        x, g = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 4))
        total = total + backward(prog, forward(prog, {"x": x, "w": w}), {"y": g.copy()})["w"]
        tape = forward(prog, {"x": x, "w": w})
        backward(prog, tape, {"y": g}, defer=["w"])
        tapes.append(tape)
    np.testing.assert_allclose(backward_deferred(prog, tapes)["w"], total, rtol=1e-12, atol=1e-12)


def test_bias_alone_is_not_folded_when_the_batch_runs_along_columns():
    """Y = W X^T + C with W a constant, X the activation (batch in Y's columns) and only C a
    parameter: stacking rows would be wrong, so the micro-batches' bias errors are summed one by one."""
    from gradserve.worker.autodiff import backward_deferred

    node = Node("n", "Gemm", ["w", "x", "c"], ["y"], {"transB": 1})
    prog = compile_program([node], ["w", "x", "c"], ["y"], ["x", "c"])
    w, c = rng.standard_normal((4, 3)), rng.standard_normal((4, 1))
    tapes, total = [], 0
    for rows in (2, 5):
        x = rng.standard_normal((rows, 3))
        g = rng.standard_normal((4, rows))
        total = total + backward(prog, forward(prog, {"w": w, "x": x, "c": c}), {"y": g.copy()})["c"]
        tape = forward(prog, {"w": w, "x": x, "c": c})
        backward(prog, tape, {"y": g}, defer=["c"])
        tapes.append(tape)
    np.testing.assert_allclose(backward_deferred(prog, tapes)["c"], total, rtol=1e-12, atol=1e-12)

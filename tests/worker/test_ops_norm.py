import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_vjp, run_op

rng = np.random.default_rng(0)
T = torch.from_numpy


def bn_inputs(shape, dtype=np.float64):
    c = shape[1] if len(shape) > 1 else 1
    return [
        rng.standard_normal(shape).astype(dtype),
        rng.standard_normal(c).astype(dtype),
        rng.standard_normal(c).astype(dtype),
        rng.standard_normal(c).astype(dtype),
        (rng.random(c) + 0.5).astype(dtype),
    ]


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (6, 4), (3, 2, 7)])
def test_batchnorm_training_vjp(shape):
    inputs = bn_inputs(shape)
    attrs = {"training_mode": 1, "momentum": 0.7, "epsilon": 1e-3}
    check_vjp("BatchNormalization", inputs, attrs, n_outputs=3, grad_outputs=[0], wrt=[0, 1, 2])
    # errors reaching running_mean / running_var too (they are linear in the batch statistics)
    check_vjp("BatchNormalization", inputs, attrs, n_outputs=3)


def test_batchnorm_training_matches_torch():
    x, s, b, m, v = bn_inputs((4, 3, 5, 6))
    y, rm, rv = run_op("BatchNormalization", [x, s, b, m, v], {"training_mode": 1, "momentum": 0.9}, n_outputs=3)
    tm, tv = T(m.copy()), T(v.copy())
    xt = T(x).requires_grad_()
    st, bt = T(s).requires_grad_(), T(b).requires_grad_()
    ty = F.batch_norm(xt, tm, tv, st, bt, training=True, momentum=0.1, eps=1e-5)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(rm, tm.numpy(), rtol=1e-12)
    # ONNX running_var uses the population variance (torch keeps the unbiased one)
    np.testing.assert_allclose(rv, 0.9 * v + 0.1 * x.var(axis=(0, 2, 3)), rtol=1e-12)
    # gradients through the batch statistics against torch autograd
    from gradserve.worker.autodiff import backward, compile_program, forward
    from gradserve.worker.graph import Node

    node = Node("bn", "BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], {"training_mode": 1})
    prog = compile_program([node], ["x", "s", "b", "m", "v"], ["y"], ["x", "s", "b"])
    tape = forward(prog, {"x": x, "s": s, "b": b, "m": m, "v": v})
    g = rng.standard_normal(x.shape)
    errs = backward(prog, tape, {"y": g})
    ty.backward(T(g))
    for name, ref in (("x", xt), ("s", st), ("b", bt)):
        np.testing.assert_allclose(errs[name], ref.grad.numpy(), rtol=1e-9, atol=1e-10)


def test_batchnorm_inference_vjp_and_forward():
    inputs = bn_inputs((3, 4, 5))
    check_vjp("BatchNormalization", inputs, {"epsilon": 1e-2})
    x, s, b, m, v = inputs
    ty = F.batch_norm(T(x), T(m), T(v), T(s), T(b), training=False, eps=1e-2)
    np.testing.assert_allclose(
        run_op("BatchNormalization", inputs, {"epsilon": 1e-2})[0], ty.numpy(), rtol=1e-12, atol=1e-12
    )


def test_batchnorm_float32_dtypes_and_errors():
    inputs = bn_inputs((4, 3, 4, 4), np.float32)
    outs = run_op("BatchNormalization", inputs, {"training_mode": 1}, n_outputs=3)
    assert [o.dtype for o in outs] == [np.float32] * 3
    with pytest.raises(Exception, match="training_mode"):
        run_op("BatchNormalization", inputs, {"training_mode": 0}, n_outputs=3)


@pytest.mark.parametrize(
    "x_shape,axis,scale_shape,bias",
    [
        ((2, 3, 5), -1, (5,), True),
        ((2, 3, 5), 1, (3, 5), True),
        ((4, 6), -1, (6,), False),
        ((2, 3, 4), 1, (1, 4), True),
    ],
)
def test_layernorm_vjp(x_shape, axis, scale_shape, bias):
    x = rng.standard_normal(x_shape)
    inputs = [x, rng.standard_normal(scale_shape)] + ([rng.standard_normal(scale_shape)] if bias else [])
    check_vjp("LayerNormalization", inputs, {"axis": axis, "epsilon": 1e-3})


def test_layernorm_matches_torch_and_extra_outputs():
    x, s, b = rng.standard_normal((2, 3, 8)), rng.standard_normal(8), rng.standard_normal(8)
    y, mean, inv = run_op("LayerNormalization", [x, s, b], {}, n_outputs=3)
    np.testing.assert_allclose(y, F.layer_norm(T(x), (8,), T(s), T(b)).numpy(), rtol=1e-12, atol=1e-12)
    # Mean / InvStdDev are stash_type (float32) tensors of shape (2, 3, 1)
    assert mean.dtype == inv.dtype == np.float32 and mean.shape == (2, 3, 1)
    np.testing.assert_allclose(mean, x.mean(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(inv, 1 / np.sqrt(x.var(-1, keepdims=True) + 1e-5), rtol=1e-6)
    check_vjp("LayerNormalization", [x, s, b], n_outputs=3, grad_outputs=[0])
    # errors at Mean / InvStdDev: float32 outputs, so a coarser finite-difference step
    check_vjp("LayerNormalization", [x, s, b], n_outputs=3, eps=1e-3, rtol=1e-3)


def test_layernorm_float32():
    x = rng.standard_normal((4, 16)).astype(np.float32)
    s, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    y = run_op("LayerNormalization", [x, s, b])[0]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, F.layer_norm(T(x), (16,)).numpy(), rtol=1e-5, atol=1e-5)


def test_instancenorm():
    x, s, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal(3), rng.standard_normal(3)
    check_vjp("InstanceNormalization", [x, s, b], {"epsilon": 1e-3})
    np.testing.assert_allclose(
        run_op("InstanceNormalization", [x, s, b])[0],
        F.instance_norm(T(x), weight=T(s), bias=T(b)).numpy(),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("offset", [0.0, 3.0, 30.0])
def test_batchnorm_training_float32_matches_torch_with_large_means(offset):
    """float32 training BatchNormalization (the compiled kernel): statistics and all errors match
    torch in float64, including channels whose mean dwarfs their spread (the shifted sums)."""
    from gradserve.worker.autodiff import backward, compile_program, forward
    from gradserve.worker.graph import Node

    x = (
        rng.standard_normal((8, 4, 9, 7)) * np.array([1.0, 0.5, 2.0, 0.1]).reshape(1, 4, 1, 1)
        + offset * np.array([1.0, -1.0, 0.5, 1.0]).reshape(1, 4, 1, 1)
    ).astype(np.float32)
    s, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    attrs = {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 1}
    node = Node("bn", "BatchNormalization", ["x", "s", "b", "rm", "rv"], ["y", "m", "v"], attrs)
    prog = compile_program([node], ["x", "s", "b", "rm", "rv"], ["y", "m", "v"], ["x", "s", "b"])
    tape = forward(prog, {"x": x, "s": s, "b": b, "rm": rm, "rv": rv})
    g = rng.standard_normal(x.shape).astype(np.float32)
    errs = backward(prog, tape, {"y": g})
    tx, ts, tb = (T(a.astype(np.float64)).requires_grad_() for a in (x, s, b))
    ty = F.batch_norm(
        tx, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), ts, tb, training=True, eps=1e-5
    )
    ty.backward(T(g.astype(np.float64)))
    y = tape.outputs["y"]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tape.outputs["v"], 0.9 + 0.1 * x.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-4)
    for name, t in (("x", tx), ("s", ts), ("b", tb)):
        ref = t.grad.numpy()
        assert errs[name].dtype == np.float32
        np.testing.assert_allclose(errs[name], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())

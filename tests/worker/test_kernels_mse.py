"""The mean squared error as one node (gradserve.MeanSquaredError): its kernel against numpy, its
VJP against finite differences, the rewrite against the unfused ops and torch autograd, and where
the rewrite must not apply."""

import numpy as np
import pytest
import torch

import gradserve
from gradcheck import assert_split_exact, check_vjp, run_op, unfused
from torch_oracle import check_module
from gradserve.server.planning.prepare import prepare
from gradserve.worker import kernels
from gradserve.worker.graph import InputSpec, Model, Node
from gradserve.worker.ops.loss import FUSED_MSE

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the compiled kernels (numba)")
rng = np.random.default_rng(11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 1000, 70_001])  # within one chunk, and across chunks
def test_kernels_against_numpy(dtype, size):
    a, b = (rng.standard_normal(size).astype(dtype) for _ in range(2))
    k = kernels.get()
    want = float(np.sum(np.square(a.astype(np.float64) - b.astype(np.float64))))
    assert k.squared_difference(a, b) == pytest.approx(want, rel=1e-12)
    out = np.empty(size, dtype)
    k.scaled_difference(a, b, dtype(0.25), out)
    np.testing.assert_allclose(out, (a - b) * dtype(0.25), rtol=1e-6 if dtype == np.float32 else 1e-15)


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("shape", [(4, 3, 5), (40, 3, 150)])  # numpy's passes; the kernels (>= kernels.MIN_SIZE)
def test_node_forward_and_vjp(keepdims, shape):
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    (loss,) = run_op(FUSED_MSE, [a, b], {"keepdims": keepdims})
    assert loss.shape == ((1, 1, 1) if keepdims else ())
    assert loss.item() == pytest.approx(np.mean((a - b) ** 2), rel=1e-14)
    check_vjp(FUSED_MSE, [a, b], {"keepdims": keepdims}, check_shapes=False)
    check_vjp(FUSED_MSE, [a, b], {"keepdims": keepdims}, wrt=[0], check_shapes=False)


def mse_model(dtype, square="Mul", axes=None, extra_reader=False, target_shape=(9, 6), opset_axes="input"):
    """x -> Gemm -> Sub target -> square -> ReduceMean (keepdims 0) -> ReduceSum (the loss)."""
    width = 6
    params = {"w": rng.standard_normal((width, width)).astype(dtype), "b": rng.standard_normal(width).astype(dtype)}
    constants = {}
    nodes = [Node("fc", "Gemm", ["x", "w", "b"], ["h"], {"transB": 1}), Node("sub", "Sub", ["h", "t"], ["d"])]
    if square == "Mul":
        nodes.append(Node("sq", "Mul", ["d", "d"], ["s"]))
    else:
        constants["e"] = np.array(square, dtype)
        nodes.append(Node("sq", "Pow", ["d", "e"], ["s"]))
    attrs = {"keepdims": 0}
    inputs = ["s"]
    if axes is not None and opset_axes == "attr":
        attrs["axes"] = axes
    elif axes is not None:
        constants["axes"] = np.array(axes, np.int64)
        inputs.append("axes")
    nodes.append(Node("mean", "ReduceMean", inputs, ["m"], attrs))
    if extra_reader:  # the difference read again
        nodes += [Node("s2", "ReduceSum", ["d"], ["l2"], {"keepdims": 0}), Node("add", "Add", ["m", "l2"], ["loss"])]
    else:
        nodes.append(Node("out", "ReduceSum", ["m"], ["loss"], {"keepdims": 0}))  # (a mean per sample too)
    specs = [
        InputSpec("x", np.dtype(dtype), (None, width)),
        InputSpec("t", np.dtype(dtype), (None,) + target_shape[1:]),
    ]
    model = Model(nodes, specs, params, "loss", constants=constants, opset=18 if "axes" in constants else 13)
    feeds = {"x": rng.standard_normal((9, width)).astype(dtype), "t": rng.standard_normal(target_shape).astype(dtype)}
    return model, feeds


def fused(model, feeds) -> bool:
    return any(n.op_type == FUSED_MSE for n in prepare(model, feeds).nodes)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("square", ["Mul", 2.0])
def test_rewrite_within_rounding_of_the_unfused_ops(dtype, square):
    model, feeds = mse_model(dtype, square)
    job = prepare(model, feeds)
    assert [n.op_type for n in job.nodes] == ["Gemm", FUSED_MSE, "ReduceSum"]
    assert any("run as one mean squared error" in r for r in job.rewrites)
    result = gradserve.local().gradients(model, feeds)
    loss, grads = unfused(model, feeds)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert abs(result.loss - loss) <= tol * abs(loss)
    for name in model.params:
        np.testing.assert_allclose(result.grads[name], grads[name], rtol=tol, atol=tol * np.abs(grads[name]).max())


def test_axes_that_cover_every_axis_count_as_every_axis():
    assert fused(*mse_model(np.float32, axes=[0, 1]))
    assert fused(*mse_model(np.float32, axes=[-1, 0], opset_axes="attr"))


def test_no_rewrite_where_it_would_change_a_value_or_cannot_apply():
    assert not fused(*mse_model(np.float32, extra_reader=True))  # the difference read again
    assert not fused(*mse_model(np.float32, axes=[1]))  # a mean per sample
    assert not fused(*mse_model(np.float32, square=3.0))  # a cube
    assert not fused(*mse_model(np.float32, target_shape=(1, 6)))  # the target broadcasts


def test_fused_loss_splits_into_micro_batches():
    """Planning knows the node: a mean over the batch, so micro-batches weigh their means exactly."""
    model, feeds = mse_model(np.float64)
    assert fused(model, feeds)
    assert_split_exact(model, feeds, parts=(3,))


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.net(x), y)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_torch_mse_loss_runs_as_one_node_and_matches_autograd(exporter, tmp_path):
    torch.manual_seed(0)
    args = [torch.randn(64, 16), torch.randn(64, 4)]
    check_module(Regression(), args, ["x", "y"], tmp_path, exporter=exporter)
    model = gradserve.load_onnx(tmp_path / f"Regression-{exporter}.onnx")
    assert fused(model, {"x": args[0].numpy(), "y": args[1].numpy()})

"""Exact graph rewrites: the rewritten job gives bit-identical loss and gradients, and a rewrite is
only applied where it is exact."""

import numpy as np
import pytest

from gradserve.server.inline import InlineEngine
from gradserve.server.planning.partition import plan_job
from gradserve.server.planning.prepare import prepare
from gradserve.worker.autodiff import backward, compile_program, forward
from gradserve.worker.graph import InputSpec, Model, Node
from gradserve.worker.validate import check_structure

rng = np.random.default_rng(11)


def cnn(pool_attrs, extra_reader=False, dtype=np.float64):
    """Conv -> Relu -> MaxPool -> ReduceSum of squares (the loss); optionally the Relu output also
    feeds the loss directly (a second reader, which must block the rewrite)."""
    nodes = [
        Node("conv", "Conv", ["x", "w"], ["c"], {"pads": [1, 1, 1, 1]}),
        Node("relu", "Relu", ["c"], ["r"]),
        Node("pool", "MaxPool", ["r"], ["p"], pool_attrs),
        Node("sq", "Mul", ["p", "p"], ["s"]),
        Node("sum", "ReduceSum", ["s"], ["loss"], {"keepdims": 0}),
    ]
    if extra_reader:
        nodes[-1:] = [
            Node("sum_p", "ReduceSum", ["s"], ["l1"], {"keepdims": 0}),
            Node("sum_r", "ReduceSum", ["r"], ["l2"], {"keepdims": 0}),
            Node("add", "Add", ["l1", "l2"], ["loss"]),
        ]
    # integer-valued weights and inputs: many exact ties inside the pooling windows, and zeros
    w = rng.integers(-1, 2, (4, 3, 3, 3)).astype(dtype)
    model = Model(nodes, [InputSpec("x", np.dtype(dtype), (None, 3, 8, 8))], {"w": w}, "loss")
    return model, {"x": rng.integers(-2, 3, (2, 3, 8, 8)).astype(dtype)}


def unrewritten(model, feeds):
    """Loss and dL/dw straight from the checked nodes, bypassing prepare (and so the rewrites)."""
    nodes = check_structure(model)
    program = compile_program(nodes, [*feeds, *model.params], [model.loss], list(model.params))
    tape = forward(program, {**feeds, **model.params})
    loss = tape.outputs[model.loss]
    return float(loss), backward(program, tape, {model.loss: np.ones_like(loss)})


POOLS = [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},  # overlapping, padded windows
    {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1},
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("pool_attrs", POOLS)
def test_relu_runs_after_maxpool_with_identical_gradients(pool_attrs, dtype):
    model, feeds = cnn(pool_attrs, dtype=dtype)
    job = prepare(model, feeds)
    ops = [(n.name, n.op_type, n.inputs[0], n.outputs[0]) for n in job.nodes][:3]
    assert ops == [("conv", "Conv", "x", "c"), ("pool", "MaxPool", "c", "r"), ("relu", "Relu", "r", "p")]
    assert job.shapes["r"].shape == job.shapes["p"].shape  # r now holds the pooled values
    assert job.rewrites == (
        "node 'relu' (Relu) runs after node 'pool' (MaxPool), on the pooled values "
        "(exact: the max of rectified values is the rectified max)",
    )
    assert "rewritten: node 'relu' (Relu) runs after node 'pool' (MaxPool)" in plan_job(job, model, 2).describe()
    result = InlineEngine().gradients(model, feeds)
    loss, grads = unrewritten(model, feeds)
    assert result.loss == loss
    np.testing.assert_array_equal(result.grads["w"], grads["w"])
    assert np.abs(grads["w"]).sum() > 0


@pytest.mark.parametrize("case", ["second_reader", "indices_output"])
def test_no_rewrite_where_it_would_not_be_exact(case):
    if case == "second_reader":
        model, feeds = cnn(POOLS[0], extra_reader=True)
    else:
        model, feeds = cnn(POOLS[0])
        model.nodes[2] = Node("pool", "MaxPool", ["r"], ["p", "idx"], POOLS[0])
    job = prepare(model, feeds)
    assert [n.op_type for n in job.nodes][:3] == ["Conv", "Relu", "MaxPool"] and not job.rewrites
    result = InlineEngine().gradients(model, feeds)
    loss, grads = unrewritten(model, feeds)
    assert result.loss == loss
    np.testing.assert_array_equal(result.grads["w"], grads["w"])


# -- MatMul + Add of a bias: one node (gradserve.MatMulAdd) ----------------------------------------------
def linear(dtype=np.float64, bias_shape=(5,), bias_first=False, extra_reader=False, w_shape=(4, 5), batched_bias=False):
    """x (B, 3, 4) @ w (4, 5) + b -> Tanh -> sum of squares. The bias before the product in the Add
    with ``bias_first``; the product also summed into the loss with ``extra_reader``."""
    h, b = "h", "b"
    nodes = [Node("mm", "MatMul", ["x", "w"], [h])]
    params = {"w": rng.standard_normal(w_shape).astype(dtype)}
    if batched_bias:  # a "bias" made from the batch: one per sample
        nodes.append(Node("bsum", "ReduceSum", ["x", "ax"], [b], {"keepdims": 1}))
    else:
        params[b] = rng.standard_normal(bias_shape).astype(dtype)
    nodes += [
        Node("add", "Add", [b, h] if bias_first else [h, b], ["y"]),
        Node("act", "Tanh", ["y"], ["t"]),
        Node("sq", "Mul", ["t", "t"], ["s"]),
        Node("sum", "ReduceSum", ["s"], ["l1"], {"keepdims": 0}),
    ]
    if extra_reader:
        nodes += [Node("sum_h", "ReduceSum", [h], ["l2"], {"keepdims": 0}), Node("tot", "Add", ["l1", "l2"], ["loss"])]
    else:
        nodes.append(Node("out", "Identity", ["l1"], ["loss"]))
    constants = {"ax": np.array([2], np.int64)} if batched_bias else {}
    model = Model(nodes, [InputSpec("x", np.dtype(dtype), (None, 3, 4))], params, "loss", constants=constants)
    return model, {"x": rng.standard_normal((6, 3, 4)).astype(dtype)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias_shape,bias_first", [((5,), False), ((1, 1, 5), True)])
def test_matmul_and_bias_run_as_one_node_within_rounding(dtype, bias_shape, bias_first):
    from gradserve.worker.ops.linalg import FUSED_LINEAR

    model, feeds = linear(dtype, bias_shape, bias_first)
    job = prepare(model, feeds)
    assert [(n.name, n.op_type) for n in job.nodes[:2]] == [("mm", FUSED_LINEAR), ("act", "Tanh")]
    assert any("run as one node" in r for r in job.rewrites)
    got = InlineEngine().gradients(model, feeds)
    loss, grads = unrewritten(model, feeds)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert got.loss == pytest.approx(loss, rel=tol)
    for name, want in grads.items():
        assert got.grads[name].shape == want.shape
        np.testing.assert_allclose(got.grads[name], want, rtol=tol, atol=tol * np.abs(want).max())


def test_no_matmul_bias_fusion_where_it_cannot_apply():
    from gradserve.worker.ops.linalg import FUSED_LINEAR

    def fused(model, feeds):
        return any(n.op_type == FUSED_LINEAR for n in prepare(model, feeds).nodes)

    assert fused(*linear())
    assert not fused(*linear(extra_reader=True))  # the product read again
    assert not fused(*linear(bias_shape=(3, 5)))  # a bias per row: not a bias of the columns
    assert not fused(*linear(batched_bias=True, bias_shape=None))  # computed, one per sample


def test_fused_linear_splits_into_micro_batches_and_merges_weight_errors():
    """Planning treats the node as its MatMul (the batch on X's leading axis) and costs its product;
    deferred weight errors of micro-batches merge into one product."""
    from gradcheck import assert_split_exact
    from gradserve.server.planning.cost import node_flops
    from gradserve.worker.autodiff import backward_deferred
    from gradserve.worker.ops.linalg import FUSED_LINEAR

    model, feeds = linear()
    job = prepare(model, feeds)
    node = next(n for n in job.nodes if n.op_type == FUSED_LINEAR)
    assert node_flops(node, job.shapes) == 2 * 6 * 3 * 5 * 4
    assert_split_exact(model, feeds, parts=(2, 3))
    params = list(model.params)
    program = compile_program(job.nodes, [*feeds, *params], [model.loss], params)
    whole = backward(program, forward(program, {**feeds, **model.params}), {model.loss: np.ones(())})
    tapes = []
    for half in (slice(0, 2), slice(2, None)):
        tape = forward(program, {"x": feeds["x"][half], **model.params})
        backward(program, tape, {model.loss: np.ones(())}, defer=["w", "b"])
        tapes.append(tape)
    merged = backward_deferred(program, tapes)
    for name in ("w", "b"):
        np.testing.assert_allclose(merged[name], whole[name], rtol=1e-12)


@pytest.mark.parametrize("x_shape,b_shape", [((2, 3, 4), (5,)), ((7, 4), (1, 5)), ((2, 2, 3, 4), (1, 1, 1, 5))])
def test_fused_linear_vjp_matches_finite_differences(x_shape, b_shape):
    from gradcheck import check_vjp, run_op
    from gradserve.worker.ops.linalg import FUSED_LINEAR

    x, w, b = rng.standard_normal(x_shape), rng.standard_normal((4, 5)), rng.standard_normal(b_shape)
    check_vjp(FUSED_LINEAR, [x, w, b], check_shapes=False)
    np.testing.assert_allclose(run_op(FUSED_LINEAR, [x, w, b])[0], x @ w + b, rtol=1e-12, atol=1e-12)


def test_torch_linear_on_sequences_runs_fused_and_matches_autograd(tmp_path):
    """nn.Linear on (batch, tokens, features), as torch's default exporter writes it (MatMul + Add)."""
    import torch

    import gradserve
    from torch_oracle import check_module
    from gradserve.worker.ops.linalg import FUSED_LINEAR

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

        def forward(self, x, y):
            return torch.nn.functional.mse_loss(self.down(torch.relu(self.up(x))), y)

    torch.manual_seed(0)
    args = [torch.randn(4, 10, 8), torch.randn(4, 10, 8)]
    check_module(Block(), args, ["x", "y"], tmp_path)
    model = gradserve.load_onnx(tmp_path / "Block-dynamo.onnx")
    job = prepare(model, {"x": args[0].numpy(), "y": args[1].numpy()})
    assert [n.op_type for n in job.nodes].count(FUSED_LINEAR) == 2

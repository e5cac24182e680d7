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
        nodes[-1:] = [Node("sum_p", "ReduceSum", ["s"], ["l1"], {"keepdims": 0}),
                      Node("sum_r", "ReduceSum", ["r"], ["l2"], {"keepdims": 0}),
                      Node("add", "Add", ["l1", "l2"], ["loss"])]
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
    assert job.rewrites == ("node 'relu' (Relu) runs after node 'pool' (MaxPool), on the pooled values "
                            "(exact: the max of rectified values is the rectified max)",)
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

"""ONNX import folds what is known at import: Constant nodes and constant subgraphs, identical
nodes, static Shape chains (the batch entry kept when it is symbolic), and If on a condition known at
import (inlined; an If on the data is refused). The rest of the import is in test_onnx_import.py."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gradserve
from gradserve.client.onnx_import import load_onnx
from gradserve.server.inline import InlineEngine
from gradserve.worker.graph import GraphError, Model
from onnx_protos import make_onnx

rng = np.random.default_rng(0)


def _ops(model: Model) -> Counter:
    return Counter(n.op_type for n in model.nodes)


# -- folding ------------------------------------------------------------------------------------------
def test_constant_nodes_and_constant_subgraphs_fold():
    proto = make_onnx(
        [
            helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(np.array([1.0, 2.0], np.float32))),
            helper.make_node("Constant", [], ["c2"], value_float=3.0),
            helper.make_node("Constant", [], ["axes"], value_ints=[0]),
            helper.make_node("Mul", ["c1", "c2"], ["c3"], name="fold_me"),
            helper.make_node("Unsqueeze", ["c3", "axes"], ["c4"], name="fold_me_too"),
            helper.make_node("Mul", ["x", "c4"], ["y"], name="keep"),
            helper.make_node("ReduceSum", ["y"], ["loss"], name="sum", keepdims=0),
        ],
        [("x", TensorProto.FLOAT, ["N", 2])],
        [("loss", TensorProto.FLOAT, [])],
    )
    model = load_onnx(proto)
    assert [n.name for n in model.nodes] == ["keep", "sum"]
    assert list(model.constants) == ["c4"]  # c1, c2, c3 and axes were only read by folded nodes
    np.testing.assert_array_equal(model.constants["c4"], np.array([[3.0, 6.0]], np.float32))
    assert model.constants["c4"].dtype == np.float32


def test_identical_nodes_are_merged():
    # (x - t) * (x - t) written with two identical Subs, as torch's exporter writes MSE
    proto = make_onnx(
        [
            helper.make_node("Sub", ["x", "t"], ["d1"], name="sub_a"),
            helper.make_node("Sub", ["x", "t"], ["d2"], name="sub_b"),
            helper.make_node("Sub", ["t", "x"], ["d3"], name="sub_swapped"),
            helper.make_node("Mul", ["d1", "d2"], ["sq"], name="square"),
            helper.make_node("Add", ["sq", "d3"], ["y"], name="add"),
            helper.make_node("ReduceSum", ["y"], ["loss"], name="sum", keepdims=0),
        ],
        [("x", TensorProto.DOUBLE, ["N", 2]), ("t", TensorProto.DOUBLE, ["N", 2])],
        [("loss", TensorProto.DOUBLE, [])],
    )
    model = load_onnx(proto)
    assert [n.name for n in model.nodes] == ["sub_a", "sub_swapped", "square", "add", "sum"]
    assert model.nodes[2].inputs == ["d1", "d1"]
    x, t = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    result = gradserve.local().gradients(model, {"x": x, "t": t}, input_grads=["x"])
    assert result.loss == pytest.approx(float(np.sum((x - t) ** 2 + (t - x))))
    np.testing.assert_allclose(result.input_grads["x"], 2 * (x - t) - 1)


def test_dropout_is_not_folded():
    proto = make_onnx(
        [
            helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0]),
            helper.make_node("Dropout", ["c"], ["d"], name="drop"),
            helper.make_node("Mul", ["x", "d"], ["y"], name="mul"),
            helper.make_node("ReduceSum", ["y"], ["loss"], name="sum", keepdims=0),
        ],
        [("x", TensorProto.FLOAT, [2])],
        [("loss", TensorProto.FLOAT, [])],
    )
    model = load_onnx(proto)
    assert "drop" in {n.name for n in model.nodes}


def _reshape_via_shape(batch):
    """h = x @ W, reshaped to (h.shape[0], 1, h.shape[1]) the way exporters spell it."""
    W = rng.standard_normal((6, 4)).astype(np.float32)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    proto = make_onnx(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Shape", ["h"], ["s"], name="shape"),
            helper.make_node("Constant", [], ["i0"], name="c0", value=numpy_helper.from_array(i64(0)[0])),
            helper.make_node("Constant", [], ["i1"], name="c1", value=numpy_helper.from_array(i64(1)[0])),
            helper.make_node("Gather", ["s", "i0"], ["d0"], name="dim0", axis=0),
            helper.make_node("Gather", ["s", "i1"], ["d1"], name="dim1", axis=0),
            helper.make_node("Unsqueeze", ["d0", "ax"], ["u0"], name="u0"),
            helper.make_node("Unsqueeze", ["d1", "ax"], ["u1"], name="u1"),
            helper.make_node("Concat", ["u0", "one", "u1"], ["newshape"], name="cat", axis=0),
            helper.make_node("Reshape", ["h", "newshape"], ["r"], name="reshape"),
            helper.make_node("Mul", ["r", "r"], ["sq"], name="sq"),
            helper.make_node("ReduceMean", ["sq"], ["loss"], name="mean", keepdims=0),
        ],
        [("x", TensorProto.FLOAT, [batch, 6])],
        [("loss", TensorProto.FLOAT, [])],
        {"W": W, "ax": i64(0), "one": i64(1)},
    )
    return proto, W


def test_static_shape_chain_folds_away():
    proto, W = _reshape_via_shape(3)
    model = load_onnx(proto)
    assert _ops(model) == Counter({"MatMul": 1, "Reshape": 1, "Mul": 1, "ReduceMean": 1})
    assert model.constants["newshape"].tolist() == [3, 1, 4]
    x = rng.standard_normal((3, 6)).astype(np.float32)
    result = InlineEngine().gradients(model, {"x": x})
    h = x @ W
    np.testing.assert_allclose(result.loss, np.mean(h * h), rtol=1e-6)


def test_symbolic_batch_keeps_shape_and_runs_two_batch_sizes():
    proto, W = _reshape_via_shape("batch")
    model = load_onnx(proto)
    # Only the batch entry is computed per job; h.shape[1] == 4 folds even though h.shape does not.
    assert _ops(model) == Counter(
        {"MatMul": 1, "Shape": 1, "Gather": 1, "Unsqueeze": 1, "Concat": 1, "Reshape": 1, "Mul": 1, "ReduceMean": 1}
    )
    assert model.inputs[0].shape == ("batch", 6)
    for batch in (2, 5):
        x = rng.standard_normal((batch, 6)).astype(np.float64).astype(np.float32)
        result = InlineEngine().gradients(model, {"x": x})
        h = x.astype(np.float64) @ W
        np.testing.assert_allclose(result.loss, np.mean(h * h), rtol=1e-5)
        np.testing.assert_allclose(result.grads["W"], x.T @ (2 * h / h.size), rtol=1e-4, atol=1e-6)


def test_torch_mse_broadcast_chain(tmp_path):
    """torch's F.mse_loss exports as Shape/ConstantOfShape/Expand bookkeeping: gone when the batch is
    static, kept (and still right for any batch) when it is symbolic."""
    torch = pytest.importorskip("torch")
    import models as M

    net = M.WithMSE(M.make_mlp()).double()
    x, t = torch.randn(5, 8, dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64)
    static = load_onnx(M.export(net, (x, t), tmp_path / "s.onnx", ["x", "target"], ["loss"]))
    assert not {"Shape", "ConstantOfShape", "Constant"} & set(_ops(static))
    dynamic = load_onnx(M.export(net, (x, t), tmp_path / "d.onnx", ["x", "target"], ["loss"], dynamic_batch=True))
    assert "Shape" in _ops(dynamic) and dynamic.inputs[0].shape == ("batch", 8)
    for batch in (3, 6):
        xb, tb = torch.randn(batch, 8, dtype=torch.float64), torch.rand(batch, 4, dtype=torch.float64)
        want = net(xb, tb)
        net.zero_grad()
        want.backward()
        got = InlineEngine().gradients(dynamic, {"x": xb.numpy(), "target": tb.numpy()})
        assert abs(got.loss - want.item()) < 1e-12
        for name, p in net.named_parameters():
            np.testing.assert_allclose(got.grads[name], p.grad.numpy(), rtol=1e-9, atol=1e-12)


# -- If -----------------------------------------------------------------------------------------------
def _if_model(cond_from_shape: bool) -> onnx.ModelProto:
    """loss = sum(If(cond, then: x * 2, else: x - 1)); the condition is rank(x) == 2 (known at
    import) or x[0, 0] > 0 (known only per job)."""
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"], name="double")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(2, np.float32), "two")],
    )
    else_g = helper.make_graph(
        [helper.make_node("Sub", ["x", "one"], ["e"], name="minus")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    if cond_from_shape:
        cond_nodes = [
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),
            helper.make_node("Size", ["shape"], ["rank"], name="rank"),
            helper.make_node("Equal", ["rank", "two_i"], ["cond"], name="is2d"),
        ]
    else:
        cond_nodes = [
            helper.make_node("ReduceMax", ["x"], ["m"], name="max", keepdims=0),
            helper.make_node("Greater", ["m", "zero"], ["cond"], name="positive"),
        ]
    nodes = cond_nodes + [
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("ReduceSum", ["y"], ["loss"], name="sum", keepdims=0),
    ]
    return make_onnx(
        nodes,
        [("x", TensorProto.FLOAT, ["batch", 3])],
        [("loss", TensorProto.FLOAT, [])],
        {"one": np.array(1, np.float32), "two_i": np.array(2, np.int64), "zero": np.array(0, np.float32)},
    )


def test_if_on_a_condition_known_at_import_is_inlined():
    model = load_onnx(_if_model(cond_from_shape=True))
    assert "If" not in {n.op_type for n in model.nodes}
    x = rng.standard_normal((4, 3)).astype(np.float32)
    result = InlineEngine().gradients(model, {"x": x})
    np.testing.assert_allclose(result.loss, (2 * x).sum(), rtol=1e-5)


def test_if_on_the_data_is_refused_naming_the_node():
    with pytest.raises(GraphError, match=r"node 'branch' \(If\): its condition is only known when the model runs"):
        load_onnx(_if_model(cond_from_shape=False))

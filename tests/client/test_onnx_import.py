"""ONNX import mechanics: parameters/constants/feeds, folding, losses, and bad input."""

from __future__ import annotations

import contextlib
import io
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gradserve
from gradserve.client.cli import main as cli_main
from gradserve.client.local import load_model
from gradserve.client.onnx_import import LossSpec, load_onnx
from gradserve.server.inline import InlineEngine
from gradserve.worker.graph import GraphError, Model

rng = np.random.default_rng(0)


def _onnx(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    """A model from helper parts; ``inputs``/``outputs`` are (name, elem_type, shape) triples."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in dict(initializers).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ops(model: Model) -> Counter:
    return Counter(n.op_type for n in model.nodes)


def _linear(batch="N", n_out=3):
    """x (batch, 4) @ W (4, n_out) + b: a logits model with parameters W and b."""
    W = rng.standard_normal((4, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    proto = _onnx(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc")],
        [("x", TensorProto.FLOAT, [batch, 4])],
        [("y", TensorProto.FLOAT, [batch, n_out])],
        {"W": W, "b": b},
    )
    return proto, W, b


# -- leaves -------------------------------------------------------------------------------------------
def test_params_constants_feeds():
    W = rng.standard_normal((3, 4)).astype(np.float32)
    scale = np.asarray(0.5, np.float64)
    proto = _onnx(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Reshape", ["h", "shape"], ["r"], name="rs"),
            helper.make_node("Gather", ["r", "idx"], ["g"], name="pick", axis=0),
            helper.make_node("ReduceMean", ["g"], ["loss"], name="mean", keepdims=0),
        ],
        [("x", TensorProto.FLOAT, ["N", 3]), ("idx", TensorProto.INT64, [None])],
        [("loss", TensorProto.FLOAT, [])],
        {"W": W, "shape": np.array([-1, 2], np.int64), "unused_int": np.arange(3), "scale64": scale},
    )
    model = load_onnx(proto)
    assert set(model.params) == {"W", "scale64"}  # every floating initializer, used or not
    assert model.params["W"].dtype == np.float32 and np.array_equal(model.params["W"], W)
    assert model.params["scale64"].dtype == np.float64
    assert set(model.constants) == {"shape"}  # the unused int initializer is dropped
    assert [(s.name, s.dtype, s.shape) for s in model.inputs] == [
        ("x", np.dtype(np.float32), ("N", 3)),
        ("idx", np.dtype(np.int64), ("?",)),
    ]
    assert model.loss == "loss"


def test_initializers_listed_as_inputs_are_not_feeds():
    """Before IR 4 (and with keep_initializers_as_inputs) initializers also appear as graph inputs."""
    proto, W, b = _linear()
    proto.graph.input.extend([helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3])])
    model = load_onnx(proto, loss="mse")
    assert [s.name for s in model.inputs] == ["x", "target"]
    assert set(model.params) == {"W", "b"}


def test_node_names_and_attributes():
    proto = _onnx(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
            helper.make_node("LeakyRelu", ["t"], ["a"], name="act", alpha=0.25),
            helper.make_node("Pad", ["a", "pads"], ["p"], name="act", mode="constant"),
            helper.make_node("Relu", ["p"], ["r"], name="act"),
            helper.make_node("ReduceSum", ["r"], ["loss"], keepdims=0),
        ],
        [("x", TensorProto.FLOAT, [2, 3])],
        [("loss", TensorProto.FLOAT, [])],
        {"pads": np.array([0, 1, 0, 1], np.int64)},
    )
    model = load_onnx(proto)
    names = [n.name for n in model.nodes]
    assert len(set(names)) == len(names) == 5
    assert names[1:4] == ["act", "act_1", "act_2"] and names[0] and names[4]
    attrs = {n.op_type: n.attrs for n in model.nodes}
    assert attrs["Transpose"] == {"perm": [1, 0]} and isinstance(attrs["Transpose"]["perm"][0], int)
    assert attrs["LeakyRelu"] == {"alpha": 0.25} and isinstance(attrs["LeakyRelu"]["alpha"], float)
    assert attrs["Pad"] == {"mode": "constant"}  # a str, not ONNX's bytes
    # The imported model survives gradserve's own wire format.
    again = Model.from_bytes(model.to_bytes())
    assert again.structure_fingerprint() == model.structure_fingerprint()


@pytest.mark.parametrize("kind", ["path", "str", "bytes", "proto"])
def test_sources(kind, tmp_path):
    proto, W, b = _linear()
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    source = {"path": path, "str": str(path), "bytes": proto.SerializeToString(), "proto": proto}[kind]
    model = load_onnx(source, loss="mse")
    assert set(model.params) == {"W", "b"}
    assert gradserve.load_onnx is load_onnx and gradserve.LossSpec is LossSpec


# -- folding ------------------------------------------------------------------------------------------
def test_constant_nodes_and_constant_subgraphs_fold():
    proto = _onnx(
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
    proto = _onnx(
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
    proto = _onnx(
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
    proto = _onnx(
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


# -- losses -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,want",
    [
        ("mse", LossSpec("mse", None, "target")),
        ("MSE", LossSpec("mse", None, "target")),
        ("mse:y", LossSpec("mse", "y", "target")),
        ("mse:y:t", LossSpec("mse", "y", "t")),
        ("cross_entropy", LossSpec("cross_entropy", None, "target")),
        ("cross-entropy::labels", LossSpec("cross_entropy", None, "labels")),
        ("cross_entropy:logits:labels", LossSpec("cross_entropy", "logits", "labels")),
    ],
)
def test_loss_spec_parse(text, want):
    assert LossSpec.parse(text) == want


@pytest.mark.parametrize("text", ["hinge", "mse:a:b:c", ""])
def test_loss_spec_parse_rejects(text):
    with pytest.raises(GraphError):
        LossSpec.parse(text)


@pytest.mark.parametrize("loss", ["mse", "mse:y:t", LossSpec("mse", "y", "t")])
def test_mse_appended(loss):
    proto, W, b = _linear(batch="N")
    model = load_onnx(proto, loss=loss)
    target = "target" if loss == "mse" else "t"
    spec = model.input_spec(target)
    assert spec is not None and spec.dtype == np.float32 and spec.shape == ("N", 3)
    assert [n.op_type for n in model.nodes] == ["Gemm", "Sub", "Mul", "ReduceMean"]
    for batch in (2, 5):
        x = rng.standard_normal((batch, 4)).astype(np.float32)
        t = rng.standard_normal((batch, 3)).astype(np.float32)
        result = InlineEngine().gradients(model, {"x": x, target: t})
        y = x @ W + b
        dy = 2 * (y - t) / y.size
        np.testing.assert_allclose(result.loss, np.mean((y - t) ** 2), rtol=1e-5)
        np.testing.assert_allclose(result.grads["W"], x.T @ dy, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.grads["b"], dy.sum(0), rtol=1e-4, atol=1e-6)


def test_cross_entropy_appended():
    proto, W, b = _linear(batch="N", n_out=5)
    model = load_onnx(proto, loss="cross_entropy::labels")
    spec = model.input_spec("labels")
    assert spec is not None and spec.dtype == np.int64 and spec.shape == ("N",)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    labels = rng.integers(0, 5, 6).astype(np.int64)
    result = InlineEngine().gradients(model, {"x": x, "labels": labels})
    y = (x @ W + b).astype(np.float64)
    p = np.exp(y - y.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(result.loss, -np.mean(np.log(p[np.arange(6), labels])), rtol=1e-5)
    dy = (p - np.eye(5)[labels]) / 6
    np.testing.assert_allclose(result.grads["W"], x.T @ dy, rtol=1e-4, atol=1e-6)


def test_loss_names_a_value():
    proto, W, b = _linear()
    proto.graph.node.append(helper.make_node("ReduceSum", ["y"], ["total"], name="total", keepdims=0))
    proto.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    with pytest.raises(GraphError, match="2 outputs .*--loss"):
        load_onnx(proto)
    model = load_onnx(proto, loss="total")
    assert model.loss == "total" and [n.op_type for n in model.nodes] == ["Gemm", "ReduceSum"]


def test_non_scalar_output_needs_a_loss():
    proto, _, _ = _linear()
    with pytest.raises(GraphError, match=r"'y' has shape \(N, 3\), not a scalar.*--loss / loss="):
        load_onnx(proto)


def test_loss_spec_errors():
    proto, _, _ = _linear()
    with pytest.raises(GraphError, match="target 'x'.*already"):
        load_onnx(proto, loss="mse::x")
    with pytest.raises(GraphError, match="'nope'"):
        load_onnx(proto, loss="mse:nope")
    with pytest.raises(GraphError, match="neither a value"):
        load_onnx(proto, loss="hinge")


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"\x08garbage\xff\xfe not onnx", b"", b"PK\x03\x04"])
def test_garbage_is_not_an_onnx_model(data, tmp_path):
    with pytest.raises(GraphError, match="not an ONNX model"):
        load_onnx(data)
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(GraphError, match="not an ONNX model"):
        load_model(path)


def _unsupported(domain: str = ""):
    return _onnx(
        [
            helper.make_node("Relu", ["x"], ["r"], name="/layer/Relu"),
            helper.make_node("Foo" if not domain else "Relu", ["r"], ["f"], name="/layer/Foo", domain=domain),
            helper.make_node("ReduceSum", ["f"], ["loss"], name="/sum", keepdims=0),
        ],
        [("x", TensorProto.FLOAT, [2, 2])],
        [("loss", TensorProto.FLOAT, [])],
    )


def test_unsupported_op_names_the_node(tmp_path):
    with pytest.raises(GraphError, match=r"node '/layer/Foo' \(Foo\): unsupported op type"):
        load_onnx(_unsupported())
    # The CLI prints the same one line and exits with status 2.
    path = tmp_path / "foo.onnx"
    onnx.save(_unsupported(), str(path))
    np.savez(tmp_path / "feeds.npz", x=np.ones((2, 2), np.float32))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli_main(["grad", str(path), "--feeds", str(tmp_path / "feeds.npz"), "--out", str(tmp_path / "g.npz")])
    assert status == 2
    assert "node '/layer/Foo' (Foo): unsupported op type" in err.getvalue()


def test_custom_domain_is_rejected():
    proto = _unsupported(domain="com.example")
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(GraphError, match=r"node '/layer/Foo' \(Relu\): domain 'com.example'"):
        load_onnx(proto)


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_models_run_at_their_own_opset(opset):
    """ReduceMean's axes moved from an attribute to an input in opset 18; the model keeps the opset
    it was exported at and the op runs either form."""
    axes_input = opset >= 18
    proto = _onnx(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node(
                "ReduceMean",
                ["r", "axes"] if axes_input else ["r"],
                ["loss"],
                name="mean",
                keepdims=0,
                **({} if axes_input else {"axes": [0, 1]}),
            ),
        ],
        [("x", TensorProto.FLOAT, [2, 3])],
        [("loss", TensorProto.FLOAT, [])],
        {"axes": np.array([0, 1], np.int64)} if axes_input else {},
        opset=opset,
    )
    model = load_onnx(proto)
    assert model.opset == opset and Model.from_bytes(model.to_bytes()).opset == opset
    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(InlineEngine().gradients(model, {"x": x}).loss, np.maximum(x, 0).mean(), rtol=1e-6)


def test_older_opsets_are_converted_and_unknown_newer_ones_refused():
    """Opset 11 (Softmax over coerced 2-D) is brought to 17 by ONNX's converter; an opset from the
    future that the converter cannot bring down is refused with the range gradserve runs."""
    proto = _onnx(
        [helper.make_node("ReduceSum", ["x"], ["loss"], name="sum", keepdims=0)],
        [("x", TensorProto.FLOAT, [2, 3])],
        [("loss", TensorProto.FLOAT, [])],
        {},
        opset=11,
    )
    assert load_onnx(proto).opset == 17
    proto.opset_import[0].version = 99
    with pytest.raises(GraphError, match="opset 99; gradserve runs opsets 13 to 21"):
        load_onnx(proto)


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
    return _onnx(
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

"""ONNX import mechanics: parameters/constants/feeds, losses, and bad input (opsets included).
Folding at import (constants, merged nodes, shape chains, If) is in test_onnx_import_folding.py."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import gradserve
from gradserve.client.cli import main as cli_main
from gradserve.client.local import load_model
from gradserve.client.onnx_import import LossSpec, load_onnx
from gradserve.server.inline import InlineEngine
from gradserve.worker.graph import GraphError, Model
from onnx_protos import make_onnx

rng = np.random.default_rng(0)


def _linear(batch="N", n_out=3):
    """x (batch, 4) @ W (4, n_out) + b: a logits model with parameters W and b."""
    W = rng.standard_normal((4, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    proto = make_onnx(
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
    proto = make_onnx(
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
    proto = make_onnx(
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
    return make_onnx(
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
    proto = make_onnx(
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
    proto = make_onnx(
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

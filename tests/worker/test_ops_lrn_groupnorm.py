"""LRN and GroupNormalization: forwards against torch and onnx's reference implementation, VJPs by
finite differences in float64 (GroupNormalization in its opset 18 per-group and opset 21
per-channel scale/bias forms)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

from gradcheck import check_vjp, onnx_reference, run_op

rng = np.random.default_rng(0)


LRN_ATTRS = [
    {"size": 1},
    {"size": 2, "alpha": 0.3},
    {"size": 3, "alpha": 0.3, "beta": 0.6, "bias": 1.5},
    {"size": 5, "alpha": 0.5, "beta": 0.75, "bias": 2.0},
    {"size": 9, "alpha": 0.2, "beta": 1.2},
]


def lrn_loop(x, size, alpha=1e-4, beta=0.75, bias=1.0):
    """The ONNX definition channel by channel (onnx's own reference LRN loops over the batch axis
    where it means channels, so it is no oracle)."""
    y = np.empty_like(x)
    for c in range(x.shape[1]):
        lo, hi = max(0, c - (size - 1) // 2), min(x.shape[1] - 1, c + size // 2)
        y[:, c] = x[:, c] / (bias + alpha / size * (x[:, lo : hi + 1] ** 2).sum(axis=1)) ** beta
    return y


@pytest.mark.parametrize("attrs", LRN_ATTRS, ids=lambda a: f"size{a['size']}")
def test_lrn(attrs):
    x = rng.standard_normal((2, 7, 4, 3))
    y = run_op("LRN", [x], attrs)[0]
    np.testing.assert_allclose(y, lrn_loop(x, **attrs), rtol=1e-12, atol=1e-12)
    if attrs["size"] % 2:  # torch centres even windows the other way round
        want = F.local_response_norm(
            torch.from_numpy(x),
            attrs["size"],
            alpha=attrs.get("alpha", 1e-4),
            beta=attrs.get("beta", 0.75),
            k=attrs.get("bias", 1.0),
        ).numpy()
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    check_vjp("LRN", [x], attrs, opset=13)


def test_lrn_shapes_and_float32():
    x = rng.standard_normal((2, 3, 5))  # 1-D spatial
    check_vjp("LRN", [x], {"size": 3, "alpha": 0.5})
    x = rng.standard_normal((1, 4, 2, 3, 2))  # 3-D spatial
    check_vjp("LRN", [x], {"size": 3, "alpha": 0.5})
    x32 = rng.standard_normal((2, 6, 3, 3)).astype(np.float32)
    y = run_op("LRN", [x32], {"size": 5})[0]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, F.local_response_norm(torch.from_numpy(x32), 5).numpy(), rtol=1e-6)


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("spatial", [(4, 3), (5,), ()], ids=["2d", "1d", "0d"])
def test_groupnorm_per_channel(groups, spatial):
    """opset 21: scale and bias per channel; torch's F.group_norm is the oracle."""
    x = rng.standard_normal((3, 6) + spatial)
    s, b = rng.standard_normal(6), rng.standard_normal(6)
    attrs = {"num_groups": groups, "epsilon": 1e-3}
    y = run_op("GroupNormalization", [x, s, b], attrs)[0]
    want = F.group_norm(torch.from_numpy(x), groups, torch.from_numpy(s), torch.from_numpy(b), eps=1e-3).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)
    # (the opset 21 reference takes its statistics in float32: stash_type 1)
    np.testing.assert_allclose(
        y, onnx_reference("GroupNormalization", [x, s, b], attrs, opset=21)[0], rtol=1e-5, atol=1e-5
    )
    check_vjp("GroupNormalization", [x, s, b], attrs, opset=21)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_groupnorm_per_group(groups):
    """opset 18: scale and bias per group, applied to each of the group's channels."""
    x = rng.standard_normal((3, 6, 4, 2))
    s, b = rng.standard_normal(groups), rng.standard_normal(groups)
    attrs = {"num_groups": groups}
    y = run_op("GroupNormalization", [x, s, b], attrs)[0]
    rep = 6 // groups
    want = F.group_norm(
        torch.from_numpy(x), groups, torch.from_numpy(np.repeat(s, rep)), torch.from_numpy(np.repeat(b, rep)), eps=1e-5
    ).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        y, onnx_reference("GroupNormalization", [x, s, b], attrs, opset=18)[0], rtol=1e-10, atol=1e-10
    )
    check_vjp("GroupNormalization", [x, s, b], attrs, opset=18)


def test_groupnorm_float32_and_stash_type():
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32) * 3 + 1
    s, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    y = run_op("GroupNormalization", [x, s, b], {"num_groups": 2, "stash_type": 1})[0]
    assert y.dtype == np.float32
    want = F.group_norm(torch.from_numpy(x), 2, torch.from_numpy(s), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_groupnorm_refuses_bad_shapes():
    x = rng.standard_normal((2, 6, 3))
    with pytest.raises(Exception, match="does not divide"):
        run_op("GroupNormalization", [x, np.ones(6), np.zeros(6)], {"num_groups": 4})
    with pytest.raises(Exception, match="scale must have shape"):
        run_op("GroupNormalization", [x, np.ones(4), np.zeros(6)], {"num_groups": 3})


# -- LRN in a real model: the onnx package's light Inception v1 ---------------------------------------
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_inception_v1.onnx"


def inception_float64(seed: int = 0) -> onnx.ModelProto:
    """light_inception_v1 (opset 9, structure only: every weight is a ConstantOfShape of 0.02, which
    makes activations grow without bound) with each of those weights replaced by a random float64
    initializer scaled by 1/sqrt(fan-in), and every float in the graph made float64."""
    from onnx import numpy_helper

    model = onnx.load(str(LIGHT))
    g = model.graph
    gen = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inits = [t for t in g.initializer if t.data_type != onnx.TensorProto.FLOAT]
    for t in g.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            inits.append(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    nodes = []
    for n in g.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in shapes:
            shape = tuple(int(d) for d in shapes[n.input[0]])
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            value = gen.standard_normal(shape) * (1.0 / np.sqrt(fan_in) if len(shape) > 1 else 0.1)
            inits.append(numpy_helper.from_array(value, n.output[0]))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(inits)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    # the model's IR version lists every initializer among the graph inputs too
    listed = {vi.name for vi in g.input}
    g.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits if t.name not in listed
    )
    return model


@pytest.mark.skipif(not LIGHT.exists(), reason="the onnx package ships no light_inception_v1.onnx")
def test_light_inception_v1_gradients():
    """The whole network (with its two LRNs) in float64: the loss is finite and dL/dw along a random
    direction over every weight equals central finite differences of the loss."""
    import gradserve

    model = gradserve.load_onnx(inception_float64(), loss="mse")
    assert any(n.op_type == "LRN" for n in model.nodes)
    gen = np.random.default_rng(1)
    feeds = {"data_0": gen.standard_normal((1, 3, 224, 224)), "target": gen.random((1, 1000))}
    engine = gradserve.local()
    result = engine.gradients(model, feeds)
    assert np.isfinite(float(result.loss))
    params = {k: v.copy() for k, v in model.params.items()}
    direction = {k: gen.standard_normal(v.shape) for k, v in params.items()}
    analytic = sum(float(np.vdot(direction[k], result.grads[k])) for k in params)
    eps = 1e-7  # small: ReLU and max-pool kinks make larger steps inexact

    def loss_at(t: float) -> float:
        for k, v in params.items():
            model.params[k] = v + t * direction[k]
        return float(engine.gradients(model, feeds).loss)

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(numeric - analytic) <= 1e-5 * max(abs(numeric), abs(analytic)), (numeric, analytic)

"""Small things start fast (issues 19 and 23): what a fresh process imports for the client library,
the CLI's help and a small inline job -- no numba, no onnx package, no Ray where none is needed --
and that ONNX's checks reached without onnx's Python package (gradserve.worker.onnx_lite) build the
same messages as onnx.helper and give the same answers as onnx. No timings here: see
benchmarks/cli_startup.py."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, shape_inference

from gradserve.worker import kernels, onnx_lite
from gradserve.worker.graph import SUPPORTED_OPSETS, GraphError, InputSpec, Model, Node
from gradserve.worker.validate import onnx_attrs, infer_shapes, onnx_model

# "onnx" is onnx's package (its __init__ imports all of onnx, and ml_dtypes): onnx_lite loads two
# of its modules, onnx.onnx_ml_pb2 and onnx.onnx_cpp2py_export, without it
HEAVY = ("numba", "onnx", "ml_dtypes", "ray", "grpc", "gradserve.worker.ops")


def _loaded_after(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh Python; it ends by printing a JSON object, returned here, to which
    this adds "heavy": which of HEAVY (the package "onnx"; any other with its submodules) the process
    imported."""
    probe = (
        f"{code}\nimport json as _j, sys as _s\n"
        f"_heavy = sorted(h for h in {HEAVY!r} if any(m == h or h != 'onnx' and m.startswith(h + '.')"
        " for m in _s.modules))\n"
        "_out = globals().get('report', {})\n_out['heavy'] = _heavy\nprint(_j.dumps(_out))"
    )
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- what fresh processes import --------------------------------------------------------------------
def test_the_client_imports_no_op_library_onnx_numba_or_ray():
    """Touching gradserve.Client and hashing a model the way an upload does (model_manifest)."""
    report = _loaded_after("""
import numpy as np
import gradserve
gradserve.Client
from gradserve.client.wire import model_manifest
m = gradserve.ModelBuilder()
x = m.input("x", (None, 3))
model = m.loss((x @ m.param("w", np.ones((3, 2))) + 1.0).sum())
manifest, arrays = model_manifest(model)
report = {"id": manifest.model_id, "arrays": sorted(arrays)}
""")
    assert len(report["id"]) == 64 and "w" in report["arrays"]
    assert [h for h in report["heavy"] if h != "grpc"] == []  # the client speaks gRPC, nothing else


@pytest.mark.parametrize("argv", [["--help"], ["grad", "--help"]])
def test_help_imports_no_numba_ray_onnx_or_grpc(argv):
    report = _loaded_after(f"""
import contextlib, io
from gradserve.client.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main({argv!r})
    except SystemExit as exc:
        code = exc.code
report = {{"code": code, "usage": out.getvalue().startswith("usage: gradserve")}}
""")
    assert report == {"code": 0, "usage": True, "heavy": []}


SMALL_JOB = """
import sys
import numpy as np
import gradserve
from gradserve.server.planning.prepare import prepare
from gradserve.worker.ops.loss import FUSED_MSE
batch, path = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(5)
m = gradserve.ModelBuilder()
x, y = m.input("x", (None, 16), np.float64), m.input("y", (None, 16), np.float64)
params = {"w0": rng.standard_normal((16, 16)) / 4, "b0": rng.standard_normal(16), "w1": rng.standard_normal((16, 16)) / 4,
          "b1": rng.standard_normal(16)}
w0, b0, w1, b1 = (m.param(k, v) for k, v in params.items())
model = m.loss(m.mse(m.tanh(x @ w0 + b0) @ w1 + b1, y))
feeds = {"x": rng.standard_normal((batch, 16)), "y": rng.standard_normal((batch, 16))}
result = gradserve.local().gradients(model, feeds)
np.savez(path, loss=result.loss, **{"grad_" + k: g for k, g in result.grads.items()}, **params, **feeds)
report = {"fused": any(n.op_type == FUSED_MSE for n in prepare(model, feeds).nodes)}
"""


def _reference(d) -> tuple[float, dict]:
    """The SMALL_JOB model's loss and dL/dw by hand: p = tanh(x w0 + b0) w1 + b1, L = mean((p - y)^2)."""
    h = np.tanh(d["x"] @ d["w0"] + d["b0"])
    diff = h @ d["w1"] + d["b1"] - d["y"]
    dp = 2 * diff / diff.size
    dz = (dp @ d["w1"].T) * (1 - h * h)
    return float(np.mean(diff**2)), {"w1": h.T @ dp, "b1": dp.sum(0), "w0": d["x"].T @ dz, "b0": dz.sum(0)}


@pytest.mark.parametrize("batch", [8, 2048])  # 128 elements at the loss; 32768, past kernels.MIN_SIZE
def test_a_small_inline_job_imports_neither_numba_nor_the_onnx_package(batch, tmp_path):
    """The mean squared error still runs as one node, on numpy's passes; a job large enough for
    the kernels does load numba (and gets the same gradients). Neither imports onnx's package."""
    report = _loaded_after(SMALL_JOB, str(batch), str(tmp_path / "out.npz"))
    assert report["fused"]
    heavy = set(report["heavy"])
    assert {"onnx", "ml_dtypes", "ray", "grpc"}.isdisjoint(heavy)
    if batch * 16 >= kernels.MIN_SIZE:
        assert ("numba" in heavy) == kernels.available()
    else:
        assert "numba" not in heavy
    with np.load(tmp_path / "out.npz") as d:
        loss, grads = _reference(d)
        assert float(d["loss"]) == pytest.approx(loss, rel=1e-12)
        for name, want in grads.items():
            np.testing.assert_allclose(d["grad_" + name], want, rtol=1e-10, atol=1e-14)


def test_onnx_imported_after_the_light_path_shares_its_messages_and_works(tmp_path):
    """onnx_lite registers onnx's protobuf module and C++ extension under their own names: a later
    ``import onnx`` reuses them (one set of message classes) and all of onnx still works."""
    report = _loaded_after("""
import numpy as np
from gradserve.worker import onnx_lite
node = onnx_lite.node("Relu", ["x"], ["y"], "r", {})
model = onnx_lite.model([node], [onnx_lite.value_info("x", np.dtype("float32"), (2, 3))], [], 17)
import onnx
from onnx import checker, helper, shape_inference
checker.check_model(model)
inferred = shape_inference.infer_shapes(model)
vi = inferred.graph.value_info[0]
report = {"same_class": type(model) is onnx.ModelProto,
          "y": [vi.name, [d.dim_value for d in vi.type.tensor_type.shape.dim]],
          "helper": helper.make_node("Relu", ["x"], ["y"], name="r") == node}
""")
    assert report["same_class"] and report["helper"] and report["y"] == ["y", [2, 3]]


# -- onnx_lite against onnx itself ------------------------------------------------------------------
ATTRS = [
    {},
    {"alpha": 0.5, "transB": 1},
    {"axes": [0, -1], "mode": "constant"},
    {"scales": [1.0, 2, 2.5]},
    {"direction": "bidirectional", "activations": ["Sigmoid", "Tanh"]},
    {"flag": True, "count": np.int64(3)},
    {"value": np.arange(6, dtype=np.float32).reshape(2, 3)},
    {"value": np.array(7, np.int64)},
    {"f": np.float32(0.25)},
]


@pytest.mark.parametrize("attrs", ATTRS, ids=range(len(ATTRS)))
def test_nodes_are_built_as_onnx_helper_builds_them(attrs):
    node = Node("n1", "Op", ["a", "", "b"], ["y"], dict(attrs))
    want = helper.make_node(node.op_type, node.inputs, node.outputs, name=node.name, **onnx_attrs(node))
    assert (
        onnx_lite.node(node.op_type, node.inputs, node.outputs, node.name, node.attrs).SerializeToString()
        == want.SerializeToString()
    )


def test_attribute_values_onnx_cannot_type_are_refused_alike():
    for value in ([], [1, "a"]):
        with pytest.raises(ValueError) as theirs:
            helper.make_node("Op", [], [], bad=value)
        with pytest.raises(ValueError) as ours:
            onnx_lite.node("Op", [], [], "", {"bad": value})
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "dtype",
    [
        "float32",
        "float64",
        "float16",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "complex64",
        "complex128",
        ">f4",
        ">i8",
    ],
)
@pytest.mark.parametrize("shape", [(), (0,), (2, 3)])
def test_tensors_and_value_infos_are_built_as_onnx_builds_them(dtype, shape):
    """Byte for byte. (onnx refuses big-endian arrays; onnx_lite writes their values, as onnx writes
    the same values in native order.)"""
    array = (np.arange(int(np.prod(shape))) % 3).astype(dtype).reshape(shape)
    native = array.astype(array.dtype.newbyteorder("="))
    assert onnx_lite.tensor(array, "t").SerializeToString() == numpy_helper.from_array(native, "t").SerializeToString()
    assert onnx_lite.tensor(array).SerializeToString() == numpy_helper.from_array(native).SerializeToString()
    code = helper.np_dtype_to_tensor_dtype(native.dtype)
    assert onnx_lite.dtype_code(np.dtype(dtype)) == code
    assert onnx_lite.numpy_dtype(code) == helper.tensor_dtype_to_np_dtype(code)
    want = helper.make_tensor_value_info("v", code, shape)
    assert onnx_lite.value_info("v", np.dtype(dtype), shape).SerializeToString() == want.SerializeToString()


def test_models_carry_the_ir_version_onnx_gives_each_opset():
    node = helper.make_node("Relu", ["x"], ["y"])
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, (2,))]
    inits = [numpy_helper.from_array(np.ones(2, np.float32), "c")]
    for opset in [*SUPPORTED_OPSETS, 12, 22]:  # and outside gradserve's range, through onnx.helper
        want = onnx_model(helper.make_graph([node], "check", inputs, [], initializer=inits), opset)
        assert onnx_lite.model([node], inputs, inits, opset).SerializeToString() == want.SerializeToString()


def test_checks_fail_with_onnx_messages():
    bad_attr = onnx_lite.node("Relu", ["x"], ["y"], "r", {"alpha": 1.0})
    with pytest.raises(onnx.checker.ValidationError) as theirs:
        onnx.checker.check_node(bad_attr, _context(17))
    with pytest.raises(onnx_lite.CheckFailed) as ours:
        onnx_lite.check_node(bad_attr, 17)
    assert str(ours.value) == str(theirs.value)
    mismatch = onnx_lite.model(
        [onnx_lite.node("MatMul", ["a", "b"], ["y"], "mm", {})],
        [
            onnx_lite.value_info("a", np.dtype("float32"), (2, 3)),
            onnx_lite.value_info("b", np.dtype("float32"), (4, 5)),
        ],
        [],
        17,
    )
    with pytest.raises(shape_inference.InferenceError) as theirs:
        shape_inference.infer_shapes(mismatch, check_type=True, strict_mode=True, data_prop=True)
    with pytest.raises(onnx_lite.CheckFailed) as ours:
        onnx_lite.infer_shapes(mismatch)
    assert str(ours.value) == str(theirs.value)


def _context(opset: int):
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    ctx.opset_imports = {"": opset}
    return ctx


def test_shape_inference_through_the_light_path_names_the_node():
    """What validate makes of it: a GraphError naming the node, and shapes where all is well
    (data propagation through shape arithmetic included)."""
    x = InputSpec("x", np.dtype("float32"), (None, 6))
    nodes = [Node("shape", "Shape", ["x"], ["s"]), Node("concat", "Concat", ["s", "s"], ["s2"], {"axis": 0})]
    model = Model(nodes, [x], {}, "s2")
    shapes = infer_shapes(model, nodes, {"x": np.zeros((4, 6), np.float32)})
    assert shapes["s2"].shape == (4,) and shapes["s2"].dtype == np.int64
    bad = [Node("mm", "MatMul", ["x", "w"], ["y"])]
    model = Model(bad, [x], {"w": np.ones((5, 2), np.float32)}, "y")
    with pytest.raises(GraphError, match=r"^node 'mm' \(MatMul\): "):
        infer_shapes(model, bad, {"x": np.zeros((4, 6), np.float32)})

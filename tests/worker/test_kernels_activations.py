"""The compiled activation kernels -- the ReLU / tanh / sigmoid VJP, GELU and its VJP -- and the
fused Gemm + activation node (gradserve.GemmActivation): the kernels against numpy and against
finite differences, the rewrite against the unfused graph (within float rounding), micro-batched
weight errors, and where the rewrite must not apply."""

import numpy as np
import pytest
import torch

import gradserve

from gradcheck import check_vjp, run_op, unfused
from torch_oracle import check_module
from gradserve.server.inline import InlineEngine
from gradserve.server.planning.prepare import prepare
from gradserve.worker import kernels
from gradserve.worker.autodiff import backward, backward_deferred, compile_program, forward
from gradserve.worker.graph import InputSpec, Model, Node
from gradserve.worker.ops import OpContext, get_op
from gradserve.worker.ops.activations import FAST_ACTIVATIONS, activation_vjp
from gradserve.worker.ops.unary import erf, erf_compiled
from gradserve.worker.ops.linalg import FUSED_GEMM

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not available")
rng = np.random.default_rng(7)
DERIVATIVE = {"Relu": lambda y: (y > 0).astype(y.dtype), "Tanh": lambda y: 1 - y * y, "Sigmoid": lambda y: y * (1 - y)}
OUTPUT = {"Relu": lambda x: np.maximum(x, 0), "Tanh": np.tanh, "Sigmoid": lambda x: 1 / (1 + np.exp(-x))}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", FAST_ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 40000)])  # one piece, several parallel pieces
def test_activation_kernel_matches_numpy(act, dtype, shape):
    g = rng.standard_normal(shape).astype(dtype)
    y = OUTPUT[act](rng.standard_normal(shape)).astype(dtype)
    want = g.astype(np.float64) * DERIVATIVE[act](y.astype(np.float64))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(activation_vjp(act, y, g, min_size=0), want, rtol=tol, atol=tol)
    # the op's own VJP takes the kernel for large arrays, numpy's formula for small ones: both agree
    ctx = OpContext({}, inputs=[y], outputs=[y], needs=(True,))
    np.testing.assert_allclose(get_op(act).vjp(ctx, g), want, rtol=tol, atol=tol)


def test_activation_kernel_declines_what_it_cannot_take():
    y = np.ones((200, 200), np.float32)
    assert activation_vjp("Relu", y, np.ones((200, 1), np.float32)) is None  # a broadcast error
    assert activation_vjp("Relu", y.astype(np.int64), np.ones((200, 200), np.int64)) is None
    assert activation_vjp("Tanh", y[:2], y[:2]) is None  # small: numpy's call is cheaper


def test_relu_kernel_keeps_nan_errors_like_numpy():
    g = np.array([np.nan, 1.0, np.inf], np.float32)
    y = np.array([0.0, 0.0, 2.0], np.float32)
    np.testing.assert_array_equal(activation_vjp("Relu", y, g, min_size=0), g * (y > 0))


def gelu_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GELU (erf form) and its derivative in float64, with the standard library's erf."""
    import math

    x = x.astype(np.float64)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return x * cdf, cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_kernel_matches_the_reference(dtype):
    """Large enough for the compiled pass (checked: the kernel is what ran), values spanning the
    approximation's clip at |x/sqrt(2)| = 4 and beyond."""
    x = (rng.standard_normal((130, 300)) * 4).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    y_want, d_want = gelu_reference(x)
    assert erf_compiled("GELU", x) is not None
    y = run_op("Gelu", [x])[0]
    ctx = OpContext({}, inputs=[x], needs=(True,))
    dx = get_op("Gelu").vjp(ctx, g)
    tol = 2e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(y, y_want, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, g * d_want, rtol=tol, atol=tol * 10)
    # non-finite inputs give what numpy's formula gives
    special = np.tile(np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 30.0, -30.0], dtype), 3000)
    np.testing.assert_array_equal(erf_compiled("GELU", special), special * 0.5 * (1.0 + erf(special * np.sqrt(0.5))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf_kernel_matches_the_standard_library(dtype):
    import math

    x = (rng.standard_normal((130, 300)) * 2).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    assert erf_compiled("ERF", x) is not None
    want = np.vectorize(math.erf)(x.astype(np.float64))
    tol = 2e-7 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(run_op("Erf", [x])[0], want, rtol=tol, atol=tol)
    dx = get_op("Erf").vjp(OpContext({}, inputs=[x], needs=(True,)), g)
    np.testing.assert_allclose(
        dx, g * 2 / math.sqrt(math.pi) * np.exp(-(x.astype(np.float64) ** 2)), rtol=tol * 10, atol=tol
    )
    special = np.tile(np.array([np.inf, -np.inf, np.nan, 0.0, 10.0, -10.0], dtype), 4000)
    np.testing.assert_array_equal(erf_compiled("ERF", special), erf(special))


@pytest.mark.parametrize("op", ["Gelu", "Erf"])
def test_erf_family_vjps_match_finite_differences(op):
    check_vjp(op, [rng.standard_normal((40, 500)) * 2])


CASES = {  # attrs, A shape, B shape, C shape (None: no C)
    "linear (transB), row bias": ({"transB": 1}, (4, 3), (5, 3), (5,)),
    "transA, (1, N) bias": ({"transA": 1}, (3, 4), (3, 5), (1, 5)),
    "full C, alpha and beta": ({"alpha": 0.5, "beta": 2.0}, (4, 3), (3, 5), (4, 5)),
    "column C": ({}, (4, 3), (3, 5), (4, 1)),
    "scalar C": ({"beta": -1.5}, (4, 3), (3, 5), ()),
    "no C": ({"transA": 1, "transB": 1}, (3, 4), (5, 3), None),
}


@pytest.mark.parametrize("act", FAST_ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
def test_fused_node_vjp_matches_finite_differences(case, act):
    attrs, sa, sb, sc = CASES[case]
    inputs = [rng.standard_normal(sa), rng.standard_normal(sb)]
    if sc is not None:
        inputs.append(rng.standard_normal(sc))
    check_vjp(FUSED_GEMM, inputs, {**attrs, "activation": act}, check_shapes=False)


def mlp(acts, dtype, extra_reader=False, loss_reads_hidden=False):
    """x -> Gemm (+bias, transB) -> act -> ... -> sum of squares."""
    nodes, value, params = [], "x", {}
    width = 6
    for i, act in enumerate(acts):
        params[f"w{i}"] = rng.standard_normal((width, width)).astype(dtype) * 0.5
        params[f"b{i}"] = rng.standard_normal(width).astype(dtype)
        nodes.append(Node(f"fc{i}", "Gemm", [value, f"w{i}", f"b{i}"], [f"h{i}"], {"transB": 1}))
        nodes.append(Node(f"act{i}", act, [f"h{i}"], [f"a{i}"]))
        value = f"a{i}"
    nodes += [Node("sq", "Mul", [value, value], ["sq"]), Node("sum", "ReduceSum", ["sq"], ["loss"], {"keepdims": 0})]
    if extra_reader:  # the first product's output read again
        nodes[-1:] = [
            Node("s1", "ReduceSum", ["sq"], ["l1"], {"keepdims": 0}),
            Node("s2", "ReduceSum", ["h0"], ["l2"], {"keepdims": 0}),
            Node("add", "Add", ["l1", "l2"], ["loss"]),
        ]
    model = Model(nodes, [InputSpec("x", np.dtype(dtype), (None, width))], params, "loss")
    return model, {"x": rng.standard_normal((9, width)).astype(dtype)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rewrite_fuses_gemm_and_activation_within_rounding(dtype):
    acts = ["Relu", "Tanh", "Sigmoid"]
    model, feeds = mlp(acts, dtype)
    job = prepare(model, feeds)
    assert [(n.name, n.op_type, n.attrs.get("activation")) for n in job.nodes[:3]] == [
        (f"fc{i}", FUSED_GEMM, act) for i, act in enumerate(acts)
    ]
    assert len(job.nodes) == 5
    assert sum("runs as one node with" in r for r in job.rewrites) == 3
    result = InlineEngine().gradients(model, feeds)
    loss, grads = unfused(model, feeds)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert abs(result.loss - loss) <= tol * abs(loss)
    for name in model.params:
        np.testing.assert_allclose(result.grads[name], grads[name], rtol=tol, atol=tol * np.abs(grads[name]).max())
        assert np.abs(grads[name]).sum() > 0


def test_no_fusion_where_the_product_is_read_again():
    model, feeds = mlp(["Relu", "Tanh"], np.float32, extra_reader=True)
    ops = [(n.name, n.op_type) for n in prepare(model, feeds).nodes]
    assert ("fc0", "Gemm") in ops and ("fc1", FUSED_GEMM) in ops
    # nor before an activation the kernel has no derivative for
    model, feeds = mlp(["Softplus", "Relu"], np.float32)
    ops = [(n.name, n.op_type) for n in prepare(model, feeds).nodes]
    assert ("fc0", "Gemm") in ops and ("act0", "Softplus") in ops and ("fc1", FUSED_GEMM) in ops


def test_micro_batched_weight_errors_merge_into_one_product():
    """Deferred weight errors of two micro-batches (the pipeline's zero-bubble split) merge into one
    VJP call whose result is the whole batch's error."""
    model, feeds = mlp(["Tanh"], np.float64)
    job = prepare(model, feeds)
    params = list(model.params)
    program = compile_program(job.nodes, [*feeds, *params], [model.loss], params)
    whole = backward(program, forward(program, {**feeds, **model.params}), {model.loss: np.ones(())})
    tapes, direct = [], {}
    for half in (slice(0, 4), slice(4, None)):
        tape = forward(program, {"x": feeds["x"][half], **model.params})
        direct.update(backward(program, tape, {model.loss: np.ones(())}, defer=["w0"]))
        tapes.append(tape)
    assert "w0" not in direct and len(tapes[0].deferred) == 1
    merged = backward_deferred(program, tapes)
    np.testing.assert_allclose(merged["w0"], whole["w0"], rtol=1e-12)


def test_fused_model_splits_into_micro_batches_and_plans_by_its_products():
    """Planning sees the rewritten graph: the fused node keeps the batch rows where they are (so
    the batch splits exactly) and costs what its product costs (so partitions stay balanced)."""
    from gradcheck import assert_split_exact
    from gradserve.server.planning.cost import node_flops

    model, feeds = mlp(["Relu", "Tanh"], np.float64)
    job = prepare(model, feeds)
    fused = [n for n in job.nodes if n.op_type == FUSED_GEMM]
    assert len(fused) == 2
    assert_split_exact(model, feeds, parts=(3,))
    assert node_flops(fused[0], job.shapes) == 2 * 9 * 6 * 6  # batch x out x in, multiply and add


# -- GELU written out with Erf (torch's exports below opset 20) becomes one Gelu node ----------------
class FFNLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.net(x), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_legacy_gelu_export_runs_as_one_gelu_and_matches_torch(dtype, tmp_path):
    """The TorchScript exporter (opset 17) writes nn.GELU() as Div, Erf, Add, Mul, Mul: the job runs
    one Gelu node (with enough elements for the compiled pass) and its gradients equal torch's."""
    torch.manual_seed(0)
    args = [torch.randn(4, 128, 32, dtype=dtype), torch.randn(4, 128, 8, dtype=dtype)]
    module = FFNLoss().to(dtype)
    result = check_module(module, args, ["x", "y"], tmp_path, exporter="legacy")
    model = gradserve.load_onnx(tmp_path / "FFNLoss-legacy.onnx")
    job = prepare(model, {"x": args[0].numpy(), "y": args[1].numpy()})
    assert [n.op_type for n in job.nodes].count("Gelu") == 1 and "Erf" not in [n.op_type for n in job.nodes]
    assert any("run as one Gelu" in r for r in job.rewrites)
    assert np.isfinite(result.loss)


def erf_gelu(order: str, dtype, sqrt2: float = float(np.sqrt(2.0)), extra_reader: bool = False):
    """x -> GELU written out (``order``: "x first" multiplies by x then 0.5, "half first" the other
    way, "times" scales by 1/sqrt(2) instead of dividing) -> sum of squares."""
    consts = {
        "s": np.asarray(sqrt2 if order != "times" else 1 / sqrt2, dtype),
        "one": np.asarray(1.0, dtype),
        "half": np.asarray(0.5, dtype),
    }
    nodes = [
        Node("scale", "Mul" if order == "times" else "Div", ["x", "s"], ["d"]),
        Node("erf", "Erf", ["d"], ["e"]),
        Node("plus", "Add", ["one", "e"], ["a"]),
    ]
    if order == "half first":
        nodes += [Node("m1", "Mul", ["half", "a"], ["m"]), Node("m2", "Mul", ["x", "m"], ["g"])]
    else:
        nodes += [Node("m1", "Mul", ["x", "a"], ["m"]), Node("m2", "Mul", ["m", "half"], ["g"])]
    nodes += [Node("sq", "Mul", ["g", "g"], ["sq"]), Node("sum", "ReduceSum", ["sq"], ["loss"], {"keepdims": 0})]
    if extra_reader:
        nodes[-1:] = [
            Node("s1", "ReduceSum", ["sq"], ["l1"], {"keepdims": 0}),
            Node("s2", "ReduceSum", ["e"], ["l2"], {"keepdims": 0}),
            Node("add", "Add", ["l1", "l2"], ["loss"]),
        ]
    model = Model(
        nodes, [InputSpec("x", np.dtype(dtype), (None, 50))], {"w": np.ones(50, dtype)}, "loss", constants=consts
    )
    model.nodes.insert(0, Node("mw", "Mul", ["x0", "w"], ["x"]))  # a parameter before it, so dL/dw exists
    model.inputs = [InputSpec("x0", np.dtype(dtype), (None, 50))]
    return model, {"x0": (rng.standard_normal((400, 50)) * 2).astype(dtype)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["x first", "half first", "times"])
def test_gelu_rewrite_within_rounding(order, dtype):
    model, feeds = erf_gelu(order, dtype)
    job = prepare(model, feeds)
    assert [n.op_type for n in job.nodes] == ["Mul", "Gelu", "Mul", "ReduceSum"]
    result = InlineEngine().gradients(model, feeds)
    loss, grads = unfused(model, feeds)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert abs(result.loss - loss) <= tol * abs(loss)
    np.testing.assert_allclose(result.grads["w"], grads["w"], rtol=tol, atol=tol * np.abs(grads["w"]).max())


def test_no_gelu_rewrite_where_the_numbers_or_the_readers_differ():
    def ops(model, feeds):
        return [n.op_type for n in prepare(model, feeds).nodes]

    assert "Gelu" not in ops(*erf_gelu("x first", np.float32, sqrt2=1.5))
    # float32's sqrt(2) is not float64's: a float64 graph dividing by it is not GELU to float64 rounding
    assert "Gelu" not in ops(*erf_gelu("x first", np.float64, sqrt2=float(np.float32(np.sqrt(2.0)))))
    assert "Gelu" in ops(*erf_gelu("x first", np.float32, sqrt2=float(np.float32(np.sqrt(2.0)))))
    assert "Gelu" not in ops(*erf_gelu("x first", np.float32, extra_reader=True))  # erf's value read again
    # a scalar that is a parameter (dL/d it is returned) is not a constant
    model, feeds = erf_gelu("x first", np.float32)
    model.params["half"] = model.constants.pop("half")
    assert "Gelu" not in ops(model, feeds)


def test_read_only_inputs_use_the_warmed_up_versions():
    """Arrays from Ray's object store are read-only, and numba compiles one version per argument
    type: the kernels take their inputs read-only always, so a worker's first job neither compiles
    nor loads a version the warm-up did not make."""
    kernels.warm_up(compile=True)
    k = kernels.get()
    names = ("activation_vjp", "erf_family", "bn_forward", "bn_backward")
    before = {n: len(getattr(k, n).kernel.signatures) for n in names}
    x = np.linspace(-2, 2, 2 * 2 * 16, dtype=np.float32)
    frozen = x.copy()
    frozen.flags.writeable = False
    for g in (x, frozen):
        k.activation_vjp(frozen, g, k.TANH, np.empty_like(x))
        k.erf_family(g, g[:0], k.GELU, False, np.empty_like(x))
        x3 = g.reshape(2, 2, 16)
        ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
        ones.flags.writeable = False
        stats, coef, y3 = np.empty((3, 2)), np.empty((4, 2), np.float32), np.empty((2, 2, 16), np.float32)
        k.bn_forward(x3, ones, zeros, 1e-5, True, y3, stats, coef)
        k.bn_backward(x3, y3, y3, ones, stats, True, np.empty_like(y3), np.empty(2), np.empty(2), coef)
    assert {n: len(getattr(k, n).kernel.signatures) for n in names} == before

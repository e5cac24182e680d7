"""Gradient checking helpers shared by the tests: the dot-product (adjoint) test of HIPS/autograd
and JAX ``check_grads``: for random directions u (at the outputs) and v (at the inputs),
``<v, VJP(u)> == <u, (f(x + eps v) - f(x - eps v)) / 2 eps>``. Run in float64."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper, shape_inference

from gradserve.worker.autodiff import backward, compile_program, forward
from gradserve.worker.graph import Node
from gradserve.worker.ops import get_op
from gradserve.worker.graph import DEFAULT_OPSET
from gradserve.worker.validate import onnx_attrs, onnx_model


def run_op(op_type: str, inputs: Sequence[np.ndarray | None], attrs: dict[str, Any] | None = None, n_outputs: int = 1):
    """Forward of one op through the engine; returns the list of outputs."""
    names = [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)]
    outs = [f"y{i}" for i in range(n_outputs)]
    node = Node("n", op_type, names, outs, dict(attrs or {}))
    prog = compile_program([node], [n for n in names if n], outs, [])
    tape = forward(prog, {n: x for n, x in zip(names, inputs) if n})
    return [tape.outputs[o] for o in outs]


def check_vjp(
    op_type: str,
    inputs: Sequence[np.ndarray | None],
    attrs: dict[str, Any] | None = None,
    wrt: Sequence[int] | None = None,
    n_outputs: int = 1,
    grad_outputs: Sequence[int] | None = None,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    seed: int = 0,
    check_shapes: bool = True,
    opset: int = DEFAULT_OPSET,
) -> None:
    """Assert the op's VJP matches central finite differences along random directions.

    ``wrt``: indices of inputs to check (default: all floating inputs). ``grad_outputs``: outputs
    that receive an error (default: all floating outputs). Also checks, where ONNX shape inference
    can tell, that the forward's output shapes and dtypes agree with the ONNX spec at ``opset``.
    """
    rng = np.random.default_rng(seed)
    attrs = dict(attrs or {})
    names = [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)]
    outs = [f"y{i}" for i in range(n_outputs)]
    if wrt is None:  # every floating input the op declares differentiable
        op = get_op(op_type)
        wrt = [i for i, x in enumerate(inputs) if x is not None and x.dtype.kind == "f" and op.can_differentiate(i)]
    node = Node("n", op_type, names, outs, attrs)
    feeds = {n: x for n, x in zip(names, inputs) if n}
    prog = compile_program([node], list(feeds), outs, [names[i] for i in wrt])
    tape = forward(prog, feeds)
    ys = [tape.outputs[o] for o in outs]
    if check_shapes:
        _check_against_onnx(node, feeds, ys, opset)
    if grad_outputs is None:
        grad_outputs = [k for k, y in enumerate(ys) if y.dtype.kind == "f"]
    us = {outs[k]: rng.standard_normal(ys[k].shape) for k in grad_outputs}
    errs = backward(prog, tape, us)
    vs = {names[i]: rng.standard_normal(inputs[i].shape) for i in wrt}

    def f(t: float) -> float:
        shifted = dict(feeds)
        for n, v in vs.items():
            shifted[n] = feeds[n] + t * v
        p = compile_program([node], list(feeds), outs, [])
        out = forward(p, shifted).outputs
        return sum(float(np.vdot(us[o], out[o])) for o in us)

    numeric = (f(eps) - f(-eps)) / (2 * eps)
    analytic = sum(float(np.vdot(vs[n], errs[n])) if n in errs else 0.0 for n in vs)
    scale = max(abs(numeric), abs(analytic), 1e-8)
    assert abs(numeric - analytic) <= rtol * scale + 1e-9, (
        f"{op_type} VJP mismatch: analytic {analytic!r} vs finite differences {numeric!r}"
    )


def _check_against_onnx(node: Node, feeds: dict[str, np.ndarray], ys: list[np.ndarray], opset: int) -> None:
    graph_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape) for n, x in feeds.items()
    ]
    onnx_node = helper.make_node(node.op_type, node.inputs, node.outputs, **onnx_attrs(node))
    outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.outputs]
    model = onnx_model(helper.make_graph([onnx_node], "t", graph_inputs, outputs), opset)
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    for vi, y in zip(inferred.graph.output, ys):
        t = vi.type.tensor_type
        if t.elem_type:
            assert helper.tensor_dtype_to_np_dtype(t.elem_type) == y.dtype, f"{node.op_type} output dtype {y.dtype}"
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            want = tuple(d.dim_value for d in t.shape.dim)
            assert want == y.shape, f"{node.op_type}: output shape {y.shape}, ONNX says {want}"


def onnx_reference(
    op_type: str,
    inputs: Sequence[np.ndarray | None],
    attrs: dict[str, Any] | None = None,
    n_outputs: int = 1,
    opset: int = DEFAULT_OPSET,
) -> list[np.ndarray]:
    """The forward of onnx's own reference implementation at ``opset``: an independent oracle."""
    from onnx.reference import ReferenceEvaluator

    names = [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)]
    outs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, **onnx_attrs(Node("n", op_type, names, outs, dict(attrs or {}))))
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
            for n, x in zip(names, inputs)
            if n
        ],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs],
    )
    return ReferenceEvaluator(onnx_model(graph, opset)).run(None, {n: x for n, x in zip(names, inputs) if n})


def assert_matches_reference(op, inputs, attrs=None, n_outputs=1, rtol=1e-6) -> None:
    """The forward of ``op`` through the engine equals :func:`onnx_reference`'s: shapes, dtypes and
    values (to ``rtol``)."""
    ours, theirs = run_op(op, inputs, attrs, n_outputs), onnx_reference(op, inputs, attrs, n_outputs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype, (op, a.shape, b.shape, a.dtype, b.dtype)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7)


def unfused(model, feeds):
    """Loss and errors from the checked nodes, bypassing prepare (and so every rewrite)."""
    from gradserve.worker.validate import check_structure

    nodes = check_structure(model)
    program = compile_program(nodes, [*feeds, *model.params, *model.constants], [model.loss], list(model.params))
    tape = forward(program, {**feeds, **model.params, **model.constants})
    loss = tape.outputs[model.loss]
    return float(loss), backward(program, tape, {model.loss: np.ones_like(loss)})


def assert_same_result(result, reference, rtol: float = 1e-10) -> None:
    """Two engines' results agree: the loss, and every dL/dw relative to its largest entry."""
    assert abs(result.loss - reference.loss) <= rtol * abs(reference.loss), (result.loss, reference.loss)
    assert result.grads.keys() == reference.grads.keys()
    for name, want in reference.grads.items():
        scale = max(np.abs(want).max(), 1e-300)
        assert np.abs(result.grads[name] - want).max() <= rtol * scale, name


def assert_close(got: dict, want: dict, rtol=1e-9) -> None:
    """Two dicts of arrays (weights, gradients) have the same names and agree to ``rtol``."""
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-12, err_msg=name)


def split_inline(model, feeds, parts):
    """Micro-batching without Ray: the loss and dL/dw of the chunks ``split_batch`` makes, each run
    inline on ``split.model`` and weighted."""
    from gradserve.server.planning.batching import split_batch
    from gradserve.server.inline import InlineEngine
    from gradserve.server.planning.prepare import prepare

    split = split_batch(model, prepare(model, feeds), feeds, parts)
    assert len(split.chunks) == parts
    results = [InlineEngine().gradients(split.model, c.feeds) for c in split.chunks]
    loss = sum(c.weight * r.loss for c, r in zip(split.chunks, results))
    grads = {k: sum(c.weight * r.grads[k] for c, r in zip(split.chunks, results)) for k in results[0].grads}
    return split, loss, grads


def assert_split_exact(model, feeds, parts=(2, 3)):
    """Split into each number of ``parts``, the weighted chunks equal the unsplit job; returns the
    last split."""
    from gradserve.server.inline import InlineEngine

    want = InlineEngine().gradients(model, feeds)
    for p in parts:
        split, loss, grads = split_inline(model, feeds, p)
        assert abs(loss - want.loss) <= 1e-12 * abs(want.loss), (loss, want.loss)
        for name, g in want.grads.items():
            np.testing.assert_allclose(grads[name], g, rtol=1e-10, atol=1e-13 * max(1, np.abs(g).max()), err_msg=name)
    return split

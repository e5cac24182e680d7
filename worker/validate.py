"""Checks a model before anything runs: structure, ops, feeds, and shapes/dtypes by inference.

Structure and feeds are checked here; shapes and dtypes by ONNX's own shape inference (our op types
*are* ONNX ops, so the ONNX spec's inference rules are the independent authority), called through
:mod:`gradserve.worker.onnx_lite`, which does not import onnx's Python package (1.2 s of start-up).
Every error is a :class:`GraphError` naming the node or tensor at fault.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

from gradserve.worker import onnx_lite
from gradserve.worker.graph import DEFAULT_OPSET, GraphError, Model, Node
from gradserve.worker.ops import REGISTRY, get_op

if TYPE_CHECKING:  # pragma: no cover
    import onnx


@dataclass(frozen=True)
class ValueInfo:
    """The shape and dtype of one value, as shape inference found them."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def check_structure(model: Model) -> list[Node]:
    """Validate names, ops and acyclicity; return the nodes that reach the loss, in topological order."""
    sources: dict[str, str] = {}
    for kind, names in (
        ("input", [s.name for s in model.inputs]),
        ("parameter", model.params),
        ("constant", model.constants),
    ):
        for name in names:
            if name in sources:
                raise GraphError(f"{kind} '{name}' has the same name as a {sources[name]}")
            sources[name] = kind
    producer: dict[str, Node] = {}
    seen_nodes: set[str] = set()
    for node in model.nodes:
        if node.name in seen_nodes:
            raise GraphError(f"two nodes are named '{node.name}'")
        seen_nodes.add(node.name)
        if get_op(node.op_type) is None:
            raise GraphError(f"{node}: unsupported op type '{node.op_type}'")
        for out in node.outputs:
            if not out:
                continue
            if out in sources:
                raise GraphError(f"{node}: output '{out}' has the name of a {sources[out]}")
            if out in producer:
                raise GraphError(f"{node}: output '{out}' is also produced by {producer[out]}")
            producer[out] = node
    for node in model.nodes:
        for inp in node.inputs:
            if inp and inp not in producer and inp not in sources:
                raise GraphError(f"{node}: input '{inp}' is not produced by any node, input, parameter or constant")
    if not model.loss:
        raise GraphError("the model names no loss value")
    if model.loss not in producer and model.loss not in sources:
        raise GraphError(f"loss '{model.loss}' is not produced by any node")

    return toposort(live_nodes(model.nodes, model.loss), producer)


def live_nodes(nodes: list[Node], loss: str) -> list[Node]:
    """The nodes ``loss`` depends on (walking back from it), in their given order: the rest can
    never get an error, so nothing waits for them."""
    producer = {o: n for n in nodes for o in n.outputs if o}
    needed: set[str] = set()
    stack = [loss]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            stack.extend(i for i in node.inputs if i)
    return [n for n in nodes if n.name in needed]


def toposort(nodes: list[Node], producer: Mapping[str, Node] | None = None) -> list[Node]:
    """Kahn's algorithm, stable with respect to the given order; a cycle is a GraphError naming it."""
    if producer is None:
        producer = {o: n for n in nodes for o in n.outputs if o}
    names = {n.name for n in nodes}
    deps = {n.name: {producer[i].name for i in n.inputs if i in producer and producer[i].name in names} for n in nodes}
    users: dict[str, list[Node]] = {n.name: [] for n in nodes}
    for n in nodes:
        for d in deps[n.name]:
            users[d].append(n)
    remaining = {k: len(v) for k, v in deps.items()}
    ready = deque(n for n in nodes if remaining[n.name] == 0)
    order: list[Node] = []
    while ready:
        n = ready.popleft()
        order.append(n)
        for u in users[n.name]:
            remaining[u.name] -= 1
            if remaining[u.name] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        stuck = sorted(k for k, v in remaining.items() if v > 0)
        raise GraphError(f"the graph has a cycle through nodes {', '.join(repr(s) for s in stuck[:8])}")
    return order


def check_feeds(model: Model, feeds: Mapping[str, np.ndarray], required: set[str] | None = None) -> None:
    """Every declared input the pruned graph reads is fed with the declared dtype and a matching shape."""
    symbols: dict[str, tuple[int, str]] = {}
    for spec in model.inputs:
        if spec.name not in feeds:
            if required is None or spec.name in required:
                raise GraphError(
                    f"feed '{spec.name}' is missing (declared input of dtype {spec.dtype.name}, shape {format_shape(spec.shape)})"
                )
            continue
        value = feeds[spec.name]
        if not isinstance(value, np.ndarray):
            raise GraphError(f"feed '{spec.name}' is a {type(value).__name__}, not a numpy array")
        if value.dtype != spec.dtype:
            raise GraphError(f"feed '{spec.name}' has dtype {value.dtype}, the model declares {spec.dtype.name}")
        if value.ndim != len(spec.shape):
            raise GraphError(
                f"feed '{spec.name}' has shape {value.shape}, the model declares {format_shape(spec.shape)}"
            )
        for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(want, (int, np.integer)) and got != want:
                raise GraphError(
                    f"feed '{spec.name}' has shape {value.shape}, the model declares {format_shape(spec.shape)}"
                )
            if isinstance(want, str) and want != "?":
                if want in symbols and symbols[want][0] != got:
                    first = symbols[want]
                    raise GraphError(
                        f"feed '{spec.name}' axis {axis} is {got} but '{want}' is {first[0]} in feed '{first[1]}'"
                    )
                symbols.setdefault(want, (got, spec.name))
    declared = {s.name for s in model.inputs}
    for name in feeds:
        if name not in declared:
            raise GraphError(
                f"feed '{name}' is not an input of the model (inputs: {', '.join(sorted(declared)) or 'none'})"
            )


def infer_shapes(model: Model, nodes: list[Node], feeds: Mapping[str, np.ndarray]) -> dict[str, ValueInfo]:
    """Shape and dtype of every value, by ONNX shape inference on the concrete feed shapes.

    ONNX's data propagation stops at shape arithmetic it cannot follow (a Where over a shape
    vector, a Reshape of one); where shapes are left unknown, that arithmetic is computed here, with
    the op library, on the concrete shapes, and inference runs again with its results as constants.
    Raises GraphError naming the node when an op gets inputs of the wrong count, shape or dtype.
    """
    known: dict[str, ValueInfo] = {}
    graph_inputs = []
    for name, value in list(feeds.items()) + list(model.params.items()):
        known[name] = ValueInfo(tuple(value.shape), value.dtype)
        graph_inputs.append(onnx_lite.value_info(name, value.dtype, value.shape))
    for name, value in model.constants.items():
        known[name] = ValueInfo(tuple(value.shape), value.dtype)
    onnx_nodes = []
    for node in nodes:
        try:
            onnx_nodes.append(onnx_lite.node(node.op_type, node.inputs, node.outputs, node.name, node.attrs))
        except Exception as exc:
            raise GraphError(f"{node}: bad attributes: {exc}") from None
    for node, onnx_node in zip(nodes, onnx_nodes):
        try:
            onnx_lite.check_node(onnx_node, model.opset)
        except onnx_lite.CheckFailed as exc:
            raise GraphError(f"{node}: {_first_line(str(exc))}") from None
    _infer_into(known, model, nodes, onnx_nodes, graph_inputs, dict(model.constants))
    if any(o and o not in known for n in nodes for o in n.outputs):
        computed = _shape_arithmetic(model, nodes, known)
        done = [n for n in nodes if all(x in computed for x in n.outputs if x)]
        if done:  # those nodes become constants; inference runs again on the rest
            dropped = {n.name for n in done}
            kept = [(n, o) for n, o in zip(nodes, onnx_nodes) if n.name not in dropped]
            values = {x: computed[x] for n in done for x in n.outputs if x}
            _infer_into(
                known, model, [n for n, _ in kept], [o for _, o in kept], graph_inputs, {**model.constants, **values}
            )
    return known


def _infer_into(
    known: dict[str, ValueInfo],
    model: Model,
    nodes: list[Node],
    onnx_nodes: list,
    graph_inputs: list,
    constants: Mapping[str, np.ndarray],
) -> None:
    initializers = [onnx_lite.tensor(np.asarray(v), k) for k, v in constants.items()]
    for name, value in constants.items():
        known[name] = ValueInfo(tuple(np.shape(value)), np.asarray(value).dtype)
    try:
        inferred = onnx_lite.infer_shapes(onnx_lite.model(onnx_nodes, graph_inputs, initializers, model.opset))
    except onnx_lite.CheckFailed as exc:
        raise GraphError(_name_node(str(exc), nodes)) from None
    for vi in inferred.graph.value_info:
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        if t.HasField("shape") and all(d >= 0 for d in dims):
            known[vi.name] = ValueInfo(dims, onnx_lite.numpy_dtype(t.elem_type))


_SHAPE_VALUE_LIMIT = 64  # elements: shape vectors and scalars derived from them, never activations


def _shape_arithmetic(model: Model, nodes: list[Node], known: Mapping[str, ValueInfo]) -> dict[str, np.ndarray]:
    """The values of shape arithmetic: Shape/Size of values whose shape is known, and every small
    result computed only from those and small integer constants."""
    from gradserve.worker.ops import OpContext  # the op library, not its registry's import time

    values: dict[str, np.ndarray] = {
        k: v for k, v in model.constants.items() if v.dtype.kind in "iub" and v.size <= _SHAPE_VALUE_LIMIT
    }
    computed: dict[str, np.ndarray] = {}
    for node in nodes:
        if node.op_type in ("Shape", "Size") and node.inputs[0] in known:
            args: list[np.ndarray | None] = [
                np.broadcast_to(np.zeros((), known[node.inputs[0]].dtype), known[node.inputs[0]].shape)
            ]
        elif node.inputs and all(not i or i in values for i in node.inputs):
            args = [values[i] if i else None for i in node.inputs]
        else:
            continue
        try:
            result = REGISTRY[node.op_type].forward(
                OpContext(dict(node.attrs), node=node.name, n_outputs=len(node.outputs)), *args
            )
        except Exception:  # left to the engine, whose message names the node
            continue
        outs = result if isinstance(result, tuple) else (result,)
        if all(np.size(r) <= _SHAPE_VALUE_LIMIT for r in outs):
            for name, r in zip(node.outputs, outs):
                if name:
                    values[name] = computed[name] = np.array(r)
    return computed


def check_loss(model: Model, shapes: Mapping[str, ValueInfo]) -> None:
    """The loss is a floating scalar (size 1), where shape inference could tell."""
    info = shapes.get(model.loss)
    if info is None:
        return  # unknown statically; the engine checks at run time
    if int(np.prod(info.shape, dtype=np.int64)) != 1:
        raise GraphError(f"loss '{model.loss}' must be a scalar, but has shape {info.shape}")
    if info.dtype.kind != "f":
        raise GraphError(f"loss '{model.loss}' must be floating point, but is {info.dtype.name}")


def onnx_model(graph: onnx.GraphProto, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """An ONNX ModelProto around ``graph`` at ``opset``, with the IR version that opset needs
    (for ONNX import, which has imported onnx anyway)."""
    from onnx import helper

    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


def onnx_attrs(node: Node) -> dict:
    """``node``'s attributes as ``onnx.helper.make_node`` takes them (arrays as TensorProtos)."""
    from onnx import numpy_helper

    out = {}
    for key, value in node.attrs.items():
        if isinstance(value, np.ndarray):
            value = numpy_helper.from_array(value)
        out[key] = value
    return out


def _first_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip() and not ln.startswith("==>")]
    return lines[0] if lines else msg.strip()


def _name_node(msg: str, nodes: list[Node]) -> str:
    """ONNX says 'node name: X'; turn its message into ours, naming node and op."""
    match = re.search(r"\(op_type:(\w+), node name: ([^)]*)\)", msg)
    detail = re.sub(r"\(op_type:[^)]*\):?\s*", "", _first_line(msg))
    detail = re.sub(r"^((Inference error\(s\):|\[\w+\])\s*)*", "", detail)
    if match:
        return f"node '{match.group(2)}' ({match.group(1)}): {detail}"
    return f"shape check failed: {detail}"


def format_shape(shape) -> str:
    """A shape as Python writes tuples, with unknown dimensions as "?"."""
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

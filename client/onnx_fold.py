"""Constant folding for the importer (:mod:`.onnx_import`): every node computable at import --
from constant inputs, or a Shape/Size (and Gathers and Slices of it) of a value whose shape the
declared inputs fix -- is evaluated once with gradserve's own ops, and an ``If`` whose condition
that fixes is replaced by the branch it takes.

Separate from the node conversion because it is the importer's one iterative algorithm (folding,
re-running ONNX's shape inference, folding again); it is a mixin over the importer's state.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gradserve.client.onnx_read import InferredShape, infer_shapes, to_array
from gradserve.worker.graph import GraphError, InputSpec, Node
from gradserve.worker.ops import REGISTRY, OpContext, get_op
from gradserve.worker.validate import onnx_attrs, onnx_model, toposort

# Ops whose result is not a function of their inputs: never folded, even with constant inputs.
NONDETERMINISTIC = {
    "Dropout",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
# A folded value larger than this (and than its inputs) stays a node: folding e.g. ConstantOfShape
# of an activation's shape would otherwise ship a full-size tensor of zeros with every model.
_FOLD_LIMIT_BYTES = 1 << 20


class ConstantFolding:
    """The folding half of the importer: it reads and rewrites the importer's graph state below."""

    nodes: list[Node]
    inputs: list[InputSpec]
    params: dict[str, np.ndarray]
    constants: dict[str, np.ndarray]
    shapes: dict[str, InferredShape]
    dtypes: dict[str, np.dtype]
    opset: int
    # If nodes: (then, else) branches, inlined once the condition is known
    _branches: dict[str, tuple[onnx.GraphProto, onnx.GraphProto]]

    def _convert_nodes(self, onnx_nodes) -> list[Node]:
        """ONNX nodes as gradserve's (the importer's conversion; an If branch's nodes go through it)."""
        raise NotImplementedError

    def fold_constants(self) -> None:
        """Replace every node computable now (constant inputs, or Shape/Size of a statically shaped
        value) by constants, in passes in graph order so folded values feed later folds. ONNX's shape
        inference loses static dims behind shape arithmetic it cannot follow (attention's
        batch*heads); once that arithmetic is folded, inferring again recovers them, so passes repeat
        while Shape nodes remain and inference learns something new."""
        self._partial_shapes: dict[str, InferredShape] = {}  # outputs of Shape nodes that stay: known dims
        while True:
            kept: list[Node] = []
            order = toposort(self.nodes)  # ONNX demands this order; hand-made graphs may not keep it
            for k, node in enumerate(order):
                if node.op_type == "If" and node.inputs[0] not in self.constants:
                    # The condition may hang on shapes ONNX could not infer before the folding so
                    # far (pads computed by the exporter): infer again, then go on.
                    self.nodes = kept + order[k:]
                    if not self._infer_again():
                        self._inline_branch(node, kept)  # raises: the condition depends on the data
                    break
                self._fold_into(node, kept)
            else:
                self.nodes = kept
                if not any(n.op_type in ("Shape", "Size") for n in kept) or not self._infer_again():
                    return

    def _infer_again(self) -> bool:
        """Run ONNX shape inference on the graph as folded so far; True if it learned new shapes."""

        def onnx_node(n: Node) -> onnx.NodeProto:
            inputs = n.inputs[:1] if n.op_type == "If" else n.inputs  # the rest were for sorting
            return helper.make_node(n.op_type, inputs, n.outputs, name=n.name, **onnx_attrs(n))

        values = {**self.params, **self.constants}
        graph = helper.make_graph(
            [onnx_node(n) for n in self.nodes],
            "import",
            [
                helper.make_tensor_value_info(
                    s.name, helper.np_dtype_to_tensor_dtype(s.dtype), [None if d == "?" else d for d in s.shape]
                )
                for s in self.inputs
            ],
            [],
            [numpy_helper.from_array(v, k) for k, v in values.items()],
        )
        shapes, dtypes = infer_shapes(onnx_model(graph, self.opset))
        known = lambda table: sum(isinstance(d, int) for v in table.values() if v is not None for d in v)  # noqa: E731
        before = known(self.shapes)
        self.shapes.update(shapes)
        self.dtypes.update(dtypes)
        return known(self.shapes) > before

    def _fold_into(self, node: Node, kept: list[Node]) -> None:
        """Fold ``node`` into constants, or append it to ``kept`` (an If: the branch it takes)."""
        if node.op_type == "If":
            self._inline_branch(node, kept)
            return
        values = self._fold(node)
        if values is None:
            kept.append(node)
            return
        for name, value in zip(node.outputs, values):
            if name:
                self.constants[name] = value

    def _inline_branch(self, node: Node, kept: list[Node]) -> None:
        """An If whose condition folding has fixed is replaced by the nodes of the branch it takes
        (in order: they read only earlier values); its outputs are the branch's outputs."""
        cond = self.constants.get(node.inputs[0])
        if cond is None:
            raise GraphError(
                f"{node}: its condition is only known when the model runs; control flow that "
                "depends on the data (If) is not supported"
            )
        branch = self._branches[node.name][0 if bool(np.asarray(cond).reshape(-1)[0]) else 1]
        for init in branch.initializer:
            value = to_array(init, f"initializer '{init.name}' of {node}")
            (self.params if value.dtype.kind == "f" else self.constants)[init.name] = value
        for inner in self._convert_nodes(branch.node):
            self._fold_into(inner, kept)
        for out, result in zip(node.outputs, [o.name for o in branch.output]):
            if result in self.constants:
                self.constants[out] = self.constants[result]
            elif out:
                kept.append(Node(f"{node.name}/{out}", "Identity", [result], [out]))

    def _fold(self, node: Node) -> list[np.ndarray] | None:
        if node.op_type in NONDETERMINISTIC or get_op(node.op_type) is None:  # sequence ops: rewritten later
            return None
        if node.op_type in ("Shape", "Size") and node.inputs and node.inputs[0] not in self.constants:
            return self._fold_shape(node)
        if node.op_type == "Gather" and node.inputs[0] in self._partial_shapes:
            return self._fold_shape_gather(node)
        if node.op_type == "Slice" and node.inputs[0] in self._partial_shapes:
            return self._fold_shape_slice(node)
        if not all(i in self.constants for i in node.inputs if i):
            return None
        args = [self.constants[i] if i else None for i in node.inputs]
        ctx = OpContext(dict(node.attrs), node=node.name, n_outputs=len(node.outputs))
        try:
            result = REGISTRY[node.op_type].forward(ctx, *args)
        except Exception as exc:
            raise GraphError(f"{node}: evaluating it on constant inputs failed: {type(exc).__name__}: {exc}") from exc
        # Copies: an op may return a view (Reshape) or a zero-stride broadcast (Expand) of its input.
        outs = [np.array(r) for r in (result if isinstance(result, tuple) else (result,))]
        size_in = sum(a.nbytes for a in args if a is not None)
        if sum(o.nbytes for o in outs) > max(_FOLD_LIMIT_BYTES, size_in):
            return None
        return outs

    def _fold_shape(self, node: Node) -> list[np.ndarray] | None:
        x = node.inputs[0]
        shape = self.shapes.get(x)
        if shape is None and x in self.params:
            shape = self.params[x].shape
        if shape is None:
            return None
        if node.op_type == "Size":
            static = [d for d in shape if isinstance(d, int)]
            return [np.asarray(int(np.prod(static)), np.int64)] if len(static) == len(shape) else None
        rank = len(shape)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        dims = shape[start:end]
        # A symbolic or unknown dim (the batch) is only known per job: such a Shape stays a node,
        # but Gathers of its static dims can still fold (x.shape[1] with a dynamic batch).
        if not all(isinstance(d, int) for d in dims):
            self._partial_shapes[node.outputs[0]] = dims
            return None
        return [np.asarray(dims, np.int64).reshape(len(dims))]

    def _fold_shape_gather(self, node: Node) -> list[np.ndarray] | None:
        """Gather of static entries of a Shape that stays (exporters emit one per ``x.size(i)``)."""
        indices = self.constants.get(node.inputs[1])
        if indices is None or indices.dtype.kind not in "iu" or node.attrs.get("axis", 0) != 0:
            return None
        dims = self._partial_shapes[node.inputs[0]]
        if not np.all((indices >= -len(dims)) & (indices < len(dims))):
            return None  # out of range: leave it to fail with the engine's message
        picked = [dims[int(i)] for i in indices.reshape(-1)]
        if not all(isinstance(d, int) for d in picked):
            return None
        return [np.asarray(picked, np.int64).reshape(indices.shape)]

    def _fold_shape_slice(self, node: Node) -> list[np.ndarray] | None:
        """Slice of static entries of a Shape that stays (``x.shape[-1:]``: attention's head size)."""
        bounds = [self.constants.get(i) if i else None for i in node.inputs[1:]]
        if any(b is None for b in bounds[:2]) or any(i and b is None for i, b in zip(node.inputs[1:], bounds)):
            return None
        dims = self._partial_shapes[node.inputs[0]]
        positions = np.arange(len(dims))
        ctx = OpContext(dict(node.attrs), node=node.name)
        try:  # the op itself says which entries the slice takes
            taken = REGISTRY["Slice"].forward(ctx, positions, *bounds)
        except Exception:
            return None  # malformed: leave it to fail with the engine's message
        picked = [dims[int(i)] for i in taken]
        if not all(isinstance(d, int) for d in picked):
            return None
        return [np.asarray(picked, np.int64)]

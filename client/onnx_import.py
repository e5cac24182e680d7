"""Importing ONNX models: an ``onnx.ModelProto`` becomes a gradserve :class:`Model`.

    model = load_onnx("net.onnx")                                   # the graph's output is the loss
    model = load_onnx("net.onnx", loss="cross_entropy:logits:labels")  # append a loss to logits

Floating initializers become parameters (dL/dw is returned for them), other initializers constants,
and the remaining graph inputs feeds. Constant subgraphs -- ``Constant`` nodes, anything computed only
from constants, and ``Shape`` of values whose shape the declared input shapes fix -- are evaluated
once here with gradserve's own ops, so the exporter's shape bookkeeping does not run per job.

This module converts nodes and appends the loss; reading and normalising the ONNX file is in
:mod:`.onnx_read`, constant folding in :mod:`.onnx_fold`, rewriting sequence ops in
:mod:`.onnx_sequences`, and telling torch's optimizer's folded initializers in :mod:`.onnx_folded`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from gradserve.client.onnx_fold import NONDETERMINISTIC, ConstantFolding
from gradserve.client.onnx_folded import folded_warning
from gradserve.client.onnx_read import (
    DEFAULT_DOMAINS,
    ModelSource,
    attr_value,
    check_dtype,
    dim_value,
    infer_shapes,
    normalize_opset,
    np_dtype,
    outer_names,
    read_model,
    to_array,
)
from gradserve.client.onnx_sequences import SEQUENCE_OPS, SequenceRewrite
from gradserve.worker.graph import GraphError, InputSpec, Model, Node
from gradserve.worker.ops import REGISTRY, OpContext, OpError, get_op
from gradserve.worker.validate import format_shape, live_nodes

log = logging.getLogger("gradserve.onnx")


@dataclass(frozen=True)
class LossSpec:
    """A loss appended to an ONNX graph whose output is not the loss.

    ``kind`` is ``"mse"`` (PyTorch ``MSELoss``: mean of squared differences over all elements) or
    ``"cross_entropy"`` (mean softmax cross-entropy of (N, C, ...) logits against int64 class labels).
    ``output`` is the graph value compared (default: the sole graph output); ``target`` names a new
    feed holding the targets: like ``output`` for mse, int64 of shape (N, ...) for cross_entropy.
    """

    kind: str
    output: str | None = None
    target: str = "target"

    KINDS = ("mse", "cross_entropy")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise GraphError(f"unknown loss kind '{self.kind}' (choose {' or '.join(self.KINDS)})")
        if not self.target:
            raise GraphError("a loss spec needs a target input name")

    @classmethod
    def parse(cls, text: str) -> "LossSpec":
        """Parse the CLI form ``KIND[:OUTPUT[:TARGET]]``, e.g. ``"mse"`` or
        ``"cross_entropy:logits:labels"``. (An output whose name contains ':' needs ``LossSpec(...)``.)"""
        parts = text.strip().split(":")
        if len(parts) > 3:
            raise GraphError(f"loss spec '{text}' has too many parts (expected KIND[:OUTPUT[:TARGET]])")
        kind = parts[0].strip().lower().replace("-", "_")
        output = parts[1].strip() if len(parts) > 1 and parts[1].strip() else None
        target = parts[2].strip() if len(parts) > 2 and parts[2].strip() else "target"
        return cls(kind, output, target)


BATCH_NORM_MODES = ("as-exported", "batch")


def load_onnx(path_or_bytes: ModelSource, loss: str | LossSpec | None = None, batch_norm: str = "as-exported") -> Model:
    """Convert an ONNX model (a path, serialized bytes or a ``ModelProto``) into a :class:`Model`.

    ``loss`` is None when the graph's single output is the scalar loss; otherwise the name of a value
    in the graph, or a :class:`LossSpec` (or its string form, see :meth:`LossSpec.parse`) to append.
    A string is a value name if the graph has such a value, else a loss spec.

    ``batch_norm="batch"`` makes every BatchNormalization normalise with the statistics of the batch
    (``training_mode=1``, what ``model.train()`` means in torch). torch's dynamo exporter writes
    BatchNormalization in its inference form even for a module in training mode; export such a model
    with ``optimize=False`` (or the optimizer folds the normalisation into the convolution before it)
    and load it with ``batch_norm="batch"``. The default keeps each node as exported.

    A file whose initializers torch's ONNX optimizer folded from the module's parameters (the
    default ``torch.onnx.export`` call) loads with one warning on the ``gradserve.onnx`` logger
    (:mod:`.onnx_folded`). Sequence ops of a length known at load become plain tensor ops
    (:mod:`.onnx_sequences`).

    Raises GraphError for anything that is not an ONNX model or uses ops gradserve does not have.
    """
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm must be one of {', '.join(BATCH_NORM_MODES)}, not {batch_norm!r}")
    proto = read_model(path_or_bytes)
    folded = folded_warning(proto)
    if folded:  # the logger, not warnings.warn: the CLI prints it as its other messages, Python shows it unconfigured
        log.warning(folded)
    proto, opset = normalize_opset(proto)
    importer = _Importer(proto, opset)
    if batch_norm == "batch":
        importer.use_batch_statistics()
    importer.resolve_loss(loss)
    importer.fold_constants()
    if importer.rewrite_sequences():  # once folding has fixed split sizes and positions
        importer.fold_constants()
    importer.merge_duplicates()
    return importer.finish()


# -- conversion -------------------------------------------------------------------------------------
class _Importer(ConstantFolding, SequenceRewrite):
    """The model under conversion: nodes, leaves, inferred shapes, then loss and folding."""

    def __init__(self, proto: onnx.ModelProto, opset: int):
        self.opset = opset
        graph = proto.graph
        self.shapes, self.dtypes = infer_shapes(proto)
        if graph.sparse_initializer:
            raise GraphError(f"sparse initializer '{graph.sparse_initializer[0].values.name}' is not supported")
        self.params: dict[str, np.ndarray] = {}
        self.constants: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            value = to_array(init, f"initializer '{init.name}'")
            (self.params if value.dtype.kind == "f" else self.constants)[init.name] = value
        # Before IR 4 initializers were also listed as inputs; they are not feeds.
        self.inputs = [
            self._input_spec(vi) for vi in graph.input if vi.name not in self.params and vi.name not in self.constants
        ]
        self.outputs = [vi.name for vi in graph.output]
        self.nodes: list[Node] = []
        self._used_names: set[str] = set()
        # If nodes: (then, else) branches, inlined by fold_constants once the condition is known
        self._branches: dict[str, tuple[onnx.GraphProto, onnx.GraphProto]] = {}
        self.nodes = self._convert_nodes(graph.node)
        self.loss = ""

    # -- leaves and nodes ---------------------------------------------------------------------------
    def _input_spec(self, vi: onnx.ValueInfoProto) -> InputSpec:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not t.elem_type:
            raise GraphError(f"input '{vi.name}' is not a tensor of known dtype")
        dtype = np_dtype(t.elem_type, f"input '{vi.name}'")
        if not t.HasField("shape"):
            raise GraphError(f"input '{vi.name}' declares no shape (its rank must be known)")
        dims = (dim_value(d) for d in t.shape.dim)
        return InputSpec(vi.name, dtype, tuple("?" if d is None else d for d in dims))

    def _convert_nodes(self, onnx_nodes) -> list[Node]:
        nodes = []
        for onnx_node in onnx_nodes:
            node = self._convert_node(onnx_node, len(self._used_names))
            if node is not None:
                nodes.append(node)
        return nodes

    def _convert_node(self, n: onnx.NodeProto, index: int) -> Node | None:
        name = n.name or f"{n.op_type}_{index}"
        base, k = name, 1
        while name in self._used_names:  # ONNX does not require unique node names; we do
            name, k = f"{base}_{k}", k + 1
        self._used_names.add(name)
        node = Node(name, n.op_type, list(n.input), list(n.output))
        if n.domain not in DEFAULT_DOMAINS:
            raise GraphError(f"{node}: domain '{n.domain}' is not supported (only the default ONNX domain)")
        if n.op_type == "If":
            # Exporters emit If on conditions fixed by shapes (the legacy LocalResponseNorm, for one):
            # kept whole until folding knows the condition. Values the branches read from outside
            # become inputs, so the node sorts after their producers.
            branches = {a.name: a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH}
            self._branches[name] = (branches["then_branch"], branches["else_branch"])
            node.inputs += sorted(outer_names(branches["then_branch"]) | outer_names(branches["else_branch"]))
            node.attrs = dict(branches)  # for re-running shape inference; the node never reaches the engine
            return node
        node.attrs = {a.name: attr_value(a, f"{node}: attribute '{a.name}'") for a in n.attribute}
        if n.op_type == "Constant":
            self.constants[n.output[0]] = _constant_value(node)
            return None
        if get_op(n.op_type) is None and n.op_type not in SEQUENCE_OPS:  # sequences: rewritten after folding
            raise GraphError(f"{node}: unsupported op type (see the README's table of supported ops)")
        return node

    def use_batch_statistics(self) -> None:
        """Every BatchNormalization in training mode. The running statistics stay its inputs (ONNX
        requires them) but no longer change its output, so their gradients are zero; ONNX also
        requires the updated statistics as outputs in training mode, which nothing reads."""
        names = self._value_names()
        for node in self.nodes:
            if node.op_type == "BatchNormalization" and not node.attrs.get("training_mode", 0):
                node.attrs["training_mode"] = 1
                node.outputs = node.outputs[:1] + [
                    self._fresh(f"{node.outputs[0]}/running_{s}", names) for s in ("mean", "var")
                ]
                log.info("%s: normalises with batch statistics", node)

    # -- loss ---------------------------------------------------------------------------------------
    def resolve_loss(self, loss: str | LossSpec | None) -> None:
        """Set ``self.loss``, appending loss nodes and a target input for a LossSpec."""
        if isinstance(loss, str) and loss in self._value_names():
            self.loss = loss
            return
        if isinstance(loss, str):
            try:
                loss = LossSpec.parse(loss)
            except GraphError as exc:
                raise GraphError(f"loss '{loss}' is neither a value of the graph nor a loss spec: {exc}") from None
        if isinstance(loss, LossSpec):
            self._append_loss(loss)
            return
        if loss is not None:
            raise TypeError(f"loss must be a value name, a LossSpec or None, not {type(loss).__name__}")
        if len(self.outputs) != 1:
            raise GraphError(
                f"the model has {len(self.outputs)} outputs ({', '.join(self.outputs)}); name the loss "
                "value or a loss spec with --loss / loss="
            )
        out = self.outputs[0]
        shape = self.shapes.get(out)
        if shape is not None and not all(d == 1 for d in shape):
            raise GraphError(
                f"the model's output '{out}' has shape {format_shape(shape)}, not a scalar loss; pass a loss with "
                "--loss / loss= (e.g. 'mse' or 'cross_entropy:OUTPUT:TARGET')"
            )
        self.loss = out

    def _append_loss(self, spec: LossSpec) -> None:
        output = spec.output
        if output is None:
            if len(self.outputs) != 1:
                raise GraphError(
                    f"the model has {len(self.outputs)} outputs ({', '.join(self.outputs)}); "
                    f"say which one the loss reads, e.g. '{spec.kind}:OUTPUT:{spec.target}'"
                )
            output = self.outputs[0]
        names = self._value_names()
        if output not in names:
            raise GraphError(f"loss spec names output '{output}', which is not a value of the graph")
        if spec.target in names:
            raise GraphError(
                f"the loss target '{spec.target}' would be a new input, but the graph already "
                "has a value of that name; choose another target name"
            )
        names.add(spec.target)
        shape = self.shapes.get(output)
        dtype = self.dtypes.get(output)
        if shape is None or dtype is None:
            raise GraphError(
                f"cannot tell the shape and dtype of output '{output}', so the loss target cannot be declared"
            )
        if dtype.kind != "f":
            raise GraphError(f"output '{output}' has dtype {dtype.name}; a loss needs floating values")
        dims = tuple("?" if d is None else d for d in shape)
        loss_name = self._fresh("loss", names)
        if spec.kind == "mse":
            self.inputs.append(InputSpec(spec.target, dtype, dims))
            diff, square = self._fresh("loss/diff", names), self._fresh("loss/square", names)
            self._add_node("Sub", [output, spec.target], diff)
            self._add_node("Mul", [diff, diff], square)
            self._add_node("ReduceMean", [square], loss_name, keepdims=0)
        else:
            if len(dims) < 2:
                raise GraphError(
                    f"cross_entropy needs logits of shape (N, C, ...), but output '{output}' "
                    f"has shape {format_shape(shape)}"
                )
            self.inputs.append(InputSpec(spec.target, np.dtype(np.int64), dims[:1] + dims[2:]))
            self._add_node("SoftmaxCrossEntropyLoss", [output, spec.target], loss_name, reduction="mean")
        self.loss = loss_name

    def _add_node(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> None:
        taken = {n.name for n in self.nodes}
        name = self._fresh(f"loss/{op_type}", taken)
        if get_op(op_type) is None:
            raise GraphError(f"node '{name}' ({op_type}): unsupported op type (needed for the loss)")
        self.nodes.append(Node(name, op_type, inputs, [output], attrs))

    def _value_names(self) -> set[str]:
        names = {s.name for s in self.inputs} | set(self.params) | set(self.constants)
        return names | {o for n in self.nodes for o in n.outputs if o}

    @staticmethod
    def _fresh(stem: str, taken: set[str]) -> str:
        name, k = stem, 1
        while name in taken:
            name, k = f"{stem}_{k}", k + 1
        taken.add(name)
        return name

    # -- result -------------------------------------------------------------------------------------
    def merge_duplicates(self) -> None:
        """Common subexpressions: a node with the same op, inputs and attributes as an earlier one
        is dropped and its outputs read from the earlier one (the exporter writes MSE as
        ``(a - b) * (a - b)`` with two identical Subs)."""
        rename: dict[str, str] = {}
        seen: dict[tuple, Node] = {}
        kept: list[Node] = []
        for node in self.nodes:  # topologically sorted by fold_constants
            node.inputs = [rename.get(i, i) for i in node.inputs]
            key = (node.op_type, tuple(node.inputs), _attrs_key(node.attrs), tuple(bool(o) for o in node.outputs))
            first = seen.get(key) if node.op_type not in NONDETERMINISTIC else None
            if first is None or self.loss in node.outputs:
                seen.setdefault(key, node)
                kept.append(node)
                continue
            rename.update((o, f) for o, f in zip(node.outputs, first.outputs) if o)  # same outputs present
        self.nodes = kept

    def finish(self) -> Model:
        """The Model: nodes the loss does not depend on (other graph outputs, Shapes whose every
        use was folded) and constants nothing reads are dropped."""
        self.nodes = live_nodes(self.nodes, self.loss)
        read = {i for n in self.nodes for i in n.inputs if i} | {self.loss}
        constants = {k: v for k, v in self.constants.items() if k in read}
        for kind, values in (("parameter", self.params), ("constant", constants)):
            for name, value in values.items():
                check_dtype(value.dtype, f"{kind} '{name}'")
        for spec in self.inputs:
            check_dtype(spec.dtype, f"input '{spec.name}'")
        return Model(
            nodes=self.nodes,
            inputs=self.inputs,
            params=self.params,
            loss=self.loss,
            constants=constants,
            opset=self.opset,
        )


# -- helpers ----------------------------------------------------------------------------------------
def _attrs_key(attrs: dict[str, Any]) -> tuple:
    """A hashable, exact key of attribute values (arrays by their bytes: repr would abbreviate)."""
    return tuple(
        (k, (v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else repr(v))
        for k, v in sorted(attrs.items())
    )


def _constant_value(node: Node) -> np.ndarray:
    """The tensor a Constant node holds: the op library's own Constant op says what it means."""
    try:
        return np.array(REGISTRY["Constant"].forward(OpContext(dict(node.attrs), node=node.name)))
    except OpError as exc:
        raise GraphError(str(exc)) from None

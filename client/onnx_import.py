"""Importing ONNX models: an ``onnx.ModelProto`` becomes a gradserve :class:`Model`.

    model = load_onnx("net.onnx")                                   # the graph's output is the loss
    model = load_onnx("net.onnx", loss="cross_entropy:logits:labels")  # append a loss to logits

Floating initializers become parameters (dL/dw is returned for them), other initializers constants,
and the remaining graph inputs feeds. Constant subgraphs -- ``Constant`` nodes, anything computed only
from constants, and ``Shape`` of values whose shape the declared input shapes fix -- are evaluated
once here with gradserve's own ops, so the exporter's shape bookkeeping does not run per job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper, shape_inference, version_converter

from gradserve.proto import tensors
from gradserve.worker.graph import DEFAULT_OPSET, SUPPORTED_OPSETS, GraphError, InputSpec, Model, Node
from gradserve.worker.ops import OpContext, OpError, get_op
from gradserve.worker.validate import _onnx_attrs, format_shape, live_nodes, onnx_model, toposort

log = logging.getLogger("gradserve.onnx")

_DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops whose result is not a function of their inputs: never folded, even with constant inputs.
_NONDETERMINISTIC = {"Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}
# A folded value larger than this (and than its inputs) stays a node: folding e.g. ConstantOfShape
# of an activation's shape would otherwise ship a full-size tensor of zeros with every model.
_FOLD_LIMIT_BYTES = 1 << 20

ModelSource = Union[str, Path, bytes, onnx.ModelProto]
InferredShape = tuple[Union[int, str, None], ...]  # per dim: a size, a symbol, or None (unknown)


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


def load_onnx(path_or_bytes: ModelSource, loss: str | LossSpec | None = None,
              batch_norm: str = "as-exported") -> Model:
    """Convert an ONNX model (a path, serialized bytes or a ``ModelProto``) into a :class:`Model`.

    ``loss`` is None when the graph's single output is the scalar loss; otherwise the name of a value
    in the graph, or a :class:`LossSpec` (or its string form, see :meth:`LossSpec.parse`) to append.
    A string is a value name if the graph has such a value, else a loss spec.

    ``batch_norm="batch"`` makes every BatchNormalization normalise with the statistics of the batch
    (``training_mode=1``, what ``model.train()`` means in torch). torch's dynamo exporter writes
    BatchNormalization in its inference form even for a module in training mode; export such a model
    with ``optimize=False`` (or the optimizer folds the normalisation into the convolution before it)
    and load it with ``batch_norm="batch"``. The default keeps each node as exported.

    Raises GraphError for anything that is not an ONNX model or uses ops gradserve does not have.
    """
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm must be one of {', '.join(BATCH_NORM_MODES)}, not {batch_norm!r}")
    proto = _read(path_or_bytes)
    proto, opset = _normalize_opset(proto)
    importer = _Importer(proto, opset)
    if batch_norm == "batch":
        importer.use_batch_statistics()
    importer.resolve_loss(loss)
    importer.fold_constants()
    importer.merge_duplicates()
    return importer.finish()


# -- reading ----------------------------------------------------------------------------------------
def _read(source: ModelSource) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        proto = source
    else:
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                proto = onnx.load_from_string(bytes(source))
            else:
                # external data later (_load_external_data): a missing file is not a malformed model
                proto = onnx.load(str(source), load_external_data=False)
        except OSError:  # a missing or unreadable file is not a malformed model
            raise
        except Exception as exc:  # protobuf raises DecodeError, others on truncated data
            raise GraphError(f"not an ONNX model: {exc}") from None
    # Protobuf parses many byte strings (the empty one, other messages) without complaint; a real
    # ModelProto always has an IR version and a graph.
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise GraphError("not an ONNX model: no IR version or graph in the data")
    if isinstance(source, (str, Path)):
        _load_external_data(proto, Path(source))
    return proto


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Read the tensors ``proto`` keeps in external data files (found relative to the model file
    ``path``, as ONNX says); GraphError naming the file and the tensor when one is missing."""
    missing: dict[str, list[str]] = {}
    for tensor in _tensors(proto.graph):
        if external_data_helper.uses_external_data(tensor):
            location = external_data_helper.ExternalDataInfo(tensor).location
            if not (path.parent / location).is_file():
                missing.setdefault(location, []).append(tensor.name)
    for location, names in missing.items():
        who = f"tensor '{names[0]}' needs" if len(names) == 1 else f"tensors '{names[0]}' and {len(names) - 1} more need"
        raise GraphError(f"{path}: external data file {path.parent / location} is missing ({who} it; "
                         "it belongs next to the model)")
    try:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:  # onnx raises ValueError, OSError... naming the tensor
        raise GraphError(f"{path}: cannot read its external data: {_first_line(str(exc))}") from None


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph`` and its subgraphs: initializers and node attributes."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _normalize_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The model as exported when its opset is one gradserve's ops follow (13 to 21: each op accepts
    every form its definition took there); older or newer models are converted into that range with
    ONNX's version converter, which fails on ops it has no adapter for."""
    opset = next((o.version for o in proto.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    if opset is None:
        raise GraphError("the model does not import the default ONNX domain (ai.onnx)")
    if opset in SUPPORTED_OPSETS:
        return proto, opset
    target = DEFAULT_OPSET if opset < SUPPORTED_OPSETS.start else SUPPORTED_OPSETS.stop - 1
    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter lacks adapters for some ops
        raise GraphError(
            f"the model uses ONNX opset {opset}; gradserve runs opsets {SUPPORTED_OPSETS.start} to "
            f"{SUPPORTED_OPSETS.stop - 1}, and ONNX's converter could not convert it to {target}: "
            f"{_first_line(str(exc))} (re-export the model at an opset in that range)"
        ) from None
    log.info("converted the model from opset %d to %d", opset, target)
    return converted, target


# -- conversion -------------------------------------------------------------------------------------
class _Importer:
    """The model under conversion: nodes, leaves, inferred shapes, then loss and folding."""

    def __init__(self, proto: onnx.ModelProto, opset: int):
        self.opset = opset
        graph = proto.graph
        self.shapes, self.dtypes = _infer(proto)
        if graph.sparse_initializer:
            raise GraphError(f"sparse initializer '{graph.sparse_initializer[0].values.name}' is not supported")
        self.params: dict[str, np.ndarray] = {}
        self.constants: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            value = _to_array(init, f"initializer '{init.name}'")
            (self.params if value.dtype.kind == "f" else self.constants)[init.name] = value
        # Before IR 4 initializers were also listed as inputs; they are not feeds.
        self.inputs = [self._input_spec(vi) for vi in graph.input
                       if vi.name not in self.params and vi.name not in self.constants]
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
        dtype = _np_dtype(t.elem_type, f"input '{vi.name}'")
        if not t.HasField("shape"):
            raise GraphError(f"input '{vi.name}' declares no shape (its rank must be known)")
        dims = (_dim(d) for d in t.shape.dim)
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
        if n.domain not in _DEFAULT_DOMAINS:
            raise GraphError(f"{node}: domain '{n.domain}' is not supported (only the default ONNX domain)")
        if n.op_type == "If":
            # Exporters emit If on conditions fixed by shapes (the legacy LocalResponseNorm, for one):
            # kept whole until folding knows the condition. Values the branches read from outside
            # become inputs, so the node sorts after their producers.
            branches = {a.name: a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH}
            self._branches[name] = (branches["then_branch"], branches["else_branch"])
            node.inputs += sorted(_outer_names(branches["then_branch"]) | _outer_names(branches["else_branch"]))
            node.attrs = dict(branches)  # for re-running shape inference; the node never reaches the engine
            return node
        node.attrs = {a.name: _attr_value(a, f"{node}: attribute '{a.name}'") for a in n.attribute}
        if n.op_type == "Constant":
            self.constants[n.output[0]] = _constant_value(node)
            return None
        if get_op(n.op_type) is None:
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
                node.outputs = node.outputs[:1] + [self._fresh(f"{node.outputs[0]}/running_{s}", names)
                                                   for s in ("mean", "var")]
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
                raise GraphError(f"the model has {len(self.outputs)} outputs ({', '.join(self.outputs)}); "
                                 f"say which one the loss reads, e.g. '{spec.kind}:OUTPUT:{spec.target}'")
            output = self.outputs[0]
        names = self._value_names()
        if output not in names:
            raise GraphError(f"loss spec names output '{output}', which is not a value of the graph")
        if spec.target in names:
            raise GraphError(f"the loss target '{spec.target}' would be a new input, but the graph already "
                             "has a value of that name; choose another target name")
        names.add(spec.target)
        shape = self.shapes.get(output)
        dtype = self.dtypes.get(output)
        if shape is None or dtype is None:
            raise GraphError(f"cannot tell the shape and dtype of output '{output}', so the loss target "
                             "cannot be declared")
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
                raise GraphError(f"cross_entropy needs logits of shape (N, C, ...), but output '{output}' "
                                 f"has shape {format_shape(shape)}")
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

    # -- constant folding ---------------------------------------------------------------------------
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
            return helper.make_node(n.op_type, inputs, n.outputs, name=n.name, **_onnx_attrs(n))

        values = {**self.params, **self.constants}
        graph = helper.make_graph(
            [onnx_node(n) for n in self.nodes], "import",
            [helper.make_tensor_value_info(s.name, helper.np_dtype_to_tensor_dtype(s.dtype),
                                           [None if d == "?" else d for d in s.shape]) for s in self.inputs],
            [], [numpy_helper.from_array(v, k) for k, v in values.items()])
        shapes, dtypes = _infer(onnx_model(graph, self.opset))
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
            raise GraphError(f"{node}: its condition is only known when the model runs; control flow that "
                             "depends on the data (If) is not supported")
        branch = self._branches[node.name][0 if bool(np.asarray(cond).reshape(-1)[0]) else 1]
        for init in branch.initializer:
            value = _to_array(init, f"initializer '{init.name}' of {node}")
            (self.params if value.dtype.kind == "f" else self.constants)[init.name] = value
        for inner in self._convert_nodes(branch.node):
            self._fold_into(inner, kept)
        for out, result in zip(node.outputs, [o.name for o in branch.output]):
            if result in self.constants:
                self.constants[out] = self.constants[result]
            elif out:
                kept.append(Node(f"{node.name}/{out}", "Identity", [result], [out]))

    def _fold(self, node: Node) -> list[np.ndarray] | None:
        if node.op_type in _NONDETERMINISTIC:
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
            result = get_op(node.op_type).forward(ctx, *args)
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
            return [np.asarray(int(np.prod(shape)), np.int64)] if all(isinstance(d, int) for d in shape) else None
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
            taken = get_op("Slice").forward(ctx, positions, *bounds)
        except Exception:
            return None  # malformed: leave it to fail with the engine's message
        picked = [dims[int(i)] for i in taken]
        if not all(isinstance(d, int) for d in picked):
            return None
        return [np.asarray(picked, np.int64)]

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
            first = seen.get(key) if node.op_type not in _NONDETERMINISTIC else None
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
                _check_dtype(value.dtype, f"{kind} '{name}'")
        for spec in self.inputs:
            _check_dtype(spec.dtype, f"input '{spec.name}'")
        return Model(nodes=self.nodes, inputs=self.inputs, params=self.params, loss=self.loss, constants=constants,
                     opset=self.opset)


# -- helpers ----------------------------------------------------------------------------------------
def _attrs_key(attrs: dict[str, Any]) -> tuple:
    """A hashable, exact key of attribute values (arrays by their bytes: repr would abbreviate)."""
    return tuple(
        (k, (v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else repr(v)) for k, v in sorted(attrs.items())
    )


def _infer(proto: onnx.ModelProto) -> tuple[dict[str, InferredShape], dict[str, np.dtype]]:
    """Shapes (ints, symbols, None for unknown) and dtypes of every value ONNX can infer from the
    declared input shapes. data_prop lets ONNX see through Shape -> Gather -> Concat -> Reshape."""
    try:
        inferred = shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # an inconsistent graph: the engine's strict check will name the node
        log.debug("ONNX shape inference failed at import: %s", exc)
        inferred = proto
    shapes: dict[str, InferredShape] = {}
    dtypes: dict[str, np.dtype] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        if t.elem_type:
            try:
                dtypes[vi.name] = helper.tensor_dtype_to_np_dtype(t.elem_type)
            except Exception:  # exotic element types: leave unknown
                pass
        if t.HasField("shape"):
            shapes[vi.name] = tuple(_dim(d) for d in t.shape.dim)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes, dtypes


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Values a subgraph (and the subgraphs inside it) reads from the scopes around it."""
    inner = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    read: set[str] = set()
    for n in graph.node:
        inner.update(n.output)
        read.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                read |= _outer_names(a.g)
    return read - inner


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param:
        return d.dim_param
    return None


def _to_array(tensor: onnx.TensorProto, what: str) -> np.ndarray:
    try:
        return np.array(numpy_helper.to_array(tensor))  # a writable copy, not a view of the proto
    except Exception as exc:
        raise GraphError(f"{what}: cannot read its data: {exc}") from None


def _np_dtype(elem_type: int, what: str) -> np.dtype:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        raise GraphError(f"{what}: ONNX element type {elem_type} is not supported") from None


def _check_dtype(dtype: np.dtype, what: str) -> None:
    try:
        tensors.dtype_code(dtype)
    except ValueError as exc:
        raise GraphError(f"{what}: {exc}") from None


def _attr_value(a: onnx.AttributeProto, what: str) -> Any:
    """An ONNX attribute as plain Python: int, float, str, lists of those, or a numpy array."""
    kind = a.type
    if kind == onnx.AttributeProto.TENSOR:
        return _to_array(a.t, what)
    if kind in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise GraphError(f"{what}: subgraphs (If/Loop/Scan bodies) are not supported")
    if kind in (onnx.AttributeProto.TENSORS, onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS,
                onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS):
        raise GraphError(f"{what}: attributes of type {onnx.AttributeProto.AttributeType.Name(kind)} are not supported")
    value = helper.get_attribute_value(a)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if kind == onnx.AttributeProto.INT:
        return int(value)
    if kind == onnx.AttributeProto.FLOAT:
        return float(value)
    if kind == onnx.AttributeProto.STRINGS:
        return [v.decode("utf-8") for v in value]
    if kind == onnx.AttributeProto.INTS:
        return [int(v) for v in value]
    if kind == onnx.AttributeProto.FLOATS:
        return [float(v) for v in value]
    raise GraphError(f"{what}: attribute without a value")




def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), text.strip())


def _constant_value(node: Node) -> np.ndarray:
    """The tensor a Constant node holds: the op library's own Constant op says what it means."""
    try:
        return np.array(get_op("Constant").forward(OpContext(dict(node.attrs), node=node.name)))
    except OpError as exc:
        raise GraphError(str(exc)) from None

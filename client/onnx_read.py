"""Reading ONNX for the importer (:mod:`.onnx_import`): the model from a file, bytes or a
``ModelProto`` (with its external data), its opset brought into the range gradserve's ops follow,
the shapes ONNX infers, and tensors, dtypes and attributes as plain numpy and Python values.

Separate from the conversion into a :class:`~gradserve.worker.graph.Model`: everything here is
about the ONNX format and its library, nothing about gradserve's graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper, shape_inference, version_converter

from gradserve.proto import tensors
from gradserve.worker.graph import DEFAULT_OPSET, SUPPORTED_OPSETS, GraphError

log = logging.getLogger("gradserve.onnx")

DEFAULT_DOMAINS = ("", "ai.onnx")

ModelSource = Union[str, Path, bytes, onnx.ModelProto]
InferredShape = tuple[Union[int, str, None], ...]  # per dim: a size, a symbol, or None (unknown)


# -- reading ----------------------------------------------------------------------------------------
def read_model(source: ModelSource) -> onnx.ModelProto:
    """The ModelProto in ``source``, its external data loaded; GraphError if it is not an ONNX model."""
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
        who = (
            f"tensor '{names[0]}' needs" if len(names) == 1 else f"tensors '{names[0]}' and {len(names) - 1} more need"
        )
        raise GraphError(
            f"{path}: external data file {path.parent / location} is missing ({who} it; it belongs next to the model)"
        )
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


def normalize_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The model as exported when its opset is one gradserve's ops follow (13 to 21: each op accepts
    every form its definition took there); older or newer models are converted into that range with
    ONNX's version converter, which fails on ops it has no adapter for."""
    opset = next((o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS), None)
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


def infer_shapes(proto: onnx.ModelProto) -> tuple[dict[str, InferredShape], dict[str, np.dtype]]:
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
            shapes[vi.name] = tuple(dim_value(d) for d in t.shape.dim)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes, dtypes


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Values a subgraph (and the subgraphs inside it) reads from the scopes around it."""
    inner = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    read: set[str] = set()
    for n in graph.node:
        inner.update(n.output)
        read.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                read |= outer_names(a.g)
    return read - inner


def dim_value(d: onnx.TensorShapeProto.Dimension) -> int | str | None:
    """One dimension of a shape: its size, its symbol, or None when unknown."""
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param:
        return d.dim_param
    return None


def to_array(tensor: onnx.TensorProto, what: str) -> np.ndarray:
    """A tensor as a writable numpy array; GraphError naming ``what`` if its data cannot be read."""
    try:
        return np.array(numpy_helper.to_array(tensor))  # a writable copy, not a view of the proto
    except Exception as exc:
        raise GraphError(f"{what}: cannot read its data: {exc}") from None


def np_dtype(elem_type: int, what: str) -> np.dtype:
    """The numpy dtype of an ONNX element type; GraphError naming ``what`` if numpy has none."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        raise GraphError(f"{what}: ONNX element type {elem_type} is not supported") from None


def check_dtype(dtype: np.dtype, what: str) -> None:
    """GraphError naming ``what`` if gradserve cannot carry ``dtype`` on the wire."""
    try:
        tensors.dtype_code(dtype)
    except ValueError as exc:
        raise GraphError(f"{what}: {exc}") from None


def attr_value(a: onnx.AttributeProto, what: str) -> Any:
    """An ONNX attribute as plain Python: int, float, str, lists of those, or a numpy array."""
    kind = a.type
    if kind == onnx.AttributeProto.TENSOR:
        return to_array(a.t, what)
    if kind in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise GraphError(f"{what}: subgraphs (If/Loop/Scan bodies) are not supported")
    if kind in (
        onnx.AttributeProto.TENSORS,
        onnx.AttributeProto.SPARSE_TENSOR,
        onnx.AttributeProto.SPARSE_TENSORS,
        onnx.AttributeProto.TYPE_PROTO,
        onnx.AttributeProto.TYPE_PROTOS,
    ):
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
    """The first non-blank line of an error message (ONNX's run to many lines)."""
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), text.strip())

"""The in-memory model: nodes, declared inputs, parameters, constants and the loss.

A :class:`Model` mirrors the ``gradserve.v1.Model`` protobuf message (see ``proto/v1/model.proto``)
with plain Python and numpy values, and converts to and from it. Op types and attributes follow ONNX.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import numpy as np

from gradserve.proto import tensors
from gradserve.proto.v1 import model_pb2

Dim = Union[int, str, None]  # a fixed size, a named symbol ("batch"), or None (any size)

# Nodes follow the ONNX operator spec at the opset their model declares. Each op accepts every form
# its definition took in SUPPORTED_OPSETS (axes as an attribute or as an input, ...), so models are
# run as exported, never converted. A model that declares none (older clients) means opset 17.
DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(13, 22)


class GraphError(ValueError):
    """A model or a feed that cannot be run; the message names the node or tensor at fault."""


@dataclass
class Node:
    """One op application. ``inputs``/``outputs`` are value names; ``""`` is an omitted optional input."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"node '{self.name}' ({self.op_type})"


@dataclass
class InputSpec:
    """A value fed per job, with its dtype and (partly symbolic) shape."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]


@dataclass
class Model:
    """A differentiable model: a graph of ops, its parameters and the name of its scalar loss."""

    nodes: list[Node]
    inputs: list[InputSpec]
    params: dict[str, np.ndarray]
    loss: str
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    opset: int = DEFAULT_OPSET  # the ONNX opset (default domain) the nodes follow

    # -- protobuf --------------------------------------------------------------------------------
    def graph_proto(self) -> model_pb2.Graph:
        """The structure of the model (no parameters) as a protobuf ``Graph``."""
        g = model_pb2.Graph(loss=self.loss, opset=self.opset)
        for node in self.nodes:
            n = g.nodes.add(name=node.name, op_type=node.op_type, inputs=node.inputs, outputs=node.outputs)
            for key, value in node.attrs.items():
                _encode_attr(value, n.attributes[key], f"{node}: attribute '{key}'")
        for spec in self.inputs:
            vi = g.inputs.add(name=spec.name, dtype=tensors.dtype_code(spec.dtype))
            for d in spec.shape:
                if isinstance(d, (int, np.integer)):
                    vi.shape.add(size=int(d))
                else:
                    vi.shape.add(symbol=d or "?")
        for name, value in self.constants.items():
            tensors.encode(value, g.constants.add(name=name).tensor)
        return g

    def to_proto(self) -> model_pb2.Model:
        """The whole model (graph and parameters) as a protobuf ``Model``."""
        msg = model_pb2.Model(graph=self.graph_proto())
        for name, value in self.params.items():
            tensors.encode(value, msg.parameters.add(name=name).tensor)
        return msg

    @classmethod
    def from_proto(cls, msg: model_pb2.Model) -> "Model":
        """A Model from a protobuf ``Model``; GraphError/TensorDecodeError name what is malformed."""
        model = graph_from_proto(msg.graph)
        for p in msg.parameters:
            if p.name in model.params:
                raise GraphError(f"parameter '{p.name}' appears twice")
            model.params[p.name] = tensors.decode(p.tensor, f"parameter '{p.name}'")
        return model

    def to_bytes(self) -> bytes:
        """The serialized ``gradserve.v1.Model`` (gradserve's own file format)."""
        return self.to_proto().SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Model":
        """Parse :meth:`to_bytes` output; anything else is a GraphError, never unpickled."""
        msg = model_pb2.Model()
        try:
            msg.ParseFromString(data)
        except Exception as exc:  # protobuf raises DecodeError, sometimes others, on garbage
            raise GraphError(f"not a gradserve model: {exc}") from None
        return cls.from_proto(msg)

    def save(self, path: str | Path) -> None:
        """Write the model in gradserve's own format (a serialized ``gradserve.v1.Model``)."""
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "Model":
        """Read a model written by :meth:`save`."""
        return cls.from_bytes(Path(path).read_bytes())

    # -- identity ----------------------------------------------------------------------------------
    def structure_fingerprint(self) -> str:
        """Hash of everything except parameter values (parameter names, shapes and dtypes included)."""
        h = hashlib.sha256(self.graph_proto().SerializeToString(deterministic=True))
        for name, value in sorted(self.params.items()):
            h.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        return h.hexdigest()

    def fingerprint(self) -> str:
        """Content hash of the whole model, parameter values included."""
        h = hashlib.sha256(self.structure_fingerprint().encode())
        for name, value in sorted(self.params.items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(value).data)
        return h.hexdigest()

    def input_spec(self, name: str) -> InputSpec | None:
        """The declared input called ``name``, or None."""
        return next((s for s in self.inputs if s.name == name), None)


def graph_from_proto(g: model_pb2.Graph) -> Model:
    """A parameterless :class:`Model` from a ``Graph`` message (parameters are added by the caller)."""
    nodes = []
    for i, n in enumerate(g.nodes):
        name = n.name or f"node{i}"
        attrs = {
            key: _decode_attr(a, f"node '{name}' ({n.op_type}): attribute '{key}'") for key, a in n.attributes.items()
        }
        nodes.append(Node(name, n.op_type, list(n.inputs), list(n.outputs), attrs))
    inputs = []
    for vi in g.inputs:
        shape = tuple(d.size if d.WhichOneof("value") == "size" else (d.symbol or None) for d in vi.shape)
        try:
            dtype = tensors.numpy_dtype(vi.dtype)
        except tensors.TensorDecodeError as exc:
            raise GraphError(f"input '{vi.name}': {exc}") from None
        inputs.append(InputSpec(vi.name, dtype, shape))
    constants = {c.name: tensors.decode(c.tensor, f"constant '{c.name}'") for c in g.constants}
    opset = int(g.opset) or DEFAULT_OPSET
    if opset not in SUPPORTED_OPSETS:
        raise GraphError(
            f"the graph declares ONNX opset {opset}; gradserve supports opsets "
            f"{SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}"
        )
    return Model(nodes=nodes, inputs=inputs, params={}, loss=g.loss, constants=constants, opset=opset)


def _encode_attr(value: Any, out: model_pb2.Attribute, what: str) -> None:
    if isinstance(value, (bool, int, np.integer)):
        out.i = int(value)
    elif isinstance(value, (float, np.floating)):
        out.f = float(value)
    elif isinstance(value, str):
        out.s = value
    elif isinstance(value, np.ndarray):
        tensors.encode(value, out.t)
    elif isinstance(value, (list, tuple)):
        if all(isinstance(v, (bool, int, np.integer)) for v in value):
            out.ints.values[:] = [int(v) for v in value]
        elif all(isinstance(v, (int, float, np.integer, np.floating)) for v in value):
            out.floats.values[:] = [float(v) for v in value]
        elif all(isinstance(v, str) for v in value):
            out.strings.values[:] = list(value)
        else:
            raise GraphError(f"{what}: mixed list {value!r} cannot be encoded")
    else:
        raise GraphError(f"{what}: value of type {type(value).__name__} cannot be encoded")


def _decode_attr(a: model_pb2.Attribute, what: str) -> Any:
    kind = a.WhichOneof("value")
    if kind is None:
        raise GraphError(f"{what}: empty attribute")
    if kind == "t":
        return tensors.decode(a.t, what)
    if kind in ("floats", "ints", "strings"):
        return list(getattr(a, kind).values)
    return getattr(a, kind)


def feed_signature(feeds: Mapping[str, np.ndarray]) -> tuple:
    """Names, dtypes and shapes of a feed dict: what shape checking depends on."""
    return tuple(sorted((k, np.asarray(v).dtype.str, np.shape(v)) for k, v in feeds.items()))


def value_names(nodes: Iterable[Node]) -> set[str]:
    return {o for n in nodes for o in n.outputs if o}

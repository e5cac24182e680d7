"""Build models with numpy-like expressions.

    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 4))
    y = m.input("y", (None, 1))
    w = m.param("w", np.random.randn(4, 1).astype(np.float32))
    b = m.param("b", np.zeros(1, np.float32))
    y_hat = m.sigmoid(x @ w + b)
    model = m.loss(0.5 * ((y - y_hat) ** 2).mean())

Every expression appends an ONNX-style node to the graph; :meth:`ModelBuilder.loss` returns the
:class:`~gradserve.worker.graph.Model`. Python numbers become constants of the other operand's dtype.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np

from gradserve.worker.graph import Dim, GraphError, InputSpec, Model, Node

Operand = Union["Value", float, int, np.ndarray]


class Value:
    """A symbolic value in a model under construction; supports + - * / @ ** and a few methods."""

    def __init__(self, builder: "ModelBuilder", name: str, dtype: np.dtype):
        self.builder, self.name, self.dtype = builder, name, np.dtype(dtype)

    def __repr__(self) -> str:
        return f"Value({self.name!r}, {self.dtype.name})"

    def _bin(self, op: str, other: Operand, reverse: bool = False) -> "Value":
        other = self.builder._lift(other, self.dtype)
        a, b = (other, self) if reverse else (self, other)
        return self.builder.op(op, a, b)

    __add__ = lambda s, o: s._bin("Add", o)
    __radd__ = lambda s, o: s._bin("Add", o, True)
    __sub__ = lambda s, o: s._bin("Sub", o)
    __rsub__ = lambda s, o: s._bin("Sub", o, True)
    __mul__ = lambda s, o: s._bin("Mul", o)
    __rmul__ = lambda s, o: s._bin("Mul", o, True)
    __truediv__ = lambda s, o: s._bin("Div", o)
    __rtruediv__ = lambda s, o: s._bin("Div", o, True)
    __pow__ = lambda s, o: s._bin("Pow", o)
    __matmul__ = lambda s, o: s._bin("MatMul", o)
    __rmatmul__ = lambda s, o: s._bin("MatMul", o, True)

    def __neg__(self) -> "Value":
        return self.builder.op("Neg", self)

    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> "Value":
        """Sum over ``axis`` (all axes when None), like ``np.sum``."""
        inputs: list[Operand] = [self]
        if axis is not None:
            inputs.append(self.builder.constant(np.asarray(_axes(axis), np.int64)))
        return self.builder.op("ReduceSum", *inputs, keepdims=int(keepdims))

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> "Value":
        """Mean over ``axis`` (all axes when None), like ``np.mean``."""
        attrs: dict[str, Any] = {"keepdims": int(keepdims)}
        if axis is not None:
            attrs["axes"] = _axes(axis)
        return self.builder.op("ReduceMean", self, **attrs)

    def reshape(self, *shape: int) -> "Value":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return self.builder.op("Reshape", self, self.builder.constant(np.asarray(shape, np.int64)))

    @property
    def T(self) -> "Value":
        return self.builder.op("Transpose", self)


class ModelBuilder:
    """Collects inputs, parameters and nodes; :meth:`loss` turns them into a Model."""

    def __init__(self) -> None:
        self._nodes: list[Node] = []
        self._inputs: list[InputSpec] = []
        self._params: dict[str, np.ndarray] = {}
        self._constants: dict[str, np.ndarray] = {}
        self._names: set[tuple[str, str]] = set()  # (kind, name)

    # -- leaves ------------------------------------------------------------------------------------
    def input(self, name: str, shape: Sequence[Dim], dtype: Any = np.float32) -> Value:
        """A value fed per job. ``None`` in ``shape`` is a batch dimension of any size."""
        self._claim(name)
        dims = tuple("batch" if d is None else d for d in shape)
        self._inputs.append(InputSpec(name, np.dtype(dtype), dims))
        return Value(self, name, dtype)

    def param(self, name: str, value: np.ndarray) -> Value:
        """A parameter w: the model returns dL/dw for it."""
        self._claim(name)
        value = np.array(value, copy=True)
        if value.dtype.kind != "f":
            raise GraphError(f"parameter '{name}' must be floating point, got {value.dtype}")
        self._params[name] = value
        return Value(self, name, value.dtype)

    def constant(self, value: np.ndarray | float, dtype: Any = None, name: str | None = None) -> Value:
        """A fixed tensor that gets no gradient."""
        array = np.array(value, dtype=dtype)
        name = name or self._fresh("const")
        self._claim(name)
        self._constants[name] = array
        return Value(self, name, array.dtype)

    # -- ops ---------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: Operand | None, n_outputs: int = 1, name: str | None = None, **attrs: Any):
        """Append any registered op (ONNX semantics); returns a Value, or a tuple for several outputs."""
        dtype = next((v.dtype for v in inputs if isinstance(v, Value)), np.dtype(np.float32))
        names = ["" if v is None else self._lift(v, dtype).name for v in inputs]
        node_name = name or self._fresh(op_type.lower())
        self._claim(node_name, kind="node")
        outs = []
        for _ in range(n_outputs):
            outs.append(self._fresh(f"{node_name}_out"))
            self._claim(outs[-1])
        self._nodes.append(Node(node_name, op_type, names, outs, attrs))
        values = tuple(Value(self, o, dtype) for o in outs)
        return values[0] if n_outputs == 1 else values

    def sigmoid(self, x: Value) -> Value:
        return self.op("Sigmoid", x)

    def relu(self, x: Value) -> Value:
        return self.op("Relu", x)

    def tanh(self, x: Value) -> Value:
        return self.op("Tanh", x)

    def exp(self, x: Value) -> Value:
        return self.op("Exp", x)

    def log(self, x: Value) -> Value:
        return self.op("Log", x)

    def softmax(self, x: Value, axis: int = -1) -> Value:
        return self.op("Softmax", x, axis=axis)

    def log_softmax(self, x: Value, axis: int = -1) -> Value:
        return self.op("LogSoftmax", x, axis=axis)

    def mse(self, prediction: Value, target: Value) -> Value:
        """Mean squared error, as PyTorch's ``MSELoss`` (mean over all elements)."""
        return ((prediction - target) ** 2).mean()

    def cross_entropy(self, logits: Value, labels: Value) -> Value:
        """Mean softmax cross-entropy of (N, C) logits against int64 class labels (N,)."""
        return self.op("SoftmaxCrossEntropyLoss", logits, labels, reduction="mean")

    # -- result ------------------------------------------------------------------------------------
    def loss(self, value: Value) -> Model:
        """Finish: the Model whose loss is ``value`` (must be a scalar)."""
        if not isinstance(value, Value) or value.builder is not self:
            raise GraphError("loss must be a value built by this builder")
        return Model(
            nodes=list(self._nodes),
            inputs=list(self._inputs),
            params=dict(self._params),
            loss=value.name,
            constants=dict(self._constants),
        )

    # -- helpers -----------------------------------------------------------------------------------
    def _lift(self, v: Operand, dtype: np.dtype) -> Value:
        if isinstance(v, Value):
            if v.builder is not self:
                raise GraphError(f"{v!r} belongs to another ModelBuilder")
            return v
        array = np.asarray(v)
        return self.constant(array, dtype=dtype if array.dtype.kind in "fiub" and dtype.kind == "f" else None)

    def _claim(self, name: str, kind: str = "value") -> None:
        key = (kind, name)
        if key in self._names:
            raise GraphError(f"{kind} name '{name}' is already used")
        self._names.add(key)

    def _fresh(self, stem: str) -> str:
        i = 0
        while ("value", f"{stem}{i}") in self._names or ("node", f"{stem}{i}") in self._names:
            i += 1
        return f"{stem}{i}"


def _axes(axis: int | Sequence[int]) -> list[int]:
    return [int(axis)] if isinstance(axis, (int, np.integer)) else [int(a) for a in axis]

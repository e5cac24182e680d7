"""ONNX's node checker and shape inference -- the checks :mod:`gradserve.worker.validate` runs on
every job -- without importing onnx's Python package.

``import onnx`` imports ml_dtypes, whose registration of its numpy types took 1.1-1.3 s of the CLI's
start-up on the 2-core CI machine (measured with ``python -X importtime``), for a check that
takes milliseconds. The check itself lives in onnx's C++ extension (``onnx.onnx_cpp2py_export``),
which takes serialized protobuf messages; onnx's Python wrappers only serialize their arguments.
So this module loads that extension and onnx's generated protobuf module (``onnx.onnx_ml_pb2``)
by themselves -- found in the installed onnx package, registered under their own names, so an
``import onnx`` later in the process reuses them -- builds the messages the way ``onnx.helper``
does for the values gradserve has, and calls the extension as ``onnx.checker.check_node`` and
``onnx.shape_inference.infer_shapes`` do. tests/e2e/test_startup.py checks that the messages equal
``onnx.helper``'s byte for byte and that the answers equal onnx's own.

Values only onnx-imported models carry (dtypes from ml_dtypes such as bfloat16, string tensors,
opsets outside 13-21) go through ``onnx.helper`` itself: whoever made them has imported onnx.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import numbers
import sys
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import Any, Mapping, Sequence

import numpy as np

# numpy dtype -> TensorProto.DataType, for the dtypes numpy has itself (onnx.helper's mapping)
_CODES = {
    np.dtype(name): code
    for name, code in (
        ("float32", 1),
        ("uint8", 2),
        ("int8", 3),
        ("uint16", 4),
        ("int16", 5),
        ("int32", 6),
        ("int64", 7),
        ("bool", 9),
        ("float16", 10),
        ("float64", 11),
        ("uint32", 12),
        ("uint64", 13),
        ("complex64", 14),
        ("complex128", 15),
    )
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
# the IR version each opset needs (onnx.helper.find_min_ir_version_for, for the opsets gradserve runs)
_IR_VERSIONS = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}

_lock = threading.Lock()


class CheckFailed(ValueError):
    """ONNX's checker or shape inference refused the model; the message is ONNX's own."""


def _submodule(name: str) -> ModuleType:
    """``onnx.<name>`` loaded from the installed onnx package without running ``onnx/__init__``
    (or the one already imported)."""
    full = f"onnx.{name}"
    if full in sys.modules:
        return sys.modules[full]
    package = importlib.util.find_spec("onnx")  # finds the package without importing it
    spec = package and importlib.machinery.PathFinder.find_spec(full, package.submodule_search_locations)
    if spec is None or spec.loader is None:
        raise ImportError(f"{full} is not installed (gradserve checks models with ONNX: pip install onnx)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module  # where `import onnx` looks first: it reuses this one
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[full]
        raise
    return module


@functools.lru_cache(maxsize=None)
def _onnx() -> tuple[ModuleType, ModuleType]:
    """onnx's protobuf classes and its C++ extension."""
    with _lock:
        return _submodule("onnx_ml_pb2"), _submodule("onnx_cpp2py_export")


def dtype_code(dtype: np.dtype) -> int:
    """The TensorProto data type of a numpy dtype."""
    code = _CODES.get(np.dtype(dtype).newbyteorder("="))
    if code is None:
        from onnx import helper

        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return code


def numpy_dtype(code: int) -> np.dtype:
    """The numpy dtype of a TensorProto data type."""
    dtype = _DTYPES.get(code)
    if dtype is None:
        from onnx import helper

        return np.dtype(helper.tensor_dtype_to_np_dtype(code))
    return dtype


def tensor(array: np.ndarray, name: str = "") -> Any:
    """A TensorProto holding ``array``, as ``onnx.numpy_helper.from_array`` makes it."""
    array = np.asarray(array)
    if array.dtype.newbyteorder("=") not in _CODES:
        from onnx import numpy_helper

        return numpy_helper.from_array(array, name or None)
    pb, _ = _onnx()
    t = pb.TensorProto(dims=array.shape, data_type=_CODES[array.dtype.newbyteorder("=")])
    if name:
        t.name = name
    t.raw_data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return t


def value_info(name: str, dtype: np.dtype, shape: Sequence[int]) -> Any:
    """A ValueInfoProto of a tensor with a known shape (``onnx.helper.make_tensor_value_info``)."""
    pb, _ = _onnx()
    vi = pb.ValueInfoProto(name=name)
    t = vi.type.tensor_type
    t.elem_type = dtype_code(dtype)
    t.shape.SetInParent()  # a scalar has a shape too: an empty one
    for d in shape:
        t.shape.dim.add(dim_value=int(d))
    return vi


def node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str, attrs: Mapping[str, Any]) -> Any:
    """A NodeProto (``onnx.helper.make_node``); ValueError for an attribute value ONNX has no type for."""
    pb, _ = _onnx()
    n = pb.NodeProto(op_type=op_type, input=inputs, output=outputs)
    if name:
        n.name = name
    n.attribute.extend(_attribute(pb, key, value) for key, value in sorted(attrs.items()))
    return n


def _attribute(pb: ModuleType, key: str, value: Any) -> Any:
    """An AttributeProto as ``onnx.helper.make_attribute`` infers it (arrays become tensors)."""
    a = pb.AttributeProto(name=key)
    if isinstance(value, np.ndarray):
        value = tensor(value)
    if isinstance(value, numbers.Integral):
        a.i, a.type = int(value), a.INT
    elif isinstance(value, numbers.Real):
        a.f, a.type = float(value), a.FLOAT
    elif isinstance(value, (str, bytes)):
        a.s, a.type = _bytes(value), a.STRING
    elif isinstance(value, pb.TensorProto):
        a.t.CopyFrom(value)
        a.type = a.TENSOR
    elif isinstance(value, Iterable):
        values = list(value)
        kinds = {type(v) for v in values}
        if not values:
            raise ValueError(f"Could not infer attribute `{key}` type from empty iterator")
        if all(issubclass(k, numbers.Integral) for k in kinds):
            a.ints.extend(values)
            a.type = a.INTS
        elif all(issubclass(k, numbers.Real) for k in kinds):
            a.floats.extend(values)
            a.type = a.FLOATS
        elif all(issubclass(k, (str, bytes)) for k in kinds):
            a.strings.extend(_bytes(v) for v in values)
            a.type = a.STRINGS
        else:
            raise ValueError("Could not infer the attribute type from the elements of the passed Iterable value.")
    else:
        raise TypeError(f"'{value}' is not an accepted attribute value.")
    return a


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def model(nodes: Sequence[Any], inputs: Sequence[Any], initializers: Sequence[Any], opset: int) -> Any:
    """A ModelProto around a graph named "check" of these nodes, inputs and initializers (no
    outputs), at ``opset`` of the default domain and the IR version it needs."""
    pb, _ = _onnx()
    m = pb.ModelProto(ir_version=ir_version(opset))
    g = m.graph
    g.node.extend(nodes)
    g.name = "check"
    g.input.extend(inputs)
    g.initializer.extend(initializers)
    m.opset_import.add(domain="", version=opset)
    return m


def ir_version(opset: int) -> int:
    """The lowest IR version that has ``opset`` of the default domain."""
    if opset in _IR_VERSIONS:
        return _IR_VERSIONS[opset]
    from onnx import helper

    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])


def check_node(n: Any, opset: int) -> None:
    """``onnx.checker.check_node`` at ``opset``; CheckFailed with ONNX's message."""
    _, c = _onnx()
    try:
        c.checker.check_node(n.SerializeToString(), _checker_context(opset), _lexical_scope())
    except c.checker.ValidationError as exc:
        raise CheckFailed(str(exc)) from None


def infer_shapes(m: Any) -> Any:
    """``onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)``;
    CheckFailed with ONNX's message."""
    pb, c = _onnx()
    try:
        inferred = c.shape_inference.infer_shapes(m.SerializeToString(), True, True, True)
    except (c.shape_inference.InferenceError, c.checker.ValidationError, RuntimeError) as exc:
        raise CheckFailed(str(exc)) from None
    return pb.ModelProto.FromString(inferred)


@functools.lru_cache(maxsize=None)
def _checker_context(opset: int) -> Any:
    _, c = _onnx()
    ctx = c.checker.CheckerContext()
    ctx.ir_version = ir_version(opset)
    ctx.opset_imports = {"": opset}
    return ctx


@functools.lru_cache(maxsize=None)
def _lexical_scope() -> Any:
    _, c = _onnx()
    return c.checker.LexicalScopeContext()

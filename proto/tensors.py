"""The one tensor codec: numpy arrays <-> ``gradserve.v1.Tensor`` messages.

Tensors travel as dtype + shape + raw little-endian bytes in C order. Decoding checks that the byte
count matches the shape, so a hostile message can never make us read past its data or unpickle it.
"""

from __future__ import annotations

import numpy as np

from gradserve.proto.v1 import model_pb2

_TO_NUMPY: dict[model_pb2.DType, np.dtype] = {
    model_pb2.FLOAT32: np.dtype("<f4"),
    model_pb2.FLOAT64: np.dtype("<f8"),
    model_pb2.INT64: np.dtype("<i8"),
    model_pb2.INT32: np.dtype("<i4"),
    model_pb2.BOOL: np.dtype("bool"),
}
_FROM_NUMPY = {dt.newbyteorder("="): code for code, dt in _TO_NUMPY.items()}

SUPPORTED_DTYPES = tuple(dt.name for dt in _TO_NUMPY.values())


class TensorDecodeError(ValueError):
    """A Tensor message that does not describe a valid array."""


def dtype_code(dtype: np.dtype | str) -> model_pb2.DType:
    """The wire enum value for a numpy dtype; ``ValueError`` names the dtype when unsupported."""
    try:
        return _FROM_NUMPY[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise ValueError(
            f"dtype {np.dtype(dtype)} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})"
        ) from None


def numpy_dtype(code: model_pb2.DType) -> np.dtype:
    """The numpy dtype for a wire enum value."""
    try:
        return _TO_NUMPY[code].newbyteorder("=")
    except KeyError:
        raise TensorDecodeError(f"unknown dtype code {code}") from None


def encode(array: np.ndarray, out: model_pb2.Tensor | None = None) -> model_pb2.Tensor:
    """Encode an array (any layout) into a Tensor message."""
    array = np.asarray(array)
    code = dtype_code(array.dtype)
    msg = out if out is not None else model_pb2.Tensor()
    msg.dtype = code
    msg.shape[:] = array.shape
    msg.data = np.ascontiguousarray(array, dtype=_TO_NUMPY[code]).tobytes()
    return msg


def decode(msg: model_pb2.Tensor, what: str = "tensor") -> np.ndarray:
    """Decode a Tensor message into a writable numpy array; ``what`` names it in errors."""
    if msg.dtype not in _TO_NUMPY:
        raise TensorDecodeError(f"{what}: unknown dtype code {msg.dtype}")
    dtype = _TO_NUMPY[msg.dtype]
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"{what}: negative dimension in shape {shape}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize != len(msg.data):
        raise TensorDecodeError(
            f"{what}: shape {shape} of {dtype.name} needs {count * dtype.itemsize} bytes, got {len(msg.data)}"
        )
    array = np.frombuffer(msg.data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)

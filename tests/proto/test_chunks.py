"""proto/chunks.py: tensors split into chunk messages and reassembled, with every hostile-stream
case rejected before it can cost memory."""

import numpy as np
import pytest

from gradserve.proto import chunks
from gradserve.proto.chunks import Assembler, LimitExceeded
from gradserve.proto.tensors import TensorDecodeError
from gradserve.proto.v1 import model_pb2, service_pb2


def roundtrip(arrays, chunk_bytes=chunks.CHUNK_BYTES, **limits):
    asm = Assembler(what="test", **limits)
    asm.declare(chunks.headers(arrays), "tensor")
    for c in chunks.chunks(arrays, chunk_bytes):
        asm.add(c)
    return asm.finish()


def test_roundtrip_dtypes_shapes_and_byte_order():
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f64_scalar": np.array(2.5),
        "i64": np.arange(10, dtype=np.int64).reshape(2, 5),
        "i32_big_endian": np.arange(6, dtype=">i4"),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float32),
        "strided": rng.standard_normal((6, 6))[::2, ::3],
    }
    out = roundtrip(arrays, chunk_bytes=7)  # odd chunk size: chunks cut through elements
    assert list(out) == list(arrays)
    for name, a in arrays.items():
        assert out[name].shape == a.shape, name
        assert out[name].dtype == a.dtype.newbyteorder("="), name
        np.testing.assert_array_equal(out[name], a)
        assert out[name].flags.writeable


def test_chunks_are_at_most_one_mib():
    big = np.zeros((1200, 1200), np.float32)  # 5.5 MiB
    sizes = [len(c.data) for c in chunks.chunks({"w": big})]
    assert max(sizes) == chunks.CHUNK_BYTES and sum(sizes) == big.nbytes and len(sizes) == 6


def _asm(shape=(2, 2), dtype=model_pb2.FLOAT32, **limits):
    asm = Assembler(what="model", **limits)
    asm.declare([service_pb2.TensorHeader(name="w", dtype=dtype, shape=shape)], "parameter")
    return asm


def chunk(data, offset=0, name="w"):
    return service_pb2.TensorChunk(name=name, offset=offset, data=data)


@pytest.mark.parametrize(
    "feed, message",
    [
        ([chunk(b"\0" * 8, 0), chunk(b"\0" * 8, 4)], "expected offset 8"),  # overlap
        ([chunk(b"\0" * 8, 0), chunk(b"\0" * 4, 12)], "expected offset 8"),  # gap
        ([chunk(b"\0" * 8, 8)], "expected offset 0"),  # out of order
        ([chunk(b"\0" * 20)], "needs 16 bytes"),  # overflow
        ([chunk(b"garbage")], "needs 16 bytes, got 7"),  # short, caught at finish
        ([chunk(b"\0" * 16, name="v")], "undeclared tensor 'v'"),
        ([chunk(b"")], "empty chunk"),
    ],
)
def test_malformed_streams_name_the_tensor(feed, message):
    asm = _asm()
    with pytest.raises(TensorDecodeError, match=message) as info:
        for c in feed:
            asm.add(c)
        asm.finish()
    if "undeclared" not in message:
        assert "parameter 'w'" in str(info.value)


@pytest.mark.parametrize(
    "headers, message",
    [
        ([dict(name="w", dtype=1, shape=[2]), dict(name="w", dtype=1, shape=[2])], "declared twice"),
        ([dict(name="w", dtype=99, shape=[2])], "unknown dtype code 99"),
        ([dict(name="w", dtype=1, shape=[-1, 4])], "negative dimension"),
        ([dict(name="", dtype=1, shape=[2])], "has no name"),
        ([dict(name="w", dtype=1, shape=[1] * 65)], "dimensions"),
    ],
)
def test_bad_headers(headers, message):
    with pytest.raises(TensorDecodeError, match=message):
        Assembler().declare([service_pb2.TensorHeader(**h) for h in headers], "parameter")


def test_limits_are_checked_on_declared_sizes_before_allocating():
    # 10^15 float32 would be 4 PB: refused from the header alone.
    with pytest.raises(LimitExceeded, match="parameter 'w'.*elements"):
        _asm(shape=(10**5, 10**5, 10**5), max_elements=10**9)
    asm = Assembler(what="model", max_total_bytes=100)
    asm.declare([service_pb2.TensorHeader(name="a", dtype=model_pb2.FLOAT32, shape=[20])], "parameter")
    with pytest.raises(LimitExceeded, match="constant 'b'.*model data to 104 bytes; the limit is 100"):
        asm.declare([service_pb2.TensorHeader(name="b", dtype=model_pb2.FLOAT32, shape=[6])], "constant")
    with pytest.raises(LimitExceeded, match="chunk of 16 bytes; the limit is 8"):
        _asm(max_chunk_bytes=8).add(chunk(b"\0" * 16))
    assert issubclass(LimitExceeded, ValueError)

"""The committed protobuf modules match the .proto sources, and the tensor codec round-trips."""

import subprocess
import sys

import numpy as np
import pytest

from gradserve.proto import tensors
from gradserve.proto.v1 import model_pb2


def test_generated_modules_are_fresh():
    proc = subprocess.run([sys.executable, "-m", "gradserve.proto.generate", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, f"run `make proto` and commit the result:\n{proc.stderr}"


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "int32", "bool"])
def test_tensor_round_trip(dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    msg = tensors.encode(a[:, ::2])  # a non-contiguous view
    b = tensors.decode(model_pb2.Tensor.FromString(msg.SerializeToString()))
    assert b.dtype == a.dtype and np.array_equal(b, a[:, ::2]) and b.flags.writeable


def test_decode_rejects_size_mismatch_and_bad_dtype():
    msg = tensors.encode(np.ones((2, 2), np.float32))
    msg.shape[:] = [3, 2]
    with pytest.raises(tensors.TensorDecodeError, match="w: shape \\(3, 2\\) of float32 needs 24 bytes, got 16"):
        tensors.decode(msg, "w")
    msg.dtype = 99
    with pytest.raises(tensors.TensorDecodeError, match="unknown dtype"):
        tensors.decode(msg, "w")


def test_compute_takes_one_message_and_streams_its_reply():
    from gradserve.proto.v1 import service_pb2

    method = service_pb2.DESCRIPTOR.services_by_name["GradientService"].methods_by_name["Compute"]
    assert (method.client_streaming, method.server_streaming) == (False, True)
    assert (method.input_type.name, method.output_type.name) == ("JobRequest", "ResultChunk")

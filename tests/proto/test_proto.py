"""The committed protobuf modules match the .proto sources, and the tensor codec round-trips."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from gradserve.proto import tensors
from gradserve.proto.v1 import model_pb2


def test_generated_modules_are_fresh():
    proc = subprocess.run([sys.executable, "-m", "gradserve.proto.generate", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, f"run `make proto` and commit the result:\n{proc.stderr}"


def test_freshness_ignores_the_generators_version_but_not_the_messages():
    from gradserve.proto.generate import HERE, meaning

    code = (HERE / "v1" / "service_pb2_grpc.py").read_bytes()
    restamped = re.sub(rb"GRPC_GENERATED_VERSION = '[^']*'", b"GRPC_GENERATED_VERSION = '9.99.9'", code)
    assert restamped != code and meaning(restamped) == meaning(code)
    renamed = code.replace(b"/gradserve.v1.GradientService/Compute", b"/gradserve.v1.GradientService/Compute2")
    assert renamed != code and meaning(renamed) != meaning(code)
    pb2 = (HERE / "v1" / "model_pb2.py").read_bytes()
    restamped = re.sub(rb"(ValidateProtobufRuntimeVersion\(\s*_runtime_version.Domain.PUBLIC,\s*)\d+", rb"\g<1>99", pb2)
    assert restamped != pb2 and meaning(restamped) == meaning(pb2)
    field = pb2.replace(b"gradserve.v1.DType", b"gradserve.v1.DTypo", 1)  # a type renamed inside the descriptor
    assert field != pb2 and meaning(field) != meaning(pb2)


def _floor(requirement: str) -> Version:
    """The lowest version a requirement admits (its >= bound)."""
    return min(Version(s.version) for s in Requirement(requirement).specifier if s.operator == ">=")


def test_dependency_floors_admit_no_runtime_the_generated_modules_refuse():
    """The generated modules refuse to import under a grpcio or protobuf older than their generator's:
    pyproject.toml must not let a user install one (pip would, and `import gradserve` would fail)."""
    root = Path(__file__).resolve().parents[2]
    deps = {
        Requirement(d).name: d for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    grpc_code = (root / "proto" / "v1" / "service_pb2_grpc.py").read_text()
    needs_grpc = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_code).group(1))
    assert _floor(deps["grpcio"]) >= needs_grpc, f"pyproject.toml: grpcio must be >= {needs_grpc}"
    for module in ("model_pb2.py", "service_pb2.py"):
        code = (root / "proto" / "v1" / module).read_text()
        major, minor, patch = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+)", code
        ).groups()
        needs_pb = Version(f"{major}.{minor}.{patch}")
        assert _floor(deps["protobuf"]) >= needs_pb, f"pyproject.toml: protobuf must be >= {needs_pb} ({module})"


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

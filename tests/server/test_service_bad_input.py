"""Bad requests to the gRPC service, over a real socket: garbage bytes, broken uploads, a forged
content hash, unknown ops, ids and tensors. Each gets the right status code and a message naming the
culprit, and the server still answers a normal job afterwards (the service's other tests:
test_service.py)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import gradserve
from gradserve.client.remote import InvalidArgument, NotFound
from gradserve.client.wire import model_manifest
from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2, service_pb2_grpc
from gradserve.worker.graph import GraphError, InputSpec, Model, Node
from serving import SERVICE, batch, check_still_serving, code_and_details, mlp

# -- bad requests ----------------------------------------------------------------------------------


def _raw_upload(client, messages):
    """UploadModel with raw bytes as the messages: what a broken or hostile client can send."""
    call = client._channel.stream_unary(f"/{SERVICE}/UploadModel")
    return call(iter(messages), timeout=10)


def _upload_with_chunks(client, model, data_chunks, model_id=None):
    manifest, _ = model_manifest(model)
    if model_id:
        manifest.model_id = model_id
    msgs = [service_pb2.UploadChunk(manifest=manifest)] + [service_pb2.UploadChunk(data=c) for c in data_chunks]
    return service_pb2_grpc.GradientServiceStub(client._channel).UploadModel(iter(msgs), timeout=10)


def test_garbage_message_bytes(client):
    # A length-delimited field claiming far more bytes than follow: not a parseable message.
    code, details = code_and_details(lambda: _raw_upload(client, [b"\x0a\xff\xff\xff\x0f garbage"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid gradserve.v1.UploadChunk" in details
    check_still_serving(client)


def test_garbage_chunk_payload_names_the_tensor(client):
    model = mlp(6)
    garbage = service_pb2.TensorChunk(name="w1", offset=0, data=b"garbage")
    code, details = code_and_details(lambda: _upload_with_chunks(client, model, [garbage]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'w1'" in details and "got 7" in details
    bad_offset = service_pb2.TensorChunk(name="b1", offset=4, data=b"\0" * 4)
    code, details = code_and_details(lambda: _upload_with_chunks(client, model, [bad_offset]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "parameter 'b1'" in details and "expected offset 0" in details
    check_still_serving(client)


def test_content_hash_is_verified(client):
    model = mlp(7)
    _, arrays = model_manifest(model)

    code, details = code_and_details(
        lambda: _upload_with_chunks(client, model, list(chunks.chunks(arrays)), model_id="0" * 64)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "hashes to" in details
    assert not client.has_model("0" * 64)


def test_first_message_must_be_the_manifest(client):
    stub = service_pb2_grpc.GradientServiceStub(client._channel)
    chunk = service_pb2.UploadChunk(data=service_pb2.TensorChunk(name="w", data=b"\0"))
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadModel(iter([chunk]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "manifest" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Run(iter([service_pb2.JobChunk(feed=chunk.data)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options" in info.value.details()


def test_unknown_op_names_the_node(client):
    model = Model(
        nodes=[Node("frob", "Frobnicate", ["x", "w"], ["loss"])],
        inputs=[InputSpec("x", np.dtype(np.float32), ())],
        params={"w": np.ones((), np.float32)},
        loss="loss",
    )
    with pytest.raises(InvalidArgument, match="node 'frob' \\(Frobnicate\\).*unsupported op type") as info:
        client.upload(model)
    assert isinstance(info.value, GraphError) and isinstance(info.value, ValueError)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    check_still_serving(client)


@pytest.mark.parametrize(
    "feeds, options, match",
    [
        ({"x": np.zeros((16, 5), np.float32), "y": np.zeros((16, 1), np.float32)}, {}, "'x'"),  # bad shape
        ({"x": np.zeros((16, 4), np.float32)}, {}, "feed 'y' is missing"),
        ({"x": np.zeros((16, 4), np.int64), "y": np.zeros((16, 1), np.float32)}, {}, "'x'"),  # bad dtype
        (batch(8), {"input_grads": ["nope"]}, "'nope'"),
    ],
    ids=["bad-shape", "missing-feed", "bad-dtype", "unknown-input-grad"],
)
def test_bad_feeds_name_the_tensor(client, feeds, options, match):
    model = mlp(8)
    with pytest.raises(InvalidArgument, match=match):
        client.gradients(model, feeds, **options)
    with pytest.raises(InvalidArgument, match=match):  # the async path checks at Submit
        client.submit(model, feeds, **options)
    check_still_serving(client)


def test_unknown_ids(client):
    with pytest.raises(NotFound, match="model 'no-such-model'"):
        client.gradients("no-such-model", batch(0))
    job = gradserve.client.remote.Job(client, "job-0-nope", "")
    for action in (job.status, job.cancel, lambda: list(job.watch(timeout=5)), lambda: job.result(timeout=5)):
        with pytest.raises(NotFound, match="job 'job-0-nope'"):
            action()
    check_still_serving(client)

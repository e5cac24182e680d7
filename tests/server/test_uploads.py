"""Uploads resume rather than restart: an UploadModel stream that breaks leaves what it delivered
on the server (for a while, counted as pending bytes), HasModel tells how far it got
(ModelInfo.received_bytes), and the retry sends only the rest. Real gRPC, inline engine."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from gradserve.client.remote import Client
from gradserve.client.wire import model_manifest
from gradserve.proto import chunks
from gradserve.proto.tensors import TensorDecodeError
from gradserve.proto.v1 import service_pb2
from serving import REFERENCE, assert_same, batch, mlp, serving

MIB = chunks.CHUNK_BYTES
N_IN, HIDDEN = 1536, 1024  # w1: 6 MiB = 6 chunks; b1, w2, const0: one small chunk each
TOTAL_CHUNKS = 9  # plus a scalar constant of the graph
BROKEN_AFTER = 3  # chunks the broken stream delivers (all of w1's first 3 MiB)


def big_model(seed: int = 1):
    return mlp(seed, n_in=N_IN, hidden=HIDDEN)


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def broken(srv, messages, n: int):
    """``messages`` until ``n`` data chunks are out and the server has taken them; then the stream
    breaks (the request iterator raises, so grpc cancels the call)."""
    target = srv.stats["upload_chunks"] + n
    for i, msg in enumerate(messages):
        if i == n + 1:
            wait_for(lambda: srv.stats["upload_chunks"] >= target)
            raise ConnectionResetError("the network went away (injected)")
        yield msg


def upload_messages(manifest, arrays, start=None):
    yield service_pb2.UploadChunk(manifest=manifest)
    for chunk in chunks.chunks(arrays, start=start):
        yield service_pb2.UploadChunk(data=chunk)


def partial_of(stub, model_id: str) -> dict[str, int]:
    return dict(stub.HasModel(service_pb2.ModelRef(model_id=model_id), timeout=10).received_bytes)


def break_upload(srv, stub, model, n: int = BROKEN_AFTER) -> dict[str, int]:
    """Upload ``model`` through a stream that breaks after ``n`` chunks; what the server kept."""
    manifest, arrays = model_manifest(model)
    with pytest.raises(grpc.RpcError):
        stub.UploadModel(broken(srv, upload_messages(manifest, arrays), n), timeout=10)
    wait_for(lambda: partial_of(stub, manifest.model_id))  # kept once the server's handler has ended
    return partial_of(stub, manifest.model_id)


class Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection reset (injected)"

    def trailing_metadata(self):
        return ()


def test_chunks_start_offsets_and_a_resumed_assembler_skips_what_it_holds():
    a = np.arange(10, dtype=np.float32)  # 40 bytes
    sent = list(chunks.chunks({"a": a, "b": a}, chunk_bytes=16, start={"a": 24, "b": 40}))
    assert [(c.name, c.offset, len(c.data)) for c in sent] == [("a", 24, 16)]

    asm = chunks.Assembler()
    asm.declare(chunks.headers({"a": a}))
    for c in list(chunks.chunks({"a": a}, chunk_bytes=16))[:2]:
        asm.add(c)
    assert asm.received() == {"a": 32}
    with pytest.raises(TensorDecodeError, match="needs 40 bytes, got 32"):
        asm.finish()  # incomplete: raises, keeps everything
    with pytest.raises(TensorDecodeError, match="expected offset 32"):
        asm.add(service_pb2.TensorChunk(name="a", offset=0, data=b"\0" * 8))  # strict until resumed
    asm.resume()
    # A sender that starts over: the chunks it resends are skipped, the straddling one is trimmed.
    for c in chunks.chunks({"a": a}, chunk_bytes=12):
        asm.add(c)
    assert asm.received_bytes == 40
    np.testing.assert_array_equal(asm.finish()["a"], a)


def test_a_broken_upload_is_resumed_by_the_client_retry_with_only_the_remaining_chunks():
    model, feeds = big_model(), batch(1, n_in=N_IN)
    manifest, arrays = model_manifest(model)
    assert sum(1 for _ in chunks.chunks(arrays)) == TOTAL_CHUNKS
    total_bytes = sum(a.nbytes for a in arrays.values())
    with serving() as srv, Client(srv.address, timeout=30) as c:
        real = c.calls.stub.UploadModel
        calls, kept = [], {}

        def flaky(request, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:  # the first stream really breaks, after BROKEN_AFTER chunks
                with pytest.raises(grpc.RpcError):
                    real(broken(srv, request, BROKEN_AFTER), *args, **kwargs)
                wait_for(lambda: partial_of(c.calls.stub, manifest.model_id))
                kept.update(partial_of(c.calls.stub, manifest.model_id))
                kept["pending"] = srv.servicer.pending.used
                raise Unavailable()
            return real(request, *args, **kwargs)

        c.calls.stub.UploadModel = flaky
        before = srv.stats
        assert c.upload(model) == manifest.model_id
        after = srv.stats

        assert kept == {"w1": BROKEN_AFTER * MIB, "b1": 0, "w2": 0, "const0": 0, "pending": total_bytes}
        assert len(calls) == 2 and c.retries == 1
        # Both streams together delivered each chunk once: the retry sent only the rest.
        assert after["upload_chunks"] - before["upload_chunks"] == TOTAL_CHUNKS
        assert after["uploads_resumed"] == before["uploads_resumed"] + 1
        assert after["uploads"] == before["uploads"] + 1
        assert partial_of(c.calls.stub, manifest.model_id) == {}  # dropped once completed
        assert srv.servicer.pending.used == 0
        assert_same(c.gradients(manifest.model_id, feeds), REFERENCE.gradients(model, feeds))


def test_an_old_client_that_resends_everything_also_completes_the_kept_upload():
    model = big_model(2)
    manifest, arrays = model_manifest(model)
    with serving() as srv, Client(srv.address, timeout=30) as c:
        assert break_upload(srv, c.calls.stub, model)["w1"] == BROKEN_AFTER * MIB
        reply = c.calls.stub.UploadModel(upload_messages(manifest, arrays), timeout=10)  # from offset 0
        assert reply.model_id == manifest.model_id
        assert reply.bytes_received == sum(a.nbytes for a in arrays.values()) - BROKEN_AFTER * MIB
        assert c.has_model(manifest.model_id) and srv.servicer.pending.used == 0


def test_the_next_upload_call_resumes_a_partial_left_by_an_earlier_one():
    model, feeds = big_model(3), batch(3, n_in=N_IN)
    with serving() as srv, Client(srv.address, timeout=30) as c:
        break_upload(srv, c.calls.stub, model)
        before = srv.stats
        c.upload(model)  # no retry involved: its first HasModel already reports the partial upload
        assert srv.stats["upload_chunks"] - before["upload_chunks"] == TOTAL_CHUNKS - BROKEN_AFTER
        assert_same(c.gradients(model, feeds), REFERENCE.gradients(model, feeds))


def test_an_expired_partial_upload_is_dropped():
    model = big_model(4)
    with serving() as srv, Client(srv.address, timeout=30) as c:
        kept, now = srv.servicer.partial_uploads, [0.0]
        kept.clock = lambda: now[0]  # the server's own seconds, moved on by the test instead of slept
        assert break_upload(srv, c.calls.stub, model)
        assert srv.servicer.pending.used > 0
        now[0] = kept.ttl - 1  # not yet
        assert partial_of(c.calls.stub, model.fingerprint()) != {}
        now[0] = kept.ttl + 1
        assert partial_of(c.calls.stub, model.fingerprint()) == {}
        assert srv.servicer.pending.used == 0  # the budget is free again
        before = srv.stats
        c.upload(model)  # from the start
        assert srv.stats["upload_chunks"] - before["upload_chunks"] == TOTAL_CHUNKS
        assert srv.stats["uploads_resumed"] == before["uploads_resumed"]


def test_a_different_manifest_under_the_same_id_drops_the_partial_upload_and_starts_afresh():
    model, other = big_model(5), big_model(6)
    manifest, _ = model_manifest(model)
    with serving() as srv, Client(srv.address, timeout=30) as c:
        break_upload(srv, c.calls.stub, model)
        # Same id, different headers (the parameters in another order) and data: not a resume.
        forged, arrays = model_manifest(other)
        forged.model_id = manifest.model_id
        forged.parameters.reverse()
        arrays = dict(reversed(list(arrays.items())))
        before = srv.stats
        with pytest.raises(grpc.RpcError) as err:
            c.calls.stub.UploadModel(upload_messages(forged, arrays), timeout=10)
        # Assembled from scratch (every chunk taken, none refused as overlapping), then the
        # fingerprint check refuses it.
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hashes to" in err.value.details()
        assert srv.stats["upload_chunks"] - before["upload_chunks"] == TOTAL_CHUNKS
        assert srv.stats["uploads_resumed"] == before["uploads_resumed"]
        assert partial_of(c.calls.stub, manifest.model_id) == {} and srv.servicer.pending.used == 0
        # The real model then uploads normally.
        c.upload(model)
        assert c.has_model(manifest.model_id)

"""The gRPC service end to end over real sockets: a GradientServer on a free port in this process
(inline engine, so it is fast), driven through gradserve.Client, raw stubs and the CLI.

Covers uploads (content-addressed, >4 MiB, re-upload free), sync jobs (Run and Compute) and async
ones, Watch, cancel, health and reflection, concurrency, every kind of bad request (right status code, message naming
the culprit, server still fine afterwards), limits, bearer-token auth, TLS, shutdown and the CLI.
"""

from __future__ import annotations

import io
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import gradserve
from borrowed import Borrowed
from gradserve.client.cli import main as cli_main
from gradserve.client.progress import ProgressLine
from gradserve.client.remote import (
    Client,
    JobStatus,
    NotFound,
    ResourceExhausted,
    read_result,
)
from gradserve.client.wire import model_manifest
from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2, service_pb2_grpc
from gradserve.server.events import ProgressEvent
from gradserve.server.limits import Limits
from serving import (
    REFERENCE,
    SERVICE,
    _files,
    assert_same,
    assert_same_npz,
    batch,
    check_still_serving,
    code_and_details,
    counting_calls,
    mlp,
    serving,
)


# -- models and helpers ----------------------------------------------------------------------------


# -- uploads and jobs ------------------------------------------------------------------------------


def test_upload_then_upload_again_costs_nothing(server, client):
    model = mlp(1)
    before = server.stats
    model_id = client.upload(model)
    assert model_id == model.fingerprint()
    middle = server.stats
    assert middle["uploads"] == before["uploads"] + 1
    assert middle["upload_chunks"] > before["upload_chunks"]
    assert client.has_model(model_id)

    assert client.upload(model) == model_id
    after = server.stats
    # The second upload was one HasModel call: no upload stream, not a single chunk.
    assert after["uploads"] == middle["uploads"]
    assert after["upload_chunks"] == middle["upload_chunks"]
    assert after["has_model_calls"] == middle["has_model_calls"] + 2  # has_model above, then upload

    # Even a client that streams the model regardless is answered at once.
    manifest, _ = model_manifest(model)
    reply = service_pb2_grpc.GradientServiceStub(client._channel).UploadModel(
        iter([service_pb2.UploadChunk(manifest=manifest)]), timeout=10
    )
    assert reply.already_present and reply.model_id == model_id


def test_sync_job_equals_inline_engine(client):
    model, feeds = mlp(2), batch(2)
    result = client.gradients(model, feeds, input_grads=["x"])
    assert_same(result, REFERENCE.gradients(model, feeds, input_grads=["x"]))
    assert result.info["server"]["model_id"] == model.fingerprint()
    # By id, once uploaded.
    assert_same(client.gradients(model.fingerprint(), feeds), REFERENCE.gradients(model, feeds))


def test_async_job_status_watch_result(client):
    model, feeds = mlp(3), batch(3)
    job = client.submit(model, feeds)
    statuses = list(job.watch(timeout=10))
    states = [s.state for s in statuses]
    assert states[-1] == "done" and states.count("done") == 1
    progress = [s for s in statuses if s.state == "running"]
    assert [(s.event.phase, s.event.done) for s in progress] == [
        ("forward", False),
        ("forward", True),
        ("backward", False),
        ("backward", True),
    ]
    assert [s.steps_done for s in progress] == [0, 1, 1, 2]
    assert statuses[-1].steps_done == statuses[-1].steps_total == 2
    assert job.status().state == "done"
    assert_same(job.result(timeout=10), REFERENCE.gradients(model, feeds))
    with pytest.raises(NotFound, match="already fetched"):
        job.result(timeout=10)


def test_result_survives_a_stream_that_breaks_half_way(client):
    """A FetchResult stream that ends after its first chunks (the client's connection broke) leaves
    the result on the server; the next fetch gets all of it, and only then is it gone."""
    rng = np.random.default_rng(8)
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 2500))
    # dL/dw: 24 MiB, more than HTTP/2 flow control lets the server send ahead of a client not reading
    w = m.param("w", rng.standard_normal((2500, 2500)).astype(np.float32) * 0.03)
    model = m.loss(m.tanh(x @ w).mean())
    feeds = {"x": rng.standard_normal((4, 2500)).astype(np.float32)}
    job = client.submit(model, feeds)
    assert list(job.watch(timeout=30))[-1].state == "done"
    stream = client.calls.stub.FetchResult(
        service_pb2.JobRef(job_id=job.id), metadata=client.calls.metadata, timeout=30
    )
    first = [next(stream), next(stream)]
    assert first[0].HasField("header") and first[1].HasField("data")
    stream.cancel()
    assert_same(job.result(timeout=30), REFERENCE.gradients(model, feeds))
    with pytest.raises(NotFound, match="already fetched"):
        job.result(timeout=30)


def test_progress_display_path(client, capsys):
    model, feeds = mlp(4), batch(4)
    assert_same(client.gradients(model, feeds, progress=True), REFERENCE.gradients(model, feeds))
    assert capsys.readouterr().err == ""  # a job under a second shows no progress at all


def test_upload_progress_is_shown_for_big_models(client, capsys, monkeypatch):
    import gradserve.client.progress as progress

    monkeypatch.setattr(
        progress.ProgressLine,
        "__init__",
        lambda self, stream=None, delay=1.0, _init=progress.ProgressLine.__init__: _init(self, stream, 0.0),
    )
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 1500))
    model = m.loss((x @ m.param("w", np.full((1500, 1000), 0.5, np.float32))).mean())  # 5.7 MiB: 6 chunks
    client.upload(model, progress=True)
    assert "] 1/6 uploading" in capsys.readouterr().err


def test_progress_line_rendering():
    out = io.StringIO()
    line = ProgressLine(out, delay=0)
    event = ProgressEvent("backward", 1, micro_batch=2)
    line.update(JobStatus("j", "running", 3, 4, event))
    line.update(JobStatus("j", "done", 4, 4, event))
    line.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[" + "#" * 18 + "." * 6 + "] 3/4 running backward p1 mb2")
    assert lines[1].startswith("[" + "#" * 24 + "] 4/4 done")


def test_model_and_batch_over_4_mib(server, client):
    rng = np.random.default_rng(5)
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 1200))
    w = m.param("w", (rng.standard_normal((1200, 1200)) * 0.03).astype(np.float32))  # 5.5 MiB
    h = m.tanh(x @ w)
    model = m.loss((h * h).mean())
    feeds = {"x": rng.standard_normal((1000, 1200)).astype(np.float32)}  # 4.6 MiB
    before = server.stats["upload_chunks"]
    result = client.gradients(model, feeds, input_grads=["x"])  # dL/dx is 4.6 MiB too
    assert server.stats["upload_chunks"] - before == 6
    assert_same(result, REFERENCE.gradients(model, feeds, input_grads=["x"]))


def test_four_clients_at_once(server):
    barrier = threading.Barrier(4)

    def work(seed):
        model, feeds = mlp(40 + seed, n_in=32, hidden=128), batch(40 + seed, n=512, n_in=32)
        with Client(server.address, timeout=30) as c:
            model_id = c.upload(model)
            barrier.wait(timeout=10)
            results = [c.gradients(model_id, feeds) for _ in range(3)]
        reference = REFERENCE.gradients(model, feeds)
        for r in results:
            assert_same(r, reference)
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


# -- Compute: a job in one request message ---------------------------------------------------------


def _job_parts(model_id, feeds, **options):
    """A job's options and its feeds' chunks, as both Run and Compute carry them."""
    return service_pb2.JobOptions(model_id=model_id, feeds=chunks.headers(feeds), **options), list(chunks.chunks(feeds))


def _compute(client, options, feed_chunks):
    stub = service_pb2_grpc.GradientServiceStub(client._channel)
    request = service_pb2.JobRequest(options=options, feeds=feed_chunks)
    return list(stub.Compute(request, metadata=client.calls.metadata, timeout=10))


def _run(client, options, feed_chunks):
    stub = service_pb2_grpc.GradientServiceStub(client._channel)
    messages = [service_pb2.JobChunk(options=options)] + [service_pb2.JobChunk(feed=c) for c in feed_chunks]
    return list(stub.Run(iter(messages), metadata=client.calls.metadata, timeout=10))


def _by_rpc(rpc, client, options, feed_chunks):
    return (_compute if rpc == "Compute" else _run)(client, options, feed_chunks)


def test_compute_answers_like_run_in_one_message(client):
    model, feeds = mlp(20), batch(20)
    options, feed_chunks = _job_parts(client.upload(model), feeds, input_grads=["x"])
    by_compute = _compute(client, options, feed_chunks)
    by_run = _run(client, options, feed_chunks)
    # Compute: the header carries the bytes; Run is unchanged: the header, then a chunk per tensor.
    assert len(by_compute) == 1 and len(by_compute[0].header.data) == 4
    assert len(by_run) == 5 and not by_run[0].header.data
    reference = REFERENCE.gradients(model, feeds, input_grads=["x"])
    for messages in (by_compute, by_run):
        header = messages[0].header
        assert header.job_id.startswith("job-")  # the first message names the job
        result = read_result(iter(messages))
        assert_same(result, reference)
        assert result.info["server"]["job_id"] == header.job_id
    assert by_compute[0].header.job_id != by_run[0].header.job_id


def test_compute_result_over_1_mib_continues_in_chunks(client):
    rng = np.random.default_rng(21)
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 1024))
    w = m.param("w", (rng.standard_normal((1024, 600)) * 0.03).astype(np.float32))  # dL/dw: 2.3 MiB
    model = m.loss(m.tanh(x @ w + m.param("b", np.zeros(600, np.float32))).mean())
    feeds = {"x": rng.standard_normal((8, 1024)).astype(np.float32)}
    messages = _compute(client, *_job_parts(client.upload(model), feeds))
    assert sum(len(c.data) for c in messages[0].header.data) == chunks.CHUNK_BYTES  # as much as fits
    assert [m.WhichOneof("part") for m in messages] == ["header", "data", "data", "data"]
    reference = REFERENCE.gradients(model, feeds)
    assert_same(read_result(iter(messages)), reference)
    assert_same(client.gradients(model, feeds), reference)


def test_client_computes_small_jobs_and_runs_big_ones(server):
    model = mlp(22, n_in=256, hidden=4)
    small, big = batch(22, n=1000, n_in=256), batch(22, n=1100, n_in=256)  # 1.00e6 and 1.13e6 bytes of feeds
    with Client(server.address, timeout=30) as c:
        calls = counting_calls(c)
        for feeds in (small, big):
            assert_same(c.gradients(model, feeds), REFERENCE.gradients(model, feeds))
    assert calls == ["Compute", "Run"]  # the 1 MiB line (chunks.CHUNK_BYTES)


def test_client_falls_back_to_run_on_a_server_without_compute(monkeypatch):
    from gradserve.server import service

    class WithoutCompute(grpc.GenericRpcHandler):  # a server from before Compute
        def __init__(self, inner):
            self.inner = inner

        def service(self, details):
            return None if details.method.endswith("/Compute") else self.inner.service(details)

    real = service.generic_handler
    monkeypatch.setattr(service, "generic_handler", lambda servicer: WithoutCompute(real(servicer)))
    model, feeds = mlp(23), batch(23)
    with serving() as srv, Client(srv.address, timeout=10) as c:
        calls = counting_calls(c)
        for _ in range(2):
            assert_same(c.gradients(model, feeds), REFERENCE.gradients(model, feeds))
    assert calls == ["Compute", "Run", "Run"]  # UNIMPLEMENTED once, then Run only


@pytest.mark.parametrize("rpc", ["Compute", "Run"])
def test_bad_job_requests_name_the_tensor(client, rpc):
    model_id = client.upload(mlp(24))
    options, (x, y) = _job_parts(model_id, batch(24))
    short = service_pb2.TensorChunk(name="x", offset=0, data=x.data[:100])
    late = service_pb2.TensorChunk(name="y", offset=8, data=y.data)
    stray = service_pb2.TensorChunk(name="z", offset=0, data=b"\0" * 4)
    bad_dtype = service_pb2.JobOptions()
    bad_dtype.CopyFrom(options)
    bad_dtype.feeds[0].dtype = 99
    for request, match in [
        ((options, [short, y]), "feed 'x'.* needs 256 bytes, got 100"),
        ((options, [x, late]), "feed 'y': chunk at offset 8, expected offset 0"),
        ((options, [x, y, stray]), "undeclared tensor 'z'"),
        ((bad_dtype, [x, y]), "feed 'x'.*dtype"),
        ((options, [x]), "feed 'y'.* needs 64 bytes, got 0"),
    ]:
        code, details = code_and_details(lambda: _by_rpc(rpc, client, *request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert re.search(match, details), details
    check_still_serving(client)


def test_malformed_compute_requests(client):
    call = client._channel.unary_stream(f"/{SERVICE}/Compute")
    code, details = code_and_details(lambda: list(call(b"\x0a\xff\xff\xff\x0f garbage", timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid gradserve.v1.JobRequest" in details
    code, details = code_and_details(lambda: _compute(client, None, []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Compute: the request has no options" in details
    code, details = code_and_details(lambda: _compute(client, *_job_parts("no-such-model", batch(25))))
    assert code == grpc.StatusCode.NOT_FOUND and "model 'no-such-model'" in details
    check_still_serving(client)


@pytest.mark.parametrize("rpc", ["Compute", "Run"])
def test_job_request_limits(rpc):
    limits = Limits(max_tensor_elements=5000, max_feed_bytes=8192, max_message_bytes=1 << 20)
    with serving(limits=limits) as srv, Client(srv.address, timeout=30) as c:
        model_id = c.upload(mlp(26))
        for feeds, match in [
            (batch(26, n=2000), "feed 'x' of shape \\(2000, 4\\) has 8000 elements; the limit is 5000"),
            (batch(26, n=1000), "feed 'x' \\(16000 bytes\\) brings the feed data to 16000 bytes; the limit is 8192"),
        ]:
            code, details = code_and_details(lambda: _by_rpc(rpc, c, *_job_parts(model_id, feeds)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and re.search(match, details), details
        if rpc == "Compute":  # one message over the server's message size: gRPC itself refuses it
            options, _ = _job_parts(model_id, batch(26))
            oversize = [service_pb2.TensorChunk(name="x", offset=0, data=b"\0" * (1 << 20))]
            code, _ = code_and_details(lambda: _compute(c, options, oversize))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        check_still_serving(c)
        assert srv.servicer.pending.used == 0


@pytest.mark.slow
def test_ray_engine_behind_the_service(ray_engine):
    """The service on the Ray engine (the default outside tests): partitions and micro-batches
    reach the engine, progress arrives per step, and the result equals the inline engine's."""

    with serving(lambda: Borrowed(ray_engine)) as srv, Client(srv.address, timeout=120) as c:
        model, feeds = mlp(30), batch(30, n=16)
        job = c.submit(model, feeds, partitions=2, micro_batches=2, input_grads=["x"])
        statuses = list(job.watch(timeout=120))
        assert statuses[-1].state == "done" and statuses[-1].steps_total == 8
        result = job.result(timeout=60)
        assert result.info["partitions"] == 2 and result.info["micro_batches"] == 2
        assert_same(result, REFERENCE.gradients(model, feeds, input_grads=["x"]))


# -- health and reflection -------------------------------------------------------------------------


def test_health_check(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        ]
        replies = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    assert SERVICE in {s.name for s in replies[0].list_services_response.service}
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the .proto is served too


def test_limits_answer_resource_exhausted():
    limits = Limits(max_model_bytes=4096, max_tensor_elements=5000, max_feed_bytes=8192, max_pending_bytes=6000)
    with serving(limits=limits) as srv, Client(srv.address, timeout=30) as c:
        with pytest.raises(ResourceExhausted, match="parameter 'w1'.*model data .*the limit is 4096"):
            c.upload(mlp(9, n_in=64, hidden=32))  # w1 alone is 8 KiB
        model = mlp(9)
        with pytest.raises(ResourceExhausted, match="feed 'x' of shape \\(2000, 4\\).*the limit is 5000"):
            c.gradients(model, batch(9, n=2000))
        with pytest.raises(ResourceExhausted, match="feed data"):
            c.gradients(model, batch(9, n=1000))  # 16 KiB + 4 KiB of feeds
        with pytest.raises(ResourceExhausted, match="feeds of this job needs 6400 bytes.*requests in flight"):
            c.gradients(model, batch(9, n=320))  # under the feed limit, over the pending budget
        assert not c.has_model(mlp(9, n_in=64, hidden=32).fingerprint())
        # A small request whose graph would build a huge tensor (shapes come from its constants).
        m = gradserve.ModelBuilder()
        x = m.input("x", (None, 4))
        w = m.param("w", np.ones((4, 1), np.float32))
        big = m.op(
            "ConstantOfShape", m.constant(np.array([300, 300], np.int64)), value=np.ones(1, np.float32), name="huge"
        )
        hostile = m.loss((x @ w).mean() + big.mean())
        with pytest.raises(ResourceExhausted, match=r"value 'huge_out0' would have shape \(300, 300\)"):
            c.gradients(hostile, {"x": batch(9)["x"]})
        with pytest.raises(ResourceExhausted, match="partitions x replicas = 130 worker actors"):
            c.gradients(model, batch(9), partitions=65, replicas=2)
        check_still_serving(c)
        assert srv.servicer.pending.used == 0


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_grad_via_server_writes_the_same_npz(server, tmp_path, capsys):
    model_path, feeds_path = _files(tmp_path, 16)
    local, remote = str(tmp_path / "local.npz"), str(tmp_path / "remote.npz")
    assert cli_main(["grad", model_path, "--feeds", feeds_path, "--out", local, "--engine", "inline", "-q"]) == 0
    assert cli_main(["grad", model_path, "--feeds", feeds_path, "--out", remote, "--server", server.address]) == 0
    assert "loss =" in capsys.readouterr().out
    assert_same_npz(local, remote)
    # A server-side error is one line, exit status 2, like a local one.
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 4), np.float32))
    assert (
        cli_main(
            [
                "grad",
                model_path,
                "--feeds",
                str(tmp_path / "bad.npz"),
                "--out",
                remote,
                "--server",
                server.address,
                "-q",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "feed 'y' is missing" in err

"""The server's log: one INFO line per job outcome, no traceback for failures the server handled,
and ``--log-format json`` (one JSON object per line).

The main test runs ``gradserve serve --engine inline --log-format json`` in a subprocess and sends
it :data:`N_JOBS` jobs that are malformed or fail -- a request that does not parse, a stream in the
wrong order, an unknown model, feeds of the wrong shape, dtype or size, a missing feed, an index
out of range and a label out of range (both fail while the job runs), cancelled jobs -- with a
few good ones among them, through raw stubs (the client library's retries would add attempts).
Then: every stderr line is a JSON object, none holds a traceback, and there is exactly one outcome
line per job. 1000 jobs, as the issue asks: about 5 s here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import grpc
import numpy as np
import pytest

import gradserve
from gradserve.client.remote import Client
from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2, service_pb2_grpc
from gradserve.server.service import JsonLogFormatter
from serving import SERVE_INLINE, batch, mlp, serving

N_JOBS = 1000
COMPUTE = "/gradserve.v1.GradientService/Compute"


def gather_model():
    m = gradserve.ModelBuilder()
    i = m.input("i", (None,), np.int64)
    w = m.param("w", np.ones((4, 3), np.float32))
    return m.loss(m.op("Gather", w, i).sum())


def ce_model():
    m = gradserve.ModelBuilder()
    labels = m.input("labels", (None,), np.int64)
    logits = m.input("logits", (None, 3))
    b = m.param("b", np.zeros(3, np.float32))
    return m.loss(m.cross_entropy(logits + b, labels))


def heavy_model():
    """About 25 ms of work from a 4 KiB feed: cancelled right after submit, it is cancelled while it runs."""
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 1024))
    w = m.param("w", np.full((1024, 1024), 1 / 1024, np.float32))
    wide = m.op("Expand", x, m.constant(np.array([1024, 1024], np.int64)))
    return m.loss((wide @ w).sum())


def job_request(model_id: str, feeds: dict[str, np.ndarray]) -> service_pb2.JobRequest:
    return service_pb2.JobRequest(
        options=service_pb2.JobOptions(model_id=model_id, feeds=chunks.headers(feeds)), feeds=list(chunks.chunks(feeds))
    )


def start_server(*args: str) -> tuple[subprocess.Popen, str, str, object]:
    """``gradserve serve --engine inline`` on free ports, stderr to a file; (process, gRPC address,
    metrics address, stderr file)."""
    import tempfile

    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [
            *SERVE_INLINE,
            "--address",
            "127.0.0.1:0",
            "--state-dir",
            "none",
            "--metrics-address",
            "127.0.0.1:0",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    timer = threading.Timer(60, proc.kill)  # a server that never starts fails the test, not hangs it
    timer.start()
    try:
        lines = [proc.stdout.readline().strip() for _ in range(2)]
    finally:
        timer.cancel()
    assert lines[0].startswith("listening on ") and lines[1].startswith("metrics on http://"), lines
    metrics = lines[1].removeprefix("metrics on http://").removesuffix("/metrics")
    return proc, lines[0].split()[-1], metrics, err


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def jobs_counted(scraped: str) -> float:
    """The sum of gradserve_jobs_total over its labels in a /metrics page."""
    return sum(float(v) for v in re.findall(r"^gradserve_jobs_total\{[^}]*\} (\S+)$", scraped, re.M))


def test_many_failing_jobs_leave_one_outcome_line_each_and_no_traceback():
    proc, address, metrics_address, err = start_server("--log-format", "json", "--max-feed-bytes", "64K")
    try:
        with Client(address, timeout=30) as client:
            good, gather, ce, heavy = mlp(51), gather_model(), ce_model(), heavy_model()
            for model in (good, gather, ce, heavy):
                client.upload(model)
            channel = client._channel
            stub = service_pb2_grpc.GradientServiceStub(channel)
            raw_compute = channel.unary_stream(
                COMPUTE, request_serializer=lambda b: b, response_deserializer=service_pb2.ResultChunk.FromString
            )
            x, y = batch(51)["x"], batch(51)["y"]
            kinds = [
                ("malformed request", lambda: list(raw_compute(b"\xff\xff\xff", timeout=30))),
                (
                    "feed chunk first",
                    lambda: list(stub.Run(iter([service_pb2.JobChunk(feed=service_pb2.TensorChunk())]), timeout=30)),
                ),
                ("unknown model", lambda: list(stub.Compute(job_request("ab" * 32, {"x": x, "y": y}), timeout=30))),
                (
                    "wrong shape",
                    lambda: list(stub.Compute(job_request(good.fingerprint(), {"x": x[:, :3], "y": y}), timeout=30)),
                ),
                ("missing feed", lambda: list(stub.Compute(job_request(good.fingerprint(), {"x": x}), timeout=30))),
                (
                    "wrong dtype",
                    lambda: list(
                        stub.Compute(job_request(good.fingerprint(), {"x": x.astype(np.float64), "y": y}), timeout=30)
                    ),
                ),
                (
                    "feeds over the limit",
                    lambda: list(
                        stub.Compute(
                            job_request(
                                good.fingerprint(),
                                {"x": np.zeros((5000, 4), np.float32), "y": np.zeros((5000, 1), np.float32)},
                            ),
                            timeout=30,
                        )
                    ),
                ),
                (
                    "index out of range",
                    lambda: list(stub.Compute(job_request(gather.fingerprint(), {"i": np.array([1, 99])}), timeout=30)),
                ),
                (
                    "label out of range",
                    lambda: list(
                        stub.Compute(
                            job_request(
                                ce.fingerprint(), {"labels": np.array([0, 7]), "logits": np.ones((2, 3), np.float32)}
                            ),
                            timeout=30,
                        )
                    ),
                ),
                (
                    "cancelled",
                    lambda: stub.Cancel(
                        service_pb2.JobRef(job_id=_submit(stub, heavy, {"x": np.ones((1, 1024), np.float32)})),
                        timeout=30,
                    ),
                ),
                ("good", lambda: list(stub.Compute(job_request(good.fingerprint(), {"x": x, "y": y}), timeout=30))),
            ]
            expected = Counter()
            for n in range(N_JOBS):
                kind, send = kinds[n % len(kinds)]
                try:
                    send()
                    expected[kind, "OK"] += 1
                except grpc.RpcError as exc:
                    expected[kind, exc.code().name] += 1
            assert all(code != "INTERNAL" for _, code in expected), expected
            assert expected["good", "OK"] > 0 and expected["index out of range", "INVALID_ARGUMENT"] > 0
            assert expected["feeds over the limit", "RESOURCE_EXHAUSTED"] > 0
            assert expected["unknown model", "NOT_FOUND"] > 0
            deadline = time.monotonic() + 30
            # A cancelled job's Cancel call returns before the job has stopped, and a job leaves
            # the running gauge a moment before the counter of ended jobs counts it.
            while True:
                with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
                    scraped = reply.read().decode()
                idle = re.search(r"^gradserve_jobs_running 0\.0$", scraped, re.M)
                if (idle and jobs_counted(scraped) == N_JOBS) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    finally:
        stop_server(proc)
    assert proc.returncode == 0
    err.seek(0)
    text = err.read()
    assert "Traceback" not in text
    records = []
    for line in text.splitlines():
        record = json.loads(line)  # every line is one JSON object
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        assert "traceback" not in record, line
        records.append(record)
    outcomes = [r for r in records if "outcome" in r]
    assert len(outcomes) == N_JOBS, Counter(r["outcome"] for r in outcomes)
    ids = [r["job_id"] for r in outcomes if r["job_id"]]
    assert len(ids) == len(set(ids))  # one line per job that got an id
    for r in outcomes:
        assert r["level"] == "INFO" and r["message"].startswith("job ")
        assert {"model_id", "code"} <= r.keys()
        if r["job_id"]:
            assert {"partitions", "micro_batches", "replicas", "queued_seconds", "run_seconds"} <= r.keys()
    by_code = Counter(r["code"] for r in outcomes)
    sent_codes = Counter()
    for (kind, code), count in expected.items():
        # A Cancel RPC answers OK; the job it cancelled (or that finished first) ends CANCELLED or OK.
        sent_codes["CANCELLED or OK" if kind == "cancelled" else code] += count
    assert by_code["CANCELLED"] + by_code["OK"] == sent_codes["CANCELLED or OK"] + sent_codes["OK"]
    assert by_code["CANCELLED"] > 0 and Counter(r["outcome"] for r in outcomes)["cancelled"] == by_code["CANCELLED"]
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"):
        assert by_code[code] == sent_codes[code], code
    # The metrics agree with the log.
    assert jobs_counted(scraped) == N_JOBS


def _submit(stub, model, feeds) -> str:
    request = iter(
        [
            service_pb2.JobChunk(
                options=service_pb2.JobOptions(model_id=model.fingerprint(), feeds=chunks.headers(feeds))
            )
        ]
        + [service_pb2.JobChunk(feed=c) for c in chunks.chunks(feeds)]
    )
    return stub.Submit(request, timeout=30).job_id


def test_a_client_that_leaves_while_sending_feeds_leaves_one_cancelled_line(caplog):
    """A Run stream abandoned after its options, while the server waits for the feeds: the job is
    refused as CANCELLED, in one line and without a traceback."""
    with serving() as srv, Client(srv.address, timeout=30) as c:
        model, feeds = mlp(53), batch(53)
        c.upload(model)
        stub = service_pb2_grpc.GradientServiceStub(c._channel)
        gate = threading.Event()

        def requests():
            yield service_pb2.JobChunk(
                options=service_pb2.JobOptions(model_id=model.fingerprint(), feeds=chunks.headers(feeds))
            )
            gate.wait(10)

        with caplog.at_level(logging.INFO, logger="gradserve.server"):
            call = stub.Run(requests(), timeout=30)
            deadline = time.monotonic() + 10
            while srv.servicer.pending.used == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # the server has the options and holds room for the feeds
            assert srv.servicer.pending.used > 0
            call.cancel()
            gate.set()
            while srv.servicer.rejected == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job ")]
    assert len(lines) == 1, lines
    # CANCELLED, or -- when gRPC ends the request stream before it marks the call cancelled -- the
    # feeds that never came.
    assert lines[0] in (
        f"job rejected: model {model.fingerprint()[:16]}: CANCELLED: the client went away while sending the job",
        f"job rejected: model {model.fingerprint()[:16]}: INVALID_ARGUMENT: feed 'x': shape (16, 4) of float32 "
        "needs 256 bytes, got 0",
    )
    assert not any(r.exc_info for r in caplog.records)
    assert srv.servicer.pending.used == 0


def test_outcome_line_in_text(caplog):
    with serving() as srv, Client(srv.address, timeout=30) as c:
        model = mlp(52)
        with caplog.at_level(logging.INFO, logger="gradserve.server"):
            c.gradients(model, batch(52))
            with pytest.raises(Exception):
                c.gradients(model, {"x": np.zeros((2, 4), np.float32)})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job ")]
    assert len(lines) == 2, lines
    assert re.fullmatch(
        rf"job job-1-[0-9a-f]+ done: model {model.fingerprint()[:16]} K=1 M=1 R=1, "
        r"queued \d+\.\d{3}s, ran \d+\.\d{3}s: OK, loss=\S+",
        lines[0],
    ), lines[0]
    assert lines[1].startswith(f"job rejected: model {model.fingerprint()[:16]}: INVALID_ARGUMENT: feed 'y' is missing")
    assert not any(r.exc_info for r in caplog.records)


def test_json_formatter_keeps_a_traceback_on_its_line():
    formatter = JsonLogFormatter()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("gradserve.server").makeRecord(
            "gradserve.server",
            logging.ERROR,
            __file__,
            1,
            "internal error: %s",
            ("boom",),
            sys.exc_info(),
            extra={"fields": {"job_id": "job-1", "message": "not overwritten"}},
        )
    line = formatter.format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "internal error: boom" and data["level"] == "ERROR"
    assert data["logger"] == "gradserve.server" and data["job_id"] == "job-1"
    assert "RuntimeError: boom" in data["traceback"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["time"])

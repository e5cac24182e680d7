"""Clients that ride out load over real gRPC sockets: a full queue answered RESOURCE_EXHAUSTED with
a hint and ridden out, a server not up yet, each call retried with a fresh request stream, what is
not retried, and 96 clients x 4 jobs against one server with default limits, every job completed
and correct.

The inline engine does the work, slowed down where a queue must fill (a sleeping job costs no CPU).
The policy itself and the server's hint are in test_retries.py.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from gradserve.client.remote import (
    Client,
    InvalidArgument,
    NotFound,
    RemoteError,
    ResourceExhausted,
    Unavailable,
)
from gradserve.client.retry import RETRY_AFTER_KEY
from gradserve.proto import chunks
from gradserve.server.events import check_cancelled
from gradserve.server.inline import InlineEngine
from gradserve.server.limits import Limits
from clusters import free_port
from serving import REFERENCE, batch, mlp, same, serving

Code = grpc.StatusCode


# -- helpers ---------------------------------------------------------------------------------------


class SlowEngine:
    """The inline engine, each job ``seconds`` longer (asleep: no CPU), or held at a gate."""

    name = "slow"

    def __init__(self, seconds: float = 0.0, gated: bool = False) -> None:
        self.seconds = seconds
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started = threading.Event()
        self.inner = InlineEngine()

    def gradients(self, model, feeds, *, input_grads=(), progress=None, cancelled=None, prepared=None):
        self.started.set()
        while not self.gate.wait(0.01):
            check_cancelled(cancelled)
        time.sleep(self.seconds)
        return self.inner.gradients(model, feeds, input_grads=input_grads, cancelled=cancelled, prepared=prepared)

    def close(self) -> None:
        pass


# -- retried and not retried over gRPC -------------------------------------------------------------


def test_a_full_queue_answers_resource_exhausted_with_a_hint_and_retries_ride_it_out():
    engine = SlowEngine(gated=True)
    with (
        serving(lambda: engine, limits=Limits(max_concurrent_jobs=1, max_queued_jobs=1)) as srv,
        Client(srv.address, timeout=30) as c,
        Client(srv.address, timeout=30, retry=None) as impatient,
    ):
        model, feeds = mlp(1), batch(1)
        jobs = [c.submit(model, feeds)]
        assert engine.started.wait(5)
        jobs.append(c.submit(model, feeds))
        # The raw answer: RESOURCE_EXHAUSTED, the pushback in the trailing metadata.
        with pytest.raises(ResourceExhausted, match="queues 1 more") as info:
            impatient.submit(model, feeds)
        assert info.value.retry_after == 0.5 and impatient.retries == 0
        # A patient client waits for room, then gets through.
        opener = threading.Timer(1.0, engine.gate.set)
        opener.start()
        t0 = time.monotonic()
        jobs.append(c.submit(model, feeds))
        assert time.monotonic() - t0 >= 0.9
        assert c.retries >= 1 and c.retries_by_code["RESOURCE_EXHAUSTED"] == c.retries
        reference = REFERENCE.gradients(model, feeds)
        assert all(same(job.result(timeout=10), reference) for job in jobs)
        opener.join()


def test_a_size_limit_is_not_retried():
    with serving(limits=Limits(max_feed_bytes=1024)) as srv, Client(srv.address, timeout=30) as c:
        t0 = time.monotonic()
        with pytest.raises(ResourceExhausted, match="feed"):
            c.gradients(mlp(2), batch(2, n=200))
        assert c.retries == 0 and time.monotonic() - t0 < 5


def test_other_errors_are_not_retried():
    with serving() as srv, Client(srv.address, timeout=30) as c:
        with pytest.raises(NotFound):
            c.gradients("no-such-model", batch(3))
        with pytest.raises(InvalidArgument):
            c.gradients(mlp(3), {"x": batch(3)["x"]})  # y missing
        with pytest.raises(NotFound):
            c.submit("no-such-model", batch(3))
        assert c.retries == 0


def test_a_client_rides_out_a_server_that_is_not_up_yet():
    port = free_port()
    model, feeds = mlp(4), batch(4)
    results, errors = [], []
    with Client(f"127.0.0.1:{port}", timeout=30) as c:

        def call():
            try:
                results.append(c.gradients(model, feeds))
            except Exception as exc:  # noqa: BLE001 -- reported below
                errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)
        with serving(address=f"127.0.0.1:{port}"):
            caller.join(30)
        assert not errors and len(results) == 1 and same(results[0], REFERENCE.gradients(model, feeds))
        assert c.retries_by_code["UNAVAILABLE"] >= 1


def test_unavailable_within_a_short_deadline_raises_the_last_error():
    with Client(f"127.0.0.1:{free_port()}", timeout=1.0) as c:
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as info:
            c.has_model("x")
        # UNAVAILABLE, or DEADLINE_EXCEEDED when the last attempt's sliver of time ran out connecting
        assert info.value.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
        assert time.monotonic() - t0 < 3 and c.retries >= 1
    with Client(f"127.0.0.1:{free_port()}", timeout=5.0, retry=None) as c:
        with pytest.raises(Unavailable):
            c.has_model("x")
        assert c.retries == 0


class FakeRpcError(grpc.RpcError):
    def code(self):
        return Code.UNAVAILABLE

    def details(self):
        return "connection reset (injected)"

    def trailing_metadata(self):
        return ((RETRY_AFTER_KEY, "10"),)


@pytest.mark.parametrize("rpc", ["UploadModel", "Submit", "Run", "Compute", "FetchResult", "HasModel"])
def test_each_call_is_retried_with_a_fresh_request_stream(rpc):
    """The first attempt of ``rpc`` breaks after reading one request message; the retry must send
    the whole request again (a request stream is one-shot) and succeed."""
    with serving() as srv, Client(srv.address, timeout=30) as c:
        real = getattr(c.calls.stub, rpc)
        calls = []

        def flaky(request, *args, **kwargs):
            calls.append(rpc)
            if len(calls) == 1:
                if hasattr(request, "__next__"):
                    next(request)  # half the stream went out
                raise FakeRpcError()
            return real(request, *args, **kwargs)

        setattr(c.calls.stub, rpc, flaky)
        model = mlp(5)
        feeds = batch(5, n=60000) if rpc == "Run" else batch(5)  # > 1 MiB of feeds go through Run
        if rpc == "Run":
            assert sum(a.nbytes for a in feeds.values()) > chunks.CHUNK_BYTES
        reference = REFERENCE.gradients(model, feeds)
        if rpc in ("Submit", "FetchResult"):
            result = c.submit(model, feeds).result(timeout=30)
        else:
            result = c.gradients(model, feeds)
        assert same(result, reference)
        assert calls == [rpc, rpc] and c.retries == 1 and c.retries_by_code == {"UNAVAILABLE": 1}


# -- the load test ---------------------------------------------------------------------------------


def test_96_clients_x_4_jobs_all_complete_against_default_limits(caplog):
    """The done-when of issue 13: 96 clients with 4 jobs each against one single-node server with
    the default limits (2 jobs at once on the inline engine, 64 queued). Jobs take 20 ms (asleep),
    and each client first submits two jobs asynchronously, so the queue overflows for sure; the
    clients must ride it out with no error reaching a caller, every result correct."""
    clients, jobs_each = 96, 4
    models = [mlp(s) for s in range(4)]
    feeds = [batch(s) for s in range(16)]
    references = {(m, f): REFERENCE.gradients(models[m], feeds[f]) for m in range(4) for f in range(16)}
    start = threading.Barrier(clients)
    errors: list[BaseException] = []
    wrong: list[tuple] = []

    def client_work(i: int, address: str) -> Client:
        c = Client(address, timeout=120)
        if i % 3 == 0:
            c._compute = False  # a third of the clients use Run rather than Compute
        m = i % 4
        keys = [(m, (i * jobs_each + j) % 16) for j in range(jobs_each)]
        try:
            model_id = c.upload(models[m])
            start.wait(30)
            submitted = [(key, c.submit(model_id, feeds[key[1]])) for key in keys[:2]]
            done = [(key, c.gradients(model_id, feeds[key[1]])) for key in keys[2:]]
            done += [(key, job.result(timeout=120)) for key, job in submitted]
            for key, result in done:
                if not same(result, references[key]):
                    wrong.append((i, key))
        except BaseException as exc:  # noqa: BLE001 -- any error reaching the caller fails the test
            errors.append(exc)
            start.abort()
        finally:
            c.close()
        return c

    caplog.set_level(logging.WARNING, logger="gradserve.client")
    engine = SlowEngine(seconds=0.02)
    limits = Limits()
    assert limits.max_queued_jobs == 64 and limits.max_concurrent_jobs is None  # the defaults
    with serving(lambda: engine, limits=limits) as srv:
        with ThreadPoolExecutor(clients) as pool:
            done = list(pool.map(lambda i: client_work(i, srv.address), range(clients)))
        assert not errors, f"{len(errors)} callers got errors, e.g. {errors[0]!r}"
        assert not wrong, f"wrong results: {wrong[:5]}"
        stats = dict(srv.servicer.stats)
        assert srv.registry.limit() == 2  # the inline engine's default concurrency
    assert stats["jobs"] == clients * jobs_each
    exhausted = sum(c.retries_by_code["RESOURCE_EXHAUSTED"] for c in done)
    assert exhausted > 0, "the queue never overflowed: the retry path was not exercised"
    assert sum(c.retries_by_code["UNAVAILABLE"] for c in done) == 0


def test_synchronous_jobs_ride_out_a_small_queue(caplog):
    """Compute and Run calls (not only Submit) are retried: 24 clients x 4 synchronous jobs
    against a queue of 2."""
    caplog.set_level(logging.INFO, logger="gradserve.client")
    model, feeds = mlp(6), batch(6)
    reference = REFERENCE.gradients(model, feeds)
    engine = SlowEngine(seconds=0.01)
    errors = []
    with serving(lambda: engine, limits=Limits(max_concurrent_jobs=1, max_queued_jobs=2)) as srv:

        def work(i):
            with Client(srv.address, timeout=120) as c:
                c._compute = i % 2 == 0
                try:
                    assert all(same(c.gradients(model, feeds), reference) for _ in range(4))
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)
                return c.retries

        with ThreadPoolExecutor(24) as pool:
            retries = list(pool.map(work, range(24)))
    assert not errors, errors[:3]
    assert sum(retries) > 0
    retried_calls = {r.getMessage().split(" ", 1)[0] for r in caplog.records if r.name == "gradserve.client"}
    assert {"Compute", "Run"} <= retried_calls

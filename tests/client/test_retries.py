"""Clients that ride out load: the server's retry hint, the client's backoff policy, and 96 clients
x 4 jobs against one server with default limits, every job completed and correct.

The policy is tested with a fake clock and sleep; the rest over real gRPC sockets with the inline
engine (slowed down where a queue must fill: a sleeping job costs no CPU).
"""

from __future__ import annotations

import logging
import random
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
from gradserve.client.retry import NO_RETRY, PUSHBACK_KEY, RETRY_AFTER_KEY, RetryPolicy, retry_hint
from gradserve.proto import chunks
from gradserve.server.errors import LimitExceeded, QueueFull, ServiceError, abort, retry_after_for, status_for
from gradserve.server.errors import Unavailable as ServerUnavailable
from gradserve.server.events import check_cancelled
from gradserve.server.inline import InlineEngine
from gradserve.server.limits import Limits
from clusters import free_port
from retry_fakes import FakeClock, Failure, failing
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


# -- the backoff policy ----------------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_cap():
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=1.0)
    assert [policy.backoff_cap(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.backoff_cap(10_000) == 1.0  # no overflow however long it retried


def test_jitter_is_full_and_bounded_and_the_hint_is_the_least_delay():
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=1.0)
    rng = random.Random(7)
    for n in range(8):
        cap = policy.backoff_cap(n)
        draws = [policy.delay(n, None, rng) for _ in range(400)]
        assert all(0.0 <= d <= cap for d in draws)
        assert min(draws) < 0.1 * cap and max(draws) > 0.9 * cap  # spread over the whole range
        hinted = [policy.delay(n, 0.5, rng) for _ in range(200)]
        assert all(0.5 <= d <= 0.5 + cap for d in hinted)


def test_retries_until_success_with_growing_delays():
    clock = FakeClock()
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=5.0)
    attempt = failing(Failure(Code.UNAVAILABLE), clock, succeed_after=6)
    retried = []
    result = policy.call(
        attempt,
        60.0,
        on_retry=lambda e, n, d: retried.append((n, d)),
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(1),
    )
    assert result == "ok" and len(attempt.lefts) == 6 and [n for n, _ in retried] == [1, 2, 3, 4, 5]
    assert [d for _, d in retried] == clock.sleeps
    assert all(d <= policy.backoff_cap(i) for i, d in enumerate(clock.sleeps))
    # each attempt is given what is left of the call's timeout
    assert attempt.lefts[0] == 60.0 and attempt.lefts == sorted(attempt.lefts, reverse=True)
    assert attempt.lefts[-1] == pytest.approx(60.0 - sum(clock.sleeps))


class MaxRandom:
    """Always the top of the range: the longest delays."""

    @staticmethod
    def uniform(a, b):
        return b


def test_deadline_is_respected():
    clock = FakeClock()
    policy = RetryPolicy(initial_backoff=0.5, multiplier=2.0, max_backoff=4.0)
    exc = Failure(Code.RESOURCE_EXHAUSTED, retry_after=0.25)
    attempt = failing(exc, clock, cost=0.1)
    with pytest.raises(Failure) as info:
        policy.call(attempt, 10.0, clock=clock, sleep=clock.sleep, rng=MaxRandom)
    assert info.value is exc  # the last error, not a made-up one
    assert clock.now - 1000.0 <= 10.0  # never slept past the deadline
    assert all(left is not None and 0 <= left <= 10.0 for left in attempt.lefts)
    # delays 0.75, 1.25, 2.25, 4.25: after 8.5 s of sleep and 0.5 s of calls, the next would pass 10 s
    assert clock.sleeps == pytest.approx([0.75, 1.25, 2.25, 4.25]) and len(attempt.lefts) == 5


def test_a_call_without_deadline_gives_up_after_max_elapsed():
    clock = FakeClock()
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, max_elapsed=5.0)
    attempt = failing(Failure(Code.UNAVAILABLE), clock)
    with pytest.raises(Failure):
        policy.call(attempt, None, clock=clock, sleep=clock.sleep, rng=MaxRandom)
    assert clock.sleeps == [1.0] * 4 and attempt.lefts == [None] * 5  # no gRPC timeout without one


def test_max_attempts():
    clock = FakeClock()
    attempt = failing(Failure(Code.UNAVAILABLE), clock)
    with pytest.raises(Failure):
        RetryPolicy(max_attempts=3).call(attempt, None, clock=clock, sleep=clock.sleep)
    assert len(attempt.lefts) == 3 and len(clock.sleeps) == 2


@pytest.mark.parametrize(
    "exc",
    [
        Failure(Code.INVALID_ARGUMENT),
        Failure(Code.NOT_FOUND),
        Failure(Code.UNAUTHENTICATED),
        Failure(Code.DEADLINE_EXCEEDED),
        Failure(Code.CANCELLED),
        Failure(Code.INTERNAL),
        Failure(Code.INVALID_ARGUMENT, retry_after=0.1),  # a hint does not make a bad request retryable
        Failure(Code.RESOURCE_EXHAUSTED),  # no hint: a size limit, final
        Failure(Code.RESOURCE_EXHAUSTED, retry_after=-1),  # negative pushback: the server says do not retry
        Failure(Code.UNAVAILABLE, retry_after=-1),
        ValueError("not a call failure"),
    ],
    ids=lambda e: f"{e.code.name if hasattr(e, 'code') else type(e).__name__}-hint{getattr(e, 'retry_after', None)}",
)
def test_non_retryable_failures_raise_at_once(exc):
    clock = FakeClock()
    attempt = failing(exc, clock)
    with pytest.raises(type(exc)):
        RetryPolicy().call(attempt, 30.0, clock=clock, sleep=clock.sleep)
    assert len(attempt.lefts) == 1 and clock.sleeps == []


def test_no_retry_policy():
    clock = FakeClock()
    attempt = failing(Failure(Code.UNAVAILABLE), clock)
    with pytest.raises(Failure):
        NO_RETRY.call(attempt, 30.0, clock=clock, sleep=clock.sleep)
    assert len(attempt.lefts) == 1


def test_retry_hint_parsing():
    assert retry_hint(()) is None and retry_hint(None) is None
    assert retry_hint([("other", "1")]) is None
    assert retry_hint([(PUSHBACK_KEY, "250")]) == 0.25
    assert retry_hint([(RETRY_AFTER_KEY, b"1500")]) == 1.5
    assert retry_hint([(RETRY_AFTER_KEY, "9"), (PUSHBACK_KEY, "20")]) == 0.02  # gRPC's key first
    assert retry_hint([(PUSHBACK_KEY, "-1")]) == -1.0
    assert retry_hint([(PUSHBACK_KEY, "soon")]) == -1.0  # malformed: do not retry (gRFC A6)


# -- the server's hint -----------------------------------------------------------------------------


class RecordingContext:
    def __init__(self) -> None:
        self.trailing = ()

    def trailing_metadata(self):
        return self.trailing

    def set_trailing_metadata(self, md):
        self.trailing = tuple(md)

    def abort(self, code, details):
        self.code, self.details = code, details
        raise grpc.RpcError(details)


@pytest.mark.parametrize(
    "exc, code, ms",
    [
        (QueueFull("queue full", retry_after=2.0), Code.RESOURCE_EXHAUSTED, "2000"),
        (QueueFull("queue full"), Code.RESOURCE_EXHAUSTED, "500"),
        (ServerUnavailable("shutting down"), Code.UNAVAILABLE, "1000"),
        (LimitExceeded("feed 'x' of shape (9,): 9 elements; the limit is 5"), Code.RESOURCE_EXHAUSTED, None),
        (MemoryError(), Code.RESOURCE_EXHAUSTED, None),
    ],
)
def test_abort_sets_the_retry_hint_for_passing_failures_only(exc, code, ms):
    _check_abort(exc, code, ms)


def _mapped(exc):
    """``exc`` as the servicer hands a rejected job's failure on: a ServiceError raised from None."""
    try:
        try:
            raise exc
        except Exception as original:  # noqa: BLE001
            raise ServiceError(*status_for(original)) from None
    except ServiceError as mapped:
        return mapped


def test_a_mapped_failure_keeps_its_hint():
    _check_abort(_mapped(QueueFull("queue full", retry_after=1.5)), Code.RESOURCE_EXHAUSTED, "1500")
    _check_abort(_mapped(LimitExceeded("too big")), Code.RESOURCE_EXHAUSTED, None)
    _check_abort(ServiceError(Code.RESOURCE_EXHAUSTED, "replayed", retry_after=0.25), Code.RESOURCE_EXHAUSTED, "250")
    _check_abort(ServiceError(Code.RESOURCE_EXHAUSTED, "a job's failure, replayed"), Code.RESOURCE_EXHAUSTED, None)


def _check_abort(exc, code, ms):
    ctx = RecordingContext()
    ctx.trailing = (("x-kept", "1"),)
    with pytest.raises(grpc.RpcError):
        abort(ctx, exc)
    assert ctx.code == code
    md = dict(ctx.trailing)
    assert md.get(PUSHBACK_KEY) == ms and md.get(RETRY_AFTER_KEY) == ms
    assert md["x-kept"] == "1"
    assert (retry_after_for(exc) is None) == (ms is None)


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
        real = getattr(c._stub, rpc)
        calls = []

        def flaky(request, *args, **kwargs):
            calls.append(rpc)
            if len(calls) == 1:
                if hasattr(request, "__next__"):
                    next(request)  # half the stream went out
                raise FakeRpcError()
            return real(request, *args, **kwargs)

        setattr(c._stub, rpc, flaky)
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

"""Retry decisions without a server: the client's backoff policy (exponential, full jitter, the
server's hint as the least delay, the call's deadline, what is never retried) and the retry hint the
server puts in a failure's trailing metadata.

The policy is tested with a fake clock and sleep (tests/retry_fakes.py); the server's hint with a
context that records what ``abort`` sets. Over real gRPC sockets: test_retries_over_grpc.py.
"""

from __future__ import annotations

import random

import grpc
import pytest

from gradserve.client.retry import NO_RETRY, PUSHBACK_KEY, RETRY_AFTER_KEY, RetryPolicy, retry_hint
from gradserve.server.errors import LimitExceeded, QueueFull, ServiceError, abort, retry_after_for, status_for
from gradserve.server.errors import Unavailable as ServerUnavailable
from retry_fakes import FakeClock, Failure, failing

Code = grpc.StatusCode


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

"""Fakes for testing retry loops without waiting: a clock whose ``sleep`` only moves its time on
(``FakeClock``), the failure a call raises (``Failure``: a gRPC status code and a retry hint), and an
attempt that fails, costing fake seconds, until a chosen call (``failing``)."""

from __future__ import annotations

from typing import Callable

import grpc


class FakeClock:
    """``clock()`` is the time; ``clock.sleep(s)`` records ``s`` and moves the time on by it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class Failure(Exception):
    """A failed call as the client's retry loop sees one: its status ``code`` and the server's
    ``retry_after`` hint (seconds, or None)."""

    def __init__(self, code: grpc.StatusCode, retry_after: float | None = None) -> None:
        super().__init__(code.name)
        self.code = code
        self.retry_after = retry_after


def failing(
    exc: Exception, clock: FakeClock | None = None, cost: float = 0.0, succeed_after: int | None = None
) -> Callable:
    """An attempt that raises ``exc`` (taking ``cost`` fake seconds), or succeeds on call number
    ``succeed_after``; records the seconds left it was given."""
    lefts: list = []

    def attempt(left):
        lefts.append(left)
        if clock is not None:
            clock.now += cost
        if succeed_after is not None and len(lefts) >= succeed_after:
            return "ok"
        raise exc

    attempt.lefts = lefts
    return attempt

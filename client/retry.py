"""When and how long :class:`gradserve.Client` waits before calling again.

A gradient job is a pure function of its model and feeds, so every call of the service is safe to
repeat. The client repeats a call that failed with UNAVAILABLE (server restarting, connection
lost) or with a RESOURCE_EXHAUSTED that the server marked as passing (a full job queue: it sends
a retry hint in the trailing metadata). A RESOURCE_EXHAUSTED without a hint is a size limit that
no retry cures, and is raised at once, as is every other code.

The delays grow exponentially with "full jitter" (a uniform draw between 0 and the exponential
cap, so that many clients turned away together do not come back together); the server's hint is
added to the draw, so it is the least the client waits. Retries stop at the call's deadline: a
retry whose delay would end past it is not made, and the last error is raised. A call without a
deadline gives up after ``max_elapsed`` seconds. A failure may come with a shorter window of its own
(``call(..., window=...)``): the client gives a server it has never reached a few seconds to
accept a connection, not the call's whole timeout (retries are for a server that is busy or
restarting, not for a wrong address).

The server's hint travels as gRPC's retry pushback (``grpc-retry-pushback-ms``, see gRFC A6) and,
for clients that strip ``grpc-`` keys, as ``retry-after-ms``; both hold integer milliseconds. As in
A6, a negative or malformed value means "do not retry".
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import grpc

PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_AFTER_KEY = "retry-after-ms"

T = TypeVar("T")

_DEFAULT_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


def retry_hint(metadata: Iterable[tuple[str, Any]] | None) -> float | None:
    """The server's retry hint in seconds from a call's trailing metadata: None when it gives
    none, -1.0 when it is negative or malformed (do not retry)."""
    values = {key: value for key, value in (metadata or ())}
    for key in (PUSHBACK_KEY, RETRY_AFTER_KEY):
        if key in values:
            value = values[key]
            try:
                ms = int(value.decode() if isinstance(value, bytes) else value)
            except (ValueError, UnicodeDecodeError):
                return -1.0
            return ms / 1000.0 if ms >= 0 else -1.0
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How :class:`gradserve.Client` retries (module docs).

    The n-th retry (n = 0, 1, ...) waits ``hint + uniform(0, min(max_backoff, initial_backoff *
    multiplier**n))`` seconds, ``hint`` being the server's (0 without one). ``max_attempts``: calls
    in all, the first included (None: as many as fit before the deadline). ``max_elapsed``: the
    seconds a call without a deadline keeps retrying (None: for ever). ``codes``: the status codes
    retried (RESOURCE_EXHAUSTED only with a server hint, see :meth:`retryable`).
    """

    initial_backoff: float = 0.1
    max_backoff: float = 10.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    max_elapsed: float | None = 120.0
    codes: frozenset = field(default=_DEFAULT_CODES)

    def __post_init__(self) -> None:
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy: backoffs must be >= 0 and multiplier >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("RetryPolicy: max_attempts must be at least 1")
        object.__setattr__(self, "codes", frozenset(self.codes))

    def retryable(self, exc: BaseException) -> bool:
        """Whether the failure ``exc`` (an object with ``code`` and ``retry_after``, such as
        :class:`gradserve.client.remote.RemoteError`) may be retried."""
        code = getattr(exc, "code", None)
        if code not in self.codes:
            return False
        hint = getattr(exc, "retry_after", None)
        if hint is not None and hint < 0:
            return False  # the server said: do not retry
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint is None:
            return False  # a size limit, or the client's own message limit: retrying cannot help
        return True

    def backoff_cap(self, retry: int) -> float:
        """The upper bound of the jittered part of the ``retry``-th retry's delay (0-based)."""
        cap = self.initial_backoff
        for _ in range(retry):
            cap *= self.multiplier
            if cap >= self.max_backoff:
                break
        return min(cap, self.max_backoff)

    def delay(self, retry: int, hint: float | None = None, rng: random.Random | Any = random) -> float:
        """Seconds to wait before the ``retry``-th retry (0-based), at least ``hint``."""
        return max(0.0, hint or 0.0) + rng.uniform(0.0, self.backoff_cap(retry))

    def call(
        self,
        attempt: Callable[[float | None], T],
        timeout: float | None = None,
        *,
        on_retry: Callable[[BaseException, int, float], None] | None = None,
        window: Callable[[BaseException], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | Any = random,
    ) -> T:
        """``attempt(seconds_left)`` until it returns, retrying the failures this policy allows
        within ``timeout`` seconds (None: ``max_elapsed``). ``seconds_left`` is what remains of
        ``timeout`` (None without one): the attempt passes it on as its gRPC timeout. ``on_retry(exc,
        n, delay)`` is called before the n-th retry (1-based) sleeps. ``window(exc)``: the seconds
        from the start within which the failure ``exc`` is retried (the last retry as it ends), or
        None for no limit but the deadline."""
        start = clock()
        budget = timeout if timeout is not None else self.max_elapsed
        deadline = None if budget is None else start + budget
        retry = 0
        while True:
            left = None if timeout is None else max(0.0, start + timeout - clock())
            try:
                return attempt(left)
            except Exception as exc:
                if not self.retryable(exc) or (self.max_attempts is not None and retry + 1 >= self.max_attempts):
                    raise
                delay = self.delay(retry, getattr(exc, "retry_after", None), rng)
                limit = window(exc) if window is not None else None
                if limit is not None:
                    rest = start + limit - clock()
                    if rest <= 0:
                        raise  # the failure's own window is over
                    delay = min(delay, rest)  # the last try is made as the window closes
                if deadline is not None and clock() + delay >= deadline:
                    raise  # the retry would start past the deadline: the last error is the answer
                retry += 1
                if on_retry is not None:
                    on_retry(exc, retry, delay)
                sleep(delay)


NO_RETRY = RetryPolicy(max_attempts=1)

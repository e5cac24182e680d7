"""The one mapping from exceptions to gRPC status codes.

Every servicer method goes through :func:`status_for`, so a given failure always reaches the client
with the same code, and the message is the exception's own (which names the node or tensor at
fault). Unexpected exceptions become INTERNAL with a short message and are logged with their
traceback here, never sent to the client.

A RESOURCE_EXHAUSTED that passes by itself (a full job queue: :class:`QueueFull`) and UNAVAILABLE
carry a retry hint in the trailing metadata: gRPC's retry pushback ``grpc-retry-pushback-ms`` and
the same value as ``retry-after-ms`` (integer milliseconds). The client retries those after at
least that long (:mod:`gradserve.client.retry`); a RESOURCE_EXHAUSTED without the hint (a size
limit) is final, and so is a failure that carries a negative hint ("-1": a job's failure replayed to
FetchResult, which fetching again cannot change).
"""

from __future__ import annotations

import concurrent.futures
import logging

import grpc

from gradserve.proto.chunks import LimitExceeded
from gradserve.proto.tensors import TensorDecodeError
from gradserve.server.events import JobCancelled
from gradserve.worker.graph import GraphError

log = logging.getLogger("gradserve.server")

__all__ = [
    "LimitExceeded",
    "RetryLater",
    "QueueFull",
    "NotFound",
    "BadRequest",
    "Unavailable",
    "WorkerLost",
    "WorkersCannotStart",
    "ServiceError",
    "status_for",
    "retry_after_for",
    "abort",
]

PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRFC A6's server pushback
RETRY_AFTER_KEY = "retry-after-ms"  # the same value under a key no proxy or library treats as reserved
QUEUE_RETRY_AFTER = 0.5  # seconds a client turned away by a full queue waits at least
UNAVAILABLE_RETRY_AFTER = 1.0  # ... and one turned away by a server shutting down


class RetryLater(LimitExceeded):
    """A limit that frees up by itself: RESOURCE_EXHAUSTED with a retry hint of ``retry_after``
    seconds, which clients honour as the least they wait before trying again."""

    def __init__(self, message: str, retry_after: float = QUEUE_RETRY_AFTER) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(RetryLater):
    """As many jobs run and wait as the server allows (``max_concurrent_jobs + max_queued_jobs``)."""


class NotFound(LookupError):
    """An unknown model id or job id (NOT_FOUND)."""

    def __str__(self) -> str:  # LookupError/KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class BadRequest(ValueError):
    """A request that breaks the protocol: wrong message order, missing fields (INVALID_ARGUMENT)."""


class Unavailable(RuntimeError):
    """The server is shutting down and takes no new work (UNAVAILABLE)."""


class WorkerLost(Unavailable):
    """A job that lost a worker (its process or node died) on every run the engine allows: the
    first and ``retries`` more on fresh workers. UNAVAILABLE with a retry hint, not INTERNAL: nothing
    is wrong with the job or the server, the cluster is losing workers (nodes replaced, memory
    pressure), and the client's retry of a synchronous call may well find it whole again."""

    def __init__(self, message: str, retries: int) -> None:
        super().__init__(message)
        self.retries = retries


class WorkersCannotStart(RuntimeError):
    """The cluster's stage workers raise as they start (their constructor failed on ``node``:
    gradserve missing or of another version there, a dependency missing, a kernel cache it cannot
    write). FAILED_PRECONDITION: the job is fine but the cluster cannot run it, and a retry as it is
    would fail the same way; ``reason`` is the constructor's error, "Type: message" on one line."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"stage workers cannot start on node {node}: {reason}")
        self.node = node
        self.reason = reason

    def __reduce__(self) -> tuple:  # pickled with its two arguments, not the message alone
        return type(self), (self.node, self.reason)


class ServiceError(Exception):
    """An error that already carries its status code, e.g. a job's failure replayed to FetchResult.
    ``retry_after``: the retry hint to send with it (see :func:`retry_after_for`); when None, one
    raised while handling the original failure takes that failure's hint."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and client-facing message for ``exc``."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, LimitExceeded):  # before ValueError: LimitExceeded is one
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (GraphError, TensorDecodeError, BadRequest)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, JobCancelled):
        return grpc.StatusCode.CANCELLED, str(exc) or "job cancelled"
    if isinstance(exc, (TimeoutError, concurrent.futures.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, WorkersCannotStart):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this request"
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__}); see the server log"


def retry_after_for(exc: BaseException) -> float | None:
    """Seconds a client should wait before retrying after ``exc``, or None when a retry cannot
    help (the client then raises at once)."""
    hint = getattr(exc, "retry_after", None)
    if hint is not None:
        return float(hint)
    if isinstance(exc, ServiceError):
        # A failure already mapped (e.g. a rejected job, counted and logged): the hint of the
        # exception it was made from, if it was raised while handling one.
        original = exc.__cause__ or exc.__context__
        return retry_after_for(original) if original is not None and original is not exc else None
    if isinstance(exc, Unavailable):
        return UNAVAILABLE_RETRY_AFTER
    return None


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """End the call with the status for ``exc`` (raises, as ``context.abort`` does); a failure that
    passes by itself gets its retry hint in the trailing metadata (module docs)."""
    code, message = status_for(exc)
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        hint = retry_after_for(exc)
        if hint is not None:
            ms = str(round(hint * 1000)) if hint >= 0 else "-1"  # negative: do not retry (gRFC A6)
            kept = tuple(
                (k, v) for k, v in (_trailing_metadata(context) or ()) if k not in (PUSHBACK_KEY, RETRY_AFTER_KEY)
            )
            context.set_trailing_metadata(kept + ((PUSHBACK_KEY, ms), (RETRY_AFTER_KEY, ms)))
    context.abort(code, message)


def _trailing_metadata(context: grpc.ServicerContext) -> tuple | None:
    """What the handler already set as trailing metadata (kept beside the hint)."""
    try:
        return tuple(context.trailing_metadata() or ())
    except (AttributeError, NotImplementedError, TypeError):  # older grpc, or a test double
        return None

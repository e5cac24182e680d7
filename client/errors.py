"""Errors answered by a gradserve server, as the client library raises them: one
:class:`RemoteError` subclass per gRPC status code, carrying the code, the server's message and its
retry hint."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import grpc

from gradserve.client.retry import retry_hint
from gradserve.server.events import JobCancelled
from gradserve.worker.graph import GraphError


class RemoteError(Exception):
    """An error answered by the server: ``code`` is the grpc.StatusCode, ``details`` its message,
    ``retry_after`` the server's retry hint in seconds (None: none; negative: do not retry)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after: float | None = None) -> None:
        Exception.__init__(self, details)
        self.code = code
        self.details = details
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.details


class InvalidArgument(RemoteError, GraphError):
    """The model, feeds or request are wrong; the message names the node or tensor."""


class NotFound(RemoteError, LookupError):
    """Unknown model id or job id."""


class ResourceExhausted(RemoteError):
    """A server limit was hit (model or tensor size, queue length); the message names it."""


class Unauthenticated(RemoteError, PermissionError):
    """Missing or wrong bearer token."""


class Cancelled(RemoteError, JobCancelled):
    """The job (or call) was cancelled."""


class DeadlineExceeded(RemoteError, TimeoutError):
    """The call did not finish within its timeout."""


class Unavailable(RemoteError, ConnectionError):
    """The server cannot be reached (down, wrong address, TLS mismatch) or is shutting down."""


class FailedPrecondition(RemoteError):
    """The request is fine but the server cannot act on it in its present state (its stage workers
    cannot start, a session's state forbids the step); the message says what to fix first."""


class Internal(RemoteError):
    """The server failed unexpectedly; its log has the details."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INTERNAL: Internal,
}


def remote_error(err: grpc.RpcError) -> RemoteError:
    """The :class:`RemoteError` subclass for a failed call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    try:
        hint = retry_hint(err.trailing_metadata()) if hasattr(err, "trailing_metadata") else None
    except Exception:  # noqa: BLE001 -- a call object without metadata: no hint
        hint = None
    return _ERRORS.get(code, RemoteError)(code, details, hint)


def calling(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as err:
        raise remote_error(err) from None


def streaming(responses: Iterator) -> Iterator:
    try:
        yield from responses
    except grpc.RpcError as err:
        raise remote_error(err) from None

"""The one mapping from exceptions to gRPC status codes.

Every servicer method goes through :func:`status_for`, so a given failure always reaches the client
with the same code, and the message is the exception's own (which names the node or tensor at
fault). Unexpected exceptions become INTERNAL with a short message and are logged with their
traceback here, never sent to the client.
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

__all__ = ["LimitExceeded", "NotFound", "BadRequest", "Unavailable", "ServiceError", "status_for"]


class NotFound(LookupError):
    """An unknown model id or job id (NOT_FOUND)."""

    def __str__(self) -> str:  # LookupError/KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class BadRequest(ValueError):
    """A request that breaks the protocol: wrong message order, missing fields (INVALID_ARGUMENT)."""


class Unavailable(RuntimeError):
    """The server is shutting down and takes no new work (UNAVAILABLE)."""


class ServiceError(Exception):
    """An error that already carries its status code, e.g. a job's failure replayed to FetchResult."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this request"
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__}); see the server log"


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """End the call with the status for ``exc`` (raises, as ``context.abort`` does)."""
    code, message = status_for(exc)
    context.abort(code, message)

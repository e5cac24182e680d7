"""Bearer-token authentication as a gRPC server interceptor.

With a token configured, every call must carry the metadata ``authorization: Bearer <token>``,
except the standard health service, which load balancers and orchestrators probe without
credentials. Tokens are compared with :func:`hmac.compare_digest` so the comparison time does not
reveal how much of a guess was right.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Callable

import grpc

from gradserve.server.handlers import like

log = logging.getLogger("gradserve.server")

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped); ``ValueError`` if there is none."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise ValueError(f"token file {path} is empty")
    if any(c.isspace() for c in token):
        raise ValueError(f"token file {path} holds more than one word; a bearer token has no spaces")
    return token


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_PREFIXES) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._open = open_prefixes

    def _authorized(self, metadata: tuple | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(self._open) or self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: let gRPC answer UNIMPLEMENTED
        log.warning("rejected unauthenticated call to %s", method)
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED. Same kind matters:
    gRPC reads the request stream according to the handler's cardinality."""

    def deny(request_or_iterator, context: grpc.ServicerContext):
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"
        )

    return like(handler, deny)

"""How a :class:`gradserve.Client` makes its calls: each under the client's retry policy (see
:mod:`gradserve.client.retry`), its retries counted and logged, and a call to a server this client
has never had an answer from given ``connect_timeout`` seconds only, then failing with
"no gradserve server at HOST:PORT (reason)".

A Client holds one :class:`RetryingCalls`, ``client.calls``: the Client and the client's own
modules that speak for it (:class:`~gradserve.client.job.Job`,
:class:`~gradserve.client.session.RemoteSession`, :func:`~gradserve.client.status.server_status`)
make every call through it."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Callable

import grpc

from gradserve.client.connection import connect_failure
from gradserve.client.errors import RemoteError, Unavailable, calling, remote_error
from gradserve.client.retry import NO_RETRY, RetryPolicy
from gradserve.proto.v1.service_pb2_grpc import GradientServiceStub

DEFAULT_RETRY = RetryPolicy()
_WARN_AFTER = 10.0  # seconds of retrying one call after which a warning is logged (once per call)
# Codes a failed call can get without the server having answered it.
_NOT_AN_ANSWER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})

log = logging.getLogger("gradserve.client")


def retry_policy(retry: RetryPolicy | None | bool) -> RetryPolicy:
    """The policy ``Client(retry=...)`` asks for: a :class:`RetryPolicy` as it is, True the default
    one, None or False :data:`~gradserve.client.retry.NO_RETRY`; TypeError for anything else."""
    if retry is True:
        return DEFAULT_RETRY
    if retry is not None and retry is not False and not isinstance(retry, RetryPolicy):
        raise TypeError("retry must be a RetryPolicy, or None to turn retries off")
    return retry or NO_RETRY


class RetryingCalls:
    """The calls to the server at ``address``: each through ``stub`` (the service's gRPC stub) with
    the bearer ``metadata``, under the ``retry`` policy, given ``timeout`` seconds unless the caller
    says otherwise (None: no limit), and ``connect_timeout`` seconds while the server has never
    answered (:class:`~gradserve.client.remote.Client` documents the arguments). ``retries``
    counts the retries made, ``retries_by_code`` them by status code name."""

    def __init__(
        self,
        address: str,
        stub: GradientServiceStub,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None,
        retry: RetryPolicy,
        connect_timeout: float | None,
    ) -> None:
        self.address = address
        self.stub = stub
        self.metadata = metadata
        self.timeout = timeout
        self.retry = retry
        self.connect_timeout = connect_timeout
        self.retries = 0
        self.retries_by_code: Counter[str] = Counter()
        self._retry_lock = threading.Lock()
        self._reached = False  # True once the server has answered a call (retries are for such servers)

    def limit(self, timeout: float | None) -> float | None:
        """The seconds a call may take: ``timeout``, or this client's default when it is None."""
        return timeout if timeout is not None else self.timeout

    def send(self, method: Callable, request: Any, seconds_left: float | None) -> Any:
        """One attempt: ``method`` (a method of :attr:`stub`) called on ``request`` with this
        client's :attr:`metadata` and ``seconds_left``; its reply, or a reply stream for a
        server-streaming method. A failed call raises its :class:`RemoteError`."""
        return calling(method, request, metadata=self.metadata, timeout=seconds_left)

    def call(self, method: Callable, request: Any, timeout: float | None = None) -> Any:
        """The reply of ``method``, a unary method of :attr:`stub`, to ``request``: retried under
        the policy for up to ``timeout`` seconds (:meth:`limit`)."""
        name = getattr(method, "_method", b"")
        name = name.decode().rsplit("/", 1)[-1] if isinstance(name, bytes) else str(name or "call")
        return self.retrying(name, lambda left: self.send(method, request, left), timeout)

    def retrying(
        self,
        what: str,
        attempt: Callable[[float | None], Any],
        timeout: float | None = None,
        policy: RetryPolicy | None = None,
    ) -> Any:
        """``attempt(seconds_left)`` under ``policy`` (this client's by default; see
        :meth:`RetryPolicy.call`) for up to ``timeout`` seconds (:meth:`limit`); ``what`` names the
        call in the log. ``attempt`` makes its calls with :meth:`send`, and must build its request
        afresh: a request stream is consumed by the attempt that sends it."""
        waited = 0.0
        warned = False

        def on_retry(exc: BaseException, n: int, delay: float) -> None:
            nonlocal waited, warned
            code = getattr(exc, "code", None)
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            with self._retry_lock:
                self.retries += 1
                self.retries_by_code[name] += 1
            waited += delay
            level = logging.INFO
            if waited >= _WARN_AFTER and not warned:
                warned, level = True, logging.WARNING
            log.log(
                level,
                "%s to %s: %s (%s); retry %d in %.2fs%s",
                what,
                self.address,
                name,
                exc,
                n,
                delay,
                f", {waited:.0f}s of retrying so far" if level == logging.WARNING else "",
            )

        def guarded(left: float | None) -> Any:
            try:
                try:
                    value = attempt(left)
                except grpc.RpcError as err:  # raised by the call itself rather than by its reply stream
                    raise remote_error(err) from None
            except RemoteError as exc:
                self._reached = self._reached or exc.code not in _NOT_AN_ANSWER
                raise
            self._reached = True
            return value

        def window(exc: BaseException) -> float | None:
            return self.connect_timeout if self._unreached(exc) else None

        try:
            return (policy or self.retry).call(guarded, self.limit(timeout), on_retry=on_retry, window=window)
        except Unavailable as exc:
            reason = self._unreached(exc)
            if reason is None:
                raise
            log.debug("%s to %s: %s", what, self.address, exc.details)
            raise Unavailable(exc.code, f"no gradserve server at {self.address} ({reason})") from None

    def _unreached(self, exc: BaseException) -> str | None:
        """Why the call could not connect, when ``exc`` says so and this client has never had an
        answer from its server (a wrong address, or a server not up yet); else None."""
        if self._reached or not isinstance(exc, Unavailable):
            return None
        return connect_failure(exc.details)

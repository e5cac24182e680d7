"""The client library of the gRPC GradientService.

    with gradserve.Client("host:50051", token_file="token", ca_file="ca.pem") as client:
        result = client.gradients(model, {"x": x, "y": y})       # same Result as the local engines
        job = client.submit(model, feeds)                          # or asynchronously
        for status in job.watch():
            print(status.state, status.steps_done, "/", status.steps_total)
        result = job.result()
        job = client.job(job_id)                                   # a job by id, from any process

The address is "host:port"; without a port it is 50051, the server's default (see
:func:`gradserve.client.connection.server_target`). Models are content-addressed:
:meth:`Client.upload` sends a model only if the server does not already have it, so passing the
same model to many jobs costs one small call each. Errors raised
by the server arrive as :class:`RemoteError` subclasses carrying the gRPC code and the server's
message; :class:`InvalidArgument` is also a :class:`~gradserve.worker.graph.GraphError`.

Every call is retried when the server is busy (RESOURCE_EXHAUSTED with a retry hint: a full job
queue) or unavailable, with exponential backoff and jitter, up to the call's timeout: jobs are pure
functions, so running one twice is harmless. ``Client(address, retry=RetryPolicy(...))`` tunes it,
``retry=None`` turns it off (see :mod:`gradserve.client.retry`). Retries are for a server that is
busy or restarting: until a client has had an answer from its server, a call that cannot connect
is retried for ``connect_timeout`` seconds (2 by default) only, then raises :class:`Unavailable`
saying "no gradserve server at HOST:PORT (connection refused)" -- or whatever gRPC found wrong
(the calls and their retries: :mod:`gradserve.client.calls`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import grpc
import numpy as np
from grpc.experimental import ChannelOptions

from gradserve.client.calls import DEFAULT_RETRY, RetryingCalls, retry_policy
from gradserve.client.connection import server_target

# errors and job handles live in their own modules; their names stay importable from here
from gradserve.client.errors import (  # noqa: F401
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    RemoteError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    calling,
    remote_error,
    streaming,
)
from gradserve.client.job import STATE_NAMES, Job, JobStatus, read_result  # noqa: F401
from gradserve.client.retry import NO_RETRY, RetryPolicy
from gradserve.client.wire import job_stream, model_manifest, wire_arrays
from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2, service_pb2_grpc
from gradserve.server.planning.counts import AUTO, Count, count_to_wire
from gradserve.server.result import Result
from gradserve.worker.graph import Model

if TYPE_CHECKING:
    from gradserve.client.session import RemoteSession
    from gradserve.client.status import ServerStatus
    from gradserve.worker.optim import Optimizer, ParamGroups, Schedule

_MAX_MESSAGE = 64 << 20  # what this client accepts; servers send 1 MiB chunks anyway
# Feeds up to this size go in one Compute request (far below the server's 16 MiB message limit, and
# gRPC's 4 MiB default); bigger ones stream through Run.
_COMPUTE_FEED_BYTES = chunks.CHUNK_BYTES
CONNECT_TIMEOUT = 2.0  # seconds a call retries a server this client has never reached


@dataclass(frozen=True)
class _Uploading:
    """What the progress line shows during an upload: chunks (MiB) sent of all."""

    steps_done: int
    steps_total: int
    state: str = "uploading"
    event: None = None
    finished: bool = False


# -- the client ------------------------------------------------------------------------------------


class Client:
    """A connection to a gradserve server at ``address``: "host:port", "host" or "[v6]" for port
    50051, or a gRPC target such as "unix:/path" (:func:`~gradserve.client.connection.server_target`;
    ValueError for a malformed one). Nothing is sent until the first call.

    ``token``/``token_file``: the bearer token the server requires (``--auth-token-file``).
    ``ca_file``: PEM CA certificate to verify the server's TLS certificate; without it the
    connection is plaintext. ``timeout``: default seconds for each call (None: no limit).
    ``retry``: how calls are retried when the server is busy or unavailable, up to their timeout
    (:class:`~gradserve.client.retry.RetryPolicy`; None or False: never). ``retries`` counts the
    retries made, ``retries_by_code`` them by status code name. ``connect_timeout``: seconds a
    connection attempt may take, and how long a call retries a server this client has never had an
    answer from before it raises :class:`Unavailable` ("no gradserve server at HOST:PORT (reason)");
    None: retry it like a server that went away, up to the call's timeout.

    ``calls``: how the client makes its calls (:class:`~gradserve.client.calls.RetryingCalls`), for
    the client's own modules that speak for it (:class:`Job`, sessions, the server's status).
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None | bool = DEFAULT_RETRY,
        connect_timeout: float | None = CONNECT_TIMEOUT,
    ) -> None:
        address = server_target(address)
        if connect_timeout is not None and not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive seconds or None, got {connect_timeout!r}")
        if token and token_file:
            raise ValueError("give token or token_file, not both")
        if token_file:
            from gradserve.server.auth import read_token_file

            token = read_token_file(token_file)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        policy = retry_policy(retry)  # a bad one is refused before a channel is opened
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            # Server-streaming calls (Compute, Watch, FetchResult) read their replies on the calling
            # thread: otherwise grpc-python starts a thread to poll the channel for each call made
            # while no other is open, which cost ~0.3 ms of a tiny job's ~2 ms.
            (ChannelOptions.SingleThreadedUnaryStream, 1),
        ]
        if connect_timeout is not None:
            # gRPC's least time for a connection attempt (20 s by default): a host that drops packets
            # or a port that never speaks HTTP/2 would hold the first call that long.
            options.append(("grpc.min_reconnect_backoff_ms", max(100, round(connect_timeout * 1000))))
        if ca_file:
            try:
                ca = Path(ca_file).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read CA file {ca_file}: {exc.strerror or exc}") from None
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        stub = service_pb2_grpc.GradientServiceStub(self._channel)
        self.calls = RetryingCalls(address, stub, metadata, timeout, policy, connect_timeout)
        self._compute = True  # False once the server said it has no Compute RPC

    # -- plumbing (the calls and their retries: self.calls) ----------------------------------------
    @property
    def address(self) -> str:
        """The server's gRPC target ("host:port", "unix:/path"...)."""
        return self.calls.address

    @property
    def timeout(self) -> float | None:
        """Default seconds for each call (None: no limit)."""
        return self.calls.timeout

    @property
    def connect_timeout(self) -> float | None:
        """Seconds a call retries a server this client has never had an answer from."""
        return self.calls.connect_timeout

    @property
    def retry(self) -> RetryPolicy:
        """How calls are retried (:data:`~gradserve.client.retry.NO_RETRY`: never)."""
        return self.calls.retry

    @property
    def retries(self) -> int:
        """Retries made so far, by all of this client's calls."""
        return self.calls.retries

    @property
    def retries_by_code(self) -> Counter[str]:
        """:attr:`retries` by status code name (``"UNAVAILABLE"``, ``"RESOURCE_EXHAUSTED"``...)."""
        return self.calls.retries_by_code

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the server -------------------------------------------------------------------------------
    def server_status(self, timeout: float | None = None) -> "ServerStatus":
        """The server's status for operators: version, engine, uptime, nodes and actors, jobs
        queued and running, stored models (what ``gradserve status`` prints)."""
        from gradserve.client.status import server_status

        return server_status(self, timeout)

    # -- models -----------------------------------------------------------------------------------
    def has_model(self, model_id: str) -> bool:
        """Whether the server has the model with this id."""
        return self.calls.call(self.calls.stub.HasModel, service_pb2.ModelRef(model_id=model_id)).present

    def upload(self, model: Model, progress: bool = False) -> str:
        """Make sure the server has ``model``; return its id (the content hash). Sends nothing
        but one small call when the server already has it. ``progress=True`` shows the upload on
        stderr when it takes longer than a second. An upload whose stream broke is resumed, not
        restarted: the server keeps what arrived (ModelInfo.received_bytes) and the retry -- or the
        next upload of the model, within the server's keep time -- sends only the rest."""
        manifest, arrays = model_manifest(model)
        calls = self.calls
        info = calls.call(calls.stub.HasModel, service_pb2.ModelRef(model_id=manifest.model_id))
        if info.present:
            return manifest.model_id
        from gradserve.client.progress import ProgressLine

        sizes = {name: int(np.asarray(a).nbytes) for name, a in arrays.items()}
        total_mib = max(1, -(-sum(sizes.values()) // chunks.CHUNK_BYTES))
        display = ProgressLine() if progress else None
        held = [dict(info.received_bytes)]  # what the server kept of an earlier, broken stream
        attempts = [0]

        def messages(start: Mapping[str, int]) -> Iterator[service_pb2.UploadChunk]:
            yield service_pb2.UploadChunk(manifest=manifest)
            done = sum(min(int(start.get(name, 0)), n) for name, n in sizes.items())
            for chunk in chunks.chunks(arrays, start=start):
                done += len(chunk.data)
                if display is not None:
                    display.update(_Uploading(min(-(-done // chunks.CHUNK_BYTES), total_mib), total_mib))
                yield service_pb2.UploadChunk(data=chunk)

        def attempt(left: float | None) -> str:
            attempts[0] += 1
            if attempts[0] > 1:  # a retry: ask what the broken stream left on the server
                again = calls.send(calls.stub.HasModel, service_pb2.ModelRef(model_id=manifest.model_id), left)
                if again.present:
                    return manifest.model_id
                held[0] = dict(again.received_bytes)
            reply = calls.send(calls.stub.UploadModel, messages(held[0]), left)
            return reply.model_id

        try:
            return calls.retrying("UploadModel", attempt)
        finally:
            if display is not None:
                display.close()

    # -- jobs -------------------------------------------------------------------------------------
    def _job_options(
        self,
        model_id: str,
        feeds: Mapping[str, Any],
        partitions: Count,
        micro_batches: Count,
        replicas: Count,
        input_grads: Iterable[str],
    ) -> tuple[service_pb2.JobOptions, dict[str, np.ndarray]]:
        """A job's options message and the feed arrays whose bytes follow it."""
        arrays = wire_arrays(feeds, "feed")
        counts = {}
        for name, value in (("partitions", partitions), ("micro_batches", micro_batches), ("replicas", replicas)):
            try:
                counts[name] = count_to_wire(value)  # "auto" travels as 0
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        options = service_pb2.JobOptions(
            model_id=model_id,
            **counts,
            input_grads=list(input_grads),
            feeds=chunks.headers(arrays),
        )
        return options, arrays

    def _model_id(self, model_or_id: Model | str, progress: bool = False) -> str:
        return model_or_id if isinstance(model_or_id, str) else self.upload(model_or_id, progress=progress)

    def submit(
        self,
        model_or_id: Model | str,
        feeds: Mapping[str, Any],
        *,
        partitions: Count = AUTO,
        micro_batches: Count = AUTO,
        replicas: Count = AUTO,
        input_grads: Iterable[str] = (),
    ) -> Job:
        """Start a job and return at once; uploads the model first if the server lacks it.

        ``partitions``, ``micro_batches``, ``replicas``: a number, or ``"auto"`` (the default) for
        the server to choose from the model, the batch and its cluster."""
        model_id = self._model_id(model_or_id)
        options, arrays = self._job_options(model_id, feeds, partitions, micro_batches, replicas, input_grads)
        calls = self.calls
        # each attempt sends a fresh request stream
        handle = calls.retrying("Submit", lambda left: calls.send(calls.stub.Submit, job_stream(options, arrays), left))
        return Job(self, handle.job_id, handle.model_id)

    def session(
        self,
        model_or_id: Model | str,
        optimizer: "Optimizer | ParamGroups",
        *,
        param_groups: Mapping[str, Mapping[str, Any]] | None = None,
        partitions: Count = AUTO,
        micro_batches: Count = AUTO,
        replicas: Count = AUTO,
        max_norm: float | None = None,
        schedule: "Schedule | None" = None,
    ) -> "RemoteSession":
        """Open a training session on the server: the model's weights and the optimizer's state
        stay on its workers, and each :meth:`RemoteSession.step` sends only its batch.

        ``optimizer``: a :mod:`gradserve.optim` optimizer (SGD, Adam, AdamW, torch's arguments);
        ``param_groups``: per-parameter overrides of its hyper-parameters, by parameter name;
        ``max_norm``: clip dL/dw by global norm before each update; ``schedule``: the learning
        rate per step, a list of (step, lr) or a callable (run here). The counts are chosen at
        the first step (``"auto"``) and kept. Uploads the model first if the server lacks it."""
        from gradserve.client.session import RemoteSession
        from gradserve.worker.optim import ParamGroups

        groups = ParamGroups.of(optimizer, param_groups, max_norm)
        model_id = self._model_id(model_or_id)
        options, _ = self._job_options(model_id, {}, partitions, micro_batches, replicas, ())
        request = service_pb2.SessionOptions(
            model_id=model_id,
            partitions=options.partitions,
            micro_batches=options.micro_batches,
            replicas=options.replicas,
            optimizer_json=json.dumps(groups.to_dict()),
            max_norm=max_norm or 0.0,
        )
        # Not retried: a retry after a lost reply would open a second session.
        calls = self.calls
        info = calls.retrying(
            "OpenSession", lambda left: calls.send(calls.stub.OpenSession, request, left), policy=NO_RETRY
        )
        return RemoteSession(self, info, groups, schedule)

    def job(self, job_id: str) -> Job:
        """The job with id ``job_id``, submitted by this client or any other -- in another process,
        before a restart -- as a :class:`Job`: ``status()``, ``watch()``, ``result()`` and
        ``cancel()`` work as for one from :meth:`submit`. Checked with one GetStatus call: an id the
        server does not know (never submitted, or expired) raises :class:`NotFound` naming it."""
        if not isinstance(job_id, str) or not job_id.strip():
            raise ValueError(f"job id must be a non-empty string, got {job_id!r}")
        status = Job(self, job_id).status()
        return Job(self, job_id, status.model_id or None)

    def gradients(
        self,
        model_or_id: Model | str,
        feeds: Mapping[str, Any],
        *,
        partitions: Count = AUTO,
        micro_batches: Count = AUTO,
        replicas: Count = AUTO,
        input_grads: Iterable[str] = (),
        progress: bool = False,
        timeout: float | None = None,
    ) -> Result:
        """The loss and dL/dw (and dL/dx for ``input_grads``) of a model on ``feeds``, computed by
        the server: the same :class:`Result` the local engines return. ``progress=True`` shows a
        progress line on stderr for jobs that take longer than a second; ``timeout`` bounds the
        job (DeadlineExceeded, and the server cancels it). Feeds of up to 1 MiB go in one Compute
        request, bigger ones stream through Run (see proto/v1/service.proto)."""
        model_id = self._model_id(model_or_id, progress=progress)
        calls = self.calls
        if not progress:
            options, arrays = self._job_options(model_id, feeds, partitions, micro_batches, replicas, input_grads)
            small = sum(a.nbytes for a in arrays.values()) <= _COMPUTE_FEED_BYTES
            request = None

            def attempt(left: float | None) -> Result:
                nonlocal request
                if self._compute and small:
                    if request is None:  # a unary request can be sent again as it is
                        request = service_pb2.JobRequest(options=options, feeds=list(chunks.chunks(arrays)))
                    try:
                        return read_result(calls.send(calls.stub.Compute, request, left))
                    except RemoteError as exc:
                        if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                            raise
                        self._compute = False  # a server older than Compute: use Run from now on
                return read_result(calls.send(calls.stub.Run, job_stream(options, arrays), left))

            return calls.retrying("Compute" if self._compute and small else "Run", attempt, timeout)
        from gradserve.client.progress import ProgressLine

        limit = calls.limit(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
        job = self.submit(
            model_id,
            feeds,
            partitions=partitions,
            micro_batches=micro_batches,
            replicas=replicas,
            input_grads=input_grads,
        )
        display = ProgressLine()
        try:
            try:
                for status in job.watch(timeout=left()):
                    display.update(status)
            except Unavailable:
                pass  # the progress stream broke: FetchResult waits for the job (and retries) all the same
            display.close()
            return job.result(timeout=left())
        except (KeyboardInterrupt, DeadlineExceeded):
            display.close()
            try:
                job.cancel()  # nobody will fetch it: free the server
            except RemoteError:
                pass
            raise

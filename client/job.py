"""A job on a gradserve server as the client sees it: its :class:`JobStatus`, and the :class:`Job`
handle that watches, fetches and cancels it (from :meth:`Client.submit <gradserve.client.remote.Client.submit>`
or, by id, :meth:`Client.job <gradserve.client.remote.Client.job>`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import grpc

from gradserve.client.errors import RemoteError, streaming
from gradserve.client.retry import NO_RETRY, RetryPolicy
from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2
from gradserve.server.events import ProgressEvent
from gradserve.server.result import Result

if TYPE_CHECKING:
    from gradserve.client.remote import Client


STATE_NAMES = {  # wire job states as the client library names them
    service_pb2.QUEUED: "queued",
    service_pb2.RUNNING: "running",
    service_pb2.DONE: "done",
    service_pb2.FAILED: "failed",
    service_pb2.CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class JobStatus:
    """Where a remote job is: ``state`` is queued, running, done, failed or cancelled; ``event``
    the progress event this status reports (or the latest); ``seconds`` when it happened."""

    job_id: str
    state: str
    steps_done: int
    steps_total: int
    event: ProgressEvent | None = None
    seconds: float = 0.0
    error_code: str = ""
    message: str = ""
    queued_seconds: float = 0.0
    running_seconds: float = 0.0
    model_id: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def describe(self) -> str:
        """One line: ``job ID: running, 3/8 steps (backward p1), queued 0.0 s, running 1.2 s``; a
        failed or cancelled job ends with its error code and message."""
        steps = f"{self.steps_done}/{self.steps_total or '?'} steps"
        if self.event is not None and self.state == "running":
            steps += f" ({self.event.phase} p{self.event.partition})"
        times = f"queued {self.queued_seconds:.1f} s" + (
            f", running {self.running_seconds:.1f} s" if self.running_seconds else ""
        )
        line = f"job {self.job_id}: {self.state}, {steps}, {times}"
        if self.error_code or (self.message and self.state in ("failed", "cancelled")):
            line += f": {self.error_code or self.state} {self.message}".rstrip()
        elif self.message:
            line += f" ({self.message})"
        return line

    @classmethod
    def from_proto(cls, msg: service_pb2.JobStatus) -> "JobStatus":
        event = None
        if msg.HasField("event"):
            e = msg.event
            event = ProgressEvent(e.phase, e.partition, e.micro_batch, e.replica, e.done, e.node)
        return cls(
            msg.job_id,
            STATE_NAMES.get(msg.state, "unknown"),
            msg.steps_done,
            msg.steps_total,
            event,
            msg.event.seconds,
            msg.error_code,
            msg.message,
            msg.queued_seconds,
            msg.running_seconds,
            msg.model_id,
        )


class Job:
    """A job on the server: from :meth:`Client.submit`, or by its id from :meth:`Client.job` (any
    client, any process, after a client restart). ``model_id``: the model it runs, when known."""

    def __init__(self, client: "Client", job_id: str, model_id: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.model_id = model_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        """The job's state and latest progress now."""
        calls = self.client.calls
        return JobStatus.from_proto(calls.call(calls.stub.GetStatus, service_pb2.JobRef(job_id=self.id)))

    def watch(self, timeout: float | None = None) -> Iterator[JobStatus]:
        """Statuses as they happen (one per progress event and state change), ending with the
        final state. ``timeout`` bounds the whole watch (DeadlineExceeded)."""
        calls = self.client.calls

        def open_watch(left: float | None) -> tuple[Any, Iterator]:
            stream = streaming(calls.send(calls.stub.Watch, service_pb2.JobRef(job_id=self.id), left))
            return next(stream, None), stream  # the first status comes at once: retried until it does

        first, stream = calls.retrying("Watch", open_watch, timeout)
        if first is None:
            return
        yield JobStatus.from_proto(first)
        for msg in stream:
            yield JobStatus.from_proto(msg)

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the job and return its Result (fetchable once: the server keeps it until it
        has been delivered whole, so a connection lost half-way is retried here -- once even with
        retries turned off -- and a later call can fetch it too). A failed job raises the error it
        failed with; a cancelled one raises :class:`Cancelled`."""
        calls = self.client.calls

        def fetch(left: float | None) -> Result:
            return read_result(calls.send(calls.stub.FetchResult, service_pb2.JobRef(job_id=self.id), left))

        policy = calls.retry if calls.retry is not NO_RETRY else _REFETCH_ONCE
        return calls.retrying("FetchResult", fetch, timeout, policy)

    def cancel(self) -> JobStatus:
        """Ask the server to stop the job (at the engine's next phase boundary)."""
        calls = self.client.calls
        return JobStatus.from_proto(calls.call(calls.stub.Cancel, service_pb2.JobRef(job_id=self.id)))


def read_result(responses: Iterator[service_pb2.ResultChunk]) -> Result:
    stream = streaming(responses)
    first = next(stream, None)
    if first is None or first.WhichOneof("part") != "header":
        raise RemoteError(grpc.StatusCode.INTERNAL, "the server's result stream does not start with a header")
    header = first.header
    asm = chunks.Assembler(what="result")
    grads = asm.declare(header.grads, "gradient")
    input_grads = asm.declare(header.input_grads, "input gradient")
    for chunk in header.data:  # Compute: a small result's bytes come with the header
        asm.add(chunk)
    for msg in stream:
        if msg.WhichOneof("part") != "data":
            raise RemoteError(grpc.StatusCode.INTERNAL, "the server's result stream has a second header")
        asm.add(msg.data)
    arrays = asm.finish()
    try:
        info = json.loads(header.info_json) if header.info_json else {}
    except json.JSONDecodeError:
        info = {}
    return Result(header.loss, {n: arrays[n] for n in grads}, {n: arrays[n] for n in input_grads}, info)


_REFETCH_ONCE = RetryPolicy(
    initial_backoff=0.0, max_backoff=0.0, max_attempts=2, codes=frozenset({grpc.StatusCode.UNAVAILABLE})
)

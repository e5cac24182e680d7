"""One job as the server keeps it: its options (parsed from the wire and checked), its state, its
progress events and the snapshots that status calls and watchers read. The registry that admits
and runs jobs is :mod:`gradserve.server.jobs`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import grpc
import numpy as np

from gradserve.server.errors import BadRequest, LimitExceeded
from gradserve.server.events import ProgressEvent
from gradserve.server.planning.auto import AUTO, Count, count_from_wire
from gradserve.server.planning.prepare import PreparedJob
from gradserve.server.result import Result
from gradserve.worker.graph import Model

if TYPE_CHECKING:
    from gradserve.server.state import JobRecord

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})
MAX_KEPT_EVENTS = 10_000  # per job; beyond this only counters and the latest event are kept


def client_of(context: Any) -> str:
    """The client a gRPC call comes from, for fair scheduling: its peer address (one connection;
    a client that opens several connections counts as several). "" when gRPC does not say."""
    try:
        return str(context.peer() or "")
    except Exception:  # noqa: BLE001 -- a context without a peer (tests, in-process calls)
        return ""


@dataclass(frozen=True)
class JobOptions:
    """How to run a job: the engine's partitioning options and the inputs whose dL/dx to return."""

    partitions: Count = AUTO  # a number, or "auto": the engine chooses (planning/auto.py)
    micro_batches: Count = AUTO
    replicas: Count = AUTO
    input_grads: tuple[str, ...] = ()

    @property
    def steps_total(self) -> int:
        """Every (partition, micro-batch, replica) runs a forward and a backward step; 0 while the
        engine has yet to choose a count (the job's progress events then carry the real total)."""
        p, m, r = self.partitions, self.micro_batches, self.replicas
        return 0 if p == AUTO or m == AUTO or r == AUTO else p * m * r * 2


@dataclass(frozen=True)
class TimedEvent:
    event: ProgressEvent
    seconds: float  # since the job started running
    steps_done: int  # finished steps, this event included


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent view of a job at one moment."""

    job_id: str
    model_id: str
    state: str
    event: TimedEvent | None
    events: int
    steps_done: int
    steps_total: int
    error_code: str
    message: str
    queued_seconds: float
    running_seconds: float


@dataclass(eq=False)
class Job:
    """One gradient job. Mutable fields are guarded by ``cond``."""

    id: str
    model_id: str
    model: Model | None
    feeds: Mapping[str, np.ndarray] | None
    options: JobOptions
    cancelled: threading.Event = field(default_factory=threading.Event)
    cond: threading.Condition = field(default_factory=threading.Condition)
    state: str = QUEUED
    events: list[TimedEvent] = field(default_factory=list)
    event_count: int = 0
    steps_done: int = 0
    last_event: TimedEvent | None = None
    result: Result | None = None
    fetched: bool = False
    error: tuple[grpc.StatusCode, str] | None = None
    on_finish: Callable[[], None] | None = None  # e.g. returns the feeds' bytes to the server's budget
    client: str = ""  # who submitted it (client_of): waiting jobs are started round-robin over clients
    claimed: bool = False  # admitted for its submitter's thread to run (JobRegistry.submit(claim=True))
    durable: bool = False  # kept in the state directory until its result is fetched or expires
    kept: bool = False  # its result is on disk, not in memory (a job finished before a restart)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    ran_as: tuple[Any, Any, Any] | None = None  # (partitions, micro_batches, replicas) the engine reported
    prepared: PreparedJob | None = None  # the model checked against the feeds at submission, for the engine

    @classmethod
    def ended_from(cls, record: "JobRecord", options: JobOptions, since: tuple[float, float]) -> "Job":
        """A job that had ended before a restart, as the state directory's ``record`` of it says:
        its result kept on disk (done) or its failure. ``since``: (wall clock, monotonic clock)
        now, to place its times on this process's clock."""
        wall, now = since
        job = cls(
            record.job_id,
            record.model_id,
            None,
            None,
            options,
            client=record.client,
            durable=True,
            state=record.state,
            kept=record.state == DONE,
        )
        job.submitted = now - (wall - record.submitted)
        job.started = job.finished = now - (wall - (record.finished or wall))
        if record.state != DONE:
            job.error = (getattr(grpc.StatusCode, record.error_code, grpc.StatusCode.UNKNOWN), record.message)
        return job

    # -- called by the engine's thread ------------------------------------------------------------
    def add_event(self, event: ProgressEvent) -> None:
        """The engine's progress callback."""
        with self.cond:
            self.event_count += 1
            self.steps_done += bool(event.done)
            timed = TimedEvent(event, time.monotonic() - (self.started or self.submitted), self.steps_done)
            self.last_event = timed
            if len(self.events) < MAX_KEPT_EVENTS:
                self.events.append(timed)
            self.cond.notify_all()

    def outcome(self) -> tuple[dict[str, Any], str, float | None]:
        """An ended job's outcome as its one log line says it: the structured fields (id, model,
        K/M/R as run, seconds queued and running, status code, loss or error), the text, and the
        seconds it ran (None if it never started)."""
        with self.cond:
            state, error, ran_as = self.state, self.error, self.ran_as
            submitted, started, finished = self.submitted, self.started, self.finished
            loss = self.result.loss if self.result is not None else None
        assert finished is not None, "the job has not ended"
        code, message = (error[0].name, error[1]) if error else ("OK", "")
        queued = (started if started is not None else finished) - submitted
        ran = finished - started if started is not None else 0.0
        k, m, r = ran_as or (self.options.partitions, self.options.micro_batches, self.options.replicas)
        fields: dict[str, Any] = {
            "job_id": self.id,
            "model_id": self.model_id[:16],
            "outcome": state,
            "code": code,
            "partitions": k,
            "micro_batches": m,
            "replicas": r,
            "queued_seconds": round(queued, 6),
            "run_seconds": round(ran, 6),
        }
        if loss is not None:
            fields["loss"] = loss
            detail = f", loss={loss:.6g}"
        else:
            fields["error"] = one_line(message)
            detail = f": {fields['error']}"
        text = (
            f"job {self.id} {state}: model {fields['model_id']} K={k} M={m} R={r}, queued {queued:.3f}s, "
            f"ran {ran:.3f}s: {code}{detail}"
        )
        return fields, text, ran if started is not None else None

    # -- readers ----------------------------------------------------------------------------------
    def snapshot(self, event_index: int | None = None) -> JobSnapshot:
        """The job now; or, with ``event_index``, the job as it was when that event happened
        (state running, the steps done by then), so a watcher replays progress in order."""
        with self.cond:
            now = time.monotonic()
            started = self.started if self.started is not None else (self.finished or now)
            state, steps_done, event = self.state, self.steps_done, self.last_event
            if event_index is not None and event_index < len(self.events):
                event = self.events[event_index]
                state, steps_done = RUNNING, event.steps_done
            code, message = self.error if self.error else (None, "")
            if state in (QUEUED, RUNNING) and self.cancelled.is_set():
                message = "cancel requested"
            return JobSnapshot(
                job_id=self.id,
                model_id=self.model_id,
                state=state,
                event=event,
                events=self.event_count,
                steps_done=steps_done,
                steps_total=(
                    self.last_event.event.total
                    if self.last_event and self.last_event.event.total
                    else self.options.steps_total
                ),
                error_code=code.name if code is not None else "",
                message=message,
                queued_seconds=started - self.submitted,
                running_seconds=((self.finished or now) - self.started) if self.started is not None else 0.0,
            )

    def watch(self, active: Callable[[], bool], poll: float) -> Iterator[JobSnapshot]:
        """The job's history, then its changes, until it finishes (or ``active()`` turns false,
        checked every ``poll`` seconds at most): each progress event in order (state running, the
        steps done by then), and each new state, the finished one last."""
        seen = 0  # progress events already given
        given_state = None
        while active():
            # The state and the event count read together: every event counted happened before
            # that state, so it is replayed first, and a finished state is the last word (read
            # apart, an event and the end could both land in between: "done" was given, then that
            # event as "running", then "done" again).
            snap = self.snapshot()
            while seen < snap.events:
                kept = seen < MAX_KEPT_EVENTS  # past the cap only the latest event is known
                replay = self.snapshot(seen) if kept else snap
                yield replay
                seen = seen + 1 if kept else snap.events
                given_state = replay.state
            if snap.state != given_state:
                yield snap
                given_state = snap.state
            if snap.state in FINISHED:
                return
            self.wait_change(seen, snap.state, poll)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or ``timeout`` seconds passed (False)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.state in FINISHED, timeout)

    def wait_change(self, seen_events: int, seen_state: str, timeout: float) -> None:
        """Block until there are more than ``seen_events`` events or the state is not ``seen_state``."""
        with self.cond:
            self.cond.wait_for(lambda: self.event_count > seen_events or self.state != seen_state, timeout)


def options_record(options: JobOptions) -> dict[str, Any]:
    """A job's options as the state directory keeps them (JSON)."""
    return {
        "partitions": options.partitions,
        "micro_batches": options.micro_batches,
        "replicas": options.replicas,
        "input_grads": list(options.input_grads),
    }


def options_from_record(record: Mapping[str, Any]) -> JobOptions:
    return JobOptions(
        record.get("partitions", AUTO),
        record.get("micro_batches", AUTO),
        record.get("replicas", AUTO),
        tuple(record.get("input_grads", ())),
    )


def one_line(message: str, limit: int = 500) -> str:
    """``message`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Bounds on how much work one job may ask for: partitions x replicas worker actors, and
# partitions x micro-batches x replicas pipeline steps.
MAX_WORKERS_PER_JOB = 64
MAX_STEPS_PER_JOB = 4096


def parse_options(partitions: int, micro_batches: int, replicas: int, input_grads: Iterable[str]) -> JobOptions:
    """Options from the wire (0 means auto, see proto/v1/service.proto), checked to be in range;
    the products are checked on the explicit counts (the engine keeps what it chooses in range)."""
    values = {
        name: count_from_wire(v)
        for name, v in (("partitions", partitions), ("micro_batches", micro_batches), ("replicas", replicas))
    }
    for name, value in values.items():
        if value != AUTO and value < 1:
            raise BadRequest(f"{name}={value} is out of range (>= 1, or 0 for auto)")
    n = {name: 1 if value == AUTO else value for name, value in values.items()}
    workers = n["partitions"] * n["replicas"]
    if workers > MAX_WORKERS_PER_JOB:
        raise LimitExceeded(f"partitions x replicas = {workers} worker actors; at most {MAX_WORKERS_PER_JOB} per job")
    steps = workers * n["micro_batches"]
    if steps > MAX_STEPS_PER_JOB:
        raise LimitExceeded(
            f"partitions x micro_batches x replicas = {steps} pipeline steps; at most {MAX_STEPS_PER_JOB} per job"
        )
    names = tuple(input_grads)
    if len(set(names)) != len(names):
        raise BadRequest(f"input_grads names an input twice: {list(names)}")
    return JobOptions(input_grads=names, **values)

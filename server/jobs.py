"""The job registry: every job the server runs, its state, progress, result and cancellation.

Jobs run on a thread pool whose size is the server's ``max_concurrent_jobs``; further jobs wait in
its queue (at most ``max_queued_jobs`` of them, beyond that a submit is refused with
RESOURCE_EXHAUSTED so a flood of jobs cannot pin unbounded feeds in memory). Each job carries a
``threading.Event`` handed to the engine as ``cancelled=``: setting it stops the job at the
engine's next phase boundary. A finished job's result is kept until it has been fetched whole once
or until it expires (``result_ttl`` seconds), whichever comes first.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import grpc
import numpy as np

from gradserve.server.errors import BadRequest, LimitExceeded, NotFound, ServiceError, Unavailable, status_for
from gradserve.server.events import ProgressEvent
from gradserve.server.result import Result
from gradserve.worker.graph import Model

log = logging.getLogger("gradserve.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})
MAX_KEPT_EVENTS = 10_000  # per job; beyond this only counters and the latest event are kept


@dataclass(frozen=True)
class JobOptions:
    """How to run a job: the engine's partitioning options and the inputs whose dL/dx to return."""

    partitions: int = 1
    micro_batches: int = 1
    replicas: int = 1
    input_grads: tuple[str, ...] = ()

    @property
    def steps_total(self) -> int:
        # Every (partition, micro-batch, replica) runs a forward and a backward step.
        return self.partitions * self.micro_batches * self.replicas * 2


@dataclass(frozen=True)
class TimedEvent:
    event: ProgressEvent
    seconds: float    # since the job started running
    steps_done: int   # finished steps, this event included


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
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None

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
                steps_total=(self.last_event.event.total if self.last_event and self.last_event.event.total
                             else self.options.steps_total),
                error_code=code.name if code is not None else "",
                message=message,
                queued_seconds=started - self.submitted,
                running_seconds=((self.finished or now) - self.started) if self.started is not None else 0.0,
            )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or ``timeout`` seconds passed (False)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.state in FINISHED, timeout)

    def wait_change(self, seen_events: int, seen_state: str, timeout: float) -> None:
        """Block until there are more than ``seen_events`` events or the state is not ``seen_state``."""
        with self.cond:
            self.cond.wait_for(lambda: self.event_count > seen_events or self.state != seen_state, timeout)


class JobRegistry:
    """Runs jobs on a bounded thread pool and keeps their records.

    ``runner(job)`` computes a job's Result (it calls the engine with ``progress=job.add_event``
    and ``cancelled=job.cancelled``); any exception it raises becomes the job's failure, mapped to
    a gRPC status by :func:`gradserve.server.errors.status_for`.
    """

    def __init__(
        self,
        runner: Callable[[Job], Result],
        *,
        max_concurrent: int = 4,
        max_queued: int = 64,
        result_ttl: float = 600.0,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self._runner = runner
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.result_ttl = result_ttl
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="gradserve-job")
        self._counter = itertools.count(1)
        self._stop_sweeper = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="gradserve-job-sweeper", daemon=True)
        self._sweeper.start()

    # -- submitting -------------------------------------------------------------------------------
    def submit(self, model_id: str, model: Model, feeds: Mapping[str, np.ndarray], options: JobOptions,
               on_finish: Callable[[], None] | None = None) -> Job:
        """Queue a job; :class:`LimitExceeded` when the queue is full, :class:`Unavailable` when
        the server is shutting down. ``on_finish`` is called once when the job ends, however."""
        self.sweep()
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down and accepts no new jobs")
            active = sum(1 for j in self._jobs.values() if j.state in (QUEUED, RUNNING))
            if active >= self.max_concurrent + self.max_queued:
                raise LimitExceeded(
                    f"{active} jobs are running or queued; the server runs at most {self.max_concurrent} at once "
                    f"and queues {self.max_queued} more -- retry later"
                )
            # Unguessable ids: a job id is all it takes to fetch a result or cancel the job.
            job_id = f"job-{next(self._counter)}-{secrets.token_hex(8)}"
            job = Job(job_id, model_id, model, feeds, options, on_finish=on_finish)
            self._jobs[job_id] = job
        log.info(
            "job %s queued: model %s, partitions=%d micro_batches=%d replicas=%d input_grads=%s feeds=%s",
            job_id, model_id[:16], options.partitions, options.micro_batches, options.replicas,
            list(options.input_grads), {k: tuple(np.shape(v)) for k, v in feeds.items()},
        )
        self._pool.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        with job.cond:
            if job.state != QUEUED:  # cancelled while queued
                return
            if job.cancelled.is_set():
                self._finish(job, CANCELLED, error=(grpc.StatusCode.CANCELLED, "job cancelled before it started"))
                return
            job.state = RUNNING
            job.started = time.monotonic()
            job.cond.notify_all()
        log.info("job %s running (queued %.3fs)", job.id, job.started - job.submitted)
        try:
            result = self._runner(job)
        except BaseException as exc:  # noqa: BLE001 -- every failure is the job's, reported to its client
            code, message = status_for(exc)
            state = CANCELLED if code == grpc.StatusCode.CANCELLED else FAILED
            with job.cond:
                self._finish(job, state, error=(code, message))
            log.info("job %s %s after %.3fs: %s: %s", job.id, state, job.finished - job.started, code.name, message)
        else:
            with job.cond:
                self._finish(job, DONE, result=result)
            log.info("job %s done in %.3fs: loss=%.6g", job.id, job.finished - job.started, result.loss)

    @staticmethod
    def _finish(job: Job, state: str, *, result: Result | None = None,
                error: tuple[grpc.StatusCode, str] | None = None) -> None:
        # Caller holds job.cond.
        job.state, job.result, job.error = state, result, error
        job.finished = time.monotonic()
        job.model = job.feeds = None  # the job no longer pins the model or the batch in memory
        if job.on_finish is not None:
            job.on_finish, on_finish = None, job.on_finish
            on_finish()
        job.cond.notify_all()

    # -- looking up -------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        """The job with this id; :class:`NotFound` for unknown or expired ids."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job '{job_id}' is not known to this server (never submitted, or expired)")
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop: a queued job is cancelled at once, a running one at its next phase."""
        job = self.get(job_id)
        job.cancelled.set()
        with job.cond:
            if job.state == QUEUED:
                self._finish(job, CANCELLED, error=(grpc.StatusCode.CANCELLED, "job cancelled before it started"))
            job.cond.notify_all()
        log.info("job %s: cancel requested (state %s)", job_id, job.state)
        return job

    def take_result(self, job: Job) -> Result:
        """The result of a finished job, handed out once; a failed job raises its failure."""
        result = self.peek_result(job)
        self.release_result(job)
        return result

    def peek_result(self, job: Job) -> Result:
        """The result of a finished job, kept for another fetch until :meth:`release_result`
        (so a stream that breaks half-way loses nothing); a failed job raises its failure."""
        with job.cond:
            if job.state != DONE:
                code, message = job.error or (grpc.StatusCode.INTERNAL, f"job {job.id} has no result")
                raise ServiceError(code, message)
            if job.result is None:
                raise NotFound(f"the result of job '{job.id}' was already fetched")
            return job.result

    def release_result(self, job: Job) -> None:
        """Drop a result that was delivered whole: it can no longer be fetched."""
        with job.cond:
            job.result, job.fetched = None, True

    def remove(self, job_id: str) -> None:
        """Forget a job (its result included)."""
        with self._lock:
            self._jobs.pop(job_id, None)

    def jobs(self) -> list[Job]:
        """Every job the registry still knows."""
        with self._lock:
            return list(self._jobs.values())

    # -- housekeeping -----------------------------------------------------------------------------
    def sweep(self) -> None:
        """Drop finished jobs whose results have expired."""
        now = time.monotonic()
        with self._lock:
            expired = [
                job_id for job_id, job in self._jobs.items()
                if job.finished is not None and now - job.finished > self.result_ttl
            ]
            for job_id in expired:
                del self._jobs[job_id]
        for job_id in expired:
            log.info("job %s expired", job_id)

    def _sweep_loop(self) -> None:
        interval = max(0.5, min(30.0, self.result_ttl / 4))
        while not self._stop_sweeper.wait(interval):
            self.sweep()

    def shutdown(self, grace: float) -> None:
        """Accept no more jobs, cancel queued ones, give running ones ``grace`` seconds to finish,
        then cancel them too and wait (briefly) for their threads."""
        with self._lock:
            self._closed = True
        self._stop_sweeper.set()
        jobs = self.jobs()
        for job in jobs:
            if job.state == QUEUED:
                self.cancel(job.id)
        deadline = time.monotonic() + max(grace, 0.0)
        running = [j for j in jobs if j.state == RUNNING]
        for job in running:
            job.wait(max(0.0, deadline - time.monotonic()))
        still = [j for j in running if j.state not in FINISHED]
        for job in still:
            log.warning("job %s still running after the grace period: cancelling it", job.id)
            job.cancelled.set()
        # Engines notice cancellation at phase boundaries; waiting longer than that would only
        # delay the exit, so the pool's threads are not joined past this point.
        for job in still:
            job.wait(5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)


# Bounds on how much work one job may ask for: partitions x replicas worker actors, and
# partitions x micro-batches x replicas pipeline steps.
MAX_WORKERS_PER_JOB = 64
MAX_STEPS_PER_JOB = 4096


def parse_options(partitions: int, micro_batches: int, replicas: int, input_grads: Iterable[str]) -> JobOptions:
    """Options from the wire (0 means 1), checked to be in range."""
    values = {"partitions": partitions or 1, "micro_batches": micro_batches or 1, "replicas": replicas or 1}
    for name, value in values.items():
        if value < 1:
            raise BadRequest(f"{name}={value} is out of range (>= 1)")
    workers = values["partitions"] * values["replicas"]
    if workers > MAX_WORKERS_PER_JOB:
        raise LimitExceeded(f"partitions x replicas = {workers} worker actors; at most {MAX_WORKERS_PER_JOB} per job")
    steps = workers * values["micro_batches"]
    if steps > MAX_STEPS_PER_JOB:
        raise LimitExceeded(f"partitions x micro_batches x replicas = {steps} pipeline steps; at most {MAX_STEPS_PER_JOB} per job")
    names = tuple(input_grads)
    if len(set(names)) != len(names):
        raise BadRequest(f"input_grads names an input twice: {list(names)}")
    return JobOptions(input_grads=names, **values)

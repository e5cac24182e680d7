"""The job registry: every job the server runs, its state, progress, result and cancellation (one
job and its options: :mod:`gradserve.server.job`).

**Admission.** At most ``max_concurrent`` jobs compute at once; the others wait in the registry (at
most ``max_queued`` of them, beyond that a submit is refused with RESOURCE_EXHAUSTED so a flood of
jobs cannot pin unbounded feeds in memory). ``max_concurrent=None`` ("auto") follows the engine:
its ``capacity()`` (the Ray engine: two jobs per CPU of the cluster's alive nodes), read
again whenever a job is queued or ends and every :data:`DISPATCH_INTERVAL` seconds, so the server
takes more jobs when nodes join and fewer when they leave; an engine without ``capacity`` (the
inline engine) runs :data:`DEFAULT_CONCURRENCY` jobs at once. An explicit number is the limit.
A job starts on a job thread, except that a synchronous call's job which can start at once runs on
the call's own thread, which would only wait for it anyway (``submit(claim=True)``).

**Fairness.** Waiting jobs are kept in one queue per client and started round-robin over the
clients, first come first served within a client (:mod:`gradserve.server.fair_queue`): one
client's 100 queued jobs delay another client's single job by at most one job per client ahead of
it. A client is a connection: the gRPC
peer address (``context.peer()``, e.g. ``ipv4:10.0.0.5:53412``), see :func:`client_of`.

**Outcomes.** How an admitted job ends -- run to its outcome, which is recorded, counted and
logged once -- and how its result is handed out: :mod:`gradserve.server.job_outcomes`.

Each job carries a ``threading.Event`` handed to the engine as ``cancelled=``: setting it stops the
job at the engine's next phase boundary. A finished job's result is kept until it has been fetched
whole once or until it expires (``result_ttl`` seconds), whichever comes first.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import grpc
import numpy as np

from gradserve.server.errors import NotFound, QueueFull, Unavailable, status_for
from gradserve.server.fair_queue import FairQueue
from gradserve.server.metrics import ServerMetrics
from gradserve.server.planning.prepare import PreparedJob
from gradserve.server.job import (
    CANCELLED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    Job,
    JobOptions,
    options_from_record,
    options_record,
)
from gradserve.server.job_outcomes import JobOutcomes
from gradserve.server.result import Result
from gradserve.worker.graph import Model

if TYPE_CHECKING:
    from gradserve.server.models import ModelStore
    from gradserve.server.state import StateDir

log = logging.getLogger("gradserve.server")

DEFAULT_CONCURRENCY = 2  # jobs at once with max_concurrent=None and an engine that has no capacity()
DISPATCH_INTERVAL = 2.0  # seconds between re-reads of the engine's capacity while jobs wait
_MAX_JOB_THREADS = 1024  # threads are made only as jobs are admitted; this bounds a runaway limit


@dataclass(frozen=True)
class RegistryCounts:
    """See :meth:`JobRegistry.counts`."""

    admitted: int  # running, or handed to a thread to run
    waiting: int
    ended: dict[str, int]
    retries: int


class JobRegistry(JobOutcomes):
    """Runs jobs, at most ``max_concurrent`` at once and fairly between clients (module docs),
    and keeps their records.

    ``runner(job)`` computes a job's Result (it calls the engine with ``progress=job.add_event``
    and ``cancelled=job.cancelled``); any exception it raises becomes the job's failure, mapped to
    a gRPC status by :func:`gradserve.server.errors.status_for`. ``max_concurrent``: a number, or
    None to follow ``runner.capacity()`` when the runner has one. ``metrics``: where jobs are
    counted (the server's; by default a registry of this object's own).
    """

    def __init__(
        self,
        runner: Callable[[Job], Result],
        *,
        max_concurrent: int | None = 4,
        max_queued: int = 64,
        result_ttl: float = 600.0,
        metrics: ServerMetrics | None = None,
        state: "StateDir | None" = None,
    ) -> None:
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self._runner = runner
        self.state = state
        self.metrics = metrics or ServerMetrics()
        self.ended: Counter[str] = Counter()  # outcome (done, failed, cancelled) -> jobs since start
        self.retries = 0  # jobs the engine ran again after losing a worker, since start
        self._capacity: Callable[[], int] | None = getattr(runner, "capacity", None) if max_concurrent is None else None
        self.max_concurrent = max_concurrent or DEFAULT_CONCURRENCY
        self.max_queued = max_queued
        self.result_ttl = result_ttl
        self._jobs: dict[str, Job] = {}
        self._waiting = FairQueue()  # jobs not started yet, taken round-robin over clients
        self._admitted = 0  # jobs handed to a thread and not yet ended
        self._reserved = 0  # admitted by submit while their feeds are being written to disk
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=_MAX_JOB_THREADS, thread_name_prefix="gradserve-job")
        self._counter = itertools.count(1)
        self._stop_sweeper = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="gradserve-job-sweeper", daemon=True)
        self._sweeper.start()

    def limit(self) -> int:
        """Jobs that may compute at once now (``max_concurrent``, or the engine's capacity)."""
        if self._capacity is not None:
            try:
                capacity = self._capacity()
            except Exception:  # noqa: BLE001 -- a cluster hiccup must not stop admissions: keep the last value
                log.exception("reading the engine's capacity failed; keeping %d", self.max_concurrent)
                return self.max_concurrent
            value = DEFAULT_CONCURRENCY if capacity is None else int(capacity)
            if value != self.max_concurrent:
                log.info("concurrent jobs: %d -> %d (the engine's capacity)", self.max_concurrent, value)
            self.max_concurrent = max(1, value)
        return self.max_concurrent

    # -- submitting -------------------------------------------------------------------------------
    def submit(
        self,
        model_id: str,
        model: Model,
        feeds: Mapping[str, np.ndarray],
        options: JobOptions,
        on_finish: Callable[[], None] | None = None,
        client: str = "",
        *,
        claim: bool = False,
        durable: bool = False,
        job_id: str | None = None,
        prepared: PreparedJob | None = None,
    ) -> Job:
        """Queue a job for ``client`` (see :func:`client_of`); :class:`LimitExceeded` when the
        queue is full, :class:`Unavailable` when the server is shutting down. ``on_finish`` is
        called once when the job ends, however.

        ``claim=True`` is for a caller that will only wait for the job (a synchronous call): when
        the job can start at once -- nothing waits and fewer than the limit run -- it is admitted
        as the next job and ``job.claimed`` is set, and the caller must then compute it in its own
        thread with :meth:`run_claimed`, sparing two thread handoffs. Otherwise it is queued as usual.

        ``durable=True`` (an asynchronous Submit, whose client may be gone when it ends): with a
        state directory the job and its feeds are written to disk before this returns, so a restart
        runs it again and keeps its result until fetched. Synchronous jobs are not written: their
        caller still holds the feeds and its client retries them. ``job_id``: a job recovered
        from the state directory keeps its id (and its files). ``prepared``: the job as the
        submitter prepared it (checking the model against the feeds), handed to the engine so that
        it does not prepare it again."""
        self.sweep()
        limit = self.limit()
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down and accepts no new jobs")
            active = self._reserved + sum(1 for j in self._jobs.values() if j.state in (QUEUED, RUNNING))
            if active >= limit + self.max_queued:
                raise QueueFull(
                    f"{active} jobs are running or queued; the server runs at most {limit} at once "
                    f"and queues {self.max_queued} more -- retry later"
                )
            # Unguessable ids: a job id is all it takes to fetch a result or cancel the job.
            recovered = job_id is not None
            job_id = job_id or f"job-{next(self._counter)}-{secrets.token_hex(8)}"
            job = Job(
                job_id,
                model_id,
                model,
                feeds,
                options,
                on_finish=on_finish,
                client=client,
                durable=durable and self.state is not None,
                prepared=prepared,
            )
            write = job.durable and not recovered
            self._reserved += write
        if write:  # outside the lock: other submits go on while the feeds reach the disk
            try:
                self._state_dir.add_job(job_id, model_id, options_record(options), client, feeds)
            finally:
                with self._lock:
                    self._reserved -= 1
        with self._lock:
            self._jobs[job_id] = job
            if claim and not self._waiting and self._admitted < limit:
                self._admit(job)  # what _dispatch would do next, minus the job thread
                job.claimed = True
            else:
                self._waiting.add(job)
        if log.isEnabledFor(logging.DEBUG):  # INFO has the job's one outcome line (_ended)
            log.debug(
                "job %s queued: model %s, partitions=%s micro_batches=%s replicas=%s input_grads=%s feeds=%s",
                job_id,
                model_id[:16],
                options.partitions,
                options.micro_batches,
                options.replicas,
                list(options.input_grads),
                {k: tuple(np.shape(v)) for k, v in feeds.items()},
            )
        if not job.claimed:
            self._dispatch(limit)
        return job

    def recover(self, store: "ModelStore") -> int:
        """Take back what the state directory kept (at start, before serving): queued and running
        jobs run again under their ids; finished ones keep their results, or their failures, until
        fetched or expired. Returns how many jobs run again."""
        if self.state is None:
            return 0
        wall, now = time.time(), time.monotonic()
        again = 0
        for record in self.state.jobs():
            options = options_from_record(record.options)
            if record.state in (QUEUED, RUNNING):
                try:
                    model, feeds = store.get(record.model_id), self.state.load_feeds(record.job_id)
                    self.submit(
                        record.model_id, model, feeds, options, client=record.client, durable=True, job_id=record.job_id
                    )
                    again += 1
                    continue
                except Exception as exc:  # noqa: BLE001 -- its model or feeds are gone: it fails, saying why
                    code, message = status_for(exc)
                    message = f"could not run again after a restart: {message}"
                    self.state.set_state(record.job_id, FAILED, code.name, message)
                    record = dataclasses.replace(
                        record, state=FAILED, error_code=code.name, message=message, finished=wall
                    )
            job = Job.ended_from(record, options, since=(wall, now))
            with self._lock:
                self._jobs[job.id] = job
        if again:
            log.info("%d jobs accepted before the restart run again", again)
        return again

    def run_claimed(self, job: Job) -> None:
        """Compute a job that :meth:`submit` admitted with ``job.claimed`` in the calling thread, as
        a job thread would (one cancelled meanwhile ends at once). Call it exactly once per claimed job."""
        assert job.claimed
        self._run(job)

    def _dispatch(self, limit: int | None = None) -> None:
        """Start waiting jobs while fewer than the limit run: the next client in turn gives its
        oldest job, then goes to the back of the turn order."""
        limit = self.limit() if limit is None else limit
        start = []
        with self._lock:
            while self._admitted < limit and self._waiting and not self._closed:
                job = self._waiting.pop()
                if job.state != QUEUED:  # cancelled while waiting
                    self._waiting.dropped(job)
                    continue
                self._admit(job)
                start.append(job)
        for job in start:
            self._pool.submit(self._run, job)

    def _admit(self, job: Job) -> None:
        """Count ``job`` as started (caller holds the lock); its thread ends with :meth:`_run`'s bookkeeping."""
        self._waiting.started(job)
        self._admitted += 1

    def _run(self, job: Job) -> None:
        try:
            self._compute(job)
        finally:
            with self._lock:
                self._admitted -= 1
                self._waiting.ended(job)
            self._dispatch()

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
        ended = False
        with job.cond:
            if job.state == QUEUED:
                self._finish(job, CANCELLED, error=(grpc.StatusCode.CANCELLED, "job cancelled before it started"))
                ended = True
            job.cond.notify_all()
        if ended:
            self._keep(job, CANCELLED, error=job.error)
            self._ended(job)
        log.info("job %s: cancel requested (state %s)", job_id, job.state)
        return job

    def remove(self, job_id: str) -> None:
        """Forget a job (its result included)."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is not None and job.durable:
            self._state_dir.forget_job(job_id)

    def jobs(self) -> list[Job]:
        """Every job the registry still knows."""
        with self._lock:
            return list(self._jobs.values())

    def counts(self) -> "RegistryCounts":
        """One consistent read of what the status screen and the tests need: jobs admitted to run
        now, jobs waiting, ended jobs by outcome, and retries after lost workers."""
        with self._lock:
            return RegistryCounts(self._admitted, len(self._waiting), dict(self.ended), self.retries)

    def dispatch(self) -> None:
        """Start waiting jobs now if the limit (re-read from the engine) allows: what the registry
        does on every submit, every job's end and every ``DISPATCH_INTERVAL`` seconds."""
        self._dispatch()

    # -- housekeeping -----------------------------------------------------------------------------
    def sweep(self) -> None:
        """Drop finished jobs whose results have expired."""
        now = time.monotonic()
        with self._lock:
            expired = [
                job_id
                for job_id, job in self._jobs.items()
                if job.finished is not None and now - job.finished > self.result_ttl
            ]
            gone = [self._jobs.pop(job_id) for job_id in expired]
        for job in gone:
            if job.durable:
                self._state_dir.forget_job(job.id)
            log.info("job %s expired", job.id)

    def _sweep_loop(self) -> None:
        # Also re-reads the engine's capacity while jobs wait: nodes that joined take them at once.
        interval = max(0.5, min(30.0, self.result_ttl / 4))
        last_sweep = time.monotonic()
        while not self._stop_sweeper.wait(min(interval, DISPATCH_INTERVAL)):
            if self._waiting:
                self._dispatch()
            if time.monotonic() - last_sweep >= interval:
                self.sweep()
                last_sweep = time.monotonic()

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

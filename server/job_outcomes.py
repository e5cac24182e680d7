"""How a registry's job ends: run to its outcome, that outcome recorded (on disk too for a durable
job), counted and logged once, and its result handed out -- the part of
:class:`~gradserve.server.jobs.JobRegistry` that takes over once a job is admitted.

**Outcomes.** Every job that ends -- done, failed or cancelled, whether it ran or not -- is counted
once in the server's metrics and logged in one INFO line (:meth:`JobOutcomes._ended`): its id,
model, partitions/micro-batches/replicas as run, seconds queued and running, and the status code.
A failure the server handled (bad input, a limit, a cancel) gets that line only; a traceback is
logged only for an unexpected error (:func:`gradserve.server.errors.status_for`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable

import grpc

from gradserve.server.errors import NotFound, ServiceError, WorkerLost, status_for
from gradserve.server.job import CANCELLED, DONE, FAILED, QUEUED, RUNNING, Job
from gradserve.server.metrics import ServerMetrics
from gradserve.server.result import Result

if TYPE_CHECKING:
    from gradserve.server.state import StateDir

log = logging.getLogger("gradserve.server")


class JobOutcomes:
    """How jobs end (module docs); mixed into :class:`~gradserve.server.jobs.JobRegistry`, which
    supplies ``_runner``, ``metrics``, ``state``, ``ended``, ``retries``, ``_lock`` and ``_closed``
    (declared here for the type checker)."""

    _runner: Callable[[Job], Result]
    metrics: ServerMetrics
    state: StateDir | None
    ended: Counter[str]
    retries: int
    _lock: threading.Lock
    _closed: bool

    @property
    def _state_dir(self) -> "StateDir":
        """Where durable jobs are recorded (a job is durable only when there is a state directory)."""
        assert self.state is not None
        return self.state

    def _compute(self, job: Job) -> None:
        """Run an admitted job to its end and record that end (one cancelled meanwhile ends at once)."""
        with job.cond:
            if job.state != QUEUED:  # cancelled while queued
                return
            if job.cancelled.is_set():
                self._finish(job, CANCELLED, error=(grpc.StatusCode.CANCELLED, "job cancelled before it started"))
                ended = True
            else:
                ended = False
                job.state = RUNNING
                job.started = started = time.monotonic()
                job.cond.notify_all()
        if ended:
            self._ended(job)
            return
        self.metrics.queue_seconds.observe(started - job.submitted)
        log.debug("job %s running (queued %.3fs)", job.id, started - job.submitted)
        try:
            result = self._runner(job)
        except BaseException as exc:  # noqa: BLE001 -- every failure is the job's, reported to its client
            code, message = status_for(exc)  # logs a traceback for unexpected errors only
            state = CANCELLED if code == grpc.StatusCode.CANCELLED else FAILED
            self._count_retries(self._lost_worker_retries(exc))
            self._keep(job, state, error=(code, message))
            with job.cond:
                self._finish(job, state, error=(code, message))
        else:
            self._count_retries(int((result.info or {}).get("retries", 0) or 0))
            try:
                self._keep(job, DONE, result=result)  # on disk before anyone can fetch it
            except BaseException as exc:  # noqa: BLE001 -- e.g. the disk budget: the job fails, saying why
                code, message = status_for(exc)
                with job.cond:
                    self._finish(job, FAILED, error=(code, message))
            else:
                with job.cond:
                    self._finish(job, DONE, result=result)
        self._ended(job)

    def _keep(
        self, job: Job, state: str, *, result: Result | None = None, error: tuple[grpc.StatusCode, str] | None = None
    ) -> None:
        """Write a durable job's end to the state directory -- except a cancel that comes from
        shutting down: that job stays queued on disk, to run again at the next start."""
        if not job.durable or (self._closed and state == CANCELLED):
            return
        if result is not None:
            self._state_dir.save_result(job.id, result)
        else:
            self._state_dir.set_state(job.id, state, error[0].name if error else "", error[1] if error else "")

    @staticmethod
    def _lost_worker_retries(exc: BaseException) -> int:
        """Retries behind a failure: a job that lost a worker on every run the engine allows fails
        with :class:`WorkerLost` (the engine tells a lost worker from other failures, see
        :func:`gradserve.server.ray_engine.is_worker_loss`), saying how often it ran again."""
        return exc.retries if isinstance(exc, WorkerLost) else 0

    def _count_retries(self, n: int) -> None:
        if n > 0:
            with self._lock:
                self.retries += n
            self.metrics.worker_retries.inc(n)

    @staticmethod
    def _finish(
        job: Job, state: str, *, result: Result | None = None, error: tuple[grpc.StatusCode, str] | None = None
    ) -> None:
        # Caller holds job.cond, and calls _ended(job) once it has released it.
        job.state, job.result, job.error = state, result, error
        job.finished = time.monotonic()
        if result is not None:
            info = result.info or {}
            job.ran_as = tuple(
                info.get(k, getattr(job.options, k)) for k in ("partitions", "micro_batches", "replicas")
            )
        job.model = job.feeds = None  # the job no longer pins the model or the batch in memory
        if job.on_finish is not None:
            on_finish = job.on_finish
            job.on_finish = None
            on_finish()
        job.cond.notify_all()

    def _ended(self, job: Job) -> None:
        """Count and log a job that has just ended: its one outcome line (see the module docs)."""
        fields, text, ran = job.outcome()
        with self._lock:
            self.ended[fields["outcome"]] += 1
        self.metrics.job_ended(fields["outcome"], fields["code"], ran)
        log.info("%s", text, extra={"fields": fields})

    def take_result(self, job: Job) -> Result:
        """The result of a finished job, handed out once; a failed job raises its failure."""
        result = self.peek_result(job, stored=False)
        self.release_result(job)
        return result

    def peek_result(self, job: Job, *, stored: bool = True) -> Result:
        """The result of a finished job, kept for another fetch until :meth:`release_result`
        (so a stream that breaks half-way loses nothing); a failed job raises its failure. For a
        ``stored`` job (FetchResult) that failure is final: fetching again gives the same answer,
        even an UNAVAILABLE one (a job that kept losing workers), which a synchronous caller
        instead retries by running the job again."""
        with job.cond:
            if job.state != DONE:
                code, message = job.error or (grpc.StatusCode.INTERNAL, f"job {job.id} has no result")
                raise ServiceError(code, message, retry_after=-1.0 if stored else None)
            if job.result is None and job.kept and not job.fetched:
                return self._state_dir.load_result(job.id)  # finished before a restart: read from disk
            if job.result is None:
                raise NotFound(f"the result of job '{job.id}' was already fetched")
            return job.result

    def release_result(self, job: Job) -> None:
        """Drop a result that was delivered whole: it can no longer be fetched."""
        with job.cond:
            job.result, job.fetched = None, True
        if job.durable:
            self._state_dir.forget_job(job.id)

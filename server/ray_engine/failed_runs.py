"""What becomes of a job's run that failed: its queued steps stopped and its state freed on every
actor it used (actors that died dropped from the pool), every result of its calls read so that Ray
reports none as unhandled, the user's error taken out of Ray's wrapping, and whether a run that lost
a worker (:func:`.worker_loss.is_worker_loss`) is run again or the job fails with
:class:`~gradserve.server.errors.WorkerLost`.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import ray

from gradserve.server.errors import WorkerLost
from gradserve.server.events import JobCancelled
from gradserve.server.ray_engine.placement import CONTROL_TIMEOUT, answers
from gradserve.server.ray_engine.submit import Deployment

log = logging.getLogger("gradserve.server.ray_engine.engine")  # one logger for the engine's lines

_STEP_DRAIN_TIMEOUT = 300.0  # seconds for an actor to finish or skip a failed job's queued steps


def abort(job_id: str, dep: Deployment, refs: list, drop_actors: Callable[[list], None]) -> None:
    """Stop the job's queued steps and free its state on every actor it used; ``drop_actors``
    forgets those that died, so the next job gets fresh ones. ``refs``: every result of the job's
    calls, read here so that none holding an error is left for Ray to report as unhandled."""
    actors = list({id(a): a for row in dep.actors for a in row}.values())
    # Asking every actor, not only the one whose error surfaced, finds each that died: a job
    # that read a lost result (an ObjectLostError) does not say whose it was.
    cancels = [actor.cancel.remote(job_id) for actor in actors]  # takes effect at once
    dead = [a for a, ref in zip(actors, cancels) if not answers(ref, CONTROL_TIMEOUT)]
    alive = [a for a in actors if all(a is not d for d in dead)]
    ends = [actor.end_job.remote(job_id) for actor in alive]  # runs after the skipped steps
    dead += [a for a, ref in zip(alive, ends) if not answers(ref, _STEP_DRAIN_TIMEOUT)]
    if dead:
        drop_actors(dead)
    # Every call has ended now (end_job ran after it, or its actor is dead or was just killed,
    # which fails it at once): reading the results cannot wait long. Unread, the errors of the
    # calls that needed a dead actor's results would be logged by Ray as unhandled tracebacks.
    _drain(refs, CONTROL_TIMEOUT)
    log.info("job %s aborted; per-job state freed on %d actors, %d gone", job_id, len(actors) - len(dead), len(dead))


def next_retry(
    exc: BaseException, job_id: str, retries: int, max_retries: int, cancelled: threading.Event | None
) -> int:
    """The retry count of the next run of a job whose run ``retries`` lost a worker (``exc``);
    raises :class:`WorkerLost` once ``max_retries`` are spent, JobCancelled if the job was
    cancelled meanwhile (no point placing it again)."""
    if cancelled is not None and cancelled.is_set():
        raise JobCancelled("job cancelled") from None
    lines = str(exc).strip().splitlines()
    what = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if retries >= max_retries:
        raise WorkerLost(
            f"the job lost a Ray worker on each of its {retries + 1} runs (last: {what}); "
            "the cluster is losing workers or nodes, try again later",
            retries,
        ) from exc
    log.warning(
        "job %s lost a worker (%s); running it again on fresh workers (%d/%d)", job_id, what, retries + 1, max_retries
    )
    return retries + 1


def unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error (a GraphError naming the node, usually),
    through every task it went through (a nested call's error reaches the driver wrapped twice)."""
    while isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    return exc


def _drain(refs: list, timeout: float) -> None:
    """Read each of a failed job's ``refs`` that has finished within ``timeout`` seconds, ignoring
    failures (the job's was reported already), so that Ray logs none as an unhandled error."""
    unique = list(dict.fromkeys(refs))  # ray.wait takes each ref once, and at least one
    if not unique:
        return
    finished, _ = ray.wait(unique, num_returns=len(unique), timeout=timeout, fetch_local=False)
    for ref in finished:
        try:
            ray.get(ref, timeout=timeout)
        except Exception:  # noqa: BLE001 -- a result that failed, or was lost with its node: nothing to report
            pass

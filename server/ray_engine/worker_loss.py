"""Which failures mean a job lost a Ray worker: the one test the engine's retry loop applies.

Ray reports a dead worker differently depending on when it died and who noticed: the actor's own
calls fail with :class:`~ray.exceptions.ActorDiedError` (or :class:`~ray.exceptions.ActorUnavailableError`
while Ray cannot tell yet), a call that read one of its results fails with a
:class:`~ray.exceptions.RayTaskError` whose cause is that error, a result stored on a node that went
away is an :class:`~ray.exceptions.ObjectLostError` (:class:`~ray.exceptions.OwnerDiedError`,
:class:`~ray.exceptions.ObjectReconstructionFailedError`, ...), and a worker or node that crashed
gives :class:`~ray.exceptions.WorkerCrashedError` or :class:`~ray.exceptions.NodeDiedError`.
Every one of them means the same for a job: its steps are pure functions of their inputs, so it can
run again, from the start, on workers that are alive.

Not losses: an actor whose constructor raised (``actor_init_failed``: a new one would raise too), an
object freed or dropped by reference counting (a bug, which a retry would only hide), and
:class:`~ray.exceptions.GetTimeoutError` (an actor that does not answer a control call in time is
dropped where that happens, see :func:`.failed_runs.abort`; a job whose workers did not start within
their time is a DEADLINE_EXCEEDED, not a loss).
"""

from __future__ import annotations

from ray import exceptions as rx

from gradserve.server.errors import WorkerLost

__all__ = ["is_worker_loss"]

_LOSSES = (rx.RayActorError, rx.ObjectLostError, rx.WorkerCrashedError, rx.NodeDiedError, WorkerLost)
_NOT_LOSSES = (rx.ObjectFreedError, rx.ReferenceCountingAssertionError)


def is_worker_loss(exc: BaseException) -> bool:
    """Whether ``exc`` says that a worker (an actor's process, or its node) died under the job,
    directly or as the cause of a task that read one of its results (module docs)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _LOSSES) and not isinstance(current, _NOT_LOSSES):
            return not (isinstance(current, rx.RayActorError) and current.actor_init_failed)
        # A task that read a dead worker's result fails with that error as its cause (Ray nests
        # one RayTaskError in another when the failure went through several tasks).
        current = current.cause if isinstance(current, rx.RayTaskError) else None
    return False

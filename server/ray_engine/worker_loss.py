"""Which failures mean a job lost a Ray worker: the one test the engine's retry loop applies
(:func:`is_worker_loss`); and which mean that its workers cannot start at all (:func:`start_failure`).

Ray reports a dead worker differently depending on when it died and who noticed: the actor's own
calls fail with :class:`~ray.exceptions.ActorDiedError` (or :class:`~ray.exceptions.ActorUnavailableError`
while Ray cannot tell yet), a call that read one of its results fails with a
:class:`~ray.exceptions.RayTaskError` whose cause is that error, a result stored on a node that went
away is an :class:`~ray.exceptions.ObjectLostError` (:class:`~ray.exceptions.OwnerDiedError`,
:class:`~ray.exceptions.ObjectReconstructionFailedError`, ...), and a worker or node that crashed
gives :class:`~ray.exceptions.WorkerCrashedError` or :class:`~ray.exceptions.NodeDiedError`; a
stage that calls another (a tiny job's nested calls) whose name Ray has already freed raises
:class:`~gradserve.worker.actor.PeerLost`.
Every one of them means the same for a job: its steps are pure functions of their inputs, so it can
run again, from the start, on workers that are alive.

Not losses: an actor whose constructor raised (``actor_init_failed``: gradserve or a dependency
missing on its node, a kernel cache it cannot write...; a new one would raise too), which fails the
job at once, without a retry, as :class:`~gradserve.server.errors.WorkersCannotStart`
(FAILED_PRECONDITION) naming the node and the constructor's error (:func:`start_failure`, applied
where the pool waits for new actors, :meth:`.pool.WorkerPool.spawn`, which keeps none of them); an
object freed or dropped by reference counting (a bug, which a retry would only hide); and
:class:`~ray.exceptions.GetTimeoutError` (an actor that does not answer a control call in time is
dropped where that happens, see :func:`.failed_runs.abort`; a job whose workers did not start within
their time is a DEADLINE_EXCEEDED, not a loss).
"""

from __future__ import annotations

import re
from typing import Iterator

from ray import exceptions as rx

from gradserve.server.errors import WorkerLost, WorkersCannotStart
from gradserve.worker.actor import PeerLost

__all__ = ["is_worker_loss", "start_failure"]

_LOSSES = (rx.RayActorError, rx.ObjectLostError, rx.WorkerCrashedError, rx.NodeDiedError, WorkerLost, PeerLost)
_NOT_LOSSES = (rx.ObjectFreedError, rx.ReferenceCountingAssertionError)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the task's name in its messages
_PREAMBLE = "The actor died because of an error raised in its creation task, "  # ActorDiedError's own words
_NODE = re.compile(r"\bip=([^,)\s]+)")  # the failed task's header: "ray::StageHost.__init__() (pid=1, ip=10.0.0.7, ..."
# Where a traceback starts in Ray's text: Ray replaces each "Traceback ..." line of the worker's
# traceback by that header, which also opens the text of a failed import (Ray's stand-in actor).
_TRACEBACK = re.compile(r"ray::\S*\(\) \(pid=|^Traceback \(most recent call last\):")
_REASON_CHARS = 300  # a reason longer than this is cut: the message stays one readable line


def is_worker_loss(exc: BaseException) -> bool:
    """Whether ``exc`` says that a worker (an actor's process, or its node) died under the job,
    directly or as the cause of a task that read one of its results (module docs)."""
    for current in _chain(exc):
        if isinstance(current, _LOSSES) and not isinstance(current, _NOT_LOSSES):
            return not (isinstance(current, rx.RayActorError) and current.actor_init_failed)
    return False


def start_failure(exc: BaseException) -> WorkersCannotStart | None:
    """The :class:`~gradserve.server.errors.WorkersCannotStart` that ``exc`` means when it says an
    actor's constructor raised (directly or as the cause of a task), else None.

    Ray keeps the constructor's error as text only (the actor error's ``error_msg``: the creation
    task's traceback under a header with the worker's pid and ip). The node is that ip; the reason
    is the last exception line of the last traceback, "Type: message", its first line, trimmed.
    """
    for current in _chain(exc):
        if isinstance(current, rx.RayActorError) and current.actor_init_failed:
            text = _ANSI.sub("", current.error_msg or "").removeprefix(_PREAMBLE)
            node = _NODE.search(text)
            return WorkersCannotStart(node.group(1) if node else "(unknown)", _reason(text))
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then the errors it was caused by: a task that read a dead worker's result fails with
    that error as its cause (Ray nests one RayTaskError in another when the failure went through
    several tasks)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.cause if isinstance(current, rx.RayTaskError) else None


def _reason(text: str) -> str:
    """The exception a Ray creation-task error reports, as "Type: message" on one line: the first
    unindented line after the frames of the text's last traceback (chained exceptions and a failed
    import's own traceback come before it); the text's last line when it holds none."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if _TRACEBACK.search(line)]
    after = lines[starts[-1] + 1 :] if starts else []
    reason = next((line for line in after if not line[0].isspace()), None)
    if reason is None:  # no traceback (or one cut short): what Ray said
        reason = lines[-1] if lines and not starts else "the actor's constructor raised (no traceback given)"
    reason = reason.strip()
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 3] + "..."

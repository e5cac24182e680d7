"""What an engine reports while it runs a job, and how a job is stopped from outside."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a job: ``phase`` is "forward" or "backward" of ``partition`` (0-based) on
    ``micro_batch``/``replica``; ``done`` is False when it starts and True when it finishes."""

    phase: str
    partition: int
    micro_batch: int = 0
    replica: int = 0
    done: bool = True
    node: str = ""  # the cluster node that ran it, when known
    total: int = 0  # how many steps the job has in all, when known (partitions may be fewer than asked)


Progress = Optional[Callable[[ProgressEvent], None]]


class JobCancelled(Exception):
    """The job was cancelled before it finished."""


def check_cancelled(cancelled: Optional[threading.Event]) -> None:
    if cancelled is not None and cancelled.is_set():
        raise JobCancelled("job cancelled")
